"""Run HeartLoop for a test: in this process, or as `heartloop serve` in a child process."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from heartloop.config import Settings
from heartloop.service.app import Service
from tests.helpers.procs import stop_pid, wait_port


@contextlib.contextmanager
def running_service(settings: Settings) -> Iterator[Service]:
    """A started `Service` (the review UI, when enabled, on a free port rather than 8080)."""
    if settings.http.enabled and settings.http.port != 0:
        settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, port=0))
    service = Service(settings)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def write_config(path: Path, *, root: Path, port: int, stable_age_s: float = 1.0, callers: str = "",
                 destinations: str = "", extra: str = "", http_port: int = 0) -> Path:
    """A TOML config for `heartloop serve` on loopback (the review UI on `http_port`, 0: a free one)."""
    path.write_text(
        f"""[node]
ae_title = "HEARTLOOP"
host = "127.0.0.1"
port = {port}
receive_processes = 2
{callers}

[storage]
root = "{root}"

[series]
stable_age_s = {stable_age_s}
poll_interval_s = 0.2
min_slices = 5

[outbox]
backoff_initial_s = 0.3
backoff_max_s = 1.0
poll_interval_s = 0.2

[limits]
min_free_disk_bytes = 1048576

[http]
port = {http_port}

{destinations}
{extra}
""",
        encoding="utf-8",
    )
    return path


def start_serve(config: Path, port: int, log_path: Path) -> subprocess.Popen:
    """`heartloop serve --config` in a child process; returns once the DICOM port accepts."""
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "heartloop", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60)
    except TimeoutError:
        stop_pid(proc)
        raise
    return proc


#: States of a case whose series was assembled into a Volume: READY, then at once a contour job
#: makes it PREDICTED (a model exists) or NO_MODEL (cold start).
ASSEMBLED = ("READY", "NO_MODEL", "PREDICTED")
