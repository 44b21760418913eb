"""Append-only model registry on disk.

Layout under ``root``::

    000001/weights.pt  000001/meta.json     one directory per version, never modified once written
    000002/...
    events/000001.json                      promotions and rollbacks, one file per event, in order
    .reserved/000001                        version numbers handed out (never reused)
    .staging/                               versions being written

Why it cannot lose or overwrite a version, even with two processes registering at once or a crash
at any instant:

- a version number is **reserved** first by creating ``.reserved/NNNNNN`` with ``O_CREAT|O_EXCL``;
  exactly one process can win a number, and a number is never handed out twice (a crash after
  reserving only burns the number);
- the version is written in ``.staging/`` (files fsynced, then the directory), then **renamed**
  into place in one atomic step, and the root directory is fsynced;
- ``meta.json`` records the size and SHA-256 of ``weights.pt``: a directory that is incomplete or
  corrupt (a crash mid-write, a bad copy) is skipped by `list`/`current` and refused by `load`;
- an event is written to ``.staging/`` and published with ``os.link``, which fails rather than
  replace an existing file, so concurrent promotions both land, in order.

`current` is the version named by the newest event (promotion or rollback); the registry never
caches it, so a rollback in one process changes the model the next prediction in any process uses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^\d{6,}$")
_FORMAT = 1
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


def format_version(number: int) -> str:
    """``7`` → ``"000007"``."""
    if number < 1:
        raise ValueError("version numbers start at 1")
    return f"{number:06d}"


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _check_version(name: str, value: str | None, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise ValueError(f"{name} = {value!r} is not a model version like \"000042\"")


@dataclass(frozen=True, kw_only=True)
class ModelMeta:
    """What a registered model is and where it came from.

    Parameters
    ----------
    kind
        What the weights hold, e.g. ``"localiser+organ"``.
    parent
        Version whose weights training started from; ``None`` for fresh weights.
    n_train_cases, n_val_cases
        Corrections in the training and validation sets when the model was saved.
    val_dice
        Validation Dice (``None`` while there was no validation data).
    settings
        The contouring settings it was trained with (JSON-serialisable).
    data_snapshot
        Fingerprint of the corrections it was trained and validated on.
    created_at
        ISO 8601 UTC time; defaults to now.
    version
        Assigned by `ModelRegistry.register`; leave ``None`` when registering.
    """

    kind: str
    parent: str | None = None
    n_train_cases: int = 0
    n_val_cases: int = 0
    val_dice: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    data_snapshot: str = ""
    created_at: str = field(default_factory=_utc_now)
    version: str | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("kind is required, e.g. \"localiser+organ\"")
        _check_version("parent", self.parent, optional=True)
        _check_version("version", self.version, optional=True)
        if self.n_train_cases < 0 or self.n_val_cases < 0:
            raise ValueError("case counts must be non-negative")
        if self.val_dice is not None and not (0.0 <= self.val_dice <= 1.0):
            raise ValueError(f"val_dice = {self.val_dice} must be in [0, 1]")
        try:
            dt.datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"created_at = {self.created_at!r} is not an ISO 8601 time") from exc
        try:
            json.dumps(dict(self.settings))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"settings must be JSON-serialisable: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["settings"] = dict(self.settings)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class EventKind(str, enum.Enum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class RegistryEvent:
    """One entry of the append-only promotion journal."""

    sequence: int
    kind: EventKind
    version: str
    at: str
    reason: str = ""


@dataclass(frozen=True)
class StoredModel:
    """A registered model read back: its metadata and its weights (on the CPU)."""

    meta: ModelMeta
    weights: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:  # "x": never overwrite, even in staging
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class ModelRegistry:
    """Append-only, crash-safe, multi-process-safe store of model versions. See module docstring.

    Parameters
    ----------
    root
        Directory of the registry (created if missing), e.g. ``<storage root>/models``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._reserved = self.root / ".reserved"
        self._staging = self.root / ".staging"
        self._events = self.root / "events"
        for path in (self.root, self._reserved, self._staging, self._events):
            path.mkdir(parents=True, exist_ok=True)

    # -- writing ----------------------------------------------------------------------------------
    def register(self, weights: Mapping[str, Any], meta: ModelMeta) -> str:
        """Store `weights` (a state dict, or a dict of state dicts) with `meta`; return the new
        version. `meta.version` is assigned here; `meta.parent`, if given, must be registered."""
        if meta.version is not None:
            raise ValueError("meta.version is assigned by the registry; leave it None")
        if meta.parent is not None and self._read_meta(meta.parent) is None:
            raise ValueError(f"parent version {meta.parent} is not in the registry")
        buffer = io.BytesIO()
        torch.save(dict(weights), buffer)
        payload = buffer.getvalue()

        version = self._reserve_version()
        stamped = dataclasses.replace(meta, version=version)
        document = {
            "format": _FORMAT,
            "meta": stamped.to_dict(),
            "weights": {"file": WEIGHTS_FILE, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
        }
        staging = self._staging / f"{version}-{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            _write_file(staging / WEIGHTS_FILE, payload)
            _write_file(staging / META_FILE, json.dumps(document, indent=2, sort_keys=True).encode("utf-8"))
            _fsync_dir(staging)
            # Only the holder of the reservation renames to this name, so nothing can be there;
            # if something is (a hand-made directory), rename fails on a non-empty target — it
            # never overwrites a version.
            os.rename(staging, self.root / version)
        except BaseException:
            # Disk full, permissions, interrupt: leave no half-written staging behind. The
            # reserved number stays burnt, which is harmless.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        log.info("registered model version %s (%s, val_dice=%s)", version, meta.kind, meta.val_dice)
        return version

    def promote(self, version: str, reason: str = "") -> RegistryEvent:
        """Make `version` current (recorded as an event)."""
        return self._append_event(EventKind.PROMOTE, version, reason)

    def rollback(self, version: str, reason: str = "") -> RegistryEvent:
        """Make an earlier `version` current again (recorded as an event; nothing is deleted)."""
        return self._append_event(EventKind.ROLLBACK, version, reason)

    def discard_stale_staging(self, older_than_s: float = 3600.0) -> int:
        """Delete leftovers of registrations that crashed mid-write; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self._staging.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> list[ModelMeta]:
        """Every complete version, oldest first; incomplete or corrupt directories are skipped."""
        metas = []
        for version in self._version_names():
            meta = self._read_meta(version)
            if meta is not None:
                metas.append(meta)
        return metas

    def get(self, version: str) -> ModelMeta:
        """Metadata of `version`; `KeyError` when it is not a complete version."""
        _check_version("version", version, optional=False)
        meta = self._read_meta(version)
        if meta is None:
            raise KeyError(f"model version {version} is not in the registry (or is incomplete)")
        return meta

    def load(self, version: str) -> StoredModel:
        """Weights and metadata of `version`, checksum verified; `KeyError` when missing/corrupt."""
        meta = self.get(version)
        document = self._read_document(version)
        assert document is not None  # get() succeeded
        payload = (self.root / version / WEIGHTS_FILE).read_bytes()
        if hashlib.sha256(payload).hexdigest() != document["weights"]["sha256"]:
            raise KeyError(f"model version {version} has corrupt weights (checksum mismatch)")
        weights = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        return StoredModel(meta=meta, weights=weights)

    def history(self) -> list[RegistryEvent]:
        """All promotion/rollback events, oldest first."""
        events = []
        for path in sorted(self._events.glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            event = self._read_event(path)
            if event is not None:
                events.append(event)
        return events

    def current(self) -> ModelMeta | None:
        """The model in use: the version named by the newest event whose version is intact.
        ``None`` at cold start (nothing promoted yet)."""
        for event in reversed(self.history()):
            meta = self._read_meta(event.version)
            if meta is not None:
                return meta
            log.warning("event %d names version %s, which is missing or incomplete; using an older one",
                        event.sequence, event.version)
        return None

    # -- internals ----------------------------------------------------------------------------------
    def _version_names(self) -> list[str]:
        names = [p.name for p in self.root.iterdir() if _VERSION_RE.match(p.name) and p.is_dir()]
        return sorted(names, key=int)

    def _highest_number(self) -> int:
        numbers = [int(p.name) for p in self._reserved.iterdir() if _VERSION_RE.match(p.name)]
        # Directories count too (a registry copied without .reserved, a hand-made directory).
        numbers += [int(p.name) for p in self.root.iterdir() if _VERSION_RE.match(p.name)]
        return max(numbers, default=0)

    def _reserve_version(self) -> str:
        number = self._highest_number() + 1
        while True:
            version = format_version(number)
            if not (self.root / version).exists():
                try:
                    fd = os.open(self._reserved / version, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    _fsync_dir(self._reserved)
                    return version
            number += 1

    def _read_document(self, version: str) -> dict[str, Any] | None:
        directory = self.root / version
        try:
            document = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            weights = document["weights"]
            size = (directory / weights["file"]).stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if document.get("format") != _FORMAT or weights["file"] != WEIGHTS_FILE or size != weights["bytes"]:
            return None
        return document

    def _read_meta(self, version: str) -> ModelMeta | None:
        document = self._read_document(version)
        if document is None:
            return None
        try:
            meta = ModelMeta.from_dict(document["meta"])
        except (KeyError, TypeError, ValueError):
            return None
        return meta if meta.version == version else None

    def _append_event(self, kind: EventKind, version: str, reason: str) -> RegistryEvent:
        _check_version("version", version, optional=False)
        if self._read_meta(version) is None:
            raise KeyError(f"model version {version} is not in the registry (or is incomplete)")
        at = _utc_now()
        sequence = max((int(p.stem) for p in self._events.glob("*.json") if p.stem.isdigit()), default=0) + 1
        while True:
            document = {"sequence": sequence, "kind": kind.value, "version": version, "at": at, "reason": reason}
            temp = self._staging / f"event-{uuid.uuid4().hex}.json"
            _write_file(temp, json.dumps(document, sort_keys=True).encode("utf-8"))
            try:
                # link() publishes the complete file atomically and fails if the name is taken:
                # a concurrent event got this sequence number, so take the next one.
                os.link(temp, self._events / f"{sequence:06d}.json")
            except FileExistsError:
                sequence += 1
                continue
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(self._events)
            log.info("%s model version %s (event %d)", kind.value, version, sequence)
            return RegistryEvent(sequence=sequence, kind=kind, version=version, at=at, reason=reason)

    def _read_event(self, path: Path) -> RegistryEvent | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return RegistryEvent(
                sequence=int(data["sequence"]),
                kind=EventKind(data["kind"]),
                version=str(data["version"]),
                at=str(data["at"]),
                reason=str(data.get("reason", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("skipping unreadable registry event %s", path.name)
            return None
