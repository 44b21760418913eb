"""The worklist: `/` (login page for visitors), ``GET /api/cases`` and ``GET /api/cases/<id>/next``.

Patient identifiers are shown to logged-in staff and never logged. The patient name is not stored
by the DICOM node (only the Patient ID, on the case), so ``patient_name`` is null.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g, jsonify, render_template, request

from heartloop.core.states import CaseState
from heartloop.review_ui.security import error_response, login_required, store
from heartloop.store import Store
from heartloop.store.people import WorklistRow

log = logging.getLogger(__name__)

bp = Blueprint("worklist", __name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def row_json(row: WorklistRow) -> dict[str, Any]:
    """The contract's case object (docs/review-api.md, "Worklist")."""
    return {
        "id": row.id, "state": row.state, "reason": row.reason, "arrived_at": row.arrived_at,
        "updated_at": row.updated_at, "n_slices": row.n_slices, "model_version": row.model_version,
        "predicted_mean_gy": row.predicted_mean_gy, "mean_delta_gy": row.mean_delta_gy,
        "dose_flagged": row.dose_flagged, "incomplete": row.incomplete, "reviewable": row.reviewable,
        "patient_name": None, "patient_id": row.patient_id or None,
    }


def case_summary(db: Store, case_id: int) -> dict[str, Any] | None:
    """The worklist fields of one case (None when there is no such case); the viewer adds to them."""
    rows = db.worklist(case_id=case_id)
    return row_json(rows[0]) if rows else None


@bp.get("/")
def index() -> Any:
    """The worklist for a logged-in user; the login page (200, not a redirect) for a visitor."""
    if g.user is None:
        return render_template("login.html", error=None, next="")
    return render_template("worklist.html", states=[s.value for s in CaseState])


@bp.get("/api/cases")
@login_required()
def list_cases() -> Any:
    """Cases, newest arrival first, with ``next_case_id`` (the oldest reviewable case).

    Query: ``state`` (repeatable or comma-separated), ``flagged`` (1: dose delta flagged or
    incomplete series; 0: neither), ``limit``.
    """
    states: list[str] = []
    for value in request.args.getlist("state"):
        states += [v.strip().upper() for v in value.split(",") if v.strip()]
    known = {s.value for s in CaseState}
    unknown = sorted(set(states) - known)
    if unknown:
        return error_response(400, f"unknown state {unknown[0]!r}: use one of {', '.join(sorted(known))}")
    flagged_arg = request.args.get("flagged", "").strip().lower()
    if flagged_arg and flagged_arg not in _TRUE | _FALSE:
        return error_response(400, "flagged must be 1 or 0")
    flagged = True if flagged_arg in _TRUE else False if flagged_arg in _FALSE else None
    limit = request.args.get("limit", type=int)
    if limit is not None and limit < 1:
        return error_response(400, "limit must be a positive integer")
    db = store()
    rows = db.worklist(states=states or None, flagged=flagged, limit=limit)
    return jsonify({"cases": [row_json(r) for r in rows], "next_case_id": db.next_reviewable_case()})


@bp.get("/api/cases/<int:case_id>/next")
@login_required()
def next_case(case_id: int) -> Any:
    """The next reviewable case after this one (wrapping round), or null."""
    try:
        nxt = store().next_reviewable_case(case_id)
    except KeyError:
        return error_response(404, f"no case {case_id}")
    return jsonify({"next_case_id": nxt})
