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
from heartloop.service.lifecycle import load_case_volume
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


def _store_correction(store: Store, case_id: int, *, kind: str, arrays: CorrectionArrays, corrected_by: str,
                      prediction_id: int | None) -> int:
    rel = f"corrections/case{case_id:06d}/{kind}-{int(time.time() * 1000)}.npz"
    store.files.write_bytes(rel, correction_to_npz(arrays))
    fg_voxels, bg_voxels = int(arrays.foreground.sum()), int(arrays.background.sum())
    correction_id = store.record_correction(case_id, kind=kind, path=rel, corrected_by=corrected_by,
                                            fg_voxels=fg_voxels, bg_voxels=bg_voxels, prediction_id=prediction_id)
    store.set_case_state(case_id, CaseState.CORRECTED, None)
    log.info("case %d CORRECTED (%s: %d foreground, %d background voxels; correction %d)", case_id, kind,
             fg_voxels, bg_voxels, correction_id)
    return correction_id


def submit_correction(store: Store, settings: Settings, case_id: int, *, foreground: np.ndarray,
                      background: np.ndarray, corrected_by: str, kind: str = "sparse") -> int:
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
    prediction = predicted if predicted is not None else np.zeros(shape, dtype=bool)
    return _store_correction(store, case_id, kind=kind, arrays=CorrectionArrays(fg, bg, prediction),
                             corrected_by=corrected_by, prediction_id=latest.id if latest is not None else None)


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
