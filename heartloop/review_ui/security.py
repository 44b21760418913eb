"""Who is asking, may they, and did they mean it: sessions, roles, CSRF, idle timeout, audit.

- Passwords are stored as salted scrypt hashes (werkzeug); never logged.
- The session is Flask's signed cookie: ``Secure`` (setting), ``HttpOnly``, ``SameSite=Strict``;
  it carries the user id, a CSRF token and the time of the last request (idle timeout).
- Every state-changing request (POST, PUT, PATCH, DELETE) must carry the session's CSRF token, in
  the ``X-CSRF-Token`` header (API, scripts) or a ``csrf_token`` form field (HTML forms).
- `login_required` answers 401 (API) or redirects to the login page (HTML); a wrong role is 403.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import time
from typing import Any, Callable, TypeVar

from flask import current_app, g, jsonify, redirect, request, session, url_for
from werkzeug.security import check_password_hash, generate_password_hash

from heartloop.store import Store

F = TypeVar("F", bound=Callable[..., Any])
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    return generate_password_hash(password, method="scrypt")


def password_matches(password_hash: str, password: str) -> bool:
    return check_password_hash(password_hash, password)


def store() -> Store:
    return current_app.extensions["heartloop"]["store"]


def is_api_request() -> bool:
    return request.path.startswith("/api/")


def csrf_token() -> str:
    """The session's CSRF token (created on first use)."""
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def error_response(status: int, message: str) -> Any:
    """A JSON error for API paths; HTML callers get the same text."""
    if is_api_request() or request.accept_mimetypes.best == "application/json":
        return jsonify({"error": message, "status": status}), status
    return f"<!doctype html><title>{status}</title><p>{message}</p><p><a href='/'>HeartLoop</a></p>", status


def load_user_and_check() -> Any:
    """`before_request`: idle timeout, current user into ``g.user``, CSRF on state changes."""
    g.user = None
    now = time.time()
    idle_s = current_app.config["HEARTLOOP_IDLE_TIMEOUT_S"]
    uid = session.get("uid")
    if uid is not None:
        if now - float(session.get("seen", 0)) > idle_s:
            session.pop("uid", None)
            session.pop("csrf", None)
            g.session_expired = True
        else:
            user = store().get_user_by_id(int(uid))
            if user is None or not user.active:
                session.pop("uid", None)
            else:
                g.user = user
                session["seen"] = now
    if request.method in STATE_CHANGING:
        sent = request.headers.get(CSRF_HEADER) or (request.form.get(CSRF_FIELD) if request.form else None)
        expected = session.get("csrf")
        if not sent or not expected or not hmac.compare_digest(str(sent), str(expected)):
            return error_response(403, "CSRF token missing or wrong: reload the page (scripts: send the token "
                                       f"from GET /api/session in the {CSRF_HEADER} header)")
    return None


def login_user(user: Any) -> None:
    session.clear()
    session.permanent = True
    session["uid"] = user.id
    session["seen"] = time.time()
    csrf_token()


def logout_user() -> None:
    session.clear()


def login_required(role: str | None = None) -> Callable[[F], F]:
    """Decorator: a logged-in user (401 / login redirect otherwise), with `role` when given
    (``"admin"``; admins may do everything a reviewer may)."""

    def wrap(view: F) -> F:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if g.get("user") is None:
                if is_api_request():
                    msg = "session expired: log in again" if g.get("session_expired") else "log in first"
                    return error_response(401, msg)
                return redirect(url_for("auth.login_page", next=request.full_path))
            if role is not None and g.user.role != role and g.user.role != "admin":
                return error_response(403, f"this needs the {role} role; you are a {g.user.role}")
            return view(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def audit(action: str, target: str = "", **detail: Any) -> None:
    """Append to the tamper-evident audit log as the current user (``anonymous`` when none)."""
    user = g.get("user")
    actor = user.username if user is not None else str(detail.pop("actor", "anonymous"))
    detail.setdefault("ip", request.remote_addr)
    store().append_audit(actor, action, target, detail)
