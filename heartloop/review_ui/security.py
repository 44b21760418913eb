"""Who is asking, may they, and did they mean it: sessions, roles, CSRF, idle timeout, audit.

- Passwords are stored as salted scrypt hashes (werkzeug); never logged.
- The session is Flask's signed cookie: ``Secure`` (setting), ``HttpOnly``, ``SameSite=Strict``;
  it carries the user id, a fingerprint of the user's password hash (a password change ends every
  other session), a CSRF token and the time of the last request (idle timeout); requests marked
  ``X-HeartLoop-Background: 1`` (auto-refresh) do not count as activity.
- Views protected by `login_required` are known before the view runs: an anonymous call to one is
  answered 401 (API) or redirected to the login page (HTML) before anything else is looked at.
- Every state-changing request (POST, PUT, PATCH, DELETE) must carry the session's CSRF token, in
  the ``X-CSRF-Token`` header (API, scripts) or a ``csrf_token`` form field (HTML forms).
- A wrong role is 403.
- Logins are rate limited per username (`LoginThrottle`): after ``MAX_FAILURES`` failures in a row
  the name is locked for ``LOCKOUT_S`` seconds, even for the right password.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import threading
import time
from typing import Any, Callable, TypeVar

from flask import current_app, g, jsonify, redirect, request, session, url_for
from markupsafe import escape
from werkzeug.security import check_password_hash, generate_password_hash

from heartloop.store import Store

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
#: Sent by automatic requests (a page refreshing itself): they do not count as activity, so an
#: open worklist does not keep an unattended session alive past the idle timeout.
BACKGROUND_HEADER = "X-HeartLoop-Background"
MIN_PASSWORD_CHARS = 8
#: Failed logins in a row after which a username is locked, and for how long.
MAX_FAILURES = 5
LOCKOUT_S = 30.0


def now() -> float:
    """Wall-clock time in epoch seconds (one place, so tests can move time)."""
    return time.time()


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password`; raises ValueError for one shorter than 8 characters."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return generate_password_hash(password, method="scrypt")


def password_matches(password_hash: str, password: str) -> bool:
    """Whether `password` matches the stored hash (constant time)."""
    return check_password_hash(password_hash, password)


def password_fingerprint(password_hash: str) -> str:
    """A short digest of a password hash kept in the session: changing the password ends sessions."""
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()[:16]


def store() -> Store:
    """The app's `Store`."""
    return current_app.extensions["heartloop"]["store"]


def is_api_request() -> bool:
    return request.path.startswith("/api/")


def _wants_html() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html" and request.accept_mimetypes["text/html"] > request.accept_mimetypes["application/json"]


def csrf_token() -> str:
    """The session's CSRF token (created on first use)."""
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def error_response(status: int, message: str) -> Any:
    """``{"error", "status"}`` for API calls and scripts; a small HTML page for a browser navigating."""
    if (is_api_request() and not _wants_html()) or request.accept_mimetypes.best == "application/json":
        return jsonify({"error": message, "status": status}), status
    link = "<a href='/login'>Log in</a>" if status == 401 else "<a href='/'>HeartLoop</a>"
    return (f"<!doctype html><meta charset='utf-8'><title>{status}</title>"
            f"<link rel='stylesheet' href='/static/css/app.css'><main class='errorpage'><h1>{status}</h1>"
            f"<p>{escape(message)}</p><p>{link}</p></main>", status)


class LoginThrottle:
    """Failed logins per username; thread-safe, per process (the web server runs one process).

    Unknown usernames are counted like known ones, so a lockout says nothing about who exists.
    """

    MAX_TRACKED = 10_000

    def __init__(self, max_failures: int = MAX_FAILURES, lockout_s: float = LOCKOUT_S) -> None:
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (failures in a row, locked until)

    @staticmethod
    def _key(username: str) -> str:
        return username.strip().lower()[:64]

    def locked_for(self, username: str, at: float) -> float:
        """Seconds the name stays locked (0 when it is not)."""
        with self._lock:
            _n, until = self._failures.get(self._key(username), (0, 0.0))
        return max(0.0, until - at)

    def failed(self, username: str, at: float) -> bool:
        """Count a failure; True when it locked the name."""
        key = self._key(username)
        with self._lock:
            if len(self._failures) >= self.MAX_TRACKED:  # forget names no longer locked
                self._failures = {k: v for k, v in self._failures.items() if v[1] > at}
            n, until = self._failures.get(key, (0, 0.0))
            if until and until <= at:  # a lockout that ran out starts a new count
                n, until = 0, 0.0
            n += 1
            if n >= self.max_failures:
                self._failures[key] = (0, at + self.lockout_s)
                return True
            self._failures[key] = (n, until)
            return False

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(self._key(username), None)


def login_throttle() -> LoginThrottle:
    """The app's `LoginThrottle` (made on first use)."""
    ext = current_app.extensions["heartloop"]
    throttle = ext.get("login_throttle")
    if throttle is None:
        throttle = ext.setdefault("login_throttle", LoginThrottle())
    return throttle


def _required_role(endpoint: str | None) -> tuple[bool, str | None]:
    view = current_app.view_functions.get(endpoint) if endpoint else None
    if view is None or not getattr(view, "hl_login_required", False):
        return False, None
    return True, getattr(view, "hl_role", None)


def _anonymous_answer() -> Any:
    if is_api_request():
        msg = "session expired: log in again" if g.get("session_expired") else "log in first"
        return error_response(401, msg)
    return redirect(url_for("auth.login_page", next=request.full_path.rstrip("?")))


def _forget_user() -> None:
    """End the login but keep the CSRF token, so the login form or script can log in again."""
    token = session.get("csrf")
    session.clear()
    if token:
        session["csrf"] = token


def load_user_and_check() -> Any:
    """`before_request`: idle timeout, current user into ``g.user``, login, then CSRF on state changes."""
    g.user = None
    at = now()
    idle_s = current_app.config["HEARTLOOP_IDLE_TIMEOUT_S"]
    uid = session.get("uid")
    if uid is not None:
        if at - float(session.get("seen", 0)) > idle_s:
            _forget_user()
            g.session_expired = True
        else:
            user = store().get_user_by_id(int(uid))
            if (user is None or not user.active
                    or not hmac.compare_digest(session.get("pwv", ""), password_fingerprint(user.password_hash))):
                _forget_user()  # deactivated, deleted or password changed: this session is over
            else:
                g.user = user
                if request.headers.get(BACKGROUND_HEADER) != "1":  # polling is not a person at work
                    session["seen"] = at
    protected, _role = _required_role(request.endpoint)
    if protected and g.user is None:
        return _anonymous_answer()
    if request.method in STATE_CHANGING:
        sent = request.headers.get(CSRF_HEADER)
        if not sent and request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            sent = request.form.get(CSRF_FIELD)
        expected = session.get("csrf")
        if not sent or not expected or not hmac.compare_digest(str(sent), str(expected)):
            return error_response(403, "CSRF token missing or wrong: reload the page (scripts: send the token "
                                       f"from GET /api/session in the {CSRF_HEADER} header)")
    return None


def login_user(user: Any) -> None:
    """Start a new session for `user` (a fresh cookie and CSRF token: no session fixation)."""
    session.clear()
    session.permanent = True
    session["uid"] = user.id
    session["pwv"] = password_fingerprint(user.password_hash)
    session["seen"] = now()
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
                return _anonymous_answer()
            if role is not None and g.user.role != role and g.user.role != "admin":
                return error_response(403, f"this needs the {role} role; you are a {g.user.role}")
            return view(*args, **kwargs)

        inner.hl_login_required = True  # type: ignore[attr-defined]
        inner.hl_role = role  # type: ignore[attr-defined]
        return inner  # type: ignore[return-value]

    return wrap


def audit(action: str, target: str = "", **detail: Any) -> None:
    """Append to the tamper-evident audit log as the current user (``anonymous`` when none).

    Parameters
    ----------
    action
        What happened, a short verb phrase (``"view_case"``, ``"save_correction"``, ``"rollback_model"``).
    target
        What it happened to (``"case:12"``, ``"model:000003"``, ``"user:ann"``).
    **detail
        JSON-able facts; ``actor=`` names the actor when nobody is logged in. The client address is
        added. Never pass patient names or IDs.
    """
    user = g.get("user")
    actor = user.username if user is not None else str(detail.pop("actor", "anonymous"))
    detail.pop("actor", None)
    detail.setdefault("ip", request.remote_addr)
    store().append_audit(actor[:64], action[:64], target[:128], detail)
