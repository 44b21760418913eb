"""Measurements on phantoms: heart volume, mean heart dose, and how far a HU window gets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from heartloop.core.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from heartloop.phantom.patient import Patient

_HU_MIN, _HU_MAX = -1024, 3071


def slice_extents(volume: Volume) -> np.ndarray:
    """Thickness (mm) each slice stands for: half of each neighbouring gap (gap-free series)."""
    offsets = volume.slice_offsets
    if len(offsets) == 1:
        return np.ones(1)
    gaps = np.diff(offsets)
    padded = np.concatenate([[gaps[0]], gaps, [gaps[-1]]])
    return 0.5 * (padded[:-1] + padded[1:])


def mask_volume_cc(mask: np.ndarray, volume: Volume) -> float:
    """Volume (cc) of a boolean mask on a volume's grid, exact for uneven slice spacing."""
    per_slice = np.asarray(mask, dtype=bool).sum(axis=(1, 2))
    area = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    return float(np.sum(per_slice * slice_extents(volume)) * area / 1000.0)


def sample_dose(dose: Volume, points_mm: np.ndarray) -> np.ndarray:
    """Trilinear dose (Gy) at ``(n, 3)`` patient points; points beyond the grid take the edge value."""
    ijk = dose.patient_to_voxel(points_mm)
    coords = np.stack([ijk[:, 2], ijk[:, 1], ijk[:, 0]])
    return ndimage.map_coordinates(np.asarray(dose.array, dtype=np.float64), coords, order=1, mode="nearest")


def mean_dose_gy(mask: np.ndarray, ct: Volume, dose: Volume) -> float:
    """Mean dose over the voxel centres of a mask on the CT grid (trilinear in the dose grid)."""
    k, j, i = np.nonzero(mask)
    if len(k) == 0:
        raise ValueError("empty mask")
    points = ct.voxel_to_patient(np.stack([i, j, k], axis=1).astype(np.float64))
    return float(np.mean(sample_dose(dose, points)))


def mean_heart_dose_gy(patient: Patient) -> float:
    """Mean dose of the true heart: the reference a correct dose pipeline should reproduce."""
    return mean_dose_gy(patient.heart_mask, patient.volume, patient.dose)


def best_threshold_window(patient: Patient, step_hu: int = 2) -> tuple[float, int, int]:
    """Best Dice of any single HU window ``[lo, hi]`` against the true heart, within the body.

    Every window on a ``step_hu`` lattice over [-1024, 3071] is tried (exhaustively, from
    cumulative histograms). Returns ``(dice, lo, hi)``.
    """
    hu = np.asarray(patient.volume.array)
    body = patient.body_mask if patient.body_mask is not None else hu > -950
    heart = patient.heart_mask & body
    n_bins = (_HU_MAX - _HU_MIN) // step_hu + 1
    values = (np.clip(hu[body].astype(np.int32), _HU_MIN, _HU_MAX) - _HU_MIN) // step_hu
    heart_values = (np.clip(hu[heart].astype(np.int32), _HU_MIN, _HU_MAX) - _HU_MIN) // step_hu
    all_cum = np.concatenate([[0], np.cumsum(np.bincount(values, minlength=n_bins))]).astype(np.float64)
    heart_cum = np.concatenate([[0], np.cumsum(np.bincount(heart_values, minlength=n_bins))]).astype(np.float64)
    n_heart = float(heart.sum())
    if n_heart == 0:
        return 0.0, 0, 0
    best = (0.0, 0, 0)
    # Row: window start bin; columns: end bin (exclusive). Chunked to bound memory.
    ends = np.arange(n_bins + 1)
    for start in range(0, n_bins, 256):
        lo = np.arange(start, min(n_bins, start + 256))[:, None]
        tp = heart_cum[ends][None, :] - heart_cum[lo]
        pred = all_cum[ends][None, :] - all_cum[lo]
        dice = np.zeros(tp.shape)
        np.divide(2.0 * tp, pred + n_heart, out=dice, where=ends[None, :] > lo)
        idx = np.unravel_index(int(np.argmax(dice)), dice.shape)
        if dice[idx] > best[0]:
            lo_bin, hi_bin = int(lo[idx[0], 0]), int(ends[idx[1]])
            best = (float(dice[idx]), _HU_MIN + lo_bin * step_hu, _HU_MIN + hi_bin * step_hu - 1)
    return best


def threshold_only_dice(patient: Patient) -> float:
    """Best Dice a single HU window achieves against the true heart (within the body).

    Evidence that the heart is not trivially separable: vessels, liver, muscle and tumour share
    its HU range and touch it, so this stays well below the Dice of a real contour.
    """
    return best_threshold_window(patient)[0]
