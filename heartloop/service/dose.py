"""Dose of a case: its RTDOSE → a dose `Volume`, dose metrics of structures stored, and the
correction report (corrected RTSTRUCT + dose SR) queued for the TPS.

Wiring only (DESIGN.md §2): RTDOSE reading and the SR live in `dicom_node`, the numbers in `dose`,
rows and files in `store`.

A case without RTDOSE
    `case_dose` and `record_structure_dose` raise `MissingDoseError` (nothing is stored).
    `report_correction` still builds and queues the corrected RTSTRUCT — the correction is worth
    sending on its own — but stores no dose rows and sends **no SR**; its result says
    ``status = "NO_RTDOSE"`` with the reason. An RTDOSE set that cannot be used (RELATIVE units,
    ambiguous PLAN/BEAM doses, another frame of reference ...) is handled the same way with
    ``status = "DOSE_ERROR"`` and the `DoseError` message as the reason, logged as a warning: the
    structure goes out, the physicist fixes the dose export, and `report_correction` can be run
    again (a new RTSTRUCT and SR are then made).

An empty prediction (cold start, or the model found no heart)
    The corrected structure is sent and its dose stored (label ``"corrected"``); there is no delta,
    and the SR reports the corrected heart's mean dose alone (``status = "EMPTY_PREDICTION"``). An empty *corrected* mask is refused (`ValueError`)
    before anything is queued: an RTSTRUCT without contours is never sent.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from heartloop.config import Settings
from heartloop.core import Volume
from heartloop.dicom_node.report import ContourDose, InstanceRef, build_dose_report
from heartloop.dicom_node.rtdose import (
    DoseError,
    DoseSelection,
    MissingDoseError,
    read_selection,
    select_dose_datasets,
)
from heartloop.dose import DoseStats, DoseThresholds, compare, dose_on_mask
from heartloop.service.outputs import queue_structure
from heartloop.store import Store

log = logging.getLogger(__name__)

#: Labels of the two structures of a correction (`DoseResult.label`).
PREDICTED = "predicted"
CORRECTED = "corrected"


def thresholds_from_settings(settings: Settings) -> DoseThresholds:
    """The delta thresholds of ``[dose]`` as `heartloop.dose.DoseThresholds`."""
    d = settings.dose
    return DoseThresholds(mean_gy=d.delta_mean_gy, max_gy=d.delta_max_gy, d2_gy=d.delta_d2_gy,
                          d98_gy=d.delta_d98_gy, v_pct=d.delta_v_pct, volume_pct=d.delta_volume_pct)


def _read_series(store: Store, case_id: int, modality: str, *, pixels: bool) -> list[Dataset]:
    datasets = []
    for series in store.linked_series(case_id, modality):
        for row in store.series_instances(series.series_uid):
            datasets.append(pydicom.dcmread(store.files.abspath(row.path), stop_before_pixels=not pixels))
    return datasets


def load_case_dose(store: Store, settings: Settings, case_id: int) -> tuple[Volume, DoseSelection]:
    """The dose of a case and which RTDOSE instances it was read from.

    Reads every RTDOSE linked to the case, applies the PLAN/BEAM rule (`select_dose_datasets`,
    checking beam completeness against a linked RTPLAN when there is one) and refuses a dose in
    another frame of reference than the case's CT.

    Raises
    ------
    KeyError
        No such case.
    MissingDoseError
        The case has no RTDOSE.
    DoseError
        The RTDOSE set cannot be used; the message says why.
    """
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(f"no case {case_id}")
    doses = _read_series(store, case_id, "RTDOSE", pixels=True)
    if not doses:
        raise MissingDoseError(
            f"case {case_id} has no RTDOSE: push the plan dose (RTDOSE, DoseSummationType PLAN, units GY) "
            "from the TPS with the planning CT"
        )
    plans = _read_series(store, case_id, "RTPLAN", pixels=False)
    selection = select_dose_datasets(doses, rtplans=plans)
    volume = read_selection(selection, frame_of_reference_uid=case.frame_of_reference_uid)
    log.info("case %d: dose from %s (%d instance(s))", case_id, selection.description, len(selection.sop_instance_uids))
    return volume, selection


def case_dose(store: Store, settings: Settings, case_id: int) -> Volume:
    """The dose (Gy) of a case on its own grid, from the case's linked RTDOSE instances.

    See `load_case_dose` for the errors.
    """
    return load_case_dose(store, settings, case_id)[0]


def _compute(settings: Settings, mask: Volume, dose: Volume) -> DoseStats:
    return dose_on_mask(mask, dose, supersample=settings.dose.supersample, dvh_bin_gy=settings.dose.dvh_bin_gy)


def _store_stats(store: Store, case_id: int, stats: DoseStats, selection: DoseSelection, *, label: str,
                 model_version: str | None, description: str, roi_name: str,
                 rtstruct_sop_instance_uid: str | None) -> int:
    metrics = stats.to_dict(include_dvh=True)
    metrics["dose_summation"] = selection.summation
    return store.record_dose(
        case_id, label=label, metrics=metrics, mean_gy=stats.mean_gy, roi_name=roi_name,
        rtstruct_sop_instance_uid=rtstruct_sop_instance_uid, rtdose_sop_instance_uids=selection.sop_instance_uids,
        model_version=model_version, description=description,
    )


def record_structure_dose(store: Store, settings: Settings, case_id: int, mask: Volume, *, label: str,
                          model_version: str | None = None, description: str = "", roi_name: str = "",
                          rtstruct_sop_instance_uid: str | None = None) -> DoseStats:
    """Compute the dose metrics of a structure of a case on the case's dose and store them.

    Parameters
    ----------
    mask
        The structure, a boolean `Volume` on any grid in the case's frame of reference.
    label
        Which structure (``"predicted"``, ``"corrected"``, ``"clinical"``, ``"model:000007"`` ...).
    model_version, description, roi_name, rtstruct_sop_instance_uid
        Recorded with the row.

    Returns
    -------
    DoseStats

    Raises
    ------
    MissingDoseError, DoseError
        As `load_case_dose` (nothing is stored).
    ValueError
        An empty structure or a mask in another frame of reference.
    """
    dose, selection = load_case_dose(store, settings, case_id)
    stats = _compute(settings, mask, dose)
    _store_stats(store, case_id, stats, selection, label=label, model_version=model_version,
                 description=description, roi_name=roi_name, rtstruct_sop_instance_uid=rtstruct_sop_instance_uid)
    log.info("case %d: %s structure mean dose %.2f Gy (%.1f cc)", case_id, label, stats.mean_gy, stats.volume_cc)
    return stats


def _output_ref(store: Store, case_id: int, item_id: int) -> InstanceRef:
    """The InstanceRef of a file we queued (read back from its stored header)."""
    item = next((o for o in store.outputs(case_id) if o.id == item_id), None)
    if item is None:  # pragma: no cover - we just queued it
        raise RuntimeError(f"outbox item {item_id} vanished")
    ds = pydicom.dcmread(store.files.abspath(item.path), stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
    return InstanceRef.from_dataset(ds)


def _find_ref(store: Store, case_id: int, sop_instance_uid: str) -> InstanceRef:
    """An RTSTRUCT we sent (outbox) or received (instances), by SOP Instance UID."""
    for item in store.outputs(case_id):
        if item.sop_instance_uid == sop_instance_uid:
            return _output_ref(store, case_id, item.id)
    row = store.get_instance(sop_instance_uid)
    if row is not None:
        return InstanceRef(row.sop_class_uid, row.sop_instance_uid, row.series_uid, row.study_uid)
    raise ValueError(
        f"RTSTRUCT {sop_instance_uid} is neither an output of case {case_id} nor a stored instance; "
        "give the SOP Instance UID of the predicted structure that was sent or received"
    )


def _first_ct(store: Store, case_id: int) -> Dataset:
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(f"no case {case_id}")
    rows = store.series_instances(case.ct_series_uid)
    if not rows:
        raise ValueError(f"case {case_id} has no stored CT instance")
    return pydicom.dcmread(store.files.abspath(rows[0].path), stop_before_pixels=True)


def _rtdose_refs(selection: DoseSelection) -> list[InstanceRef]:
    return [InstanceRef.from_dataset(ds) for ds in selection.datasets]


def _queue_report(store: Store, case_id: int, destination: str, sr: Dataset, model_version: str) -> dict[str, Any]:
    """Write the SR atomically and queue it; its UID and outbox id."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    rel = store.files.output_relpath(case_id, str(sr.SOPInstanceUID))
    store.files.write_bytes(rel, buf.getvalue())
    item = store.queue_output(destination, sop_instance_uid=str(sr.SOPInstanceUID), sop_class_uid=str(sr.SOPClassUID),
                              relpath=rel, case_id=case_id, description=f"SR heart dose report (model {model_version})")
    return {"report_sop_instance_uid": str(sr.SOPInstanceUID), "report_outbox_id": item}


def report_correction(
    store: Store,
    settings: Settings,
    case_id: int,
    *,
    predicted: Volume,
    corrected: Volume,
    model_version: str,
    corrected_by: str,
    destination: str | None = None,
    predicted_rtstruct_uid: str | None = None,
) -> dict[str, Any]:
    """A dosimetrist corrected a predicted heart: send the corrected structure and the dose report.

    Steps: the dose of both contours on the case's dose (`dose_on_mask`, ``[dose]`` settings);
    the corrected RTSTRUCT (ROI ``rtstruct.corrected_roi_name``, SEMIAUTOMATIC, operator
    `corrected_by`, ApprovalStatus ``rtstruct.corrected_approval_status``) queued to
    `destination`; both dose rows (``"predicted"``, ``"corrected"``) and their delta (corrected − predicted, flagged against the ``[dose]`` thresholds) stored; the
    Comprehensive SR (mean doses, difference, RTSTRUCT and RTDOSE references, model version,
    person) written and queued to the same destination. Without a usable dose, only the RTSTRUCT
    is sent (see the module docstring).

    Parameters
    ----------
    predicted, corrected
        Boolean masks on the case's CT grid (the corrected one is what goes to the TPS).
    model_version
        Model that made the prediction.
    corrected_by
        Person name of the dosimetrist (``"Family^Given"``).
    destination
        Configured destination name (default: the first).
    predicted_rtstruct_uid
        SOP Instance UID of the predicted structure's RTSTRUCT, when it was sent or received, so
        the report references it.

    Returns
    -------
    dict
        ``status`` (``"REPORTED"``, ``"NO_RTDOSE"``, ``"DOSE_ERROR"`` or ``"EMPTY_PREDICTION"``), ``reason``,
        ``rtstruct_sop_instance_uid``, ``rtstruct_outbox_id``, and when reported
        ``report_sop_instance_uid``, ``report_outbox_id``, ``predicted`` / ``corrected`` (metrics),
        ``delta`` (differences, flagged, reasons), ``mean_delta_gy``, ``flagged``, ``reasons``,
        ``dose_result_ids`` and ``delta_id``.

    Raises
    ------
    ConfigError
        Unknown destination.
    ValueError
        An empty corrected mask, masks off the CT grid, or an unknown `predicted_rtstruct_uid`.
    """
    dest = settings.destination(destination)
    predicted_ref = _find_ref(store, case_id, predicted_rtstruct_uid) if predicted_rtstruct_uid else None
    status, reason = "REPORTED", None
    dose = selection = None
    try:
        dose, selection = load_case_dose(store, settings, case_id)
    except MissingDoseError as exc:
        status, reason = "NO_RTDOSE", str(exc)
        log.info("case %d: no RTDOSE, the corrected structure is sent without a dose report", case_id)
    except DoseError as exc:
        status, reason = "DOSE_ERROR", str(exc)
        log.warning("case %d: dose not usable, the corrected structure is sent without a dose report: %s",
                    case_id, exc)
    pred_stats = corr_stats = None
    if dose is not None:  # computed before anything is queued: a bad mask queues nothing
        corr_stats = _compute(settings, corrected, dose)
        if np.any(predicted.array):
            pred_stats = _compute(settings, predicted, dose)
        else:
            status, reason = "EMPTY_PREDICTION", "no predicted heart to compare: the report gives the corrected dose alone"
            log.info("case %d: no prediction to compare; the dose report gives the corrected heart's dose alone",
                     case_id)

    corrected_roi = settings.rtstruct.corrected_roi_name
    item_id = queue_structure(store, settings, case_id, corrected, model_version=model_version,
                              algorithm="SEMIAUTOMATIC", roi_name=corrected_roi, operator=corrected_by,
                              destination=dest.name, approval_status=settings.rtstruct.corrected_approval_status)
    if item_id is None:  # pragma: no cover - a new RTSTRUCT always has new UIDs
        raise RuntimeError("the corrected RTSTRUCT was not queued")
    rtstruct_ref = _output_ref(store, case_id, item_id)
    result: dict[str, Any] = {
        "case_id": case_id, "status": status, "reason": reason,
        "rtstruct_sop_instance_uid": rtstruct_ref.sop_instance_uid, "rtstruct_outbox_id": item_id,
    }
    if dose is None or selection is None or corr_stats is None:
        return result
    if pred_stats is None:
        result["dose_result_ids"] = [_store_stats(
            store, case_id, corr_stats, selection, label=CORRECTED, model_version=model_version,
            description="corrected by a dosimetrist", roi_name=corrected_roi,
            rtstruct_sop_instance_uid=rtstruct_ref.sop_instance_uid)]
        result["corrected"] = corr_stats.to_dict()
        sr = build_dose_report(
            _first_ct(store, case_id), predicted=None,
            corrected=ContourDose(corr_stats.mean_gy, corrected_roi, rtstruct_ref, corr_stats.volume_cc),
            rtdoses=_rtdose_refs(selection), model_version=model_version, corrected_by=corrected_by,
            assessment="No prediction to compare with: the heart was contoured by hand (mean heart dose of the "
                       "contour sent).")
        result.update(_queue_report(store, case_id, dest.name, sr, model_version))
        log.info("case %d: dose report (corrected heart only) queued for %s", case_id, dest.name)
        return result

    pred_id = _store_stats(store, case_id, pred_stats, selection, label=PREDICTED, model_version=model_version,
                           description=f"prediction of model {model_version}", roi_name=settings.rtstruct.roi_name,
                           rtstruct_sop_instance_uid=predicted_rtstruct_uid)
    corr_id = _store_stats(store, case_id, corr_stats, selection, label=CORRECTED, model_version=model_version,
                           description="corrected by a dosimetrist", roi_name=corrected_roi,
                           rtstruct_sop_instance_uid=rtstruct_ref.sop_instance_uid)
    delta = compare(pred_stats, corr_stats, thresholds_from_settings(settings))
    mean_delta = corr_stats.mean_gy - pred_stats.mean_gy
    delta_id = store.record_dose_delta(
        case_id, reference_label=PREDICTED, other_label=CORRECTED, delta=delta.to_dict(), mean_delta_gy=mean_delta,
        flagged=delta.flagged, reasons=delta.reasons, reference_result_id=pred_id, other_result_id=corr_id,
    )
    if delta.flagged:
        assessment = "Flagged: " + "; ".join(delta.reasons)
        log.warning("case %d: corrected vs predicted dose flagged: %s", case_id, "; ".join(delta.reasons))
    else:
        assessment = (f"Within thresholds (mean heart dose difference {abs(mean_delta):.2f} Gy, "
                      f"threshold {settings.dose.delta_mean_gy:g} Gy)")

    sr = build_dose_report(
        _first_ct(store, case_id),
        predicted=ContourDose(pred_stats.mean_gy, settings.rtstruct.roi_name, predicted_ref, pred_stats.volume_cc),
        corrected=ContourDose(corr_stats.mean_gy, corrected_roi, rtstruct_ref, corr_stats.volume_cc),
        rtdoses=_rtdose_refs(selection),
        model_version=model_version,
        corrected_by=corrected_by,
        assessment=assessment,
    )
    result.update(_queue_report(store, case_id, dest.name, sr, model_version))
    log.info("case %d: dose report queued for %s (Δ mean %+.2f Gy%s)", case_id, dest.name, mean_delta,
             ", flagged" if delta.flagged else "")
    result.update(
        predicted=pred_stats.to_dict(), corrected=corr_stats.to_dict(), delta=delta.to_dict(),
        mean_delta_gy=mean_delta, flagged=delta.flagged, reasons=list(delta.reasons),
        dose_result_ids=[pred_id, corr_id], delta_id=delta_id,
    )
    return result


__all__ = [
    "CORRECTED",
    "PREDICTED",
    "case_dose",
    "load_case_dose",
    "record_structure_dose",
    "report_correction",
    "thresholds_from_settings",
]
