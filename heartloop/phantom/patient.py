"""`make_patient`: a deterministic synthetic planning CT with its RTDOSE and true heart."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmwrite

from heartloop.core.volume import Volume
from heartloop.phantom.anatomy import Anatomy, draw_anatomy
from heartloop.phantom.dicom import (
    ct_datasets_from_volume,
    derived_uid,
    dose_grid_scaling_for,
    quantised_dose,
    rtdose_dataset,
)
from heartloop.phantom.grid import AXIAL_COLUMN, AXIAL_ROW, CtGrid, Placement, choose_grid
from heartloop.phantom.metrics import mask_volume_cc, mean_heart_dose_gy
from heartloop.phantom.plan import PlanKind, breast_plan, compute_dose, dose_grid, lung_plan
from heartloop.phantom.render import body_mask, heart_mask, labels_to_hu, render_labels

log = logging.getLogger(__name__)

#: Independent random streams per aspect, so e.g. asking for fewer slices keeps the anatomy.
_STREAMS = {"choices": 1, "anatomy": 2, "grid": 3, "noise": 4, "dose": 5, "identity": 6}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream]]))


@dataclass(frozen=True, eq=False)
class Patient:
    """A synthetic patient: planning CT, plan dose and the true heart.

    Attributes
    ----------
    seed
        The seed it was made from.
    patient_id, patient_name
        Synthetic identifiers (``PHANTOM-0007``, ``Phantom^0007``); like real ones, never log them.
    volume
        CT in HU, int16 ``(slices, rows, columns)``, slice ``k = 0`` most inferior (z grows with k).
    heart_mask
        Bool on the CT grid: everything inside the pericardium (chambers, myocardium, groove fat,
        coronary calcium); the great vessels and the fat rim around the heart are outside.
    dose
        Plan dose (Gy, float64, exactly as the RTDOSE reads back) on its own coarser grid.
    ct_datasets
        One CT Image Storage dataset per slice, ordered by slice (k = 0 first).
    rtdose
        RT Dose Storage dataset.
    body_mask
        Bool on the CT grid: the patient (not air, not the couch).
    plan
        ``"breast"`` or ``"lung"``.
    tumour
        Whether a soft-tissue tumour touches the heart.
    prescription_gy
        Prescription the dose is normalised to (target median).
    """

    seed: int
    patient_id: str
    patient_name: str
    volume: Volume
    heart_mask: np.ndarray
    dose: Volume
    ct_datasets: list[Dataset]
    rtdose: Dataset
    body_mask: np.ndarray | None = None
    plan: str = ""
    tumour: bool = False
    prescription_gy: float = 0.0


def _validate(rows: int, n_slices: int | None, slice_thickness: float | None, plan: str | None) -> None:
    if not 32 <= rows <= 1024:
        raise ValueError(f"rows must be in [32, 1024], got {rows}")
    if n_slices is not None and not 3 <= n_slices <= 1000:
        raise ValueError(f"n_slices must be in [3, 1000], got {n_slices}")
    if slice_thickness is not None and not 0.5 <= slice_thickness <= 10.0:
        raise ValueError(f"slice_thickness must be in [0.5, 10] mm, got {slice_thickness}")
    if plan is not None and plan not in {k.value for k in PlanKind}:
        raise ValueError(f"plan must be 'breast' or 'lung', got {plan!r}")


def make_patient(
    seed: int,
    *,
    rows: int = 512,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    uneven: bool = False,
    tumour: bool | None = None,
    plan: str | None = None,
) -> Patient:
    """Make one synthetic thorax patient; the same arguments always give the same patient.

    Parameters
    ----------
    seed
        Non-negative integer; different seeds give different anatomy, grid and plan.
    rows
        Rows (= columns) of each slice. The field of view stays physical (461–614 mm), so fewer
        rows mean bigger pixels (512 → 0.9–1.2 mm).
    n_slices
        Number of slices (default: 100–200, drawn from the seed). The series is centred on the
        heart and always contains it with a margin: when too few slices are asked for, the slices
        are made thicker than 3 mm.
    slice_thickness
        Nominal thickness (mm; default 2, 2.5 or 3 from the seed). Slices are contiguous.
    uneven
        Blocks of different thickness (e.g. 3 mm | 2 mm | 3 mm), gap-free, so the slice spacing
        and ``volume.slice_offsets`` are uneven.
    tumour
        A soft-tissue tumour touching the heart; ``None`` draws it (about 20 %).
    plan
        ``"breast"`` (left-breast tangents; implies a female phantom) or ``"lung"``; ``None``
        draws one.

    Raises
    ------
    ValueError
        On out-of-range arguments, or ``n_slices`` and ``slice_thickness`` too small for the heart.
    """
    if seed < 0:
        raise ValueError("seed must be non-negative")
    _validate(rows, n_slices, slice_thickness, plan)
    started = time.perf_counter()
    r_plan, r_tumour, r_sex = _rng(seed, "choices").random(3)
    plan_kind = PlanKind(plan) if plan is not None else (PlanKind.BREAST if r_plan < 0.5 else PlanKind.LUNG)
    has_tumour = bool(r_tumour < 0.2) if tumour is None else bool(tumour)
    female = True if plan_kind is PlanKind.BREAST else bool(r_sex < 0.5)

    anatomy = draw_anatomy(_rng(seed, "anatomy"), female=female, tumour=has_tumour,
                           lung_target=plan_kind is PlanKind.LUNG)
    torso = anatomy.torso
    w = np.linspace(-400.0, 400.0, 161)
    _, _, a, b_ant, _, _ = torso.outline(w)
    protrusion = max((float(b.mound.semi[1]) + 10.0 for b in anatomy.breasts), default=0.0)
    grid, placement = choose_grid(
        _rng(seed, "grid"),
        heart_w_range=anatomy.heart_w_range,
        body_half_width=float(np.max(a + np.abs(torso.lean * w))) + (20.0 if anatomy.breasts else 0.0),
        body_front=-float(np.max(b_ant)) - protrusion,
        body_back=float(anatomy.couch_top),
        rows=rows,
        n_slices=n_slices,
        slice_thickness=slice_thickness,
        uneven=uneven,
    )
    labels = render_labels(anatomy, grid, placement)
    hu = labels_to_hu(labels, anatomy, grid, placement, [seed, _STREAMS["noise"]])
    heart = heart_mask(labels, anatomy, grid, placement)
    body = body_mask(labels, anatomy, grid, placement)
    del labels

    # UIDs depend on every argument: the same seed at another resolution is another series.
    key = (f"{seed}|rows={rows}|n={n_slices}|t={slice_thickness}|uneven={uneven}"
           f"|tumour={has_tumour}|plan={plan_kind.value}")
    frame_uid = derived_uid(key, "frame-of-reference")
    study_uid = derived_uid(key, "study")
    series_uid = derived_uid(key, "ct-series")
    volume = grid.volume(hu, frame_uid)

    identity = _rng(seed, "identity")
    patient_id = f"PHANTOM-{seed:04d}"
    patient_name = f"Phantom^{seed:04d}"
    def pick(lo: int, hi: int) -> int:
        return int(identity.integers(lo, hi))

    birth = f"{pick(1940, 1976)}{pick(1, 13):02d}{pick(1, 29):02d}"
    study_date = f"2024{pick(1, 13):02d}{pick(1, 29):02d}"
    study_time = f"{pick(7, 18):02d}{pick(0, 60):02d}{pick(0, 60):02d}"
    ct_datasets = ct_datasets_from_volume(
        volume,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_sex="F" if female else "M",
        patient_birth_date=birth,
        study_date=study_date,
        study_time=study_time,
        study_id=f"{seed % 100000}",
        accession_number=f"PH{seed:06d}",
        slice_thicknesses=grid.slice_thicknesses,
    )

    dose_volume, scaling, prescription = _plan_dose(seed, anatomy, grid, placement, body, heart, plan_kind, frame_uid)
    rtdose = rtdose_dataset(dose_volume, ct_datasets, dose_grid_scaling=scaling,
                            series_description=f"Plan dose ({plan_kind.value})")
    patient = Patient(
        seed=seed,
        patient_id=patient_id,
        patient_name=patient_name,
        volume=volume,
        heart_mask=heart,
        dose=dose_volume,
        ct_datasets=ct_datasets,
        rtdose=rtdose,
        body_mask=body,
        plan=plan_kind.value,
        tumour=has_tumour,
        prescription_gy=prescription,
    )
    log.debug("phantom seed %d: %s slices of %d rows, %s plan, tumour=%s, made in %.2f s",
              seed, grid.n_slices, rows, plan_kind.value, has_tumour, time.perf_counter() - started)
    return patient


def _plan_dose(
    seed: int,
    anatomy: Anatomy,
    grid: CtGrid,
    placement: Placement,
    body: np.ndarray,
    heart: np.ndarray,
    plan_kind: PlanKind,
    frame_uid: str,
) -> tuple[Volume, float, float]:
    """The plan dose as a `Volume` (quantised as stored), its DoseGridScaling and prescription."""
    rng = _rng(seed, "dose")
    footprint = np.any(body, axis=0)
    rows_any = np.nonzero(footprint.any(axis=1))[0]
    cols_any = np.nonzero(footprint.any(axis=0))[0]
    x, y = grid.x, grid.y
    box = (float(x[cols_any[0]]), float(x[cols_any[-1]]), float(y[rows_any[0]]), float(y[rows_any[-1]]))
    dgrid = dose_grid(rng, grid, box)
    # The body on the dose grid (nearest CT voxel).
    ii = np.clip(np.rint((dgrid.x - grid.origin[0]) / grid.pixel_spacing).astype(int), 0, grid.rows - 1)
    jj = np.clip(np.rint((dgrid.y - grid.origin[1]) / grid.pixel_spacing).astype(int), 0, grid.rows - 1)
    kk = np.clip(np.rint(np.interp(dgrid.z, grid.z, np.arange(grid.n_slices))).astype(int), 0, grid.n_slices - 1)
    body_d = body[kk[:, None, None], jj[None, :, None], ii[None, None, :]]
    ct_u, ct_v, ct_w = placement.to_body(grid)
    if plan_kind is PlanKind.BREAST:
        plan = breast_plan(rng, anatomy, body, ct_u, ct_v, ct_w)
    else:
        k, j, i = np.nonzero(heart[:, ::2, ::2])
        pts = np.stack([ct_u[::2][i], ct_v[::2][j], ct_w[k]], axis=1).astype(np.float64)
        plan = lung_plan(rng, anatomy, body, ct_u, ct_v, ct_w, pts[:: max(1, len(pts) // 4000)])
    dose_gy = compute_dose(plan, dgrid, placement, body_d)
    scaling = dose_grid_scaling_for(float(dose_gy.max()))
    volume = Volume(
        array=quantised_dose(dose_gy, scaling),
        origin=dgrid.origin,
        row_direction=AXIAL_ROW,
        column_direction=AXIAL_COLUMN,
        pixel_spacing=(dgrid.spacing, dgrid.spacing),
        slice_offsets=dgrid.offsets,
        frame_of_reference_uid=frame_uid,
    )
    return volume, scaling, plan.prescription_gy


def nifti_affine(volume: Volume) -> np.ndarray:
    """Voxel ``(i, j, k)`` → RAS mm for a NIfTI holding ``array.transpose(2, 1, 0)``.

    DICOM patient coordinates are LPS; RAS negates x and y. For uneven slice spacing the
    slice axis uses the mean spacing (NIfTI cannot hold uneven slices) — use the DICOM geometry
    or ``slice_offsets_mm`` in truth.json for exact slice positions.
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine


def write_patient(patient: Patient, out_dir: Path) -> Path:
    """Write ``out_dir/phantom-<seed>/``: ``CT_<k:04d>.dcm``, ``RD.dcm``, ``heart_truth.nii.gz``, ``truth.json``.

    Returns the patient directory. An existing directory of the same seed is overwritten.
    """
    import nibabel as nib  # imported here: only writing needs it

    directory = Path(out_dir) / f"phantom-{patient.seed:04d}"
    directory.mkdir(parents=True, exist_ok=True)
    for k, ds_ in enumerate(patient.ct_datasets):
        dcmwrite(directory / f"CT_{k:04d}.dcm", ds_, enforce_file_format=True)
    dcmwrite(directory / "RD.dcm", patient.rtdose, enforce_file_format=True)
    image = nib.Nifti1Image(patient.heart_mask.transpose(2, 1, 0).astype(np.uint8), nifti_affine(patient.volume))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(directory / "heart_truth.nii.gz"))
    truth = {
        "seed": patient.seed,
        "plan": patient.plan,
        "tumour": patient.tumour,
        "prescription_gy": patient.prescription_gy,
        "heart_volume_cc": round(mask_volume_cc(patient.heart_mask, patient.volume), 3),
        "mean_heart_dose_gy": round(mean_heart_dose_gy(patient), 4),
        "mean_heart_dose_method": "trilinear interpolation of the RTDOSE at the heart voxel centres",
        "shape": list(patient.volume.shape),
        "pixel_spacing_mm": list(patient.volume.pixel_spacing),
        "slice_offsets_mm": [float(o) for o in patient.volume.slice_offsets],
        "uniform_slices": patient.volume.is_uniform,
        "nifti": "heart_truth.nii.gz: uint8 (i, j, k) = array.transpose(2, 1, 0), RAS affine "
                 "(exact only when uniform_slices; else the slice axis uses the mean spacing)",
        "study_instance_uid": str(patient.ct_datasets[0].StudyInstanceUID),
        "ct_series_instance_uid": str(patient.ct_datasets[0].SeriesInstanceUID),
        "frame_of_reference_uid": patient.volume.frame_of_reference_uid,
        "rtdose_sop_instance_uid": str(patient.rtdose.SOPInstanceUID),
    }
    (directory / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    log.info("wrote phantom seed %d to %s", patient.seed, directory)
    return directory


def write_cohort(n: int, seed: int, out_dir: Path, **make_kwargs: object) -> list[Path]:
    """Write ``n`` patients with seeds ``seed, seed + 1, ...``; returns their directories."""
    if n < 0:
        raise ValueError("n must be non-negative")
    paths = []
    for s in range(seed, seed + n):
        paths.append(write_patient(make_patient(s, **make_kwargs), out_dir))  # type: ignore[arg-type]
    return paths
