"""Run HeartLoop for a test: in this process, or as `heartloop serve` in a child process."""

from __future__ import annotations

import contextlib
import dataclasses
import http.cookiejar
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

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


def tps_destination(port: int, name: str = "tps", ae_title: str = "TPS") -> str:
    """The ``[[destinations]]`` TOML of a TPS (a dcmtk storescp) on loopback `port`."""
    return f"""
[[destinations]]
name = "{name}"
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}
"""


def write_config(path: Path, *, root: Path, port: int, stable_age_s: float = 1.0, callers: str = "",
                 destinations: str = "", extra: str = "", http_port: int = 0, receive_processes: int = 2) -> Path:
    """A TOML config for `heartloop serve` on loopback (the review UI on `http_port`, 0: a free one)."""
    path.write_text(
        f"""[node]
ae_title = "HEARTLOOP"
host = "127.0.0.1"
port = {port}
receive_processes = {receive_processes}
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


class ApiClient:
    """A scripted user of the review UI's HTTP API (docs/review-api.md): a cookie jar, the CSRF
    token from ``GET /api/session``, JSON in and out, every call bounded in time."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        # The session cookie is Secure; browsers send it to http://127.0.0.1 (a secure context),
        # so this client does too.
        policy = http.cookiejar.DefaultCookiePolicy(secure_protocols=("https", "wss", "http"))
        self.jar = http.cookiejar.CookieJar(policy)
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.base = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.csrf: str | None = None

    def call(self, method: str, path: str, body: Any = None, *, csrf: bool = True) -> tuple[int, Any]:
        """``(status, parsed JSON | bytes | None)``; HTTP errors are answers, not exceptions."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if method != "GET" and csrf:
            if self.csrf is None:
                self.csrf = self.call("GET", "/api/session")[1]["csrf_token"]
            headers["X-CSRF-Token"] = self.csrf or ""
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=self.timeout_s) as rsp:
                status, ctype, raw = rsp.status, rsp.headers.get("Content-Type", ""), rsp.read()
        except urllib.error.HTTPError as exc:
            status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
        if "json" in ctype:
            return status, json.loads(raw or b"null")
        return status, raw

    def get(self, path: str) -> Any:
        status, data = self.call("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path} answered {status}: {data!r}")
        return data

    def add_user(self, username: str, password: str, role: str = "reviewer", display_name: str = "") -> None:
        """As an admin: create a user (``POST /api/users``)."""
        status, body = self.call("POST", "/api/users", {"username": username, "password": password, "role": role,
                                                        "display_name": display_name})
        if status not in (200, 201):
            raise AssertionError(f"adding user {username} answered {status}: {body!r}")

    def login(self, username: str, password: str) -> dict[str, Any]:
        status, data = self.call("POST", "/api/session", {"username": username, "password": password})
        if status != 200:
            raise AssertionError(f"login as {username} answered {status}: {data!r}")
        self.csrf = data["csrf_token"]
        return data
