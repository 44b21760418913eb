"""Log in and out: the HTML login page and the JSON session API (`/api/session`).

Failed logins are counted per username (`security.LoginThrottle`); a locked name is answered 429
with ``Retry-After`` — even with the right password — until the lockout runs out.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flask import Blueprint, g, jsonify, redirect, render_template, request, url_for

from heartloop.review_ui import security
from heartloop.review_ui.security import (audit, csrf_token, error_response, login_user, logout_user,
                                          password_matches, store)

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)


def user_json(user: Any) -> dict[str, Any] | None:
    """The session API's view of a user (None for nobody)."""
    if user is None:
        return None
    return {"username": user.username, "role": user.role, "display_name": user.display_name or user.username}


class LoginRefused(Exception):
    """A login that did not succeed: `status` 401 (wrong) or 429 (locked), with a readable message."""

    def __init__(self, status: int, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


def _authenticate(username: str, password: str) -> Any:
    """The active user with this password, or `LoginRefused`; failures and lockouts are audited."""
    throttle = security.login_throttle()
    at = security.now()
    target = f"user:{username[:64]}"
    wait = throttle.locked_for(username, at)
    if wait > 0:
        audit("login_locked", target, actor="anonymous")
        raise LoginRefused(429, f"too many failed logins for this user: try again in {math.ceil(wait)} s", wait)
    user = store().get_user(username) if username else None
    if user is None or not user.active or not password_matches(user.password_hash, password):
        locked = throttle.failed(username, at)
        audit("login_failed", target, actor="anonymous", locked=locked)
        if locked:
            log.warning("login locked for %.0f s after %d failures", throttle.lockout_s, throttle.max_failures)
            raise LoginRefused(429, f"too many failed logins for this user: try again in "
                                    f"{math.ceil(throttle.lockout_s)} s", throttle.lockout_s)
        raise LoginRefused(401, "unknown user or wrong password")
    throttle.succeeded(username)
    return user


def _start(user: Any) -> None:
    login_user(user)
    g.user = user
    audit("login", f"user:{user.username}")


def _safe_next(nxt: str) -> str:
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else url_for("worklist.index")


@bp.get("/login")
def login_page() -> Any:
    """The login form (a logged-in user goes to the worklist)."""
    if g.user is not None:
        return redirect(url_for("worklist.index"))
    return render_template("login.html", error=None, next=request.args.get("next", ""))


@bp.post("/login")
def login_form() -> Any:
    """The login form's POST: session cookie and a redirect to `next` (or the worklist)."""
    username = request.form.get("username", "").strip()
    try:
        user = _authenticate(username, request.form.get("password", ""))
    except LoginRefused as exc:
        text = "Unknown user or wrong password." if exc.status == 401 else exc.message[0].upper() + exc.message[1:] + "."
        rsp = render_template("login.html", error=text, next=request.form.get("next", ""))
        return rsp, exc.status, ({"Retry-After": str(math.ceil(exc.retry_after_s))} if exc.status == 429 else {})
    _start(user)
    return redirect(_safe_next(request.form.get("next", "")))


@bp.post("/logout")
def logout_form() -> Any:
    if g.user is not None:
        audit("logout", f"user:{g.user.username}")
    logout_user()
    return redirect(url_for("auth.login_page"))


@bp.get("/api/session")
def session_get() -> Any:
    """Who is logged in (or null) and the CSRF token to send with state-changing requests."""
    return jsonify({"user": user_json(g.user), "csrf_token": csrf_token()})


@bp.post("/api/session")
def session_post() -> Any:
    """Log in with ``{"username", "password"}``; answers the user and a fresh CSRF token."""
    body = request.get_json(silent=True) or {}
    username = str(body.get("username", "")).strip()
    try:
        user = _authenticate(username, str(body.get("password", "")))
    except LoginRefused as exc:
        rsp = error_response(exc.status, exc.message)
        if exc.status == 429:
            return rsp[0], rsp[1], {"Retry-After": str(math.ceil(exc.retry_after_s))}
        return rsp
    _start(user)
    return jsonify({"user": user_json(user), "csrf_token": csrf_token()})


@bp.delete("/api/session")
def session_delete() -> Any:
    """Log out (the session cookie is emptied)."""
    if g.user is not None:
        audit("logout", f"user:{g.user.username}")
    logout_user()
    return jsonify({"user": None, "csrf_token": csrf_token()})

