"""RT Dose reading: RTDOSE datasets → a dose `Volume` in Gy on the dose's own grid.

What is read, and how (PS3.3 C.8.8.3 RT Dose module):

* **Values.** Stored pixel values (16- or 32-bit unsigned, multi-frame) times DoseGridScaling,
  returned as float32 Gy. DoseUnits must be ``GY``; ``RELATIVE`` doses are refused (they are
  fractions of an unknown normalisation, so no mean heart dose can be stated in Gy). DoseType
  ``ERROR`` (an uncertainty map) is refused.
* **Geometry.** ImagePositionPatient is the centre of the first voxel of the first frame,
  ImageOrientationPatient and PixelSpacing as for images. GridFrameOffsetVector comes in two forms:
  *relative* (first value 0: distances along the frame normal from the first frame) and
  *absolute* (first value equals the ImagePositionPatient z: patient z of every frame, axial
  grids only). Both are detected; a vector that is neither is refused. Frames stored in
  descending order are reversed so that `Volume.slice_offsets` increase from 0.
* **Which dose of a case** (`select_dose_datasets`): a single ``PLAN`` dose is used; when there is
  no PLAN dose, the ``BEAM`` doses of one plan (same ReferencedRTPlanSequence, same grid) are
  summed. Everything else — two PLAN doses, beams of different plans or on different grids,
  FRACTION or other summation types, doses without a plan reference when beams must be summed —
  raises `DoseError` describing what was found; nothing is guessed.
* **Frame of reference.** When the caller gives the CT's frame of reference, a dose in another
  frame is refused with both UIDs in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from heartloop.core.errors import HeartLoopError
from heartloop.core.volume import Volume

log = logging.getLogger(__name__)

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
#: Tolerance (mm) when telling a relative from an absolute GridFrameOffsetVector and comparing grids.
_OFFSET_TOL_MM = 0.01
_AXIAL_TOL = 1e-4


class DoseError(HeartLoopError):
    """An RTDOSE (or a set of them) cannot be used as the dose of a case; the message says why."""


class MissingDoseError(DoseError):
    """A case (or a command) has no RTDOSE at all."""


@dataclass(frozen=True)
class DoseSelection:
    """Which RTDOSE instances make the dose of a case, and how they combine.

    Attributes
    ----------
    summation
        ``"PLAN"`` (one plan dose used as it is) or ``"BEAM"`` (per-beam doses of one plan, summed).
    sop_instance_uids
        SOP Instance UIDs of the RTDOSE instances used, in the order given.
    plan_uid
        The RT Plan they reference (ReferencedRTPlanSequence), or ``None`` when not stated.
    datasets
        The datasets themselves (not shown in ``repr``).
    """

    summation: str
    sop_instance_uids: tuple[str, ...]
    plan_uid: str | None
    datasets: tuple[Dataset, ...] = field(repr=False, compare=False)

    @property
    def description(self) -> str:
        """A short sentence for logs and reports, e.g. ``"sum of 3 BEAM doses of one plan"``."""
        if self.summation == "PLAN":
            return "PLAN dose"
        return f"sum of {len(self.sop_instance_uids)} BEAM doses of one plan"


# -- one dataset ----------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _label(ds: Dataset) -> str:
    """How messages name an RTDOSE: by SOP Instance UID (never by patient)."""
    uid = _text(ds, "SOPInstanceUID")
    return f"RTDOSE {uid}" if uid else "RTDOSE (no SOP Instance UID)"


def _plan_uids(ds: Dataset) -> tuple[str, ...]:
    return tuple(
        str(item.get("ReferencedSOPInstanceUID", "")).strip()
        for item in ds.get("ReferencedRTPlanSequence", [])
        if item.get("ReferencedSOPInstanceUID")
    )


def _summation(ds: Dataset) -> str:
    return _text(ds, "DoseSummationType").upper()


def _check_usable(ds: Dataset, frame_of_reference_uid: str | None) -> None:
    """Refuse what no mean dose in Gy can be computed from."""
    sop_class = _text(ds, "SOPClassUID")
    if sop_class and sop_class != RT_DOSE_STORAGE:
        raise DoseError(f"{_label(ds)} is not an RT Dose (SOP Class {sop_class})")
    units = _text(ds, "DoseUnits").upper()
    if units == "RELATIVE":
        raise DoseError(
            f"{_label(ds)} has DoseUnits RELATIVE (a fraction of an unstated normalisation): "
            "HeartLoop needs an absolute dose in Gy. Export the plan dose from the TPS with dose "
            "units GY (absolute dose)"
        )
    if units != "GY":
        raise DoseError(f"{_label(ds)} has DoseUnits {units or '(missing)'}; only GY is supported")
    dose_type = _text(ds, "DoseType").upper()
    if dose_type == "ERROR":
        raise DoseError(f"{_label(ds)} has DoseType ERROR (an uncertainty map), not a dose distribution")
    if "PixelData" not in ds:
        raise DoseError(
            f"{_label(ds)} has no dose grid (no Pixel Data; it may carry only DVHs): export the 3D dose"
        )
    if "DoseGridScaling" not in ds:
        raise DoseError(f"{_label(ds)} has Pixel Data but no DoseGridScaling, so its values have no unit")
    if frame_of_reference_uid is not None:
        own = _text(ds, "FrameOfReferenceUID")
        if own != frame_of_reference_uid:
            raise DoseError(
                f"{_label(ds)} is in frame of reference {own or '(none)'}, but the CT is in "
                f"{frame_of_reference_uid}: the dose was not computed on this planning CT"
            )


def _floats(ds: Dataset, keyword: str, n: int | None = None) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise DoseError(f"{_label(ds)} has no {keyword}")
    values = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DoseError(f"{_label(ds)}: {keyword} is not numeric ({value!r})") from exc
    if n is not None and arr.shape != (n,):
        raise DoseError(f"{_label(ds)}: {keyword} must have {n} values, has {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise DoseError(f"{_label(ds)}: {keyword} has non-finite values")
    return arr


def _frame_offsets(ds: Dataset, n_frames: int, position: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Signed distance (mm) of each frame from the first along the normal, from GridFrameOffsetVector."""
    if "GridFrameOffsetVector" not in ds or ds.GridFrameOffsetVector is None:
        if n_frames == 1:
            return np.zeros(1)
        raise DoseError(f"{_label(ds)} has {n_frames} frames but no GridFrameOffsetVector")
    raw = _floats(ds, "GridFrameOffsetVector")
    if raw.size != n_frames:
        raise DoseError(
            f"{_label(ds)}: GridFrameOffsetVector has {raw.size} values for {n_frames} frames"
        )
    if abs(raw[0]) <= _OFFSET_TOL_MM:
        return raw - raw[0]  # relative: distances along the normal
    if abs(raw[0] - position[2]) <= _OFFSET_TOL_MM:
        # Absolute: the patient z of each frame (allowed only for axial grids, PS3.3 C.8.8.3.2).
        if abs(abs(normal[2]) - 1.0) > _AXIAL_TOL:
            raise DoseError(
                f"{_label(ds)}: GridFrameOffsetVector is absolute (starts at the ImagePositionPatient z) "
                "but the grid is not axial; the standard allows absolute offsets only for axial grids"
            )
        return (raw - raw[0]) * np.sign(normal[2])
    raise DoseError(
        f"{_label(ds)}: GridFrameOffsetVector starts at {raw[0]:g} mm, which is neither 0 (relative "
        f"offsets) nor the ImagePositionPatient z {position[2]:g} mm (absolute z); cannot place the frames"
    )


def _read_one(ds: Dataset) -> Volume:
    """One RTDOSE dataset → dose `Volume` (Gy, float32). Units and frame already checked."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows < 1 or columns < 1 or n_frames < 1:
        raise DoseError(f"{_label(ds)}: Rows, Columns and NumberOfFrames must be positive")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (16, 32):
        raise DoseError(f"{_label(ds)}: BitsAllocated {bits} (only 16- or 32-bit dose grids are defined)")
    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        raise DoseError(f"{_label(ds)}: signed dose values (PixelRepresentation 1) are only allowed for "
                        "DoseType ERROR, which is not a dose")
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise DoseError(f"{_label(ds)}: PixelSpacing must be positive, got {spacing.tolist()}")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise DoseError(f"{_label(ds)}: ImageOrientationPatient is not two orthogonal unit vectors")
    offsets = _frame_offsets(ds, n_frames, position, normal)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a refusal with the reason
        raise DoseError(f"{_label(ds)}: its Pixel Data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    pixels = np.asarray(pixels).reshape(n_frames, rows, columns) if pixels.size == n_frames * rows * columns else None
    if pixels is None:
        raise DoseError(f"{_label(ds)}: Pixel Data does not hold {n_frames} frames of {rows}×{columns}")
    scaling = float(ds.DoseGridScaling)
    if not np.isfinite(scaling) or scaling <= 0:
        raise DoseError(f"{_label(ds)}: DoseGridScaling must be a positive number, got {ds.DoseGridScaling!r}")
    # float32 straight away (a float64 intermediate costs ~5 ms per plan dose; float32 keeps 7
    # significant digits, far below dose-grid uncertainty)
    dose = pixels.astype(np.float32)
    dose *= np.float32(scaling)
    diffs = np.diff(offsets)
    if n_frames > 1 and np.all(diffs < 0):
        # Frames stored against the normal: reverse so offsets increase, origin at the lowest frame.
        dose = dose[::-1]
        position = position + normal * offsets[-1]
        offsets = offsets[::-1] - offsets[-1]
    elif n_frames > 1 and not np.all(diffs > 0):
        raise DoseError(
            f"{_label(ds)}: GridFrameOffsetVector is not strictly increasing or decreasing "
            "(repeated or out-of-order frames); cannot build a dose grid"
        )
    frame = _text(ds, "FrameOfReferenceUID")
    if not frame:
        raise DoseError(f"{_label(ds)} has no FrameOfReferenceUID")
    return Volume(
        array=np.ascontiguousarray(dose),
        origin=tuple(position),
        row_direction=tuple(row_dir),
        column_direction=tuple(col_dir),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_offsets=offsets,
        frame_of_reference_uid=frame,
    )


# -- a case's set of RTDOSE instances -------------------------------------------------------------


def _describe(datasets: Sequence[Dataset]) -> str:
    parts = []
    for ds in datasets:
        plans = _plan_uids(ds)
        plan = f"plan {plans[0]}" if len(plans) == 1 else ("no plan reference" if not plans else f"plans {list(plans)}")
        parts.append(f"{_label(ds)} ({_summation(ds) or 'no DoseSummationType'}, {plan})")
    return "; ".join(parts)


def _referenced_beams(ds: Dataset) -> tuple[int, ...]:
    """ReferencedBeamNumber(s) a BEAM dose names (ReferencedRTPlanSequence → fraction group → beam)."""
    beams = []
    for plan in ds.get("ReferencedRTPlanSequence", []):
        for group in plan.get("ReferencedFractionGroupSequence", []):
            for beam in group.get("ReferencedBeamSequence", []):
                if beam.get("ReferencedBeamNumber") is not None:
                    beams.append(int(beam.ReferencedBeamNumber))
    return tuple(beams)


def _treatment_beams(plan: Dataset) -> set[int]:
    """Beam numbers of an RT (Ion) Plan's treatment beams (setup beams carry no dose)."""
    beams = set()
    for beam in list(plan.get("BeamSequence", [])) + list(plan.get("IonBeamSequence", [])):
        if str(beam.get("TreatmentDeliveryType", "TREATMENT")).strip().upper() == "TREATMENT" \
                and beam.get("BeamNumber") is not None:
            beams.add(int(beam.BeamNumber))
    return beams


def _check_beams_complete(beam_doses: Sequence[Dataset], plan_uid: str, rtplans: Sequence[Dataset], found: str) -> None:
    """With the RT Plan at hand, the BEAM doses must cover each treatment beam exactly once."""
    named = [b for ds in beam_doses for b in _referenced_beams(ds)]
    if len(named) != len(set(named)):
        raise DoseError(f"cannot sum the BEAM doses: two of them name the same beam. Found: {found}")
    plan = next((p for p in rtplans if _text(p, "SOPInstanceUID") == plan_uid), None)
    if plan is None:
        log.warning("summing %d BEAM doses without their RT Plan: cannot check that every beam is there",
                    len(beam_doses))
        return
    expected = _treatment_beams(plan)
    if not expected:
        return
    if named and len(named) == len(beam_doses):
        missing = sorted(expected - set(named))
        if missing or set(named) - expected:
            raise DoseError(
                f"cannot sum the BEAM doses: the plan's treatment beams are {sorted(expected)} but the doses "
                f"cover beams {sorted(named)}; push the missing beam doses or the PLAN dose. Found: {found}"
            )
    elif len(beam_doses) != len(expected):
        raise DoseError(
            f"cannot sum the BEAM doses: the plan has {len(expected)} treatment beams but {len(beam_doses)} "
            f"BEAM doses arrived; push the missing beam doses or the PLAN dose. Found: {found}"
        )


def select_dose_datasets(datasets: Dataset | Sequence[Dataset], *, rtplans: Sequence[Dataset] = ()) -> DoseSelection:
    """Decide which RTDOSE instances make the dose of a case (the PLAN/BEAM rule), without reading pixels.

    Parameters
    ----------
    datasets
        Every RTDOSE instance of the case (duplicates of one SOP Instance UID count once).
    rtplans
        RT Plans of the case, optional. When the plan the BEAM doses reference is among them, the
        doses must cover each of its treatment beams exactly once (else `DoseError`); without it
        the sum is made and a warning says completeness could not be checked.

    Returns
    -------
    DoseSelection

    Raises
    ------
    MissingDoseError
        If `datasets` is empty.
    DoseError
        If the set is ambiguous (two PLAN doses; PLAN and BEAM doses of different plans; BEAM doses
        of several plans or without a plan reference; FRACTION, MULTI_PLAN or other summation
        types); the message lists every instance with its summation type and plan.
    """
    if isinstance(datasets, Dataset):
        datasets = [datasets]
    unique: dict[str, Dataset] = {}
    for n, ds in enumerate(datasets):
        unique.setdefault(_text(ds, "SOPInstanceUID") or f"#{n}", ds)
    items = list(unique.values())
    if not items:
        raise MissingDoseError("no RTDOSE: push the plan dose (RTDOSE, DoseSummationType PLAN) from the TPS")
    gridded = [ds for ds in items if "PixelData" in ds]
    if gridded and len(gridded) < len(items):
        # DVH-only RTDOSE objects (no Pixel Data) carry no dose grid: not candidates.
        log.info("ignoring %d RTDOSE instance(s) without a dose grid (DVH only)", len(items) - len(gridded))
        items = gridded
    plan_doses = [ds for ds in items if _summation(ds) == "PLAN"]
    beam_doses = [ds for ds in items if _summation(ds) == "BEAM"]
    others = [ds for ds in items if _summation(ds) not in ("PLAN", "BEAM")]
    found = _describe(items)
    if others:
        kinds = sorted({_summation(ds) or "(missing)" for ds in others})
        raise DoseError(
            f"cannot tell which dose to use: DoseSummationType {', '.join(kinds)} is not used by HeartLoop "
            f"(it needs one PLAN dose, or the BEAM doses of one plan). Found: {found}"
        )
    if len(plan_doses) > 1:
        raise DoseError(
            f"cannot tell which dose to use: {len(plan_doses)} PLAN doses for one case. Keep one plan dose "
            f"per planning CT (remove the others from the export). Found: {found}"
        )
    if len(plan_doses) == 1:
        plan = plan_doses[0]
        plan_refs = set(_plan_uids(plan))
        strangers = [ds for ds in beam_doses if not plan_refs or set(_plan_uids(ds)) != plan_refs]
        if strangers:
            raise DoseError(
                "cannot tell which dose to use: a PLAN dose and BEAM doses that do not belong to its plan. "
                f"Found: {found}"
            )
        if beam_doses:
            log.info("using the PLAN dose; %d BEAM dose(s) of the same plan ignored", len(beam_doses))
        return DoseSelection("PLAN", (_text(plan, "SOPInstanceUID"),), next(iter(plan_refs), None), (plan,))
    # Only BEAM doses: they must belong to one plan.
    plans = {_plan_uids(ds) for ds in beam_doses}
    if any(len(p) != 1 for p in plans) or len(plans) != 1:
        raise DoseError(
            "cannot sum the BEAM doses: they must all reference the same single RT Plan "
            f"(ReferencedRTPlanSequence), and here they do not. Found: {found}"
        )
    (plan_uid,) = next(iter(plans))
    _check_beams_complete(beam_doses, plan_uid, rtplans, found)
    return DoseSelection(
        "BEAM", tuple(_text(ds, "SOPInstanceUID") for ds in beam_doses), plan_uid, tuple(beam_doses)
    )


def select_case_dose(
    datasets: Dataset | Sequence[Dataset],
    *,
    frame_of_reference_uid: str | None = None,
    rtplans: Sequence[Dataset] = (),
) -> Volume:
    """The dose of a case from all its RTDOSE instances (see `select_dose_datasets`), in Gy.

    BEAM doses are summed only when they share one grid exactly (shape, position, orientation,
    spacing, frame offsets); otherwise `DoseError` names the first that differs.
    """
    selection = select_dose_datasets(datasets, rtplans=rtplans)
    return read_selection(selection, frame_of_reference_uid=frame_of_reference_uid)


def read_selection(selection: DoseSelection, *, frame_of_reference_uid: str | None = None) -> Volume:
    """Read (and, for BEAM doses, sum) the datasets of a `DoseSelection` into one dose `Volume`."""
    for ds in selection.datasets:
        _check_usable(ds, frame_of_reference_uid)
    volumes = [_read_one(ds) for ds in selection.datasets]
    first = volumes[0]
    if len(volumes) == 1:
        return first
    total = np.zeros(first.shape, dtype=np.float64)
    for ds, vol in zip(selection.datasets, volumes):
        if not first.same_grid(vol, tol_mm=_OFFSET_TOL_MM):
            raise DoseError(
                f"cannot sum the BEAM doses: {_label(ds)} is on a different grid (shape {vol.shape}, "
                f"origin {tuple(round(v, 2) for v in vol.origin)}) than {_label(selection.datasets[0])} "
                f"(shape {first.shape}, origin {tuple(round(v, 2) for v in first.origin)}); "
                "export the PLAN dose instead"
            )
        total += vol.array
    log.info("dose: %s", selection.description)
    return first.with_array(total.astype(np.float32))


def read_rtdose(
    datasets: Dataset | Sequence[Dataset], *, frame_of_reference_uid: str | None = None
) -> Volume:
    """Read an RTDOSE (or the RTDOSE instances of one case) as a dose `Volume` in Gy (float32).

    Parameters
    ----------
    datasets
        One RT Dose dataset, or several (then the PLAN/BEAM rule of `select_dose_datasets` applies).
    frame_of_reference_uid
        The planning CT's frame of reference; a dose in another frame is refused.

    Returns
    -------
    Volume
        Dose in Gy on the dose's own grid, slice offsets increasing from 0.

    Raises
    ------
    DoseError
        RELATIVE or non-GY units, DoseType ERROR, a mismatched frame of reference, no pixel data or
        DoseGridScaling, a GridFrameOffsetVector that is neither relative nor absolute, or an
        ambiguous set of doses — each with a message saying what was found.
    """
    return select_case_dose(datasets, frame_of_reference_uid=frame_of_reference_uid)


__all__ = [
    "DoseError",
    "DoseSelection",
    "MissingDoseError",
    "read_rtdose",
    "read_selection",
    "select_case_dose",
    "select_dose_datasets",
]
