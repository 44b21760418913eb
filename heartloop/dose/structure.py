"""Dose on a structure: volume, mean/min/max, D2/D98, V5–V30 Gy and the cumulative DVH.

Two entry points, one result type:

* `dose_on_mask` — a voxel mask on any grid (the CT's, a finer one, uneven slices allowed);
* `dose_on_contours` — RTSTRUCT-style planar contours, voxelised here, so cohorts that arrive
  as RTSTRUCT need no CT mask.

Conventions (the same in both, and what a reader of our numbers must know)

* **Trilinear dose** at sample points, found through patient coordinates (so any mask or contour
  grid works with any dose grid of the same frame of reference).
* **Outside the dose grid.** Within half a dose voxel of the grid the edge voxel's dose is used (the
  grid's voxels are cells, as a TPS displays them); beyond that the dose is **0 Gy** (a TPS
  computes no dose there; this is also what dicompyler-core does). Such parts still count in the
  volume, `DoseStats.outside_fraction` says how much of the volume they are, and a warning is logged.
* **Empty structures are refused** with ``ValueError("structure is empty: ...")``: a mean dose of
  nothing is not 0 Gy.
* **Different frames of reference are refused** with a ``ValueError`` naming both UIDs.
* Doses are Gy, volumes cm³ (cc), V-metrics are the percentage of the structure's volume
  receiving **at least** the dose level.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from heartloop.core import Volume
from heartloop.core.contours import PlanarContours
from heartloop.dose import _interp
from heartloop.dose._raster import even_odd_runs, pixel_coverage

log = logging.getLogger(__name__)

#: Dose levels (Gy) of the V-metrics in `DoseStats`.
V_LEVELS_GY: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0)
_MAX_SUPERSAMPLE = 15  # 225 sub-pixels (3375 sub-voxels): beyond that nothing measurable is gained
_REL_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class DoseStats:
    """Dose statistics of one structure on one dose.

    Parameters
    ----------
    volume_cc
        Structure volume (cm³), including any part outside the dose grid.
    mean_gy, min_gy, max_gy
        Volume-weighted mean, minimum and maximum dose (Gy).
    d2_gy, d98_gy
        Dose (Gy) received by at least the hottest 2 % / 98 % of the volume (exact on the samples,
        not binned).
    v5_pct, v10_pct, v20_pct, v30_pct
        Percentage of the volume receiving at least 5, 10, 20, 30 Gy.
    v5_cc, v10_cc, v20_cc, v30_cc
        The same as volumes (cm³).
    outside_fraction
        Fraction (0–1) of the volume beyond half a dose voxel outside the dose grid, counted at 0 Gy.
    dvh_dose_gy
        Cumulative DVH dose axis: bin edges ``0, b, 2b, …`` (Gy) up to past the maximum.
    dvh_volume_pct
        Percentage of the volume receiving at least each `dvh_dose_gy`: 100 at 0 Gy, non-increasing,
        0 at the last edge.
    """

    volume_cc: float
    mean_gy: float
    min_gy: float
    max_gy: float
    d2_gy: float
    d98_gy: float
    v5_pct: float
    v10_pct: float
    v20_pct: float
    v30_pct: float
    v5_cc: float
    v10_cc: float
    v20_cc: float
    v30_cc: float
    outside_fraction: float
    dvh_dose_gy: np.ndarray
    dvh_volume_pct: np.ndarray

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("dvh_"):
                continue
            value = float(getattr(self, f.name))
            if not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value}")
            object.__setattr__(self, f.name, value)
        tol = _REL_TOL * max(1.0, abs(self.max_gy))
        if self.volume_cc <= 0:
            raise ValueError(f"volume_cc must be positive, got {self.volume_cc}")
        if not (-tol <= self.min_gy <= self.mean_gy + tol and self.mean_gy <= self.max_gy + tol):
            raise ValueError(f"need 0 <= min <= mean <= max, got {self.min_gy}, {self.mean_gy}, {self.max_gy}")
        if not (self.min_gy - tol <= self.d98_gy <= self.d2_gy + tol and self.d2_gy <= self.max_gy + tol):
            raise ValueError(f"need min <= D98 <= D2 <= max, got D98={self.d98_gy}, D2={self.d2_gy}")
        pcts = [self.v5_pct, self.v10_pct, self.v20_pct, self.v30_pct]
        if any(p < 0 or p > 100 + 1e-6 for p in pcts) or any(b > a + 1e-9 for a, b in zip(pcts, pcts[1:])):
            raise ValueError(f"V-metrics must lie in [0, 100] and not increase with dose, got {pcts}")
        for level, pct in zip(V_LEVELS_GY, pcts):
            cc = getattr(self, f"v{level:g}_cc")
            if abs(cc - pct * self.volume_cc / 100.0) > 1e-6 * self.volume_cc + 1e-9:
                raise ValueError(f"v{level:g}_cc={cc} disagrees with v{level:g}_pct={pct}")
        if not 0.0 <= self.outside_fraction <= 1.0:
            raise ValueError(f"outside_fraction must lie in [0, 1], got {self.outside_fraction}")
        dose = np.array(self.dvh_dose_gy, dtype=np.float64).reshape(-1)
        volume = np.array(self.dvh_volume_pct, dtype=np.float64).reshape(-1)
        if dose.shape != volume.shape or dose.size < 2:
            raise ValueError("the DVH needs two arrays of equal length >= 2")
        if dose[0] != 0.0 or np.any(np.diff(dose) <= 0):
            raise ValueError("dvh_dose_gy must start at 0 and increase")
        if abs(volume[0] - 100.0) > 1e-6 or np.any(np.diff(volume) > 1e-9) or volume[-1] < -1e-9:
            raise ValueError("dvh_volume_pct must start at 100 and not increase")
        for name, arr in (("dvh_dose_gy", dose), ("dvh_volume_pct", volume)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def dvh_bin_gy(self) -> float:
        """Width (Gy) of the DVH dose bins."""
        return float(self.dvh_dose_gy[1] - self.dvh_dose_gy[0])

    def to_dict(self, include_dvh: bool = False) -> dict[str, Any]:
        """JSON-safe dict of the metrics (plain floats); the DVH arrays as lists only when asked."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("dvh_")
        }
        if include_dvh:
            out["dvh_dose_gy"] = self.dvh_dose_gy.tolist()
            out["dvh_volume_pct"] = self.dvh_volume_pct.tolist()
        return out


# -- entry points -----------------------------------------------------------------------------


def dose_on_mask(mask: Volume, dose: Volume, *, supersample: int = 3, dvh_bin_gy: float = 0.01) -> DoseStats:
    """Dose statistics of a voxel mask.

    Parameters
    ----------
    mask
        Boolean (or integer, non-zero = inside) `Volume` on any grid: the CT's, a finer one, uneven
        slices allowed. Each voxel is the cell around its centre: in-plane the pixel, along the slice
        normal half way to the neighbouring slices (the end slices: the adjacent gap; a single-slice
        mask: the dose grid's mean slice spacing), so volumes are exact for uneven slices and the
        volume is exactly that of the voxels set (no surface model is guessed from the mask).
    dose
        Dose (Gy) on its own grid, same frame of reference as `mask`.
    supersample
        ``s``: boundary voxels (inside, with at least one of their six face neighbours outside) are
        split into ``s × s × s`` sub-voxels, each weighted by its share of the voxel's volume (exact
        for uneven slices, where a cell is not centred on its slice), and their dose is the
        weighted mean of the trilinear dose at the sub-voxel centres; as ``s`` grows it converges to
        the voxel's exact mean dose. Inner voxels need no supersampling: the trilinear dose is
        linear along each axis inside a dose cell, so its value at the centre of a voxel lying in
        one dose cell *is* the voxel's mean. ``s = 1``: the plain voxel-centre rule.
    dvh_bin_gy
        Width of the cumulative DVH's dose bins (Gy). The scalar metrics do not depend on it.

    Returns
    -------
    DoseStats

    Raises
    ------
    ValueError
        If the frames of reference differ (both UIDs are named), the mask is empty
        (``"structure is empty: ..."``) or is not boolean/integer, the settings are invalid, or a
        single-slice mask meets a single-frame dose (no thickness can be inferred).

    Notes
    -----
    Only the mask's bounding box (grown by one voxel) is copied. When the mask's axes run along the
    dose grid's (the usual axial case), the dose at the voxel centres is a tensor product computed
    axis by axis on that box, and the sub-voxels use per-axis taps; otherwise every point goes
    through patient coordinates (`Volume.voxel_to_patient` geometry, `Volume.patient_to_voxel`).

    Why not partial volumes from a smoothed surface: the 0.5 level of the trilinearly interpolated
    mask was tried (each boundary voxel weighted by the fraction of its sub-voxels inside it). It
    cuts the staircase's convex corners more than it fills its concave ones, so it shrinks convex
    organs — on random ellipsoids of 27–45 mm semi-axes on a 3 mm grid by 0.3 % on average in
    volume, against 0.04 % for the voxel count — so the mask's own voxels define the structure.
    """
    _check_frames("mask", mask.frame_of_reference_uid, dose.frame_of_reference_uid)
    s = _check_settings(supersample, dvh_bin_gy)
    inside = _mask_array(mask.array)
    box = _bounding_box(inside)
    if box is None:
        raise ValueError("structure is empty: the mask has no voxel set")
    (k0, k1), (j0, j1), (i0, i1) = box
    # The "core" is the bounding box; its copy is padded by one outside voxel so that every inside
    # voxel has its six face neighbours. Core index (0, 0, 0) is mask index (k0, j0, i0).
    padded = np.zeros((k1 - k0 + 2, j1 - j0 + 2, i1 - i0 + 2), dtype=bool)
    padded[1:-1, 1:-1, 1:-1] = inside[k0:k1, j0:j1, i0:i1] != 0
    core = padded[1:-1, 1:-1, 1:-1]
    enclosed = (padded[:-2, 1:-1, 1:-1] & padded[2:, 1:-1, 1:-1] & padded[1:-1, :-2, 1:-1]
                & padded[1:-1, 2:, 1:-1] & padded[1:-1, 1:-1, :-2] & padded[1:-1, 1:-1, 2:])
    interior = core & enclosed if s > 1 else core
    boundary = core & ~enclosed if s > 1 else np.zeros_like(core)
    core_i, core_j = np.arange(i0, i1, dtype=np.float64), np.arange(j0, j1, dtype=np.float64)
    offsets, gap_lo, gap_hi = _slice_geometry(mask, np.arange(k0, k1), dose)
    area = mask.pixel_spacing[0] * mask.pixel_spacing[1]
    thickness = 0.5 * (gap_lo + gap_hi)
    aligned = _interp.same_axes(mask.row_direction, mask.column_direction, dose.row_direction,
                                dose.column_direction)

    # Inner voxels: the whole cell, dose at its centre. Boundary voxels: the whole cell, mean dose of
    # its s³ sub-voxels — computed exactly as a box average with per-axis weights (module doc of
    # _interp), which equals evaluating every sub-voxel and averaging, at a fraction of the cost.
    cell_weights = area * thickness
    inner_weights = np.repeat(cell_weights, np.count_nonzero(interior, axis=(1, 2)))
    edge_weights = np.repeat(cell_weights, np.count_nonzero(boundary, axis=(1, 2)))
    a = (np.arange(s) + 0.5) / s - 0.5
    sub_t, sub_z = _subslab_geometry(gap_lo, gap_hi, a)  # (slices, s): sub-slab thickness, centre (mm)
    if aligned:
        wi, wj, wk = _mask_axis_weights(mask, dose, core_i, core_j, offsets)
        inner_values = _interp.sample_tensor_at(dose, wi, wj, wk, interior)
        inner_outside = _outside_weight(interior, inner_weights, wi, wj, wk)
        if s > 1:
            uniform = np.full((1, s), 1.0 / s)
            wi, wj, wk = _mask_axis_weights(
                mask, dose, core_i[:, None] + a, core_j[:, None] + a, offsets[:, None] + sub_z,
                sub_weights=(uniform, uniform, sub_t / thickness[:, None]),
            )
            edge_values = _interp.sample_tensor_at(dose, wi, wj, wk, boundary)
            edge_outside = _outside_weight(boundary, edge_weights, wi, wj, wk)
        else:
            edge_values, edge_outside = np.zeros(0), 0.0
    else:
        kk, jj, ii = np.nonzero(interior)
        xyz = _mask_patient(mask, core_i[ii], core_j[jj], offsets[kk])
        inner_values, ok = _interp.sample_points(dose, dose.patient_to_voxel(xyz))
        inner_outside = float(inner_weights[~ok].sum())
        bk, bj, bi = np.nonzero(boundary)
        shape = (len(bk), s, s, s)
        xyz = _mask_patient(
            mask,
            np.broadcast_to((core_i[bi][:, None] + a)[:, None, None, :], shape).reshape(-1),
            np.broadcast_to((core_j[bj][:, None] + a)[:, None, :, None], shape).reshape(-1),
            np.broadcast_to((offsets[bk][:, None] + sub_z[bk])[:, :, None, None], shape).reshape(-1),
        )
        values, ok = _interp.sample_points(dose, dose.patient_to_voxel(xyz))
        share = (sub_t[bk] / (s * s * thickness[bk][:, None]))[:, :, None, None]  # (N, s, 1, 1)
        edge_values = (values.reshape(shape) * share).sum(axis=(1, 2, 3))
        edge_outside = float((((~ok).reshape(shape) * share).sum(axis=(1, 2, 3)) * edge_weights).sum())

    return _stats(
        np.concatenate([inner_values, edge_values]),
        np.concatenate([inner_weights, edge_weights]),
        inner_outside + edge_outside,
        dvh_bin_gy,
    )


def dose_on_contours(
    contours: PlanarContours,
    dose: Volume,
    *,
    in_plane_mm: float | None = None,
    supersample: int = 6,
    dvh_bin_gy: float = 0.01,
) -> DoseStats:
    """Dose statistics of planar (RTSTRUCT) contours, voxelised here.

    Parameters
    ----------
    contours
        The structure: axial polygons per plane, even-odd rule (inner polygons are holes).
    dose
        Dose (Gy) on its own grid, same frame of reference.
    in_plane_mm
        Pixel size of the voxelisation grid. Default: the dose grid's own pixel spacing along x and
        along y, pixels centred on the dose nodes (fine sub-pixels, see `supersample`, resolve the
        contour edges). The grid is aligned to the dose grid (its pixel centres include the dose
        grid's nodes whenever `in_plane_mm` divides the dose spacing) and covers the contours'
        bounding box.
    supersample
        ``s``: each pixel is sampled at ``s × s`` sub-pixel centres (even-odd, centre-inside rule);
        its partial area is the fraction inside and, for pixels cut by a contour, its dose is taken
        at the centroid of the inside sub-pixels. ``s = 1`` is the plain pixel-centre rule.
    dvh_bin_gy
        Width of the cumulative DVH's dose bins (Gy).

    Returns
    -------
    DoseStats

    Raises
    ------
    ValueError
        If the frames of reference differ, the contours are empty (``"structure is empty: ..."``),
        or a single contour plane meets a single-frame dose (no thickness can be inferred).

    Notes
    -----
    Each contour plane is a slab of constant cross-section reaching half way to the neighbouring
    planes (the end planes: the adjacent gap, i.e. half a gap beyond the end; a single plane: the
    dose grid's mean slice spacing). For evenly spaced planes this is dicompyler-core's convention
    (every plane as thick as the plane spacing); when a plane is missing in between, its gap is
    shared by the two neighbouring planes, where dicompyler-core would use the smallest spacing for
    every plane. The dose of a slab is the trilinear dose on its contour plane, as in dicompyler-core
    (whose in-plane samples are the dose grid's own nodes; ours are finer, see `in_plane_mm`).

    Accuracy (``python -m bench.dose``, heart-sized ellipsoids, 3 mm and 2 mm dose grids): the volume
    of the polygons as written is found to < 0.015 %, the mean of a linear field to < 0.002 %. In a
    strongly curved field trilinear interpolation itself overestimates between convex nodes (by
    ``D''·h²/8`` at mid-nodes): +0.05 to +0.14 % for ``D = a + 0.004 Gy/mm² · r²`` with pixels of half
    the dose spacing. Hence the default: pixels centred on the dose nodes with 6 × 6 sub-pixels for the
    edges — at most 0.04 % on the same phantoms, where dicompyler-core (node samples only) is off by
    up to 0.14 % on the mean and 0.17 % on the volume.
    """
    _check_frames("contours", contours.frame_of_reference_uid, dose.frame_of_reference_uid)
    s = _check_settings(supersample, dvh_bin_gy)
    planes = [sl for sl in contours.slices if sl.polygons]
    if not planes:
        raise ValueError(f"structure is empty: {contours.name!r} has no contour")
    z = np.array([sl.z_mm for sl in planes])
    thickness = _plane_thickness(z, dose)

    aligned = _interp.same_axes((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), dose.row_direction, dose.column_direction)
    if in_plane_mm is not None:
        if not (in_plane_mm > 0 and math.isfinite(in_plane_mm)):
            raise ValueError(f"in_plane_mm must be a positive number, got {in_plane_mm}")
        px = py = float(in_plane_mm)
    elif aligned:
        px, py = dose.pixel_spacing[1], dose.pixel_spacing[0]
    else:
        px = py = min(dose.pixel_spacing)
    x_ref, y_ref = (dose.origin[0], dose.origin[1]) if aligned else (0.0, 0.0)

    rings = [poly for sl in planes for poly in sl.polygons]
    lengths = np.fromiter((len(r) for r in rings), np.int64, len(rings))
    ring_plane = np.repeat(np.arange(len(planes)), [len(sl.polygons) for sl in planes])
    xy = np.concatenate(rings)
    m_lo = np.floor((xy.min(axis=0) - (x_ref, y_ref)) / (px, py) + 0.5).astype(np.int64)
    m_hi = np.floor((xy.max(axis=0) - (x_ref, y_ref)) / (px, py) + 0.5).astype(np.int64)
    ncols, nrows = (m_hi - m_lo + 1).tolist()
    # Continuous sub-pixel indices: sub-pixel c of the first pixel column starts at its cell edge.
    first_edge = np.array([x_ref, y_ref]) + (m_lo - 0.5) * (px, py)
    uv = (xy - first_edge) / np.array([px / s, py / s]) - 0.5
    runs = even_odd_runs(len(planes), nrows * s, ncols * s, uv, lengths, ring_plane)
    covered, y_moment, x_moment = pixel_coverage(runs, s, len(planes), nrows, ncols)
    full = covered > s * s - 0.5
    partial = (covered > 0.5) & ~full
    x_centres = x_ref + np.arange(m_lo[0], m_hi[0] + 1) * px
    y_centres = y_ref + np.arange(m_lo[1], m_hi[1] + 1) * py

    # Whole pixels: dose at the pixel centre on the plane.
    per_plane = np.count_nonzero(full, axis=(1, 2))
    full_weights = np.repeat(px * py * thickness, per_plane)
    if aligned:
        wi, wj, wk = _line_weights(dose, x_centres, y_centres, z)
        full_values = _interp.sample_tensor_at(dose, wi, wj, wk, full)
        full_outside = _outside_weight(full, full_weights, wi, wj, wk)
    else:
        pk, pj, pi = np.nonzero(full)
        xyz = np.stack([x_centres[pi], y_centres[pj], z[pk]], axis=-1)
        full_values, ok = _interp.sample_points(dose, dose.patient_to_voxel(xyz))
        full_outside = float(full_weights[~ok].sum())

    # Pixels cut by a contour: partial area, dose at the centroid of the inside sub-pixels.
    pk, pj, pi = np.nonzero(partial)
    n_in = covered[pk, pj, pi]
    cx, cy = x_moment[pk, pj, pi] / n_in, y_moment[pk, pj, pi] / n_in
    part_weights = n_in / (s * s) * px * py * thickness[pk]
    xyz = np.stack([x_centres[pi] + cx * px, y_centres[pj] + cy * py, z[pk]], axis=-1)
    part_values, ok = _interp.sample_points(dose, dose.patient_to_voxel(xyz))
    part_outside = float(part_weights[~ok].sum())

    return _stats(
        np.concatenate([full_values, part_values]),
        np.concatenate([full_weights, part_weights]),
        full_outside + part_outside,
        dvh_bin_gy,
    )


# -- statistics -------------------------------------------------------------------------------


def _stats(values: np.ndarray, weights_mm3: np.ndarray, outside_mm3: float, dvh_bin_gy: float) -> DoseStats:
    """`DoseStats` from dose samples and their volumes (mm³)."""
    total = float(weights_mm3.sum())
    if not total > 0:
        raise ValueError("structure is empty: no volume after voxelisation")
    values = np.maximum(values, 0.0)  # a dose grid never holds negative dose; guard the binning
    # Not np.dot: a BLAS call may wake its thread pool, which costs milliseconds on a busy host.
    mean = float((values * weights_mm3).sum() / total)
    present = weights_mm3 > 0
    lo, hi = float(values[present].min()), float(values[present].max())
    # Cumulative DVH: volume receiving at least each bin edge, from a weighted histogram.
    bins = np.floor(values / dvh_bin_gy).astype(np.int64)
    n_bins = int(bins.max()) + 1
    hist = np.bincount(bins, weights=weights_mm3, minlength=n_bins)
    at_least = np.cumsum(hist[::-1])[::-1]
    dvh_volume = np.append(at_least, 0.0) * (100.0 / total)
    dvh_volume[0] = 100.0
    dvh_dose = np.arange(n_bins + 1) * dvh_bin_gy
    v_cc = [float(weights_mm3[values >= level].sum()) / 1000.0 for level in V_LEVELS_GY]
    volume_cc = total / 1000.0
    outside_fraction = min(max(outside_mm3 / total, 0.0), 1.0)
    if outside_fraction > 0:
        log.warning(
            "%.2f %% of the structure (%.2f cc) lies outside the dose grid: counted at 0 Gy",
            100 * outside_fraction, outside_mm3 / 1000.0,
        )
    return DoseStats(
        volume_cc=volume_cc,
        mean_gy=min(max(mean, lo), hi),  # rounding must not put the mean outside [min, max]
        min_gy=lo,
        max_gy=hi,
        d2_gy=_dose_covering(values, weights_mm3, bins, at_least, 0.02 * total),
        d98_gy=_dose_covering(values, weights_mm3, bins, at_least, 0.98 * total),
        v5_pct=100 * v_cc[0] / volume_cc,
        v10_pct=100 * v_cc[1] / volume_cc,
        v20_pct=100 * v_cc[2] / volume_cc,
        v30_pct=100 * v_cc[3] / volume_cc,
        v5_cc=v_cc[0],
        v10_cc=v_cc[1],
        v20_cc=v_cc[2],
        v30_cc=v_cc[3],
        outside_fraction=outside_fraction,
        dvh_dose_gy=dvh_dose,
        dvh_volume_pct=dvh_volume,
    )


def _dose_covering(values: np.ndarray, weights: np.ndarray, bins: np.ndarray, at_least: np.ndarray,
                   target: float) -> float:
    """Highest dose d such that the volume receiving >= d is at least `target` (exact, unbinned).

    The histogram finds the bin where the cumulative volume crosses `target`; only that bin's
    samples are sorted.
    """
    target *= 1.0 - 1e-12  # a target equal to the whole volume must not fall off the end by rounding
    b = int(np.count_nonzero(at_least >= target)) - 1
    b = max(b, 0)
    above = float(at_least[b + 1]) if b + 1 < len(at_least) else 0.0
    in_bin = np.flatnonzero(bins == b)
    order = np.argsort(-values[in_bin], kind="stable")
    cumulative = above + np.cumsum(weights[in_bin][order])
    hit = min(int(np.searchsorted(cumulative, target, side="left")), len(order) - 1)
    return float(values[in_bin][order][hit])


# -- geometry helpers -------------------------------------------------------------------------


def _check_frames(what: str, structure_uid: str, dose_uid: str) -> None:
    if structure_uid != dose_uid:
        raise ValueError(
            f"the {what} and the dose are in different frames of reference: "
            f"{what} {structure_uid}, dose {dose_uid}"
        )


def _check_settings(supersample: int, dvh_bin_gy: float) -> int:
    if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) \
            or not 1 <= supersample <= _MAX_SUPERSAMPLE:
        raise ValueError(f"supersample must be an integer from 1 to {_MAX_SUPERSAMPLE}, got {supersample!r}")
    if not (dvh_bin_gy > 0 and math.isfinite(dvh_bin_gy)):
        raise ValueError(f"dvh_bin_gy must be a positive number, got {dvh_bin_gy}")
    return int(supersample)


def _mask_array(array: np.ndarray) -> np.ndarray:
    """The mask's array if it is boolean or integer (non-zero = inside); one-byte types are used as
    they are (no full-size copy), wider integers become boolean."""
    if array.dtype == bool or (np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize == 1):
        return array
    if np.issubdtype(array.dtype, np.integer):
        return array != 0
    raise ValueError(f"the mask must be boolean (or integer labels), got {array.dtype}")


def _bounding_box(inside: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Index ranges ``[start, stop)`` per axis of the non-zero voxels of a one-byte array, or None."""
    n_k, n_j, n_i = inside.shape
    if inside.flags.c_contiguous and inside.itemsize == 1 and n_i % 8 == 0:
        # Eight voxels per 64-bit word: a whole CT-sized mask is scanned in a few milliseconds.
        words = inside.view(np.uint64).reshape(n_k, n_j, n_i // 8)
        ks = np.flatnonzero(words.reshape(n_k, -1).any(axis=1))
        if ks.size == 0:
            return None
        rows = np.bitwise_or.reduce(words[ks[0]: ks[-1] + 1], axis=0)  # (n_j, n_i / 8)
        js = np.flatnonzero(rows.any(axis=1))
        is_ = np.flatnonzero(np.bitwise_or.reduce(rows, axis=0).view(np.uint8))
    else:
        ks = np.flatnonzero(inside.reshape(n_k, -1).any(axis=1))
        if ks.size == 0:
            return None
        plane = inside[ks[0]: ks[-1] + 1].any(axis=0)
        js = np.flatnonzero(plane.any(axis=1))
        is_ = np.flatnonzero(plane.any(axis=0))
    return (int(ks[0]), int(ks[-1]) + 1), (int(js[0]), int(js[-1]) + 1), (int(is_[0]), int(is_[-1]) + 1)


def _slice_geometry(mask: Volume, ks: np.ndarray, dose: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets along the normal (mm) of mask slices `ks` (may run one past either end), and the gaps
    to the slice below and above (beyond the ends, the end gaps continue)."""
    offsets = mask.slice_offsets
    if len(offsets) == 1:
        g0 = g1 = _dose_slice_spacing(dose)
    else:
        g0, g1 = offsets[1] - offsets[0], offsets[-1] - offsets[-2]
    extended = np.concatenate([[-2 * g0, -g0], offsets, [offsets[-1] + g1, offsets[-1] + 2 * g1]])
    index = ks + 2
    here = extended[index]
    return here, here - extended[index - 1], extended[index + 1] - here


def _dose_slice_spacing(dose: Volume) -> float:
    if len(dose.slice_offsets) < 2:
        raise ValueError("a single-slice structure on a single-frame dose has no thickness to infer")
    return dose.slice_spacing


def _plane_thickness(z: np.ndarray, dose: Volume) -> np.ndarray:
    """Slab thickness (mm) of each contour plane: half way to each neighbour (see dose_on_contours)."""
    if len(z) == 1:
        return np.array([_dose_slice_spacing(dose)])
    gaps = np.diff(z)
    return 0.5 * (np.r_[gaps[:1], gaps] + np.r_[gaps, gaps[-1:]])


def _subslab_geometry(gap_lo: np.ndarray, gap_hi: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thickness and centre offset (mm) of each sub-slab of a slice whose cell reaches half way to
    the slice below (gap `gap_lo`) and above (`gap_hi`): piecewise linear in the slice index."""
    h = 0.5 / len(a)

    def z(t: np.ndarray) -> np.ndarray:
        return np.where(t < 0, t * gap_lo[:, None], t * gap_hi[:, None])

    lo, hi = z((a - h)[None, :]), z((a + h)[None, :])
    return hi - lo, 0.5 * (hi + lo)


def _mask_patient(mask: Volume, i: np.ndarray, j: np.ndarray, offset_mm: np.ndarray) -> np.ndarray:
    """Patient mm of continuous mask column `i`, row `j` and distance `offset_mm` along the normal."""
    return (
        np.asarray(mask.origin)
        + (i * mask.pixel_spacing[1])[:, None] * np.asarray(mask.row_direction)
        + (j * mask.pixel_spacing[0])[:, None] * np.asarray(mask.column_direction)
        + np.asarray(offset_mm)[:, None] * mask.normal
    )


def _mask_axis_weights(
    mask: Volume, dose: Volume, i: np.ndarray, j: np.ndarray, offsets: np.ndarray,
    sub_weights: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[_interp.AxisWeights, ...]:
    """Dose-axis weights for mask columns `i`, rows `j` and slice offsets `offsets` (mm).

    Each is ``(P,)`` (interpolate at those positions) or ``(P, s)`` (average over the ``s``
    sub-positions of each, weighted by the matching `sub_weights` rows). Only valid when the
    mask's axes run along the dose grid's: each dose index then depends on its own mask axis alone,
    so one line of points per axis gives it.
    """
    def dose_index(ii: np.ndarray, jj: np.ndarray, oo: np.ndarray, axis: int) -> np.ndarray:
        flat = dose.patient_to_voxel(_mask_patient(mask, ii.reshape(-1), jj.reshape(-1), oo.reshape(-1)))
        return flat[:, axis].reshape(ii.shape)

    di = dose_index(i, np.zeros_like(i), np.zeros_like(i), 0)
    dj = dose_index(np.zeros_like(j), j, np.zeros_like(j), 1)
    dk = dose_index(np.zeros_like(offsets), np.zeros_like(offsets), offsets, 2)
    nk, nj, ni = dose.shape
    if sub_weights is None:
        return _interp.axis_weights(di, ni), _interp.axis_weights(dj, nj), _interp.axis_weights(dk, nk)
    swi, swj, swk = (np.broadcast_to(w, d.shape) for w, d in zip(sub_weights, (di, dj, dk)))
    return (_interp.axis_weights(di, ni, swi), _interp.axis_weights(dj, nj, swj),
            _interp.axis_weights(dk, nk, swk))


def _line_weights(dose: Volume, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[_interp.AxisWeights, ...]:
    """Dose-axis weights for patient x, y and z lines of an axial grid (dose axes along x, y, z)."""
    ox, oy, oz = dose.origin
    di = dose.patient_to_voxel(np.stack([x, np.full_like(x, oy), np.full_like(x, oz)], axis=-1))[:, 0]
    dj = dose.patient_to_voxel(np.stack([np.full_like(y, ox), y, np.full_like(y, oz)], axis=-1))[:, 1]
    dk = dose.patient_to_voxel(np.stack([np.full_like(z, ox), np.full_like(z, oy), z], axis=-1))[:, 2]
    nk, nj, ni = dose.shape
    return _interp.axis_weights(di, ni), _interp.axis_weights(dj, nj), _interp.axis_weights(dk, nk)


def _outside_weight(selected: np.ndarray, weights: np.ndarray, wi: _interp.AxisWeights,
                    wj: _interp.AxisWeights, wk: _interp.AxisWeights) -> float:
    """Volume of the `selected` tensor-grid samples (weights in C order) lying outside the dose grid."""
    inside = _interp.inside_fraction(wi, wj, wk)
    if inside is None:
        return 0.0
    return float((weights * (1.0 - inside[selected])).sum())
