"""The Flask application factory of the review UI (one blueprint per feature)."""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask

from heartloop.config import Settings
from heartloop.review_ui import security
from heartloop.review_ui.services import UiServices
from heartloop.store import Store

log = logging.getLogger(__name__)


def secret_key(root: Path) -> bytes:
    """The signing key of session cookies: made once per installation, kept 0600 in the data dir."""
    path = root / ".secret_key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key


def create_app(settings: Settings, store: Store, services: UiServices | None = None, *,
               testing: bool = False) -> Flask:
    """Build the review UI.

    Parameters
    ----------
    settings
        Validated settings (``[http]`` section: cookies, idle timeout).
    store
        The service's store.
    services
        What the UI needs from the rest of HeartLoop (`UiServices`); pages that need one answer
        503 when it is missing.
    testing
        Flask's testing mode.
    """
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key(store.files.root),
        SESSION_COOKIE_NAME="heartloop_session",
        SESSION_COOKIE_SECURE=settings.http.secure_cookies,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=settings.http.idle_timeout_min),
        HEARTLOOP_IDLE_TIMEOUT_S=settings.http.idle_timeout_min * 60.0,
        MAX_CONTENT_LENGTH=256 * 1024 * 1024,
        TESTING=testing,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["heartloop"] = {"settings": settings, "store": store, "services": services}
    app.before_request(security.load_user_and_check)
    app.jinja_env.globals["csrf_token"] = security.csrf_token

    from heartloop.review_ui import admin, apidocs, audit_log, auth, dashboard, viewer, worklist

    for module in (auth, worklist, viewer, dashboard, audit_log, admin, apidocs):
        app.register_blueprint(module.bp)

    app.after_request(security_headers)
    for status in (400, 401, 403, 404, 405, 409, 413, 429, 500, 503):
        app.register_error_handler(status, lambda exc, status=status: security.error_response(
            status, getattr(exc, "description", None) or str(exc)))
    return app


#: Same-origin everything: no CDN, no inline script, no framing, forms post only here.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; img-src 'self' data: blob:; "
                           "style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; "
                           "form-action 'self'; base-uri 'self'; object-src 'none'")


def security_headers(response: Any) -> Any:
    """`after_request`: browser hardening, and no caching of pages and JSON (they carry patient
    data); binary slabs set their own private caching."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    if "Cache-Control" not in response.headers and response.mimetype in ("application/json", "text/html"):
        response.headers["Cache-Control"] = "no-store"
    return response


def ui_services() -> UiServices:
    """The `UiServices` of the running app (503 when the app was built without them)."""
    from flask import abort, current_app

    services = current_app.extensions["heartloop"]["services"]
    if services is None:
        abort(503, description="this HeartLoop web app was started without its services")
    return services


def ui_settings() -> Settings:
    """The settings of the running app."""
    from flask import current_app

    return current_app.extensions["heartloop"]["settings"]
