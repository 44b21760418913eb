"""`dose_on_mask` / `dose_on_contours`: geometry, edges of the dose grid, refusals, DVH, `DoseStats`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from heartloop.core import Volume
from heartloop.core.contours import ContourSlice, PlanarContours
from heartloop.dose import V_LEVELS_GY, DoseStats, dose_on_contours, dose_on_mask
from heartloop.dose.analytic import (
    Ellipsoid,
    LinearField,
    QuadraticField,
    axial_grid,
    covering_grid,
    polygon_area_factor,
)

FOR = "1.2.826.0.1.3680043.8.498.2"
SPHERE = Ellipsoid.sphere((1.3, -0.7, 2.2), 42.0)
LINEAR = LinearField(18.0, (0.09, -0.06, 0.11))
QUADRATIC = QuadraticField(4.0, 0.005, (6.0, -3.0, 9.0))


def _uneven_offsets(n: int, gaps=(2.0, 3.0, 2.5, 1.5)) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.resize(gaps, n - 1))])


def _cell_thickness(offsets: np.ndarray) -> np.ndarray:
    gaps = np.diff(offsets)
    return 0.5 * (np.r_[gaps[:1], gaps] + np.r_[gaps, gaps[-1:]])


def _dose_grid(step=2.5, shift=(0.0, 0.0, 0.0), margin=12.0):
    return covering_grid(SPHERE, (step, step, step), FOR, margin_mm=margin, shift_mm=shift)


def _reference_mean(mask: Volume, dose: Volume, s: int) -> float:
    """Independent reference: scipy's trilinear interpolation (map_coordinates, order 1) at every
    voxel centre, and at all s³ sub-voxel centres of boundary voxels — equal-volume sub-voxels, so
    only for evenly spaced masks."""
    inside = mask.array.astype(bool)
    padded = np.pad(inside, 1)
    enclosed = np.ones_like(inside)
    for axis in range(3):
        for step in (-1, 1):
            enclosed &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    boundary = inside & ~enclosed if s > 1 else np.zeros_like(inside)
    k, j, i = np.nonzero(inside & ~boundary)
    centres = np.stack([i, j, k], axis=-1).astype(float)
    a = (np.arange(s) + 0.5) / s - 0.5
    sub = np.stack(np.meshgrid(a, a, a, indexing="ij"), axis=-1).reshape(-1, 3)
    bk, bj, bi = np.nonzero(boundary)
    sub_points = (np.stack([bi, bj, bk], axis=-1)[:, None, :] + sub[None]).reshape(-1, 3)

    def trilinear(ijk: np.ndarray) -> np.ndarray:
        dijk = dose.patient_to_voxel(mask.voxel_to_patient(ijk))
        return map_coordinates(dose.array.astype(np.float64), dijk[:, ::-1].T, order=1, mode="nearest")

    inner = trilinear(centres)
    edge = trilinear(sub_points).reshape(len(bk), -1).mean(axis=1) if len(bk) else np.zeros(0)
    return float((inner.sum() + edge.sum()) / (len(inner) + len(edge)))


# -- interpolation and geometry -------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 3, 5])
def test_mask_mean_equals_an_independent_trilinear_reference(s):
    """Our tensor-product interpolation and box-averaged supersampling against scipy, point by point."""
    mask = SPHERE.mask(covering_grid(SPHERE, (3.0, 3.0, 3.0), FOR, margin_mm=3.0, shift_mm=(0.4, 0.9, -1.1)))
    dose = QUADRATIC.on_grid(_dose_grid(step=2.0, shift=(0.3, -0.8, 0.5)))
    stats = dose_on_mask(mask, dose, supersample=s)
    assert stats.mean_gy == pytest.approx(_reference_mean(mask, dose, s), rel=1e-6)


def test_supersampling_keeps_the_mask_volume_and_converges():
    mask = SPHERE.mask(covering_grid(SPHERE, (3.0, 3.0, 3.0), FOR, margin_mm=3.0))
    dose = QUADRATIC.on_grid(_dose_grid(step=1.0, shift=(0.3, -0.2, 0.1)))
    means = {s: dose_on_mask(mask, dose, supersample=s).mean_gy for s in (1, 3, 9, 15)}
    volumes = {s: dose_on_mask(mask, dose, supersample=s).volume_cc for s in (1, 3)}
    assert volumes[1] == volumes[3] == pytest.approx(mask.array.sum() * 27.0 / 1000)
    assert abs(means[15] - means[9]) < abs(means[9] - means[3]) < abs(means[3] - means[1])


def test_dose_grid_offset_by_half_a_voxel():
    """Nothing is aligned: the linear field must still be exact (at the voxel centres' centroid)."""
    mask = SPHERE.mask(covering_grid(SPHERE, (2.0, 2.0, 2.0), FOR, margin_mm=3.0))
    dose = LINEAR.on_grid(_dose_grid(step=2.0, shift=(1.0, 1.0, 1.0)))
    k, j, i = np.nonzero(mask.array)
    centroid = mask.voxel_to_patient(np.stack([i, j, k], -1).astype(float)).mean(axis=0)
    expected = LINEAR.offset_gy + np.dot(LINEAR.gradient_gy_per_mm, centroid)
    for s in (1, 3):
        assert dose_on_mask(mask, dose, supersample=s).mean_gy == pytest.approx(expected, rel=2e-6)


def test_uneven_mask_slices_exact_volume_and_centroid():
    """Uneven slices: each voxel's cell reaches half way to its neighbours, so the volume is exact and
    a boundary voxel's cell is not centred on its slice — for a linear field its average is the
    field at the cell's centre, not at the slice."""
    offsets = _uneven_offsets(50)
    grid = axial_grid((-45.0, -45.0, -45.0 + 2.2), (1.5, 1.5), offsets, (61, 61), FOR)
    mask = SPHERE.mask(grid)
    dose = LINEAR.on_grid(_dose_grid(step=2.5, shift=(0.3, 0.4, 0.7)))
    thickness = _cell_thickness(offsets)
    per_slice = mask.array.sum(axis=(1, 2))
    assert dose_on_mask(mask, dose).volume_cc == pytest.approx((per_slice * thickness).sum() * 1.5 * 1.5 / 1000, rel=1e-12)

    stats = dose_on_mask(mask, dose, supersample=3)
    inside = mask.array
    padded = np.pad(inside, 1)
    enclosed = np.ones_like(inside)
    for axis in range(3):
        for step in (-1, 1):
            enclosed &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    gaps = np.diff(offsets)
    lower, upper = np.r_[gaps[:1], gaps], np.r_[gaps, gaps[-1:]]
    cell_centre = offsets + (upper - lower) / 4  # centre of [z - lower/2, z + upper/2]
    k, j, i = np.nonzero(inside)
    z = np.where(enclosed[k, j, i], offsets[k], cell_centre[k]) + grid.origin[2]
    x, y = grid.origin[0] + 1.5 * i, grid.origin[1] + 1.5 * j
    values = LINEAR.offset_gy + LINEAR.gradient_gy_per_mm[0] * x + LINEAR.gradient_gy_per_mm[1] * y \
        + LINEAR.gradient_gy_per_mm[2] * z
    weights = thickness[k]
    assert stats.mean_gy == pytest.approx(np.dot(values, weights) / weights.sum(), rel=2e-6)
    assert stats.mean_gy == pytest.approx(LINEAR.mean_over(SPHERE), rel=0.005)
    assert stats.volume_cc == pytest.approx(SPHERE.volume_cc, rel=0.01)


def test_mask_finer_than_the_dose_and_quadratic_truth():
    mask = SPHERE.mask(covering_grid(SPHERE, (0.8, 0.8, 1.0), FOR, margin_mm=2.0))
    dose = QUADRATIC.on_grid(_dose_grid(step=3.0, shift=(0.5, 0.5, 0.5)))
    stats = dose_on_mask(mask, dose)
    assert stats.volume_cc == pytest.approx(SPHERE.volume_cc, rel=0.003)
    assert stats.mean_gy == pytest.approx(QUADRATIC.mean_over(SPHERE), rel=0.005)


def test_oblique_mask_grid_goes_through_patient_coordinates():
    """A mask grid rotated about z (and one about x) relative to the axial dose grid takes the point-by-
    point path; a linear field stays exact."""
    for row, col in (((np.cos(0.5), np.sin(0.5), 0.0), (-np.sin(0.5), np.cos(0.5), 0.0)),
                     ((1.0, 0.0, 0.0), (0.0, np.cos(0.3), np.sin(0.3)))):
        normal = np.cross(row, col)
        # 64 × 64 × 45 voxels of 1.6 × 1.6 × 2 mm centred on the sphere.
        origin = np.asarray(SPHERE.centre) - 31.5 * 1.6 * (np.asarray(row) + np.asarray(col)) - 44.0 * normal
        grid = Volume(np.zeros((45, 64, 64), np.float32), origin=tuple(origin), row_direction=row,
                      column_direction=col, pixel_spacing=(1.6, 1.6), slice_offsets=np.arange(45) * 2.0,
                      frame_of_reference_uid=FOR)
        mask = SPHERE.mask(grid)
        dose = LINEAR.on_grid(_dose_grid(step=2.5, shift=(0.2, 0.3, 0.4), margin=20.0))
        k, j, i = np.nonzero(mask.array)
        centroid = mask.voxel_to_patient(np.stack([i, j, k], -1).astype(float)).mean(axis=0)
        stats = dose_on_mask(mask, dose, supersample=3)
        assert stats.mean_gy == pytest.approx(LINEAR.offset_gy + np.dot(LINEAR.gradient_gy_per_mm, centroid),
                                              rel=2e-6)
        assert stats.volume_cc == pytest.approx(SPHERE.volume_cc, rel=0.01)
        quad = dose_on_mask(mask, QUADRATIC.on_grid(_dose_grid(step=2.5, margin=20.0)))
        assert quad.mean_gy == pytest.approx(QUADRATIC.mean_over(SPHERE), rel=0.005)


def test_dose_grid_with_reversed_axes_and_uneven_frames():
    """RTDOSE grids may run along -x / -y (prone) and have uneven GridFrameOffsetVector steps."""
    mask = SPHERE.mask(covering_grid(SPHERE, (2.0, 2.0, 2.0), FOR, margin_mm=3.0))
    offsets = _uneven_offsets(45, gaps=(2.0, 2.5, 3.0))
    dose_grid = Volume(np.zeros((45, 50, 50), np.float32), origin=(60.3, 59.1, -57.9), row_direction=(-1, 0, 0),
                       column_direction=(0, -1, 0), pixel_spacing=(2.5, 2.5), slice_offsets=offsets,
                       frame_of_reference_uid=FOR)
    assert dose_grid.normal[2] == pytest.approx(1.0)
    dose = LINEAR.on_grid(dose_grid)
    k, j, i = np.nonzero(mask.array)
    centroid = mask.voxel_to_patient(np.stack([i, j, k], -1).astype(float)).mean(axis=0)
    stats = dose_on_mask(mask, dose)
    assert stats.mean_gy == pytest.approx(LINEAR.offset_gy + np.dot(LINEAR.gradient_gy_per_mm, centroid), rel=2e-6)
    contours = SPHERE.contours(np.arange(-50.0, 50.0, 2.5), FOR)
    assert dose_on_contours(contours, dose).mean_gy == pytest.approx(LINEAR.mean_over(SPHERE), rel=1e-3)


def test_integer_masks_and_big_sparse_masks():
    """uint8 / int16 label masks work; a CT-sized mask is only scanned, not copied."""
    grid = axial_grid((-255.0, -255.0, -100.0), (1.0, 1.0), np.arange(80) * 2.5, (512, 512), FOR)
    mask = SPHERE.mask(grid)
    dose = LINEAR.on_grid(_dose_grid())
    expected = dose_on_mask(mask, dose)
    for dtype in (np.uint8, np.int16):
        other = dose_on_mask(mask.with_array(mask.array.astype(dtype) * 3), dose)
        assert other.mean_gy == expected.mean_gy and other.volume_cc == expected.volume_cc
    with pytest.raises(ValueError, match="boolean"):
        dose_on_mask(mask.with_array(mask.array.astype(np.float32)), dose)


# -- outside the dose grid, empty, frames of reference ------------------------------------------------


def test_structure_partly_outside_the_dose_grid_counts_outside_as_zero(caplog):
    """Documented: within half a dose voxel of the grid the edge dose is used; beyond it the dose is
    0 Gy, the volume still counts, outside_fraction says how much, and a warning is logged."""
    step = 2.0
    mask = SPHERE.mask(covering_grid(SPHERE, (step, step, step), FOR, margin_mm=2.0))
    full = _dose_grid(step=2.5)
    cut_k = 30  # keep dose slices below the sphere's top
    cut = Volume(np.zeros((cut_k,) + full.shape[1:], np.float32), origin=full.origin,
                 row_direction=full.row_direction, column_direction=full.column_direction,
                 pixel_spacing=full.pixel_spacing, slice_offsets=full.slice_offsets[:cut_k],
                 frame_of_reference_uid=FOR)
    dose = LINEAR.on_grid(cut)
    z_limit = cut.origin[2] + cut.slice_offsets[-1] + 1.25  # half a dose voxel beyond the last frame
    k, j, i = np.nonzero(mask.array)
    xyz = mask.voxel_to_patient(np.stack([i, j, k], -1).astype(float))
    beyond = xyz[:, 2] > z_limit
    clamped = xyz.copy()
    clamped[:, 2] = np.minimum(clamped[:, 2], cut.origin[2] + cut.slice_offsets[-1])
    values = np.where(beyond, 0.0, LINEAR.offset_gy + clamped @ np.asarray(LINEAR.gradient_gy_per_mm))

    with caplog.at_level(logging.WARNING, logger="heartloop.dose.structure"):
        stats = dose_on_mask(mask, dose, supersample=1)
    assert 0.05 < stats.outside_fraction < 0.5
    assert stats.outside_fraction == pytest.approx(beyond.mean(), rel=1e-9)
    assert stats.mean_gy == pytest.approx(values.mean(), rel=1e-5)
    assert stats.volume_cc == pytest.approx(mask.array.sum() * step ** 3 / 1000)
    assert stats.min_gy == 0.0
    assert "outside the dose grid" in caplog.text

    # Supersampled, and from contours: the same convention, the same fraction within sampling.
    assert dose_on_mask(mask, dose).outside_fraction == pytest.approx(beyond.mean(), abs=0.01)
    contours = SPHERE.contours(np.arange(-60.0, 60.0, step) + 0.2, FOR)
    from_contours = dose_on_contours(contours, dose)
    assert from_contours.outside_fraction == pytest.approx(beyond.mean(), abs=0.01)
    assert from_contours.mean_gy == pytest.approx(stats.mean_gy, rel=0.01)


def test_empty_structures_are_refused():
    grid = covering_grid(SPHERE, (3.0, 3.0, 3.0), FOR)
    dose = LINEAR.on_grid(_dose_grid())
    with pytest.raises(ValueError, match="structure is empty"):
        dose_on_mask(grid.with_array(np.zeros(grid.shape, bool)), dose)
    with pytest.raises(ValueError, match="structure is empty"):
        dose_on_contours(PlanarContours("Heart", FOR, ()), dose)


def test_mismatched_frame_of_reference_names_both_uids():
    dose = LINEAR.on_grid(_dose_grid())
    other = "1.2.826.0.1.3680043.8.498.999"
    mask = SPHERE.mask(covering_grid(SPHERE, (3.0, 3.0, 3.0), other))
    with pytest.raises(ValueError) as err:
        dose_on_mask(mask, dose)
    assert other in str(err.value) and FOR in str(err.value)
    with pytest.raises(ValueError) as err:
        dose_on_contours(SPHERE.contours(np.arange(-40.0, 40.0, 3.0), other), dose)
    assert other in str(err.value) and FOR in str(err.value)


@pytest.mark.parametrize("kwargs", [{"supersample": 0}, {"supersample": 2.0}, {"supersample": 99},
                                    {"dvh_bin_gy": 0.0}, {"dvh_bin_gy": float("nan")}])
def test_invalid_settings(kwargs):
    mask = SPHERE.mask(covering_grid(SPHERE, (3.0, 3.0, 3.0), FOR))
    with pytest.raises(ValueError):
        dose_on_mask(mask, LINEAR.on_grid(_dose_grid()), **kwargs)


# -- contours ----------------------------------------------------------------------------------------


def _square(cx, cy, half):
    return np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]])


def _circle(cx, cy, r, n=256):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def test_contour_slabs_reach_half_way_and_end_slabs_take_the_adjacent_gap():
    dose = LINEAR.on_grid(_dose_grid())
    square = _square(0.0, 0.0, 20.0)  # 1600 mm²
    z = [-10.0, -8.0, -4.0, 1.0]  # gaps 2, 4, 5: slabs 2, 3, 4.5, 5 mm
    contours = PlanarContours("Box", FOR, tuple(ContourSlice(zz, (square,)) for zz in z))
    assert dose_on_contours(contours, dose).volume_cc == pytest.approx(1600 * 14.5 / 1000, rel=1e-9)
    single = PlanarContours("Box", FOR, (ContourSlice(0.0, (square,)),))
    assert dose_on_contours(single, dose).volume_cc == pytest.approx(1600 * 2.5 / 1000, rel=1e-9)


def test_even_odd_rule_holes_and_overlaps():
    dose = QUADRATIC.on_grid(_dose_grid())
    outer, inner = _circle(1.0, -2.0, 30.0), _circle(4.0, 0.0, 12.0)
    z = np.arange(-9.0, 9.5, 3.0)
    ring = PlanarContours("Ring", FOR, tuple(ContourSlice(zz, (outer, inner)) for zz in z))
    area = np.pi * (30.0 ** 2 - 12.0 ** 2) * polygon_area_factor(256)
    stats = dose_on_contours(ring, dose)
    assert stats.volume_cc == pytest.approx(area * 3.0 * len(z) / 1000, rel=2e-3)
    # Two overlapping squares: the overlap is outside by the even-odd rule (XOR).
    a, b = _square(0.0, 0.0, 10.0), _square(10.0, 10.0, 10.0)
    xor = PlanarContours("X", FOR, (ContourSlice(0.0, (a, b)),))
    assert dose_on_contours(xor, dose).volume_cc == pytest.approx((800 - 2 * 100) * 2.5 / 1000, rel=1e-9)


def test_contour_in_plane_resolution_converges():
    dose = QUADRATIC.on_grid(_dose_grid(step=3.0))
    contours = SPHERE.contours(np.arange(-45.0, 45.0, 2.5) + 0.3, FOR)
    coarse = dose_on_contours(contours, dose, in_plane_mm=3.0, supersample=1)
    default = dose_on_contours(contours, dose)
    fine = dose_on_contours(contours, dose, in_plane_mm=0.5, supersample=5)
    assert abs(default.volume_cc - fine.volume_cc) < 0.2 * abs(coarse.volume_cc - fine.volume_cc) + 1e-3
    assert default.volume_cc == pytest.approx(fine.volume_cc, rel=2e-4)
    # The mean: a fine pixel grid converges to the mean of the *trilinear interpolant*, which in
    # this strongly curved field overestimates the true dose between nodes (by D''h²/8). The
    # default samples at the dose nodes, where the interpolant is exact, so it lands closer to the
    # true field than the fine grid does.
    truth = QUADRATIC.mean_over(SPHERE)
    assert abs(default.mean_gy - truth) < abs(fine.mean_gy - truth)
    assert default.mean_gy == pytest.approx(truth, rel=1e-3)
    assert fine.mean_gy == pytest.approx(truth, rel=5e-3)
    with pytest.raises(ValueError, match="in_plane_mm"):
        dose_on_contours(contours, dose, in_plane_mm=0.0)


# -- DVH and DoseStats -----------------------------------------------------------------------------


def _wide_stats(dvh_bin_gy=0.01) -> DoseStats:
    """A field from ~0 to ~45 Gy across the sphere, so every V-level is between 0 and 100 %."""
    field = LinearField(22.0, (0.5, 0.1, 0.0))
    mask = SPHERE.mask(covering_grid(SPHERE, (2.0, 2.0, 2.0), FOR))
    return dose_on_mask(mask, field.on_grid(_dose_grid()), dvh_bin_gy=dvh_bin_gy)


def test_dvh_is_monotone_and_consistent_with_v_and_d_metrics():
    stats = _wide_stats()
    dose, vol = stats.dvh_dose_gy, stats.dvh_volume_pct
    assert vol[0] == 100.0 and vol[-1] == 0.0 and np.all(np.diff(vol) <= 0)
    assert np.allclose(np.diff(dose), 0.01) and dose[-1] > stats.max_gy >= dose[-2]
    for level in V_LEVELS_GY:
        pct = getattr(stats, f"v{level:g}_pct")
        assert 0 < pct < 100
        assert vol[int(round(level / 0.01))] == pytest.approx(pct, abs=1e-9)
        assert getattr(stats, f"v{level:g}_cc") == pytest.approx(pct * stats.volume_cc / 100)
    for pct, d in ((2.0, stats.d2_gy), (98.0, stats.d98_gy)):
        b = int(np.floor(d / 0.01))
        assert vol[b] >= pct - 1e-9 and vol[b + 1] <= pct + 0.05  # the bin holding D_x straddles x %
    assert stats.min_gy <= stats.d98_gy < stats.mean_gy < stats.d2_gy <= stats.max_gy
    # The mean from the DVH (bin centres) agrees to within half a bin.
    diff = -np.diff(vol)
    assert np.dot(dose[:-1] + 0.005, diff) / 100 == pytest.approx(stats.mean_gy, abs=0.005)


def test_scalar_metrics_do_not_depend_on_the_dvh_bin():
    fine, coarse = _wide_stats(0.01), _wide_stats(0.5)
    for name in ("mean_gy", "d2_gy", "d98_gy", "v20_pct", "min_gy", "max_gy"):
        assert getattr(coarse, name) == pytest.approx(getattr(fine, name), rel=1e-12)
    assert coarse.dvh_bin_gy == pytest.approx(0.5)


def test_to_dict_is_json_safe_and_leaves_the_dvh_out_unless_asked():
    stats = _wide_stats()
    plain = stats.to_dict()
    assert "dvh_dose_gy" not in plain and plain["outside_fraction"] == 0.0
    assert set(plain) >= {"volume_cc", "mean_gy", "min_gy", "max_gy", "d2_gy", "d98_gy", "v5_pct", "v30_cc"}
    full = json.loads(json.dumps(stats.to_dict(include_dvh=True)))
    assert full["dvh_volume_pct"][0] == 100.0 and len(full["dvh_dose_gy"]) == len(stats.dvh_dose_gy)
    with pytest.raises(ValueError):
        stats.dvh_volume_pct[0] = 50.0


def test_dose_stats_validates():
    good = _wide_stats().to_dict(include_dvh=True)
    DoseStats(**good)
    for change, match in (({"volume_cc": 0.0}, "volume"), ({"mean_gy": -1.0}, "min <= mean"),
                          ({"d2_gy": 0.0}, "D98"), ({"v5_pct": 101.0}, "V-metrics"),
                          ({"v5_cc": 1e6}, "disagrees"), ({"outside_fraction": 1.5}, "outside"),
                          ({"dvh_volume_pct": [100.0, 50.0, 60.0]}, "DVH|dvh"), ({"mean_gy": float("nan")}, "finite")):
        with pytest.raises(ValueError, match=match):
            DoseStats(**{**good, **change})
