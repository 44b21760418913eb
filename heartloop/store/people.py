"""People, the audit log, interaction events and the worklist: the review UI's part of the `Store`.

Kept apart from the DICOM side of the store; `Store` inherits these methods (`ReviewRecords`).
The audit log is append-only and chained: every row stores the hash of the row before it and its
own hash over (previous hash, time, actor, action, target, detail), so editing, deleting or
reordering any row breaks the chain at that row (`verify_audit`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import and_, func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from heartloop.core.states import CaseState
from heartloop.store.models import AuditEntry, Case, DoseDelta, DoseResult, InteractionEvent, Prediction, User

ROLES = ("reviewer", "admin")
GENESIS_HASH = "0" * 64
#: States a reviewer can open and save a correction in (cold start included).
REVIEWABLE_STATES = (CaseState.PREDICTED.value, CaseState.NO_MODEL.value)
#: `DoseResult.label` of the predicted heart's dose (service/dose.py and service/contouring.py).
PREDICTED_DOSE_LABEL = "predicted"


@dataclass(frozen=True)
class WorklistRow:
    """One case as the worklist shows it (no patient name: it is not stored; the ID is the Case's)."""

    id: int
    state: str
    reason: str | None
    arrived_at: float
    updated_at: float
    n_slices: int | None
    patient_id: str
    model_version: str | None
    predicted_mean_gy: float | None
    mean_delta_gy: float | None
    dose_flagged: bool

    @property
    def incomplete(self) -> bool:
        return self.state == CaseState.INCOMPLETE.value

    @property
    def reviewable(self) -> bool:
        return self.state in REVIEWABLE_STATES


def audit_hash(prev_hash: str, at: float, actor: str, action: str, target: str, detail_json: str) -> str:
    """The chain hash of one audit row (defined once: writer and verifier both use it)."""
    payload = json.dumps([prev_hash, repr(float(at)), actor, action, target, detail_json], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditCheck:
    """Result of `verify_audit`: ``ok``, rows checked, and the first broken row with why."""

    ok: bool
    rows: int
    broken_id: int | None = None
    reason: str | None = None


class ReviewRecords:
    """Mixin of `Store`: users, audit log, interaction events."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    # -- users ------------------------------------------------------------------------------------
    def add_user(self, username: str, password_hash: str, role: str, display_name: str = "") -> int:
        """Create a user; raises ValueError for a bad role or a username that exists."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not username or len(username) > 64 or not username.replace("_", "").replace(".", "").replace("-", "").isalnum():
            raise ValueError("username: 1-64 letters, digits, '.', '_' or '-'")
        try:
            with self.session() as s, s.begin():
                row = User(username=username, display_name=display_name, password_hash=password_hash, role=role,
                           active=True, created_at=time.time())
                s.add(row)
                s.flush()
                return row.id
        except IntegrityError:
            raise ValueError(f"user {username!r} already exists") from None

    def get_user(self, username: str) -> User | None:
        with self.session() as s:
            return s.scalar(select(User).where(User.username == username))

    def get_user_by_id(self, user_id: int) -> User | None:
        with self.session() as s:
            return s.get(User, user_id)

    def list_users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.username)))

    def update_user(self, username: str, **fields: Any) -> None:
        """Change `password_hash`, `role`, `active` or `display_name` of a user."""
        allowed = {"password_hash", "role", "active", "display_name"}
        if not set(fields) <= allowed:
            raise ValueError(f"cannot change {sorted(set(fields) - allowed)} of a user")
        if "role" in fields and fields["role"] not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {fields['role']!r}")
        with self.session() as s, s.begin():
            row = s.scalar(select(User).where(User.username == username))
            if row is None:
                raise KeyError(f"no user {username!r}")
            for key, value in fields.items():
                setattr(row, key, value)

    def count_users(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(User)) or 0)

    # -- audit log --------------------------------------------------------------------------------
    def append_audit(self, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None) -> int:
        """Append one chained row; retried when another writer appended at the same moment."""
        detail_json = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)
        for _attempt in range(20):
            try:
                with self.session() as s, s.begin():
                    last = s.scalar(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1))
                    prev = last.hash if last is not None else GENESIS_HASH
                    at = time.time()
                    row = AuditEntry(at=at, actor=actor, action=action, target=target, detail_json=detail_json,
                                     prev_hash=prev, hash=audit_hash(prev, at, actor, action, target, detail_json))
                    s.add(row)
                    s.flush()
                    return row.id
            except IntegrityError:  # someone chained onto `prev` first: read the new tail and retry
                time.sleep(0.005)
        raise RuntimeError("could not append to the audit log (20 concurrent conflicts)")

    def audit_entries(self, *, limit: int = 200, before_id: int | None = None, actor: str | None = None,
                      action: str | None = None, target: str | None = None) -> list[AuditEntry]:
        """Newest first."""
        with self.session() as s:
            q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if before_id is not None:
                q = q.where(AuditEntry.id < before_id)
            if actor:
                q = q.where(AuditEntry.actor == actor)
            if action:
                q = q.where(AuditEntry.action == action)
            if target:
                q = q.where(AuditEntry.target == target)
            return list(s.scalars(q))

    def verify_audit(self) -> AuditCheck:
        """Walk the whole chain in id order; the first row whose link or hash is wrong is named."""
        prev = GENESIS_HASH
        n = 0
        with self.session() as s:
            for row in s.scalars(select(AuditEntry).order_by(AuditEntry.id)).yield_per(1000):
                n += 1
                if row.prev_hash != prev:
                    return AuditCheck(False, n, row.id, "its link to the previous row is broken "
                                                         "(a row before it was deleted, inserted or edited)")
                expected = audit_hash(row.prev_hash, row.at, row.actor, row.action, row.target, row.detail_json)
                if row.hash != expected:
                    return AuditCheck(False, n, row.id, "its content does not match its hash (the row was edited)")
                prev = row.hash
        return AuditCheck(True, n)

    # -- worklist ---------------------------------------------------------------------------------
    def worklist(self, *, states: Iterable[str] | None = None, flagged: bool | None = None,
                 case_id: int | None = None, limit: int | None = None) -> list[WorklistRow]:
        """Cases with their newest prediction, predicted dose and dose delta, newest arrival first.

        One SQL statement whatever the number of cases (the newest row of each table per case is
        found by a grouped subquery, not one query per case).

        Parameters
        ----------
        states
            Only cases in these states.
        flagged
            True: only cases with a flagged dose delta or an incomplete series; False: only the others.
        case_id
            Only this case.
        limit
            At most this many rows.
        """
        newest_pred = (select(Prediction.case_id, func.max(Prediction.id).label("id"))
                       .group_by(Prediction.case_id).subquery())
        newest_dose = (select(DoseResult.case_id, func.max(DoseResult.id).label("id"))
                       .where(DoseResult.label == PREDICTED_DOSE_LABEL).group_by(DoseResult.case_id).subquery())
        newest_delta = (select(DoseDelta.case_id, func.max(DoseDelta.id).label("id"))
                        .group_by(DoseDelta.case_id).subquery())
        q = (select(Case.id, Case.state, Case.reason, Case.created_at, Case.updated_at, Case.n_slices,
                    Case.patient_id, Prediction.model_version, DoseResult.mean_gy, DoseDelta.mean_delta_gy,
                    DoseDelta.flagged)
             .outerjoin(newest_pred, newest_pred.c.case_id == Case.id)
             .outerjoin(Prediction, Prediction.id == newest_pred.c.id)
             .outerjoin(newest_dose, newest_dose.c.case_id == Case.id)
             .outerjoin(DoseResult, DoseResult.id == newest_dose.c.id)
             .outerjoin(newest_delta, newest_delta.c.case_id == Case.id)
             .outerjoin(DoseDelta, DoseDelta.id == newest_delta.c.id)
             .order_by(Case.created_at.desc(), Case.id.desc()))
        states = [str(x) for x in states] if states else None
        if states:
            q = q.where(Case.state.in_(states))
        if case_id is not None:
            q = q.where(Case.id == case_id)
        is_flagged = or_(and_(DoseDelta.flagged.is_not(None), DoseDelta.flagged.is_(True)),
                         Case.state == CaseState.INCOMPLETE.value)
        if flagged is True:
            q = q.where(is_flagged)
        elif flagged is False:
            q = q.where(~is_flagged)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            rows = s.execute(q).all()
        return [WorklistRow(id=r[0], state=r[1], reason=r[2], arrived_at=r[3], updated_at=r[4], n_slices=r[5],
                            patient_id=r[6] or "", model_version=r[7], predicted_mean_gy=r[8], mean_delta_gy=r[9],
                            dose_flagged=bool(r[10])) for r in rows]

    def next_reviewable_case(self, after_case_id: int | None = None) -> int | None:
        """The case to review next: the oldest reviewable one, or with `after_case_id` the first
        reviewable case that arrived after it (wrapping round to the oldest other one)."""
        order = (Case.created_at, Case.id)
        with self.session() as s:
            base = select(Case.id).where(Case.state.in_(REVIEWABLE_STATES)).order_by(*order).limit(1)
            if after_case_id is None:
                return s.scalar(base)
            this = s.execute(select(Case.created_at, Case.id).where(Case.id == after_case_id)).first()
            if this is None:
                raise KeyError(f"no case {after_case_id}")
            later = s.scalar(base.where(tuple_(*order) > tuple_(this[0], this[1])))
            if later is not None:
                return later
            return s.scalar(base.where(Case.id != after_case_id))

    # -- interaction events -----------------------------------------------------------------------
    def record_interactions(self, case_id: int, username: str, events: Iterable[tuple[float, str]]) -> int:
        """Store (epoch seconds, kind) events of one reviewer on one case; returns how many."""
        rows = [InteractionEvent(case_id=case_id, username=username, at=float(at), kind=str(kind)[:32])
                for at, kind in events]
        if not rows:
            return 0
        with self.session() as s, s.begin():
            s.add_all(rows)
        return len(rows)

    def interactions(self, case_id: int, username: str | None = None) -> list[InteractionEvent]:
        with self.session() as s:
            q = select(InteractionEvent).where(InteractionEvent.case_id == case_id).order_by(InteractionEvent.at)
            if username is not None:
                q = q.where(InteractionEvent.username == username)
            return list(s.scalars(q))


def active_seconds(times: Iterable[float], max_gap_s: float = 20.0) -> float:
    """Active annotation time: the sum of gaps between consecutive events, gaps over `max_gap_s`
    excluded (RootPainter3D's measure: a reviewer who left the desk is not annotating)."""
    ordered = sorted(times)
    return float(sum(b - a for a, b in zip(ordered, ordered[1:]) if b - a <= max_gap_s))
