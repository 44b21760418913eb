"""Test helpers: free loopback ports, processes started and stopped by their PID, bounded waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.1f} s waiting for {what} (last value {last!r})")


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    def _open() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(_open, timeout_s, what=f"127.0.0.1:{port} to accept connections")


def stop_pid(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after `timeout_s` — by its PID only."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
