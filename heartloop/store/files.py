"""Instance files under the storage root: atomic writes, UID-safe paths, quarantine."""

from __future__ import annotations

import hashlib
import itertools
import threading
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_component(uid: str) -> str:
    """A path component for `uid` that can never escape its directory.

    A well-formed UID (digits and dots, ≤ 64 characters) is used as it is; anything else is
    replaced by a hash, so ``../../etc`` or a UID with a slash lands safely inside the root.
    """
    if isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_RE.match(uid):
        return uid
    return "x" + hashlib.sha256(str(uid).encode("utf-8", "surrogateescape")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceFiles:
    """Layout: ``instances/<study>/<series>/<sop>.dcm``, ``quarantine/``, ``incoming/`` (temp).

    ``incoming/`` is on the same filesystem as the final paths, so a received file moves into
    place with one atomic rename.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._counter = itertools.count()
        self._known_dirs: set[Path] = set()
        self.instances_dir = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.incoming_dir = self.root / "incoming"
        self.outputs_dir = self.root / "outputs"
        for d in (self.instances_dir, self.quarantine_dir, self.incoming_dir, self.outputs_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- paths ------------------------------------------------------------------------------------
    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        rel = Path("instances") / uid_component(study_uid) / uid_component(series_uid) / f"{uid_component(sop_uid)}.dcm"
        return rel.as_posix()

    def output_relpath(self, case_id: int, sop_uid: str) -> str:
        return (Path("outputs") / f"case{int(case_id):06d}" / f"{uid_component(sop_uid)}.dcm").as_posix()

    def abspath(self, relpath: str) -> Path:
        """The absolute path of a stored relative path; refuses anything outside the root."""
        p = (self.root / relpath).resolve()
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"path {relpath!r} escapes the storage root")
        return p

    # -- writing ----------------------------------------------------------------------------------
    def new_temp(self, suffix: str = ".part") -> Path:
        """A new empty file in ``incoming/`` (unique per process, thread and call; cheaper than mkstemp)."""
        while True:
            name = f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}{suffix}"
            path = self.incoming_dir / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:  # a leftover of an earlier process with the same pid
                continue
            os.close(fd)
            return path

    def commit_file(self, temp_path: Path, relpath: str) -> Path:
        """fsync `temp_path`, rename it to `relpath` atomically, fsync the directory."""
        dest = self.abspath(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(temp_path, dest)
        except OSError:
            # A temp file on another filesystem: copy next to the destination, then rename.
            tmp2 = dest.with_name(dest.name + f".{os.getpid()}.part")
            shutil.copyfile(temp_path, tmp2)
            with open(tmp2, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp2, dest)
            os.unlink(temp_path)
        fsync_dir(dest.parent)
        return dest

    def place_new(self, temp_path: Path, dest: Path, *, fd: int | None = None) -> bool:
        """Durably put `temp_path` at `dest` only if nothing is there yet (atomic, via a hard link).

        Returns False, leaving `temp_path` untouched, when `dest` already exists. `fd`: an open
        descriptor of `temp_path` to fsync through (spares reopening the file).
        """
        if fd is not None:
            os.fsync(fd)
        else:
            own = os.open(temp_path, os.O_RDONLY)
            try:
                os.fsync(own)
            finally:
                os.close(own)
        if dest.parent not in self._known_dirs:  # one mkdir per series, not per slice
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(dest.parent)
        try:
            os.link(temp_path, dest)
        except FileExistsError:
            return False
        except OSError:
            # No hard links here (or another filesystem): fall back to exclusive create + copy.
            if dest.exists():
                return False
            self.commit_file(temp_path, self.relpath(dest))
            return True
        os.unlink(temp_path)
        fsync_dir(dest.parent)
        return True

    def relpath(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def write_bytes(self, relpath: str, data: bytes) -> Path:
        """Atomically write `data` at `relpath` (temp file, fsync, rename, fsync dir)."""
        tmp = self.new_temp()
        with open(tmp, "wb") as fh:
            fh.write(data)
        return self.commit_file(tmp, relpath)

    def quarantine(self, temp_path: Path | None, reason: str, meta: dict) -> str:
        """Move `temp_path` (may be None when nothing was received) to quarantine with a reason file."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{os.getpid()}-{hashlib.sha1(os.urandom(8)).hexdigest()[:8]}"
        rel = (Path("quarantine") / f"{name}.dcm").as_posix()
        dest = self.abspath(rel)
        if temp_path is not None and Path(temp_path).exists():
            self.commit_file(Path(temp_path), rel)
        else:
            dest.write_bytes(b"")
        info = dict(meta, reason=reason)
        reason_tmp = self.new_temp()
        reason_tmp.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        self.commit_file(reason_tmp, (Path("quarantine") / f"{name}.json").as_posix())
        return rel

    def clean_incoming(self, older_than_s: float = 0.0) -> int:
        """Remove leftover temp files (a crash mid-receive leaves them; they were never acknowledged)."""
        n = 0
        now = time.time()
        for p in self.incoming_dir.iterdir():
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n
