"""Corrections in the service: painted fg/bg (or a clinical contour) → stored npz + row → CORRECTED.

A correction is kept as one compressed ``.npz`` under the storage root (written atomically), with
three bit-packed bool volumes on the case's CT grid — ``foreground`` (heart the model missed),
``background`` (non-heart it included) and ``prediction`` (the contour that was corrected; all
false at cold start) — plus their ``shape``. The continual trainer
(`heartloop.service.training`) reads them back with `load_correction_arrays`. This file format is
defined here only: writer and reader share `correction_to_npz` / `correction_from_npz`.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import pydicom

from heartloop.config import Settings
from heartloop.core import CaseState
from heartloop.service.contouring import mask_from_npz
from heartloop.service.lifecycle import case_series_uid, load_case_volume, ordered_series
from heartloop.store import Store

log = logging.getLogger(__name__)

#: Cases that can be corrected: a prediction (or none at cold start) exists and the CT is valid.
#: ``CORRECTED`` / ``SENT`` accept a further correction (it replaces the earlier one in training).
CORRECTABLE = (CaseState.PREDICTED.value, CaseState.NO_MODEL.value, CaseState.FAILED.value,
               CaseState.CORRECTED.value, CaseState.SENT.value)
KINDS = ("sparse", "dense")


@dataclass(frozen=True)
class CorrectionArrays:
    """The three bool volumes of a stored correction, all of one shape (the CT grid)."""

    foreground: np.ndarray
    background: np.ndarray
    prediction: np.ndarray

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.foreground, self.background, self.prediction)}
        if len(shapes) != 1:
            raise ValueError(f"correction volumes differ in shape: {sorted(shapes)}")


def correction_to_npz(arrays: CorrectionArrays) -> bytes:
    """The stored form: bit-packed, compressed (sparse strokes on a 512×512×150 CT: a few kB)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, shape=np.array(arrays.foreground.shape),
                        foreground=np.packbits(arrays.foreground.astype(bool), axis=None),
                        background=np.packbits(arrays.background.astype(bool), axis=None),
                        prediction=np.packbits(arrays.prediction.astype(bool), axis=None))
    return buf.getvalue()


def correction_from_npz(data: bytes | str | object) -> CorrectionArrays:
    """Read what `correction_to_npz` wrote (bytes or a path)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with np.load(source) as z:  # type: ignore[arg-type]
        shape = tuple(int(v) for v in z["shape"])
        count = int(np.prod(shape))

        def unpack(key: str) -> np.ndarray:
            return np.unpackbits(z[key], count=count).reshape(shape).astype(bool)

        return CorrectionArrays(unpack("foreground"), unpack("background"), unpack("prediction"))


def load_correction_arrays(store: Store, relpath: str) -> CorrectionArrays:
    """The stored volumes of one correction row (its ``path``)."""
    return correction_from_npz(store.files.abspath(relpath))


def _ct_shape(store: Store, settings: Settings, case_id: int, prediction_mask: np.ndarray | None) -> tuple[int, ...]:
    if prediction_mask is not None:
        return tuple(prediction_mask.shape)  # the prediction is on the CT grid: no need to read pixels
    return tuple(load_case_volume(store, case_id, settings).shape)


def corrected_mask(arrays: CorrectionArrays) -> np.ndarray:
    """The corrected contour: prediction ∪ foreground − background (the prediction is empty at cold start)."""
    return (arrays.prediction | arrays.foreground) & ~arrays.background


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _store_correction(store: Store, case_id: int, *, kind: str, arrays: CorrectionArrays, corrected_by: str,
                      prediction_id: int | None, active_seconds: float | None = None) -> int:
    rel = f"corrections/case{case_id:06d}/{kind}-{int(time.time() * 1000)}.npz"
    store.files.write_bytes(rel, correction_to_npz(arrays))
    fg_voxels, bg_voxels = int(arrays.foreground.sum()), int(arrays.background.sum())
    # Dice(predicted, corrected): how much the reviewer had to change (None without a prediction).
    agreement = dice(arrays.prediction, corrected_mask(arrays)) if prediction_id is not None else None
    correction_id = store.record_correction(case_id, kind=kind, path=rel, corrected_by=corrected_by,
                                            fg_voxels=fg_voxels, bg_voxels=bg_voxels, prediction_id=prediction_id,
                                            active_seconds=active_seconds, dice=agreement)
    store.set_case_state(case_id, CaseState.CORRECTED, None)
    log.info("case %d CORRECTED (%s: %d foreground, %d background voxels; correction %d)", case_id, kind,
             fg_voxels, bg_voxels, correction_id)
    return correction_id


def submit_correction(store: Store, settings: Settings, case_id: int, *, foreground: np.ndarray,
                      background: np.ndarray, corrected_by: str, kind: str = "sparse",
                      active_seconds: float | None = None) -> int:
    """Store a reviewer's correction of a case's latest prediction; the case becomes CORRECTED.

    Parameters
    ----------
    store, settings
        The service's store and settings.
    case_id
        A case in one of `CORRECTABLE`.
    foreground, background
        Bool volumes on the CT grid ``(slices, rows, columns)``: painted heart the model missed and
        painted non-heart it included. They may not overlap.
    corrected_by
        Who corrected (kept in the database, never logged).
    kind
        ``"sparse"`` (only painted voxels are labels) or ``"dense"`` (the whole contour is known).
    active_seconds
        Active annotation time measured by the viewer (kept with the row for the dashboard).

    Returns
    -------
    int
        The correction id.

    Raises
    ------
    ValueError
        Wrong shape (both shapes named), overlapping or empty paint, a case not correctable, an
        unknown kind.
    KeyError
        No such case.
    """
    if kind not in KINDS:
        raise ValueError(f"correction kind must be one of {KINDS}, got {kind!r}")
    if not corrected_by:
        raise ValueError("corrected_by is required: who made the correction")
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(f"no case {case_id}")
    if case.state not in CORRECTABLE:
        raise ValueError(f"case {case_id} is {case.state}: only {', '.join(CORRECTABLE)} cases can be corrected")
    latest = store.latest_prediction(case_id)
    predicted = mask_from_npz(store.files.abspath(latest.mask_path)) if latest is not None else None
    shape = _ct_shape(store, settings, case_id, predicted)
    fg = np.asarray(foreground, dtype=bool)
    bg = np.asarray(background, dtype=bool)
    for name, array in (("foreground", fg), ("background", bg)):
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, but the case's CT grid is {shape} "
                             "(slices, rows, columns)")
    if (fg & bg).any():
        raise ValueError(f"{int((fg & bg).sum())} voxel(s) are painted both foreground and background")
    if kind == "sparse" and not (fg.any() or bg.any()):
        raise ValueError("a sparse correction needs some painted voxels")
    if active_seconds is not None and not (active_seconds >= 0):
        raise ValueError(f"active_seconds = {active_seconds!r} must be zero or positive")
    prediction = predicted if predicted is not None else np.zeros(shape, dtype=bool)
    if not corrected_mask(CorrectionArrays(fg, bg, prediction)).any():
        raise ValueError("the corrected heart would be empty: paint the heart (foreground) before saving")
    return _store_correction(store, case_id, kind=kind, arrays=CorrectionArrays(fg, bg, prediction),
                             corrected_by=corrected_by, prediction_id=latest.id if latest is not None else None,
                             active_seconds=active_seconds)


def import_clinical_structure(store: Store, settings: Settings, case_id: int, *,
                              corrected_by: str = "TPS") -> int | None:
    """A clinical RTSTRUCT linked to the case (sent by the TPS) with a heart ROI becomes a dense
    correction: a hospital's archive of manual hearts warm-starts the model.

    The ROI is the first of ``settings.rtstruct.heart_roi_names`` found; the label is its mask on
    the CT grid (foreground) and the complement (background). Returns the correction id, or
    ``None`` when no linked RTSTRUCT has a heart ROI.
    """
    from heartloop.dicom_node.rtstruct import rtstruct_to_mask

    case = store.get_case(case_id)
    if case is None:
        raise KeyError(f"no case {case_id}")
    series = store.linked_series(case_id, "RTSTRUCT")
    if not series:
        return None
    ct = load_case_volume(store, case_id, settings)
    for s in reversed(series):  # newest first
        for row in store.series_instances(s.series_uid):
            ds = pydicom.dcmread(store.files.abspath(row.path))
            try:
                mask = rtstruct_to_mask(ds, ct, roi_names=settings.rtstruct.heart_roi_names)
            except ValueError as exc:
                log.info("case %d: a linked RTSTRUCT has no usable heart ROI (%s)", case_id, exc)
                continue
            if not mask.any():
                log.info("case %d: the linked heart ROI is empty; not imported", case_id)
                continue
            arrays = CorrectionArrays(mask, ~mask, np.zeros(ct.shape, dtype=bool))
            return _store_correction(store, case_id, kind="dense", arrays=arrays, corrected_by=corrected_by,
                                     prediction_id=None)
    return None


# -- after a save: the corrected structure and the dose report go to the TPS -----------------------

JOB_FINALISE = "finalise"
#: The model version recorded on a structure contoured from scratch (no prediction existed).
NO_MODEL_VERSION = "none"


def finalise_key(case_id: int, correction_id: int) -> str:
    """The dedupe key of a correction's finalise job (also how `mark_sent_cases` finds it)."""
    return f"{JOB_FINALISE}:{case_id}:{correction_id}"


def enqueue_finalise(store: Store, case_id: int, correction_id: int) -> int | None:
    """Queue the finalise job of a saved correction (durable: it survives a restart)."""
    return store.enqueue(JOB_FINALISE, {"case_id": case_id, "correction_id": correction_id},
                         dedupe_key=finalise_key(case_id, correction_id), max_attempts=1)


def finalise_correction(store: Store, settings: Settings, payload: dict[str, object]) -> dict[str, object] | None:
    """The finalise job: build and queue the corrected RTSTRUCT and the dose report of a correction.

    The corrected contour is prediction ∪ foreground − background; `report_correction` sends it as
    ROI ``rtstruct.corrected_roi_name`` (SEMIAUTOMATIC, the reviewer as operator, approval status
    per ``rtstruct.corrected_approval_status``) with the SR when the case has a usable RTDOSE. A
    correction that is no longer the case's latest is skipped (the newer one is sent). Any failure
    puts the case in FAILED with a readable reason (the reviewer can save again); it is never
    raised, so the queue moves on and nothing is queued twice by a retry.

    Returns the `report_correction` result, or None when skipped or failed.
    """
    from heartloop.service.dose import report_correction

    case_id = int(payload["case_id"])  # type: ignore[arg-type]
    correction_id = int(payload["correction_id"])  # type: ignore[arg-type]
    row = store.get_correction(correction_id)
    latest = store.latest_correction(case_id)
    if row is None or row.case_id != case_id or latest is None or latest.id != correction_id:
        log.info("case %d: correction %d is not the latest; not sent", case_id, correction_id)
        return None
    try:
        arrays = load_correction_arrays(store, row.path)
        geometry, _paths = ordered_series(store, settings, case_series_uid(store, case_id))
        prediction = store.get_prediction(row.prediction_id) if row.prediction_id is not None else None
        model_version = prediction.model_version if prediction is not None else NO_MODEL_VERSION
        result = report_correction(
            store, settings, case_id,
            predicted=geometry.to_volume(arrays.prediction), corrected=geometry.to_volume(corrected_mask(arrays)),
            model_version=model_version, corrected_by=row.corrected_by,
        )
    except Exception as exc:  # a readable reason on the case; the queue is not blocked
        log.exception("case %d: the corrected structure could not be sent", case_id)
        store.set_case_state(case_id, CaseState.FAILED, f"corrected structure not sent: {type(exc).__name__}: {exc}")
        return None
    what = "corrected RTSTRUCT and dose report" if result.get("report_outbox_id") else "corrected RTSTRUCT"
    note = f"{what} queued for the TPS"
    if result["status"] != "REPORTED":
        note += f" (no dose report: {result['reason']})"
    store.set_case_state(case_id, CaseState.CORRECTED, note[:500])
    log.info("case %d: %s (correction %d, %s)", case_id, what, correction_id, result["status"])
    return result


def mark_sent_cases(store: Store) -> int:
    """After an outbox pass: a CORRECTED case whose latest correction is finalised and whose outputs
    queued since that correction are all SENT becomes SENT; one that gave up sending says so.
    Returns how many cases became SENT."""
    from heartloop.core.states import JobState, OutboxState

    n = 0
    for case in store.list_cases([CaseState.CORRECTED.value]):
        latest = store.latest_correction(case.id)
        if latest is None:
            continue
        if store.job_state(finalise_key(case.id, latest.id)) != JobState.DONE.value:
            continue  # not finalised yet: more outputs may still be queued
        items = [o for o in store.outputs(case.id) if o.created_at >= latest.created_at]
        if not items:
            continue
        if all(o.state == OutboxState.SENT.value for o in items):
            store.set_case_state(case.id, CaseState.SENT, None)
            # The audit log records what left the hospital's review, where to and when.
            store.append_audit("system", "send", f"case:{case.id}", {
                "correction_id": latest.id,
                "outputs": [{"destination": o.destination, "sop_instance_uid": o.sop_instance_uid,
                             "sop_class_uid": o.sop_class_uid, "description": o.description,
                             "sent_at": o.sent_at} for o in items]})
            log.info("case %d SENT (%d output(s) delivered)", case.id, len(items))
            n += 1
        else:
            failed = [o for o in items if o.state == OutboxState.FAILED.value]
            if failed:
                reason = f"sending to {failed[0].destination} failed: {failed[0].last_error or 'gave up'} " \
                         "(heartloop outbox --retry ID)"
                if case.reason != reason[:500]:
                    store.set_case_state(case.id, CaseState.CORRECTED, reason[:500])
    return n
