"""dcmtk as the peer: storescu/echoscu play the TPS, storescp plays the TPS receiving our outputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tests.helpers.procs import free_port, stop_pid, wait_port

# Debian's dcmtk waits ~40 ms per C-STORE on Nagle's algorithm unless told otherwise.
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


_found: dict[str, str] = {}


def _is_dcmtk(path: str) -> bool:
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "dcmtk" in (r.stdout + r.stderr).lower()


def require(tool: str) -> str:
    """The path of dcmtk's `tool` on PATH.

    Not simply the first `tool` on PATH: pynetdicom installs console scripts of the same names
    (storescu, storescp, echoscu) into the virtualenv's bin, which comes first once it is
    activated — the peer must be dcmtk's, not our own library's.
    """
    if tool in _found:
        return _found[tool]
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = shutil.which(tool, path=directory or ".")
        if path is not None and _is_dcmtk(path):
            _found[tool] = path
            return path
    raise FileNotFoundError(f"dcmtk's {tool} not found on PATH (apt-get install dcmtk); "
                            f"a {tool} of another package does not count")


@dataclass
class PushResult:
    returncode: int
    sent_ok: list[Path]  # files answered Success
    refused: list[tuple[Path, str]]  # files answered with a failure status
    output: str


def storescu(files: Sequence[Path], port: int, *, called: str = "HEARTLOOP", calling: str = "TPS",
             timeout_s: float = 300, extra: Sequence[str] = ()) -> PushResult:
    """Push `files` with dcmtk storescu -v over one association and parse what was answered."""
    cmd = [require("storescu"), "-v", "-aec", called, "-aet", calling, *extra, "127.0.0.1", str(port),
           *[str(f) for f in files]]
    r = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout_s)
    return parse_storescu(r.stdout + r.stderr, r.returncode)


def parse_storescu(out: str, returncode: int = 0) -> PushResult:
    ok: list[Path] = []
    refused: list[tuple[Path, str]] = []
    current: Path | None = None
    for line in out.splitlines():
        m = re.match(r"I: Sending file: (.*)$", line)
        if m:
            current = Path(m.group(1).strip())
            continue
        m = re.match(r"I: Received Store Response \((.*)\)", line)
        if m and current is not None:
            if m.group(1).startswith("Success") or m.group(1).startswith("Warning"):
                ok.append(current)
            else:
                refused.append((current, m.group(1)))
            current = None
    return PushResult(returncode, ok, refused, out)


def echoscu(port: int, *, called: str = "HEARTLOOP", calling: str = "TPS") -> subprocess.CompletedProcess:
    return subprocess.run([require("echoscu"), "-aec", called, "-aet", calling, "127.0.0.1", str(port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


class StoreSCP:
    """dcmtk storescp on a free loopback port, writing what it receives to `out_dir`."""

    def __init__(self, out_dir: Path, port: int | None = None, ae_title: str = "TPS") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        self.proc = subprocess.Popen([require("storescp"), "-aet", self.ae_title, "-od", str(self.out_dir),
                                      "--max-pdu", "131072", str(self.port)],
                                     env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
