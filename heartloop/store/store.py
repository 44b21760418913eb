"""`Store`: the one door to the database and the instance files.

Every method is a short transaction; objects returned are detached snapshots.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from sqlalchemy import Engine, and_, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from heartloop.core.states import CaseState, JobState, OutboxState
from heartloop.store.db import make_engine, migrate, session_factory
from heartloop.store.files import InstanceFiles
from heartloop.store.people import ReviewRecords
from heartloop.store.models import (
    Case,
    CaseEvent,
    Correction,
    DoseDelta,
    DoseResult,
    Instance,
    Job,
    OutboxItem,
    Prediction,
    Quarantined,
    Series,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewInstance:
    """What the store needs to know about a received instance (parsed by dicom_node)."""

    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str | None
    patient_id: str
    header: dict[str, Any]

    def __post_init__(self) -> None:
        for name in ("sop_instance_uid", "sop_class_uid", "study_uid", "series_uid"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")


@dataclass(frozen=True)
class StoredInstance:
    created: bool  # False: the SOP Instance UID was already stored (duplicate, stored once)
    relpath: str
    case_id: int | None


class Store(ReviewRecords):
    """Database + files. Build once per process; safe to share between threads."""

    def __init__(self, root: Path, database_url: str, *, migrate_schema: bool = True) -> None:
        self.files = InstanceFiles(root)
        self.engine: Engine = make_engine(database_url)
        if migrate_schema:
            migrate(self.engine)
        self._sessions = session_factory(self.engine)
        # The receive hot path: statements built once (building them costs more than running them).
        insert = sqlite_insert if self.engine.dialect.name == "sqlite" else pg_insert
        self._insert_instance = insert(Instance.__table__).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        series = Series.__table__
        self._bump_series = (
            update(series)
            .where(series.c.series_uid == bindparam("uid"), series.c.state == "OPEN")
            .values(instance_count=series.c.instance_count + 1, last_received_at=bindparam("now"))
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._write_lock: Any = threading.Lock()
        self._raw_sqlite: sqlite3.Connection | None = None
        if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            # Receiving processes share one SQLite file. SQLite makes a writer that finds it locked
            # sleep in its busy handler (whole milliseconds, growing); a kernel lock wakes the next
            # writer the instant the last one commits. Threads of this process queue on the thread
            # lock first (an flock belongs to the open file, not to a thread).
            self._write_lock = _ProcessWriteLock(self.engine.url.database + ".writelock")
            self._raw_sqlite = sqlite3.connect(self.engine.url.database, timeout=30, isolation_level=None,
                                               check_same_thread=False)  # used under _write_lock only
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
                self._raw_sqlite.execute(f"PRAGMA {pragma}")
            self._raw_insert = _positional_sql(self._insert_instance, self.engine)
            self._raw_bump = _positional_sql(self._bump_series, self.engine)

    @classmethod
    def from_settings(cls, settings: Any, *, migrate_schema: bool = True) -> "Store":
        root = settings.storage_root
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, settings.database_url, migrate_schema=migrate_schema)

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        if isinstance(self._write_lock, _ProcessWriteLock):
            self._write_lock.close()
        if self._raw_sqlite is not None:
            self._raw_sqlite.close()
            self._raw_sqlite = None
        self.engine.dispose()

    # -- receiving --------------------------------------------------------------------------------
    def instance_exists(self, sop_instance_uid: str) -> bool:
        with self.session() as s:
            return s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is not None

    def store_instance(self, inst: NewInstance, temp_path: Path, calling_ae: str, size_bytes: int, *,
                       fd: int | None = None) -> StoredInstance:
        """Move the received file into place durably and commit its row; idempotent per SOP UID.

        Returns only after the file is fsynced in place and the row committed — the caller may then
        answer success. A duplicate SOP Instance UID keeps the first file and row. `fd`: an open
        descriptor of `temp_path` the writer still holds (fsynced through it; the caller closes it).
        """
        relpath = self.files.instance_relpath(inst.study_uid, inst.series_uid, inst.sop_instance_uid)
        dest = self.files.root / relpath  # safe by construction: every component is uid_component()
        if not self.files.place_new(temp_path, dest, fd=fd):
            # The path exists: a duplicate, or a file a crash left before its row was committed
            # (never acknowledged, so it may be replaced).
            if self.instance_exists(inst.sop_instance_uid):
                _unlink_quietly(temp_path)
                return StoredInstance(False, relpath, None)
            self.files.commit_file(temp_path, relpath)
        now = time.time()
        values = dict(
            sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid, modality=inst.modality,
            study_uid=inst.study_uid, series_uid=inst.series_uid, frame_of_reference_uid=inst.frame_of_reference_uid,
            path=relpath, size_bytes=size_bytes, calling_ae=calling_ae, received_at=now,
            header_json=json.dumps(inst.header, default=_json_default),
        )
        if self._raw_sqlite is not None:
            fast = self._store_row_sqlite(values, inst.series_uid, now)
            if fast is not None:
                return StoredInstance(fast, relpath, None)
        for attempt in range(5):
            try:
                # One writer at a time in this process: SQLite would make a second one wait in its
                # busy handler, which sleeps whole milliseconds; a lock hands over in microseconds.
                with self._write_lock, self.engine.begin() as conn:
                    res = conn.execute(self._insert_instance, values)
                    if res.rowcount == 0:
                        return StoredInstance(False, relpath, None)
                    # Fast path: the series is already open — one UPDATE.
                    bumped = conn.execute(self._bump_series, {"uid": inst.series_uid, "now": now})
                    if bumped.rowcount == 1:
                        return StoredInstance(True, relpath, None)
                    with Session(bind=conn) as s:
                        case_id = self._touch_series(s, inst, now)
                        s.flush()
                return StoredInstance(True, relpath, case_id)
            except IntegrityError:
                # Another association created the same series/case row at the same moment: retry.
                if attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _store_row_sqlite(self, values: dict[str, Any], series_uid: str, now: float) -> bool | None:
        """The commonest receive (a new instance of an open series) on a raw sqlite3 connection.

        The same two statements as the SQLAlchemy path, compiled from it once; SQLAlchemy's own
        per-statement work costs ~0.35 ms, a tenth of a slice's budget. Returns True (stored),
        False (duplicate), or None when the series is new or closed: the caller then takes the
        full path, in which the series and case rows are created.
        """
        raw = self._raw_sqlite
        assert raw is not None
        insert_sql, insert_keys, _ = self._raw_insert
        bump_sql, bump_keys, bump_values = self._raw_bump
        bump_values = dict(bump_values, uid=series_uid, now=now)
        with self._write_lock:
            raw.execute("BEGIN IMMEDIATE")
            try:
                cur = raw.execute(insert_sql, [values[k] for k in insert_keys])
                if cur.rowcount == 0:
                    raw.execute("ROLLBACK")
                    return False
                cur = raw.execute(bump_sql, [bump_values[k] for k in bump_keys])
                if cur.rowcount != 1:
                    raw.execute("ROLLBACK")
                    return None
                raw.execute("COMMIT")
                return True
            except BaseException:
                raw.execute("ROLLBACK")
                raise

    def _touch_series(self, s: Session, inst: NewInstance, now: float) -> int | None:
        series = s.scalar(select(Series).where(Series.series_uid == inst.series_uid))
        if series is None:
            series = Series(
                series_uid=inst.series_uid,
                study_uid=inst.study_uid,
                modality=inst.modality,
                frame_of_reference_uid=inst.frame_of_reference_uid,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
                state="OPEN",
            )
            s.add(series)
        series.instance_count = (series.instance_count or 0) + 1
        series.last_received_at = now
        if series.state != "OPEN":
            series.state = "OPEN"  # new data re-opens a series for assembly
            series.reason = None
        if inst.modality != "CT":
            s.flush()
            return series.case_id
        case = s.scalar(select(Case).where(Case.ct_series_uid == inst.series_uid))
        if case is None:
            case = Case(
                ct_series_uid=inst.series_uid,
                study_uid=inst.study_uid,
                patient_id=inst.patient_id or "",
                frame_of_reference_uid=inst.frame_of_reference_uid,
                state=CaseState.RECEIVED.value,
                created_at=now,
                updated_at=now,
            )
            s.add(case)
            s.flush()
            s.add(CaseEvent(case_id=case.id, at=now, from_state=None, to_state=CaseState.RECEIVED.value, reason=None))
        elif case.state in (CaseState.READY.value, CaseState.INCOMPLETE.value, CaseState.UNSUPPORTED.value):
            # New slices for an assembled series: assemble again once it is stable.
            s.add(CaseEvent(case_id=case.id, at=now, from_state=case.state, to_state=CaseState.RECEIVED.value,
                            reason="new instances arrived"))
            case.state = CaseState.RECEIVED.value
            case.reason = None
            case.updated_at = now
        s.flush()
        return case.id

    def index_existing(self, inst: NewInstance, relpath: str, calling_ae: str, size_bytes: int,
                       received_at: float) -> bool:
        """Index a file that is already in place (recovery after an unclean stop). False if known."""
        if self.instance_exists(inst.sop_instance_uid):
            return False
        with self.session() as s, s.begin():
            s.add(Instance(sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid,
                           modality=inst.modality, study_uid=inst.study_uid, series_uid=inst.series_uid,
                           frame_of_reference_uid=inst.frame_of_reference_uid, path=relpath, size_bytes=size_bytes,
                           calling_ae=calling_ae, received_at=received_at,
                           header_json=json.dumps(inst.header, default=_json_default)))
            self._touch_series(s, inst, time.time())
        return True

    def indexed_paths(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(Instance.path)))

    def quarantine(self, temp_path: Path | None, *, status: int, reason: str, calling_ae: str,
                   sop_instance_uid: str | None = None) -> int:
        """Keep a refused dataset with its reason; returns the quarantine row id."""
        rel = self.files.quarantine(temp_path, reason, {"status": f"0x{status:04X}", "calling_ae": calling_ae,
                                                         "sop_instance_uid": sop_instance_uid})
        with self.session() as s, s.begin():
            row = Quarantined(received_at=time.time(), calling_ae=calling_ae, status=status, reason=reason,
                              path=rel, sop_instance_uid=sop_instance_uid)
            s.add(row)
            s.flush()
            return row.id

    # -- series and cases -------------------------------------------------------------------------
    def stable_series(self, stable_age_s: float, now: float | None = None) -> list[Series]:
        """OPEN series with no instance for `stable_age_s` seconds (oldest first)."""
        now = time.time() if now is None else now
        with self.session() as s:
            rows = s.scalars(
                select(Series)
                .where(Series.state == "OPEN", Series.last_received_at <= now - stable_age_s)
                .order_by(Series.last_received_at)
            ).all()
            return list(rows)

    def series_instances(self, series_uid: str) -> list[Instance]:
        with self.session() as s:
            return list(s.scalars(select(Instance).where(Instance.series_uid == series_uid).order_by(Instance.id)))

    def get_series(self, series_uid: str) -> Series | None:
        with self.session() as s:
            return s.scalar(select(Series).where(Series.series_uid == series_uid))

    def close_series(self, series_uid: str, state: str, reason: str | None = None, *,
                     case_id: int | None = None, seen_count: int | None = None) -> bool:
        """Mark a series assembled/linked. When `seen_count` is given and more instances arrived
        meanwhile, nothing changes and False is returned (it will be assembled again)."""
        with self.session() as s, s.begin():
            series = s.scalar(select(Series).where(Series.series_uid == series_uid))
            if series is None:
                return False
            if seen_count is not None and series.instance_count != seen_count:
                return False
            series.state = state
            series.reason = reason
            if case_id is not None:
                series.case_id = case_id
            return True

    def finish_assembly(self, series_uid: str, seen_count: int, *, series_state: str, case_state: CaseState | str,
                        reason: str | None = None, **case_fields: Any) -> bool:
        """Close a CT series and move its case, atomically, unless instances arrived meanwhile.

        Returns False (and changes nothing) when the series grew since it was read: it will be
        assembled again once stable.
        """
        case_state = case_state.value if isinstance(case_state, CaseState) else case_state
        now = time.time()
        with self.session() as s, s.begin():
            series = s.scalar(select(Series).where(Series.series_uid == series_uid))
            case = s.scalar(select(Case).where(Case.ct_series_uid == series_uid))
            if series is None or case is None or series.instance_count != seen_count or series.state != "OPEN":
                return False
            series.state = series_state
            series.reason = reason
            series.case_id = case.id
            if case.state != case_state or case.reason != reason:
                s.add(CaseEvent(case_id=case.id, at=now, from_state=case.state, to_state=case_state, reason=reason))
            case.state = case_state
            case.reason = reason
            case.updated_at = now
            for k, v in case_fields.items():
                setattr(case, k, v)
            return True

    def link_rt_series(self, frame_of_reference_uid: str, case_id: int) -> list[str]:
        """Link every RT series (RTDOSE/RTPLAN/RTSTRUCT) of this frame of reference to `case_id`."""
        with self.session() as s, s.begin():
            rows = list(s.scalars(select(Series).where(
                Series.frame_of_reference_uid == frame_of_reference_uid, Series.modality != "CT",
                Series.state.in_(["OPEN", "UNLINKED", "LINKED"]))))
            for row in rows:
                row.case_id = case_id
                row.state = "LINKED"
                row.reason = None
            return [r.series_uid for r in rows]

    def case_for_series(self, series_uid: str) -> Case | None:
        with self.session() as s:
            return s.scalar(select(Case).where(Case.ct_series_uid == series_uid))

    def get_case(self, case_id: int) -> Case | None:
        with self.session() as s:
            return s.get(Case, case_id)

    def cases_by_frame(self, frame_of_reference_uid: str) -> list[Case]:
        with self.session() as s:
            return list(s.scalars(select(Case).where(Case.frame_of_reference_uid == frame_of_reference_uid)))

    def list_cases(self, states: Sequence[str] | None = None) -> list[Case]:
        with self.session() as s:
            q = select(Case).order_by(Case.id)
            if states:
                q = q.where(Case.state.in_(list(states)))
            return list(s.scalars(q))

    def case_events(self, case_id: int) -> list[CaseEvent]:
        with self.session() as s:
            return list(s.scalars(select(CaseEvent).where(CaseEvent.case_id == case_id).order_by(CaseEvent.id)))

    def set_case_state(self, case_id: int, state: CaseState | str, reason: str | None = None, **fields: Any) -> None:
        """Move a case to `state`, recording the transition in its history."""
        state = state.value if isinstance(state, CaseState) else state
        now = time.time()
        with self.session() as s, s.begin():
            case = s.get(Case, case_id)
            if case is None:
                raise KeyError(f"no case {case_id}")
            if case.state != state or case.reason != reason:
                s.add(CaseEvent(case_id=case_id, at=now, from_state=case.state, to_state=state, reason=reason))
            case.state = state
            case.reason = reason
            case.updated_at = now
            for k, v in fields.items():
                setattr(case, k, v)

    def linked_series(self, case_id: int, modality: str | None = None) -> list[Series]:
        """The RT series (RTDOSE, RTPLAN, RTSTRUCT) linked to a case — not its own CT series."""
        with self.session() as s:
            q = select(Series).where(Series.case_id == case_id, Series.modality != "CT")
            if modality:
                q = q.where(Series.modality == modality)
            return list(s.scalars(q.order_by(Series.id)))

    def unlinked_series(self) -> list[Series]:
        """RT series waiting for a CT of their frame of reference."""
        with self.session() as s:
            return list(s.scalars(select(Series).where(Series.state == "UNLINKED").order_by(Series.id)))

    def quarantined(self) -> list[Quarantined]:
        with self.session() as s:
            return list(s.scalars(select(Quarantined).order_by(Quarantined.id)))

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                "instances": s.scalar(select(func.count(Instance.id))) or 0,
                "series": s.scalar(select(func.count(Series.id))) or 0,
                "cases": s.scalar(select(func.count(Case.id))) or 0,
                "quarantined": s.scalar(select(func.count(Quarantined.id))) or 0,
            }

    # -- predictions and corrections ------------------------------------------------------------
    def record_prediction(self, case_id: int, *, model_version: str, mask_path: str, voxels: int, volume_cc: float,
                          seconds: float, rtstruct_path: str | None = None,
                          rtstruct_sop_uid: str | None = None) -> int:
        with self.session() as s, s.begin():
            row = Prediction(case_id=case_id, model_version=model_version, mask_path=mask_path,
                             rtstruct_path=rtstruct_path, rtstruct_sop_uid=rtstruct_sop_uid, voxels=voxels,
                             volume_cc=volume_cc, seconds=seconds, created_at=time.time())
            s.add(row)
            s.flush()
            return row.id

    def predictions(self, case_id: int) -> list[Prediction]:
        """Every prediction of a case, oldest first (a new model re-predicts; nothing is overwritten)."""
        with self.session() as s:
            return list(s.scalars(select(Prediction).where(Prediction.case_id == case_id).order_by(Prediction.id)))

    def get_prediction(self, prediction_id: int) -> Prediction | None:
        with self.session() as s:
            return s.get(Prediction, prediction_id)

    def latest_prediction(self, case_id: int) -> Prediction | None:
        rows = self.predictions(case_id)
        return rows[-1] if rows else None

    def record_correction(self, case_id: int, *, kind: str, path: str, corrected_by: str, fg_voxels: int,
                          bg_voxels: int, prediction_id: int | None = None, split: str | None = None,
                          active_seconds: float | None = None, dice: float | None = None) -> int:
        if kind not in ("sparse", "dense"):
            raise ValueError(f"correction kind must be 'sparse' or 'dense', got {kind!r}")
        with self.session() as s, s.begin():
            row = Correction(case_id=case_id, prediction_id=prediction_id, kind=kind, path=path,
                             corrected_by=corrected_by, split=split, fg_voxels=fg_voxels, bg_voxels=bg_voxels,
                             created_at=time.time(), active_seconds=active_seconds, dice=dice)
            s.add(row)
            s.flush()
            return row.id

    def corrections(self) -> list[Correction]:
        """Every correction in the order it was saved (the order the trainer sees them)."""
        with self.session() as s:
            return list(s.scalars(select(Correction).order_by(Correction.id)))

    def set_correction_split(self, correction_id: int, split: str) -> None:
        """Fix a correction's training/validation assignment (once: it never moves afterwards)."""
        with self.session() as s, s.begin():
            row = s.get(Correction, correction_id)
            if row is None:
                raise KeyError(f"no correction {correction_id}")
            if row.split is not None and row.split != split:
                raise ValueError(f"correction {correction_id} is already in {row.split!r}; a split never changes")
            row.split = split

    def get_correction(self, correction_id: int) -> Correction | None:
        with self.session() as s:
            return s.get(Correction, correction_id)

    def latest_correction(self, case_id: int) -> Correction | None:
        """The newest correction of a case (the one that is sent and that training uses)."""
        with self.session() as s:
            return s.scalar(select(Correction).where(Correction.case_id == case_id)
                            .order_by(Correction.id.desc()).limit(1))

    # -- durable job queue ------------------------------------------------------------------------
    def enqueue(self, kind: str, payload: dict[str, Any] | None = None, *, dedupe_key: str | None = None,
                delay_s: float = 0.0, max_attempts: int = 3) -> int | None:
        """Add a job; with `dedupe_key`, a second pending/running job with the same key is not added.

        Returns the job id, or None when deduplicated.
        """
        now = time.time()
        try:
            with self.session() as s, s.begin():
                if dedupe_key is not None:
                    old = s.scalar(select(Job).where(Job.dedupe_key == dedupe_key))
                    if old is not None:
                        if old.state in (JobState.PENDING.value, JobState.RUNNING.value):
                            return None
                        old.dedupe_key = None  # finished: free the key for the new job
                        s.flush()
                job = Job(kind=kind, payload_json=json.dumps(payload or {}, default=_json_default),
                          dedupe_key=dedupe_key, state=JobState.PENDING.value, attempts=0,
                          max_attempts=max_attempts, not_before=now + delay_s, created_at=now)
                s.add(job)
                s.flush()
                return job.id
        except IntegrityError:
            return None

    def claim_job(self, kinds: Sequence[str] | None = None, lease_s: float = 600.0,
                  worker: str | None = None) -> Job | None:
        """Atomically take the oldest due job (or one whose lease expired after a crash)."""
        now = time.time()
        worker = worker or self.worker_id
        with self.session() as s, s.begin():
            due = or_(
                and_(Job.state == JobState.PENDING.value, Job.not_before <= now),
                and_(Job.state == JobState.RUNNING.value, Job.lease_until < now),
            )
            q = select(Job).where(due).order_by(Job.not_before, Job.id).limit(1)
            if kinds:
                q = q.where(Job.kind.in_(list(kinds)))
            if self.engine.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            job = s.scalar(q)
            if job is None:
                return None
            res = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == job.state, or_(Job.lease_until.is_(None), Job.lease_until == job.lease_until))
                .values(state=JobState.RUNNING.value, lease_until=now + lease_s, worker=worker,
                        attempts=Job.attempts + 1)
            )
            if res.rowcount != 1:
                return None
        with self.session() as s:
            return s.get(Job, job.id)

    def finish_job(self, job_id: int) -> None:
        with self.session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id).values(state=JobState.DONE.value, finished_at=time.time(),
                                                                   lease_until=None))

    def fail_job(self, job_id: int, error: str, retry_in_s: float = 5.0) -> str:
        """Record a failure; the job is retried until `max_attempts`, then FAILED. Returns the new state."""
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            if job is None:
                return "MISSING"
            job.last_error = error[:4000]
            job.lease_until = None
            if job.attempts >= job.max_attempts:
                job.state = JobState.FAILED.value
                job.finished_at = time.time()
            else:
                job.state = JobState.PENDING.value
                job.not_before = time.time() + retry_in_s
            return job.state

    def job_state(self, dedupe_key: str) -> str | None:
        """State of the newest job enqueued with `dedupe_key` (None when there is none)."""
        with self.session() as s:
            return s.scalar(select(Job.state).where(Job.dedupe_key == dedupe_key).order_by(Job.id.desc()).limit(1))

    def jobs(self, state: str | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).order_by(Job.id)
            if state:
                q = q.where(Job.state == state)
            return list(s.scalars(q))

    # -- outbox -----------------------------------------------------------------------------------
    def queue_output(self, destination: str, *, sop_instance_uid: str, sop_class_uid: str, relpath: str,
                     case_id: int | None = None, description: str = "") -> int | None:
        """Queue a stored output file for sending. The same SOP instance is queued once per destination."""
        now = time.time()
        try:
            with self.session() as s, s.begin():
                item = OutboxItem(destination=destination, sop_instance_uid=sop_instance_uid,
                                  sop_class_uid=sop_class_uid, path=relpath, case_id=case_id,
                                  description=description, state=OutboxState.PENDING.value, attempts=0,
                                  next_attempt_at=now, created_at=now)
                s.add(item)
                s.flush()
                return item.id
        except IntegrityError:
            return None

    def due_outputs(self, now: float | None = None, limit: int = 100) -> list[OutboxItem]:
        now = time.time() if now is None else now
        with self.session() as s:
            return list(s.scalars(
                select(OutboxItem)
                .where(OutboxItem.state == OutboxState.PENDING.value, OutboxItem.next_attempt_at <= now)
                .order_by(OutboxItem.id).limit(limit)
            ))

    def mark_output_sent(self, item_id: int) -> None:
        with self.session() as s, s.begin():
            s.execute(update(OutboxItem).where(OutboxItem.id == item_id)
                      .values(state=OutboxState.SENT.value, sent_at=time.time(), last_error=None,
                              attempts=OutboxItem.attempts + 1))

    def mark_output_failed(self, item_id: int, error: str, *, backoff_initial_s: float, backoff_max_s: float,
                           max_attempts: int) -> str:
        """Count a failed attempt and schedule the next with exponential backoff (or give up)."""
        with self.session() as s, s.begin():
            item = s.get(OutboxItem, item_id)
            if item is None:
                return "MISSING"
            item.attempts += 1
            item.last_error = error[:4000]
            if item.attempts >= max_attempts:
                item.state = OutboxState.FAILED.value
            else:
                delay = min(backoff_max_s, backoff_initial_s * (2 ** (item.attempts - 1)))
                item.next_attempt_at = time.time() + delay
            return item.state

    def retry_output(self, item_id: int) -> None:
        """Put a FAILED item back in the queue (a physicist fixed the destination)."""
        with self.session() as s, s.begin():
            s.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.state == OutboxState.FAILED.value)
                      .values(state=OutboxState.PENDING.value, next_attempt_at=time.time(), attempts=0))

    def outputs(self, case_id: int | None = None) -> list[OutboxItem]:
        with self.session() as s:
            q = select(OutboxItem).order_by(OutboxItem.id)
            if case_id is not None:
                q = q.where(OutboxItem.case_id == case_id)
            return list(s.scalars(q))

    def get_instance(self, sop_instance_uid: str) -> Instance | None:
        """The stored instance with this SOP Instance UID, if any."""
        with self.session() as s:
            return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))

    # -- dose results -------------------------------------------------------------------------------
    def record_dose(self, case_id: int, *, label: str, metrics: dict[str, Any], mean_gy: float | None,
                    roi_name: str = "", rtstruct_sop_instance_uid: str | None = None,
                    rtdose_sop_instance_uids: Sequence[str] = (), model_version: str | None = None,
                    description: str = "") -> int:
        """Store the dose metrics of one structure of a case; returns the row id.

        Parameters
        ----------
        label
            Which structure: ``"predicted"``, ``"corrected"``, ``"clinical"``, ``"model:000007"`` ...
        metrics
            Plain data (JSON-serialisable): every metric and the DVH.
        mean_gy
            The mean dose, also kept as a column.
        """
        if not label or len(label) > 64:
            raise ValueError(f"dose label must be 1-64 characters, got {label!r}")
        with self.session() as s, s.begin():
            row = DoseResult(
                case_id=case_id, label=label, roi_name=roi_name[:64], rtstruct_sop_instance_uid=rtstruct_sop_instance_uid,
                description=description[:200], rtdose_sop_instance_uids=json.dumps(list(rtdose_sop_instance_uids)),
                model_version=model_version, metrics_json=json.dumps(metrics, default=_json_default),
                mean_gy=None if mean_gy is None else float(mean_gy), computed_at=time.time(),
            )
            s.add(row)
            s.flush()
            return row.id

    def dose_results(self, case_id: int, label: str | None = None) -> list[DoseResult]:
        """The dose rows of a case, oldest first (optionally only one label)."""
        with self.session() as s:
            q = select(DoseResult).where(DoseResult.case_id == case_id)
            if label is not None:
                q = q.where(DoseResult.label == label)
            return list(s.scalars(q.order_by(DoseResult.id)))

    def record_dose_delta(self, case_id: int, *, reference_label: str, other_label: str, delta: dict[str, Any],
                          mean_delta_gy: float | None, flagged: bool, reasons: Sequence[str] = (),
                          reference_result_id: int | None = None, other_result_id: int | None = None) -> int:
        """Store the difference of two structures' dose metrics (`other` minus `reference`); returns the id."""
        with self.session() as s, s.begin():
            row = DoseDelta(
                case_id=case_id, reference_label=reference_label, other_label=other_label,
                reference_result_id=reference_result_id, other_result_id=other_result_id,
                delta_json=json.dumps(delta, default=_json_default),
                mean_delta_gy=None if mean_delta_gy is None else float(mean_delta_gy), flagged=bool(flagged),
                reasons=json.dumps([str(r) for r in reasons]), computed_at=time.time(),
            )
            s.add(row)
            s.flush()
            return row.id

    def dose_deltas(self, case_id: int) -> list[DoseDelta]:
        """The dose deltas of a case, oldest first."""
        with self.session() as s:
            return list(s.scalars(select(DoseDelta).where(DoseDelta.case_id == case_id).order_by(DoseDelta.id)))

    def all_dose_rows(self) -> "DoseRows":
        """Every dose result and delta of every case (for research export), ordered by case then id."""
        with self.session() as s:
            results = list(s.scalars(select(DoseResult).order_by(DoseResult.case_id, DoseResult.id)))
            deltas = list(s.scalars(select(DoseDelta).order_by(DoseDelta.case_id, DoseDelta.id)))
        return DoseRows(results, deltas)


class DoseRows(NamedTuple):
    """What `Store.all_dose_rows` returns."""

    results: list[DoseResult]
    deltas: list[DoseDelta]


class _ProcessWriteLock:
    """A thread lock plus an exclusive ``flock`` on a file next to the database: one writer at a
    time across every process of this service, handed over without sleeping."""

    def __init__(self, path: str) -> None:
        self._thread_lock = threading.Lock()
        self._path = path
        self._fd: int | None = None
        self._pid = -1

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own description
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o640)
            self._pid = os.getpid()
        return self._fd

    def __enter__(self) -> "_ProcessWriteLock":
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            fcntl.flock(self._file(), fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def _positional_sql(statement: Any, engine: Engine) -> tuple[str, list[str], dict[str, Any]]:
    """SQL text with ``?`` placeholders, its parameter names in order and the literals' values,
    compiled by SQLAlchemy from the statement the ORM path runs (one definition of each row)."""
    keys = [c.name for c in Instance.__table__.columns if c.name != "id"] if statement.is_insert else None
    compiled = statement.compile(dialect=engine.dialect, column_keys=keys)
    return str(compiled), list(compiled.positiontup or []), dict(compiled.params)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def iter_chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
