"""Acceptance (issue 4): analytic truth. Spheres and ellipsoids (one rotated) in a linear field
(mean = dose at the centroid) and a quadratic field (closed form), on a coarse (3 mm voxels and
contour planes, 3 mm dose) and a fine (1 mm, 2 mm dose) grid: mean within 0.5 %, volume within 1 %,
from a mask (voxel-centre rasterisation of the true shape) and from contours (exact sections).

Sizes are a heart's (semi-axes 40-60 mm). The dose grid is shifted off the structure grid so that no
node coincides. Volume errors come from rasterisation (mask) and from the inscribed polygons
(contours); mean errors mostly from trilinear interpolation of the curved field (for the quadratic
field on a 3 mm grid it overestimates by about k·h²/2, ~0.2 %).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from heartloop.dose import dose_on_contours, dose_on_mask
from heartloop.dose.analytic import Ellipsoid, LinearField, QuadraticField, covering_grid, rotation_matrix

FOR = "1.2.826.0.1.3680043.8.498.1"
N_VERTICES = 128

SHAPES = {
    "sphere": Ellipsoid.sphere((3.3, -2.1, 1.7), 45.0),
    "ellipsoid": Ellipsoid((-4.2, 6.1, 2.9), (60.0, 45.0, 40.0)),
    "rotated": Ellipsoid((1.9, -3.7, -2.4), (60.0, 45.0, 40.0), rotation_matrix(30.0, 20.0, 15.0)),
}
#: (structure voxel / contour plane spacing, dose spacing), both isotropic (mm)
GRIDS = {"coarse": (3.0, 3.0), "fine": (1.0, 2.0)}
DOSE_SHIFT_MM = (0.37, -0.61, 0.83)


def _fields(shape: Ellipsoid) -> dict:
    return {
        "linear": LinearField(20.0, (0.1, -0.05, 0.08)),
        "quadratic": QuadraticField(5.0, 0.004, tuple(np.add(shape.centre, (10.0, -5.0, 8.0)))),
    }


@lru_cache(maxsize=None)
def _mask(shape_name: str, grid_name: str):
    shape, step = SHAPES[shape_name], GRIDS[grid_name][0]
    return shape.mask(covering_grid(shape, (step, step, step), FOR, margin_mm=4.0))


@lru_cache(maxsize=None)
def _dose(shape_name: str, grid_name: str, field_name: str):
    shape, step = SHAPES[shape_name], GRIDS[grid_name][1]
    grid = covering_grid(shape, (step, step, step), FOR, margin_mm=8.0, shift_mm=DOSE_SHIFT_MM)
    return _fields(shape)[field_name].on_grid(grid)


def _contours(shape_name: str, grid_name: str):
    shape, step = SHAPES[shape_name], GRIDS[grid_name][0]
    # Planes on a CT-like lattice that does not straddle the centre symmetrically.
    z = np.arange(-80.0, 80.0, step) + 0.4
    return shape.contours(z, FOR, n_vertices=N_VERTICES)


CASES = [(s, g, f) for s in SHAPES for g in GRIDS for f in ("linear", "quadratic")]


@pytest.mark.parametrize("shape_name, grid_name, field_name", CASES)
def test_mask_matches_analytic_truth(shape_name, grid_name, field_name):
    shape = SHAPES[shape_name]
    stats = dose_on_mask(_mask(shape_name, grid_name), _dose(shape_name, grid_name, field_name))
    true_mean = _fields(shape)[field_name].mean_over(shape)
    assert stats.volume_cc == pytest.approx(shape.volume_cc, rel=0.01)
    assert stats.mean_gy == pytest.approx(true_mean, rel=0.005)
    assert stats.outside_fraction == 0.0


@pytest.mark.parametrize("shape_name, grid_name, field_name", CASES)
def test_contours_match_analytic_truth(shape_name, grid_name, field_name):
    shape = SHAPES[shape_name]
    stats = dose_on_contours(_contours(shape_name, grid_name), _dose(shape_name, grid_name, field_name))
    true_mean = _fields(shape)[field_name].mean_over(shape)
    assert stats.volume_cc == pytest.approx(shape.volume_cc, rel=0.01)
    assert stats.mean_gy == pytest.approx(true_mean, rel=0.005)
    assert stats.outside_fraction == 0.0


@pytest.mark.parametrize("grid_name", GRIDS)
def test_linear_field_is_exact_up_to_the_shape(grid_name):
    """In a linear field trilinear interpolation is exact, so the mean is the field at the centroid of
    what was integrated: for the mask, the centroid of its voxel centres, to float32 precision."""
    mask = _mask("rotated", grid_name)
    field = _fields(SHAPES["rotated"])["linear"]
    stats = dose_on_mask(mask, _dose("rotated", grid_name, "linear"))
    k, j, i = np.nonzero(mask.array)
    centroid = mask.voxel_to_patient(np.stack([i, j, k], axis=-1).astype(float)).mean(axis=0)
    assert stats.mean_gy == pytest.approx(field.offset_gy + np.dot(field.gradient_gy_per_mm, centroid), rel=2e-6)


def test_contours_and_mask_of_one_shape_agree():
    """The two entry points are two rasterisations of one truth: on the fine grid they agree far
    better than the acceptance tolerance."""
    for field_name in ("linear", "quadratic"):
        dose = _dose("rotated", "fine", field_name)
        from_mask = dose_on_mask(_mask("rotated", "fine"), dose)
        from_contours = dose_on_contours(_contours("rotated", "fine"), dose)
        assert from_contours.mean_gy == pytest.approx(from_mask.mean_gy, rel=0.001)
        assert from_contours.volume_cc == pytest.approx(from_mask.volume_cc, rel=0.003)
