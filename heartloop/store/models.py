"""Database tables (SQLAlchemy 2 declarative). Times are UTC epoch seconds (portable, sortable)."""

from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One stored DICOM instance (its file lives under the storage root at `path`)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage root
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[float] = mapped_column(Float)
    header_json: Mapped[str] = mapped_column(Text)  # the parsed header (geometry, references)


class Series(Base):
    """A series as it arrives; `state` is OPEN until assembled (CT) or linked (RT objects)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="OPEN", index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: For RT objects: the case (CT) they were linked to by frame of reference.
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), nullable=True)


class Case(Base):
    """One planning CT series and everything linked to it."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ct_series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64))  # never logged
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(24), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_slices: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class CaseEvent(Base):
    """Append-only history of case state changes."""

    __tablename__ = "case_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(24), nullable=True)
    to_state: Mapped[str] = mapped_column(String(24))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Quarantined(Base):
    """A dataset we refused, kept with the reason (file under ``quarantine/``)."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[float] = mapped_column(Float)
    calling_ae: Mapped[str] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(String(512))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Job(Base):
    """Durable work item. A RUNNING job whose lease expired (crash) is claimed again."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_due", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload_json: Mapped[str] = mapped_column(Text, default="{}")
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    not_before: Mapped[float] = mapped_column(Float)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class OutboxItem(Base):
    """An output waiting to be (or already) C-STOREd to a destination."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_dest_sop"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage root
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), nullable=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DoseResult(Base):
    """Dose metrics of one structure of a case on the case's dose (one row per computation).

    `label` says which structure: ``"predicted"``, ``"corrected"``, ``"clinical"``,
    ``"model:000007"`` ...; `metrics_json` holds every scalar metric (volume_cc, mean_gy, min_gy,
    max_gy, d2_gy, d98_gy, v5_pct ...) and the DVH; `mean_gy` is repeated as a column for queries.
    """

    __tablename__ = "dose_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    roi_name: Mapped[str] = mapped_column(String(64), default="")
    #: The RTSTRUCT the structure was received or sent as, when there is one.
    rtstruct_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    #: JSON list of the SOP Instance UIDs of the RTDOSE instances the dose was read from.
    rtdose_sop_instance_uids: Mapped[str] = mapped_column(Text, default="[]")
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    metrics_json: Mapped[str] = mapped_column(Text)
    mean_gy: Mapped[float | None] = mapped_column(Float, nullable=True)
    computed_at: Mapped[float] = mapped_column(Float)


class DoseDelta(Base):
    """Difference of the dose metrics of two structures of a case (`other` minus `reference`)."""

    __tablename__ = "dose_deltas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    reference_label: Mapped[str] = mapped_column(String(64))
    other_label: Mapped[str] = mapped_column(String(64))
    reference_result_id: Mapped[int | None] = mapped_column(ForeignKey("dose_results.id"), nullable=True)
    other_result_id: Mapped[int | None] = mapped_column(ForeignKey("dose_results.id"), nullable=True)
    delta_json: Mapped[str] = mapped_column(Text)
    mean_delta_gy: Mapped[float | None] = mapped_column(Float, nullable=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    #: JSON list of sentences: why the delta was flagged (empty when it was not).
    reasons: Mapped[str] = mapped_column(Text, default="[]")
    computed_at: Mapped[float] = mapped_column(Float)


class Prediction(Base):
    """A predicted heart of a case: mask file (on the CT grid) and the Heart_AI RTSTRUCT kept for review."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(32))
    mask_path: Mapped[str] = mapped_column(String(512))  # relative to the storage root (.npz)
    rtstruct_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    rtstruct_sop_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    voxels: Mapped[int] = mapped_column(Integer)
    volume_cc: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class Correction(Base):
    """A reviewer's correction: painted foreground/background (.npz, on the CT grid) of a prediction.

    `kind` is ``"sparse"`` (painted strokes: only painted voxels are labels) or ``"dense"`` (a
    whole contour, e.g. a clinical RTSTRUCT from the TPS). `split` is the training/validation
    assignment, fixed once given.
    """

    __tablename__ = "corrections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage root (.npz: fg, bg, prediction)
    corrected_by: Mapped[str] = mapped_column(String(128))
    split: Mapped[str | None] = mapped_column(String(8), nullable=True)
    fg_voxels: Mapped[int] = mapped_column(Integer)
    bg_voxels: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    #: Active annotation time in the viewer (gaps over 20 s excluded), when it came from the UI.
    active_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Dice(prediction, corrected contour) at save time (None at cold start).
    dice: Mapped[float | None] = mapped_column(Float, nullable=True)


class User(Base):
    """A person who may use the review UI. `role` is ``reviewer`` or ``admin`` (physicist/admin)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    #: Person name for DICOM outputs (``Family^Given``); empty: the username is used.
    display_name: Mapped[str] = mapped_column(String(128), default="")
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)


class AuditEntry(Base):
    """One row of the append-only audit log, chained: `hash` = sha256(`prev_hash` + the row's content)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(64))  # username, or "system"
    action: Mapped[str] = mapped_column(String(64))  # e.g. "login", "view_case", "save_correction"
    target: Mapped[str] = mapped_column(String(128), default="")  # e.g. "case:12", "model:000003"
    detail_json: Mapped[str] = mapped_column(Text, default="{}")
    #: Unique: two writers appending at once cannot both chain onto the same row (one retries).
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class InteractionEvent(Base):
    """A reviewer's interaction with a case in the viewer (paint, scroll, window, ...), for timing."""

    __tablename__ = "interaction_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    username: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float)  # epoch seconds, as the browser saw it
    kind: Mapped[str] = mapped_column(String(32))
