"""Time and learning, shown: the paper's figures per corrected case, and the trainer's state.

- ``GET /dashboard``: the page (inline SVG figures drawn by ``static/js/dashboard.js``).
- ``GET /api/dashboard``: per corrected case, in correction order — active annotation time,
  Dice(predicted, corrected), |Δ mean heart dose| (corrected − predicted), the model version that
  made the prediction, painted voxels — and trailing running means (window `WINDOW`), as in the
  RootPainter3D paper's figures.
- ``GET /api/trainer``: the continual trainer's status (`UiServices.trainer_status`).
"""

from __future__ import annotations

from typing import Any, Sequence

from flask import Blueprint, jsonify, render_template

from heartloop.review_ui.app import ui_services
from heartloop.review_ui.security import login_required, store

bp = Blueprint("dashboard", __name__)

#: Cases in each running mean (the paper smooths its per-case series over a few cases).
WINDOW = 5
SERIES = ("active_seconds", "dice", "abs_delta_mean_gy")


def running_mean(values: Sequence[float | None], window: int = WINDOW) -> list[float | None]:
    """Trailing mean over the last `window` values, skipping missing ones (None when all are)."""
    out: list[float | None] = []
    for n in range(len(values)):
        present = [v for v in values[max(0, n - window + 1):n + 1] if v is not None]
        out.append(sum(present) / len(present) if present else None)
    return out


def dashboard_rows(db: Any) -> list[dict[str, Any]]:
    """One row per corrected case (its latest correction), ordered by that correction."""
    latest: dict[int, Any] = {}
    for row in db.corrections():  # oldest first: later rows of a case replace earlier ones
        latest.pop(row.case_id, None)
        latest[row.case_id] = row
    rows = []
    for order, row in enumerate(latest.values(), start=1):
        prediction = db.get_prediction(row.prediction_id) if row.prediction_id is not None else None
        deltas = [d for d in db.dose_deltas(row.case_id) if d.computed_at >= row.created_at]
        delta = deltas[-1].mean_delta_gy if deltas else None
        rows.append({
            "order": order,
            "case_id": row.case_id,
            "corrected_at": row.created_at,
            "active_seconds": row.active_seconds,
            "dice": row.dice,
            "abs_delta_mean_gy": None if delta is None else abs(delta),
            "model_version": prediction.model_version if prediction is not None else None,
            "corrected_voxels": int(row.fg_voxels) + int(row.bg_voxels),
        })
    return rows


@bp.get("/dashboard")
@login_required()
def page() -> Any:
    return render_template("dashboard.html", window=WINDOW)


@bp.get("/api/dashboard")
@login_required()
def api_dashboard() -> Any:
    """The per-case series of the paper's figures, with running means (see module docstring)."""
    rows = dashboard_rows(store())
    means = {key: running_mean([r[key] for r in rows]) for key in SERIES}
    return jsonify({"cases": rows, "running_mean": means, "window": WINDOW})


@bp.get("/api/trainer")
@login_required()
def api_trainer() -> Any:
    """The trainer's state: current version, best validation Dice, epochs, cases in train/val."""
    return jsonify(ui_services().trainer_status())
