"""The audit log page and API (admin): read entries, verify the hash chain.

The mechanism (`security.audit` → `Store.append_audit`) is used by every feature: logins and
logouts, case views, corrections, sends, rollbacks, user changes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, jsonify, render_template, request

from heartloop.review_ui.security import audit, error_response, login_required, store

log = logging.getLogger(__name__)

bp = Blueprint("audit_log", __name__)

MAX_LIMIT = 1000


def entry_json(row: Any) -> dict[str, Any]:
    """One audit row as JSON (the detail parsed; the raw row stays the verifiable record)."""
    try:
        detail = json.loads(row.detail_json or "{}")
    except ValueError:
        detail = {"unparseable": row.detail_json}
    return {"id": row.id, "at": row.at, "actor": row.actor, "action": row.action, "target": row.target,
            "detail": detail, "hash": row.hash, "prev_hash": row.prev_hash}


@bp.get("/audit")
@login_required("admin")
def page() -> Any:
    """The audit log table with filters and the chain check."""
    return render_template("audit.html")


@bp.get("/api/audit")
@login_required("admin")
def entries() -> Any:
    """Entries newest first: ``limit`` (≤ 1000, default 200), ``before`` (an id), ``actor``, ``action``,
    ``target``."""
    limit = request.args.get("limit", default=200, type=int)
    before = request.args.get("before", type=int)
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        return error_response(400, f"limit must be 1..{MAX_LIMIT}")
    rows = store().audit_entries(limit=limit, before_id=before, actor=request.args.get("actor") or None,
                                 action=request.args.get("action") or None,
                                 target=request.args.get("target") or None)
    return jsonify({"entries": [entry_json(r) for r in rows]})


@bp.get("/api/audit/verify")
@login_required("admin")
def verify() -> Any:
    """Walk the chain: ``{"ok", "rows", "broken_id", "reason"}``."""
    check = store().verify_audit()
    if not check.ok:
        log.error("audit chain broken at row %s: %s", check.broken_id, check.reason)
    audit("verify_audit", "audit_log", ok=check.ok, broken_id=check.broken_id)
    return jsonify({"ok": check.ok, "rows": check.rows, "broken_id": check.broken_id, "reason": check.reason})
