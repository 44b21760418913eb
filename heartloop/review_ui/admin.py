"""Administration (admin role): users, model versions and rollback, the effective settings.

Every change an admin makes is audited. ``GET /api/models`` is open to every logged-in user (the
dashboard shows it); everything else here needs the admin role.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, jsonify, render_template, request

from heartloop.config import settings_to_dict
from heartloop.review_ui.security import audit, error_response, hash_password, login_required, store
from heartloop.store.people import ROLES

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__)

#: Setting keys whose values are secrets or may carry one (a database URL holds its password).
_SECRET_WORDS = ("password", "secret", "token", "key")


def user_json(user: Any) -> dict[str, Any]:
    """An admin's view of a user (never the password hash)."""
    return {"username": user.username, "display_name": user.display_name, "role": user.role,
            "active": bool(user.active), "created_at": user.created_at}


def redact_url(url: str) -> str:
    """A database URL with its password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, at, host = rest.rpartition("@")
    user, colon, _password = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def redacted(value: Any, key: str = "") -> Any:
    """Settings as plain data with passwords hidden (recursively)."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, key) for v in value]
    lowered = key.lower()
    if isinstance(value, str) and value and any(w in lowered for w in _SECRET_WORDS):
        return "***"
    if isinstance(value, str) and ("url" in lowered or "://" in value):
        return redact_url(value)
    return value


def _active_admins() -> list[str]:
    return [u.username for u in store().list_users() if u.active and u.role == "admin"]


@bp.get("/admin")
@login_required("admin")
def page() -> Any:
    """Users, model versions and settings."""
    return render_template("admin.html", roles=ROLES)


@bp.get("/api/users")
@login_required("admin")
def list_users() -> Any:
    """Every user (active or not)."""
    return jsonify({"users": [user_json(u) for u in store().list_users()]})


@bp.post("/api/users")
@login_required("admin")
def create_user() -> Any:
    """Create a user from ``{"username", "password", "role", "display_name"}`` → 201 ``{"user"}``."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error_response(400, "send a JSON object {username, password, role, display_name}")
    username = str(body.get("username", "")).strip()
    role = str(body.get("role", "reviewer"))
    display_name = str(body.get("display_name", "") or "").strip()
    try:
        password_hash = hash_password(str(body.get("password", "")))
        store().add_user(username, password_hash, role, display_name)
    except ValueError as exc:
        status = 409 if "already exists" in str(exc) else 400
        return error_response(status, str(exc))
    audit("user_create", f"user:{username}", role=role, display_name=display_name)
    log.info("user created (role %s) by an admin", role)
    return jsonify({"user": user_json(store().get_user(username))}), 201


@bp.patch("/api/users/<username>")
@login_required("admin")
def change_user(username: str) -> Any:
    """Change ``role``, ``active``, ``display_name`` or ``password`` (reset) of a user → ``{"user"}``.

    The last active admin cannot be demoted or deactivated (nobody could administer HeartLoop).
    """
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not body:
        return error_response(400, "send a JSON object with role, active, display_name and/or password")
    unknown = sorted(set(body) - {"role", "active", "display_name", "password"})
    if unknown:
        return error_response(400, f"cannot change {', '.join(unknown)} of a user")
    db = store()
    user = db.get_user(username)
    if user is None:
        return error_response(404, f"no user {username!r}")
    fields: dict[str, Any] = {}
    if "role" in body:
        if body["role"] not in ROLES:
            return error_response(400, f"role must be one of {', '.join(ROLES)}")
        fields["role"] = body["role"]
    if "active" in body:
        if not isinstance(body["active"], bool):
            return error_response(400, "active must be true or false")
        fields["active"] = body["active"]
    if "display_name" in body:
        fields["display_name"] = str(body["display_name"] or "").strip()[:128]
    if "password" in body:
        try:
            fields["password_hash"] = hash_password(str(body["password"]))
        except ValueError as exc:
            return error_response(400, str(exc))
    loses_admin = user.role == "admin" and user.active and (
        fields.get("role", "admin") != "admin" or fields.get("active", True) is False)
    if loses_admin and _active_admins() == [user.username]:
        return error_response(409, "this is the last active admin: make another admin first")
    db.update_user(username, **fields)
    changed = sorted("password" if k == "password_hash" else k for k in fields)
    audit("user_change", f"user:{username}", changed=changed,
          **{k: v for k, v in fields.items() if k in ("role", "active", "display_name")})
    return jsonify({"user": user_json(db.get_user(username))})


@bp.get("/api/models")
@login_required()
def list_models() -> Any:
    """Registry versions, newest first."""
    from heartloop.review_ui.app import ui_services

    return jsonify({"models": ui_services().list_models()})


@bp.post("/api/models/<version>/rollback")
@login_required("admin")
def rollback(version: str) -> Any:
    """Make an earlier model version current again → ``{"current": version}``."""
    from heartloop.review_ui.app import ui_services

    services = ui_services()
    try:
        services.rollback_model(version)
    except KeyError:
        audit("rollback_model_refused", f"model:{version[:32]}", reason="no such version")
        return error_response(404, f"no model version {version!r}")
    except ValueError as exc:
        audit("rollback_model_refused", f"model:{version[:32]}", reason=str(exc))
        return error_response(409, str(exc))
    audit("rollback_model", f"model:{version}")
    log.info("model rolled back to %s by an admin", version)
    return jsonify({"current": version})


@bp.get("/api/settings")
@login_required("admin")
def settings_view() -> Any:
    """The effective settings (passwords hidden)."""
    from heartloop.review_ui.app import ui_settings

    audit("view_settings", "settings")
    return jsonify({"settings": redacted(settings_to_dict(ui_settings()))})
