"""Log in and out: the HTML login page and the JSON session API (`/api/session`)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, redirect, render_template, request, url_for

from heartloop.review_ui.security import (audit, csrf_token, error_response, login_user, logout_user,
                                          password_matches, store)

bp = Blueprint("auth", __name__)


def _user_json(user: Any) -> dict[str, Any] | None:
    if user is None:
        return None
    return {"username": user.username, "role": user.role, "display_name": user.display_name or user.username}


def _check(username: str, password: str) -> Any:
    user = store().get_user(username) if username else None
    if user is None or not user.active or not password_matches(user.password_hash, password):
        return None
    return user


@bp.get("/login")
def login_page() -> Any:
    if g.user is not None:
        return redirect(url_for("worklist.index"))
    return render_template("login.html", error=None, next=request.args.get("next", ""))


@bp.post("/login")
def login_form() -> Any:
    username = request.form.get("username", "").strip()
    user = _check(username, request.form.get("password", ""))
    if user is None:
        audit("login_failed", f"user:{username[:64]}", actor="anonymous")
        return render_template("login.html", error="Unknown user or wrong password.",
                               next=request.form.get("next", "")), 401
    login_user(user)
    g.user = user
    audit("login", f"user:{user.username}")
    nxt = request.form.get("next", "")
    return redirect(nxt if nxt.startswith("/") and not nxt.startswith("//") else url_for("worklist.index"))


@bp.post("/logout")
def logout_form() -> Any:
    if g.user is not None:
        audit("logout", f"user:{g.user.username}")
    logout_user()
    return redirect(url_for("auth.login_page"))


@bp.get("/api/session")
def session_get() -> Any:
    """Who is logged in (or null) and the CSRF token to send with state-changing requests."""
    return jsonify({"user": _user_json(g.user), "csrf_token": csrf_token()})


@bp.post("/api/session")
def session_post() -> Any:
    """Log in with ``{"username", "password"}``; answers the user and a fresh CSRF token."""
    body = request.get_json(silent=True) or {}
    username = str(body.get("username", "")).strip()
    user = _check(username, str(body.get("password", "")))
    if user is None:
        audit("login_failed", f"user:{username[:64]}", actor="anonymous")
        return error_response(401, "unknown user or wrong password")
    login_user(user)
    g.user = user
    audit("login", f"user:{user.username}")
    return jsonify({"user": _user_json(user), "csrf_token": csrf_token()})


@bp.delete("/api/session")
def session_delete() -> Any:
    if g.user is not None:
        audit("logout", f"user:{g.user.username}")
    logout_user()
    return jsonify({"user": None})
