"""Contouring in the service: READY → contour job → PREDICTED (or NO_MODEL at cold start).

A prediction is kept, never overwritten: the mask (``.npz`` on the CT grid) and a ``Heart_AI``
RTSTRUCT for review, both recording the model version. Nothing is sent to the TPS from here: the
reviewed (corrected) structure is what goes back.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom

from heartloop.config import Settings
from heartloop.core import CaseState, Volume
from heartloop.dicom_node.rtstruct import RoiSpec, build_rtstruct
from heartloop.dicom_node.series import load_ct_volume
from heartloop.service.lifecycle import case_series_uid, ordered_series
from heartloop.store import Store

log = logging.getLogger(__name__)

JOB_CONTOUR = "contour"
#: Cases in these states are (re-)predicted by a contour job; others (under review, corrected,
#: sent) keep the prediction the reviewer saw.
PREDICTABLE = (CaseState.READY.value, CaseState.PREDICTED.value, CaseState.NO_MODEL.value, CaseState.FAILED.value)


def models_dir(settings: Settings) -> Path:
    return settings.storage_root / "models"


def contouring_settings(settings: Settings) -> Any:
    """The engine's `ContouringSettings` from ``[contouring]`` plus this machine's ``[compute]``
    knobs (device, threads). Raises `ConfigError` naming the section when the engine refuses a value."""
    from heartloop.config import ConfigError
    from heartloop.contouring.settings import ContouringSettings

    values = dataclasses.asdict(settings.contouring)
    try:
        return ContouringSettings(**values, device=settings.compute.device, threads=settings.compute.threads)
    except ValueError as exc:
        raise ConfigError(f"[contouring]: {exc}") from exc


def reviewer_box_path(case_id: int) -> str:
    """Where a case's reviewer box is kept (relative to the storage root): re-predictions after a
    promotion keep honouring it until the reviewer clears it."""
    return f"predictions/case{case_id:06d}/reviewer-box.json"


def save_reviewer_box(store: Store, case_id: int, box: Sequence[int] | None) -> None:
    """Remember (or, with None, forget) the box a reviewer drew on a case: ``[k0, k1, j0, j1, i0, i1]``."""
    rel = reviewer_box_path(case_id)
    if box is None:
        store.files.abspath(rel).unlink(missing_ok=True)
        return
    store.files.write_bytes(rel, json.dumps([int(v) for v in box]).encode("ascii"))


def load_reviewer_box(store: Store, case_id: int) -> list[int] | None:
    """The box a reviewer drew on a case, or None."""
    try:
        return [int(v) for v in json.loads(store.files.abspath(reviewer_box_path(case_id)).read_text())]
    except FileNotFoundError:
        return None


def _index_box(flat: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``[k0, k1, j0, j1, i0, i1]`` (the API's form) → ``((k0, k1), (j0, j1), (i0, i1))``."""
    if len(flat) != 6:
        raise ValueError(f"a box is [k0, k1, j0, j1, i0, i1] (6 voxel indices), got {list(flat)!r}")
    v = [int(x) for x in flat]
    return (v[0], v[1]), (v[2], v[3]), (v[4], v[5])


def mask_to_npz(mask: np.ndarray) -> bytes:
    """A bool mask, bit-packed and compressed (a 512×512×150 heart: ~100 kB)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, packed=np.packbits(mask.astype(bool), axis=None), shape=np.array(mask.shape))
    return buf.getvalue()


def mask_from_npz(data: bytes | Path) -> np.ndarray:
    with np.load(io.BytesIO(data) if isinstance(data, bytes) else data) as z:
        shape = tuple(int(v) for v in z["shape"])
        return np.unpackbits(z["packed"], count=int(np.prod(shape))).reshape(shape).astype(bool)


class ContouringStage:
    """The contour job handler, with the current model's predictor cached per version."""

    def __init__(self, store: Store, settings: Settings) -> None:
        from heartloop.contouring.registry import ModelRegistry

        self.store = store
        self.settings = settings
        self.registry = ModelRegistry(models_dir(settings))
        self._predictor: Any = None
        self._lock = threading.Lock()

    def enqueue(self, case_id: int, _volume: Volume | None = None) -> None:
        """Queue a contour job for a case (the `on_ready` hook of the service)."""
        self.store.enqueue(JOB_CONTOUR, {"case_id": case_id}, dedupe_key=f"{JOB_CONTOUR}:{case_id}")

    def enqueue_with_box(self, case_id: int, box: Sequence[int] | None) -> None:
        """A reviewer's request: re-predict a case limited to `box` (``[k0, k1, j0, j1, i0, i1]``,
        half-open voxel indices), or with the localiser again when `box` is None.

        Raises
        ------
        KeyError
            No such case.
        ValueError
            The case is not (re-)predictable, no model exists yet, or the box is malformed.
        """
        case = self.store.get_case(case_id)
        if case is None:
            raise KeyError(f"no case {case_id}")
        if case.state not in PREDICTABLE:
            raise ValueError(f"case {case_id} is {case.state}: only {', '.join(PREDICTABLE)} cases are re-predicted")
        current = self.registry.current()
        if current is None or current.version is None:
            raise ValueError("no model trained yet: contour this case by hand (the box cannot limit a prediction)")
        if box is not None:
            flat = [int(v) for v in box]
            (k0, k1), (j0, j1), (i0, i1) = _index_box(flat)
            if min(k0, j0, i0) < 0 or k1 <= k0 or j1 <= j0 or i1 <= i0 or (case.n_slices and k1 > case.n_slices):
                raise ValueError(f"box {flat} is empty or outside the CT (half-open voxel ranges [k0, k1, j0, j1, i0, i1])")
            box = flat
        save_reviewer_box(self.store, case_id, box)
        # Its own dedupe key: a pending plain job must not swallow the reviewer's box (it runs after it).
        self.store.enqueue(JOB_CONTOUR, {"case_id": case_id, "box": box}, dedupe_key=f"{JOB_CONTOUR}:{case_id}:box")

    def _current_predictor(self) -> Any:
        """The predictor of the current model (re-read every job, so a rollback applies at once)."""
        from heartloop.contouring.inference import Predictor

        current = self.registry.current()
        if current is None or current.version is None:
            return None
        if self._predictor is None or self._predictor.version != current.version:
            self._predictor = Predictor.load(self.registry, current.version, runtime=contouring_settings(self.settings))
        return self._predictor

    def run(self, payload: dict[str, Any]) -> None:
        case_id = int(payload["case_id"])
        case = self.store.get_case(case_id)
        if case is None or case.state not in PREDICTABLE:
            log.info("case %s: not predicted (state %s)", case_id, case.state if case else "gone")
            return
        box = payload["box"] if "box" in payload else load_reviewer_box(self.store, case_id)
        try:
            with self._lock:
                self._contour(case_id, _index_box(box) if box is not None else None)
        except Exception as exc:
            # A readable reason on the case; the job is retried, and other cases are not blocked.
            self.store.set_case_state(case_id, CaseState.FAILED, f"contouring failed: {type(exc).__name__}: {exc}")
            raise

    def _contour(self, case_id: int, box: Any = None) -> None:
        t0 = time.perf_counter()
        predictor = self._current_predictor()
        if predictor is None:
            self.store.set_case_state(case_id, CaseState.NO_MODEL,
                                      "no model trained yet: contour this case by hand; it will train the first model")
            return
        # One validation pass serves both the volume and the RTSTRUCT's CT references.
        geometry, paths = ordered_series(self.store, self.settings, case_series_uid(self.store, case_id))
        volume = load_ct_volume(paths, geometry)
        prediction = predictor.predict(volume, box=box)
        rel_mask = f"predictions/case{case_id:06d}/{prediction.model_version}-{int(time.time() * 1000)}.npz"
        self.store.files.write_bytes(rel_mask, mask_to_npz(prediction.mask.array))
        rel_rs, rs_uid = None, None
        if not prediction.is_empty:
            cts = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
            ds = build_rtstruct(prediction.mask, cts,
                                roi=RoiSpec(name=self.settings.rtstruct.roi_name, color=self.settings.rtstruct.roi_color,
                                            algorithm="AUTOMATIC"),
                                model_version=prediction.model_version, label=self.settings.rtstruct.structure_set_label)
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            rel_rs = rel_mask[:-4] + "-RS.dcm"
            self.store.files.write_bytes(rel_rs, buf.getvalue())
            rs_uid = str(ds.SOPInstanceUID)
        voxel_cc = float(np.prod(volume.voxel_size)) / 1000.0
        voxels = int(prediction.mask.array.sum())
        seconds = time.perf_counter() - t0
        self.store.record_prediction(case_id, model_version=prediction.model_version, mask_path=rel_mask,
                                     voxels=voxels, volume_cc=voxels * voxel_cc, seconds=seconds,
                                     rtstruct_path=rel_rs, rtstruct_sop_uid=rs_uid)
        reason = prediction.reason or None
        if not prediction.is_empty:
            reason = self._record_predicted_dose(case_id, prediction) or reason
        self.store.set_case_state(case_id, CaseState.PREDICTED, reason)
        log.info("case %d PREDICTED by model %s in %.1f s (%.0f cc)", case_id, prediction.model_version, seconds,
                 voxels * voxel_cc)


    def _record_predicted_dose(self, case_id: int, prediction: Any) -> str | None:
        """The mean heart dose (and DVH metrics) of the prediction, when the case has an RTDOSE.

        Returns a note for the case when the dose could not be used (the prediction stands)."""
        from heartloop.dicom_node.rtdose import DoseError, MissingDoseError
        from heartloop.service.dose import record_structure_dose

        try:
            stats = record_structure_dose(self.store, self.settings, case_id, prediction.mask, label="predicted",
                                          model_version=prediction.model_version,
                                          roi_name=self.settings.rtstruct.roi_name)
        except MissingDoseError:
            return None  # no RTDOSE pushed (yet): nothing to compute
        except DoseError as exc:
            log.warning("case %d: predicted heart dose not computed: %s", case_id, exc)
            return f"predicted; dose not computed: {exc}"
        log.info("case %d: predicted heart mean dose %.2f Gy", case_id, stats.mean_gy)
        return None


def enqueue_repredictions(store: Store) -> int:
    """After a promotion: queue a contour job for every case no reviewer has opened yet."""
    n = 0
    for case in store.list_cases([CaseState.PREDICTED.value, CaseState.NO_MODEL.value]):
        n += store.enqueue(JOB_CONTOUR, {"case_id": case.id}, dedupe_key=f"{JOB_CONTOUR}:{case.id}") is not None
    return n
