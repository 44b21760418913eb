"""The viewer: the page `/cases/<id>` and its data and correction endpoints (docs/review-api.md).

Data requests (CT slabs, the first slice, the packed prediction, dose slabs) are slices of buffers
prepared once per case by `VolumeCache` (module `volumes`), so they cost about what a static file
server costs. Corrections arrive as run-length encoded flat indices over the CT's ``[k, j, i]``
grid, are validated here (a readable reason on every refusal) and handed to
``UiServices.save_correction`` as bool volumes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
from flask import Blueprint, Response, current_app, g, jsonify, render_template, request

from heartloop.core import CaseState
from heartloop.review_ui.app import ui_services
from heartloop.review_ui.security import audit, error_response, login_required, store
from heartloop.review_ui.services import CorrectionRequest
from heartloop.review_ui.volumes import SLAB, Box, PreparedCase, VolumeCache, mask_box
from heartloop.review_ui.volumes import dose_slab as dose_slab_bytes
from heartloop.store import active_seconds

log = logging.getLogger(__name__)

bp = Blueprint("viewer", __name__)

EXTENSION = "heartloop_volumes"
MAX_EVENTS_PER_BATCH = 2000
#: States in which a case has a complete CT and may receive a (new) correction.
CORRECTABLE = (CaseState.PREDICTED.value, CaseState.NO_MODEL.value, CaseState.FAILED.value,
               CaseState.CORRECTED.value, CaseState.SENT.value)
CACHE_CONTROL = "private, max-age=3600"


@bp.record_once
def _attach_cache(state: Any) -> None:
    """One `VolumeCache` per app, reaching the app's `UiServices` when it first loads."""
    app = state.app
    state.app.extensions[EXTENSION] = VolumeCache(lambda: app.extensions["heartloop"]["services"]
                                                  or _no_services())


def _no_services() -> Any:
    from flask import abort

    abort(503, description="this HeartLoop web app was started without its services")


def volume_cache() -> VolumeCache:
    """The app's `VolumeCache` (also used by tests and the bench to inspect loads)."""
    return current_app.extensions[EXTENSION]


# -- helpers ------------------------------------------------------------------------------------
def _case_or_404(case_id: int) -> Any:
    case = store().get_case(case_id)
    if case is None:
        return None
    return case


def _prepared(case_id: int) -> Any:
    """The prepared case (404 for an unknown case, 409 when its CT cannot be read)."""
    cache = volume_cache()
    prepared = cache.peek(case_id)
    if prepared is not None:
        return prepared
    if _case_or_404(case_id) is None:
        return error_response(404, f"no case {case_id}")
    ui_services()  # 503 without services
    try:
        return cache.get(case_id)
    except KeyError:
        return error_response(404, f"no case {case_id}")
    except ValueError as exc:
        return error_response(409, f"case {case_id} cannot be shown: {exc}")


def _binary(view: bytes, etag: str) -> Response:
    """An octet-stream answer with a strong ETag (304 when the browser already has it)."""
    if request.if_none_match.contains(etag):
        rsp = Response(status=304)
    else:
        rsp = Response([view], mimetype="application/octet-stream", direct_passthrough=True)
        rsp.headers["Content-Length"] = str(len(view))
    rsp.set_etag(etag)
    rsp.headers["Cache-Control"] = CACHE_CONTROL
    return rsp


def next_case_id(after: int | None) -> int | None:
    """The next reviewable case after `after` (the store's rule, wrapping round), or None."""
    try:
        return store().next_reviewable_case(after)
    except KeyError:
        return store().next_reviewable_case(None)


def _case_fields(case: Any) -> dict[str, Any]:
    """The worklist's case fields (docs/review-api.md, "Worklist"), built by the worklist."""
    from heartloop.review_ui.worklist import case_summary

    return case_summary(store(), case.id) or {"id": case.id, "state": case.state}


def _dose_meta(cache: VolumeCache, case_id: int) -> dict[str, Any] | None:
    """Meta's ``dose``: null (none), the scale, or ``pending`` while it is still being prepared."""
    state, dose = cache.dose_state(case_id)
    if state == "none":
        return None
    if dose is None:
        return {"max_gy": None, "scale": None, "pending": True}
    return {"max_gy": dose.max_gy, "scale": dose.scale, "pending": False}


def _box_arg(value: Any, shape: Sequence[int], name: str = "box") -> Box | None:
    """Validate a half-open ``[k0, k1, j0, j1, i0, i1]`` box inside `shape` (None allowed)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 6 or not all(type(v) is int for v in value):
        raise ValueError(f"{name} must be null or six integers [k0, k1, j0, j1, i0, i1]")
    for axis, (lo, hi) in enumerate(zip(value[0::2], value[1::2])):
        if not 0 <= lo < hi <= shape[axis]:
            raise ValueError(f"{name} axis {'kji'[axis]}: [{lo}, {hi}) is empty or outside 0..{shape[axis]}")
    return tuple(value)  # type: ignore[return-value]


def decode_rle(runs: Any, n_voxels: int, name: str) -> np.ndarray:
    """Decode ``[start0, length0, start1, length1, ...]`` into a flat bool array of `n_voxels`.

    Raises
    ------
    ValueError
        With a reason a person can read: not a list of integers, odd length, a run that is empty,
        out of range, not ascending or overlapping the previous one.
    """
    if not isinstance(runs, list):
        raise ValueError(f"{name} must be a list [start, length, ...]")
    if len(runs) % 2:
        raise ValueError(f"{name} has an odd number of values ({len(runs)}): it must be start, length pairs")
    if not all(type(v) is int for v in runs):
        bad = next(v for v in runs if type(v) is not int)
        raise ValueError(f"{name} must hold integers only, found {bad!r}")
    out = np.zeros(n_voxels, dtype=bool)
    if not runs:
        return out
    pairs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    starts, lengths = pairs[:, 0], pairs[:, 1]
    ends = starts + lengths
    if (lengths < 1).any():
        r = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(f"{name} run {r} has length {int(lengths[r])}: lengths must be at least 1")
    if (starts < 0).any() or (ends > n_voxels).any():
        r = int(np.flatnonzero((starts < 0) | (ends > n_voxels))[0])
        raise ValueError(f"{name} run {r} [{int(starts[r])}, {int(ends[r])}) is outside the volume "
                         f"(0..{n_voxels})")
    if len(starts) > 1 and (starts[1:] < ends[:-1]).any():
        r = int(np.flatnonzero(starts[1:] < ends[:-1])[0]) + 1
        raise ValueError(f"{name} run {r} starts at {int(starts[r])}, before the end of run {r - 1} "
                         f"({int(ends[r - 1])}): runs must be ascending and disjoint")
    delta = np.zeros(n_voxels + 1, dtype=np.int8)
    delta[starts] += 1
    delta[ends] -= 1
    np.cumsum(delta[:-1], dtype=np.int8, out=delta[:-1])
    out[:] = delta[:-1] > 0
    return out


def encode_rle(mask: np.ndarray) -> list[int]:
    """The inverse of `decode_rle` over the C-order flat index (tests and scripts use it)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flat, [0]))))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


# -- page ---------------------------------------------------------------------------------------
@bp.get("/cases/<int:case_id>")
@login_required()
def viewer_page(case_id: int) -> Any:
    """The viewer (its data comes from the JSON/binary endpoints below)."""
    case = _case_or_404(case_id)
    if case is None:
        return error_response(404, f"no case {case_id}")
    return render_template("viewer.html", case_id=case_id, slab=SLAB)


# -- data ---------------------------------------------------------------------------------------
@bp.get("/api/cases/<int:case_id>")
@login_required()
def case_meta(case_id: int) -> Any:
    """Case fields plus the grid, slabs, prediction box and dose scale the viewer needs.

    Counts as one "view_case" in the audit log unless ``?refresh=1`` (the viewer polling for a
    new prediction after a bounding box).
    """
    case = _case_or_404(case_id)
    if case is None:
        return error_response(404, f"no case {case_id}")
    cache = volume_cache()
    cached = cache.peek(case_id)
    if cached is not None and case.n_slices and cached.shape[0] != case.n_slices:
        # Slices arrived after the case was prepared (it was assembled again): read it afresh.
        cache.invalidate(case_id)
    prepared = _prepared(case_id)
    if not isinstance(prepared, PreparedCase):
        return prepared
    try:
        prediction = cache.prediction(case_id, case.updated_at)
    except (KeyError, ValueError) as exc:
        log.warning("case %d: prediction unreadable (%s)", case_id, type(exc).__name__)
        prediction = None
    body = _case_fields(case)
    heart_box = prediction.box if prediction is not None and prediction.voxels else None
    first = (heart_box[0] + heart_box[1]) // 2 if heart_box else prepared.shape[0] // 2
    body.update({
        "shape": list(prepared.shape),
        "spacing_mm": list(prepared.spacing_mm),
        "slice_offsets_mm": list(prepared.slice_offsets_mm),
        "origin_mm": list(prepared.origin_mm),
        "row_direction": list(prepared.row_direction),
        "column_direction": list(prepared.column_direction),
        "normal": list(prepared.normal),
        "slab": SLAB,
        "n_slabs": prepared.n_slabs,
        "hu_min": prepared.hu_min,
        "hu_max": prepared.hu_max,
        "prediction": None if prediction is None else {"model_version": prediction.model_version,
                                                       "box": list(prediction.box)},
        "dose": _dose_meta(cache, case_id),
        "heart_box": list(heart_box) if heart_box else None,
        "first_slice": int(first),
        "next_case_id": next_case_id(case_id),
    })
    if request.args.get("refresh") != "1":
        audit("view_case", f"case:{case_id}")
        cache.prefetch(body["next_case_id"])
    return jsonify(body)


def _ct_bytes(case_id: int, part: str, n: int) -> Any:
    """CT bytes of a prepared case: ``part`` is ``"slab"`` or ``"slice"`` number `n`."""
    prepared = _prepared(case_id)
    if not isinstance(prepared, PreparedCase):
        return prepared
    try:
        view = prepared.ct_slab(n) if part == "slab" else prepared.ct_slice(n)
    except IndexError as exc:
        return error_response(404, str(exc))
    return _binary(view, f"ct{part}-{case_id}-{prepared.etag}-{n}")


@bp.get("/api/cases/<int:case_id>/ct/<int:n>")
@login_required()
def ct_slab(case_id: int, n: int) -> Any:
    """Slab `n`: slices ``[n*S, min((n+1)*S, K))`` as int16 little-endian HU, k-major."""
    return _ct_bytes(case_id, "slab", n)


@bp.get("/api/cases/<int:case_id>/ct/slice/<int:k>")
@login_required()
def ct_slice(case_id: int, k: int) -> Any:
    """One slice as int16 little-endian HU (the first image, before the slabs arrive)."""
    return _ct_bytes(case_id, "slice", k)


@bp.get("/api/cases/<int:case_id>/prediction")
@login_required()
def prediction_mask(case_id: int) -> Any:
    """The latest prediction, ``np.packbits`` of the mask cropped to ``prediction.box``; 404 if none."""
    case = _case_or_404(case_id)
    if case is None:
        return error_response(404, f"no case {case_id}")
    prepared = _prepared(case_id)
    if not isinstance(prepared, PreparedCase):
        return prepared
    try:
        prediction = volume_cache().prediction(case_id, case.updated_at)
    except KeyError:
        prediction = None
    except ValueError as exc:
        return error_response(409, f"the prediction of case {case_id} cannot be shown: {exc}")
    if prediction is None:
        return error_response(404, f"case {case_id} has no prediction")
    rsp = _binary(prediction.packed, f"pred-{case_id}-{prediction.etag}")
    rsp.headers["Cache-Control"] = "private, no-cache"  # changes when the case is re-predicted
    rsp.headers["X-Prediction-Box"] = ",".join(map(str, prediction.box))
    rsp.headers["X-Model-Version"] = prediction.model_version
    return rsp


@bp.get("/api/cases/<int:case_id>/dose/<int:n>")
@login_required()
def dose_slab(case_id: int, n: int) -> Any:
    """Dose slab `n` as uint8 per voxel (Gy = value × ``dose.scale``); 404 when there is no dose."""
    prepared = _prepared(case_id)
    if not isinstance(prepared, PreparedCase):
        return prepared
    dose = volume_cache().dose(case_id)
    if dose is None:
        return error_response(404, f"case {case_id} has no dose")
    try:
        data = dose_slab_bytes(prepared, dose, n)
    except IndexError as exc:
        return error_response(404, str(exc))
    return _binary(data, f"dose-{case_id}-{dose.etag}-{n}")


# -- actions ------------------------------------------------------------------------------------
@bp.post("/api/cases/<int:case_id>/events")
@login_required()
def post_events(case_id: int) -> Any:
    """Store a batch of interaction events ``{"events": [{"t": epoch_ms, "kind": str}]}``."""
    if _case_or_404(case_id) is None:
        return error_response(404, f"no case {case_id}")
    body = request.get_json(silent=True)
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list):
        return error_response(400, 'send {"events": [{"t": epoch_ms, "kind": "paint"}, ...]}')
    if len(events) > MAX_EVENTS_PER_BATCH:
        return error_response(400, f"{len(events)} events in one batch; send at most {MAX_EVENTS_PER_BATCH}")
    rows: list[tuple[float, str]] = []
    for n, ev in enumerate(events):
        t = ev.get("t") if isinstance(ev, dict) else None
        kind = ev.get("kind") if isinstance(ev, dict) else None
        if type(t) not in (int, float) or not math.isfinite(t) or not isinstance(kind, str) or not kind:
            return error_response(400, f"event {n} needs a numeric 't' (epoch ms) and a 'kind' text")
        rows.append((float(t) / 1000.0, kind))
    stored = store().record_interactions(case_id, g.user.username, rows)
    return jsonify({"stored": stored})


@bp.post("/api/cases/<int:case_id>/box")
@login_required()
def post_box(case_id: int) -> Any:
    """Queue a re-prediction limited to ``box`` (or unlimited with ``null``); 202."""
    if _case_or_404(case_id) is None:
        return error_response(404, f"no case {case_id}")
    prepared = _prepared(case_id)
    if not isinstance(prepared, PreparedCase):
        return prepared
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "box" not in body:
        return error_response(400, 'send {"box": [k0, k1, j0, j1, i0, i1] | null}')
    try:
        box = _box_arg(body["box"], prepared.shape)
    except ValueError as exc:
        return error_response(400, str(exc))
    try:
        ui_services().request_prediction(case_id, list(box) if box else None)
    except KeyError:
        return error_response(404, f"no case {case_id}")
    except ValueError as exc:
        return error_response(409, str(exc))
    audit("request_prediction", f"case:{case_id}", box=list(box) if box else None)
    return jsonify({"queued": True, "box": list(box) if box else None}), 202


@bp.post("/api/cases/<int:case_id>/correction")
@login_required()
def post_correction(case_id: int) -> Any:
    """Save a reviewer's correction (RLE foreground/background); 201 with the next case."""
    case = _case_or_404(case_id)
    if case is None:
        return error_response(404, f"no case {case_id}")
    if case.state not in CORRECTABLE:
        return error_response(409, f"case {case_id} is {case.state}: it cannot be corrected now")
    prepared = _prepared(case_id)
    if not isinstance(prepared, PreparedCase):
        return prepared
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error_response(400, "send a JSON object {foreground, background, kind, active_seconds, box}")
    kind = body.get("kind", "sparse")
    if kind not in ("sparse", "dense"):
        return error_response(400, f"kind must be 'sparse' or 'dense', got {kind!r}")
    client_seconds = body.get("active_seconds")
    if client_seconds is not None and (type(client_seconds) not in (int, float) or not math.isfinite(client_seconds)
                                       or client_seconds < 0):
        return error_response(400, "active_seconds must be a non-negative number or null")
    n_voxels = int(np.prod(prepared.shape))
    try:
        fg = decode_rle(body.get("foreground", []), n_voxels, "foreground")
        bg = decode_rle(body.get("background", []), n_voxels, "background")
        box = _box_arg(body.get("box"), prepared.shape)
    except ValueError as exc:
        return error_response(400, str(exc))
    both = int(np.count_nonzero(fg & bg))
    if both:
        return error_response(400, f"{both} voxel(s) are painted both foreground and background")
    n_fg, n_bg = int(np.count_nonzero(fg)), int(np.count_nonzero(bg))
    if kind == "sparse" and n_fg + n_bg == 0:
        return error_response(400, "an empty sparse correction: paint some foreground or background first")
    if kind == "dense" and n_fg == 0:
        return error_response(400, "a dense correction (contoured from scratch) needs a painted heart")
    user = g.user
    times = [e.at for e in store().interactions(case_id, user.username)]
    seconds = active_seconds(times) if times else (float(client_seconds) if client_seconds is not None else None)
    request_ = CorrectionRequest(
        case_id=case_id, foreground=fg.reshape(prepared.shape), background=bg.reshape(prepared.shape),
        username=user.username, person_name=user.display_name or user.username, kind=kind,
        active_seconds=seconds, box=box)
    try:
        result = dict(ui_services().save_correction(request_))
    except KeyError:
        return error_response(404, f"no case {case_id}")
    except ValueError as exc:
        now = store().get_case(case_id)
        status = 409 if now is None or now.state not in CORRECTABLE else 400
        return error_response(status, str(exc))
    nxt = result.get("next_case_id", next_case_id(case_id))
    audit("save_correction", f"case:{case_id}", correction_id=result.get("correction_id"), kind=kind,
          fg_voxels=n_fg, bg_voxels=n_bg, active_seconds=seconds)
    volume_cache().prefetch(nxt)
    log.info("case %d corrected (%s, %d fg / %d bg voxels)", case_id, kind, n_fg, n_bg)
    return jsonify({"correction_id": result.get("correction_id"), "state": result.get("state"),
                    "next_case_id": nxt, "active_seconds": seconds}), 201


__all__ = ["bp", "decode_rle", "encode_rle", "mask_box", "next_case_id", "volume_cache"]
