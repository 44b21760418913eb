"""People, the audit log and interaction events: the review UI's part of the `Store`.

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

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from heartloop.store.models import AuditEntry, InteractionEvent, User

ROLES = ("reviewer", "admin")
GENESIS_HASH = "0" * 64


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
