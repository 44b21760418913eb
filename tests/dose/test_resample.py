"""A dose resampled onto a CT grid: exact for a linear field inside the dose grid, 0 Gy beyond half
a dose voxel outside it, the same on the separable (aligned) and the point-by-point (oblique) path."""

from __future__ import annotations

import numpy as np
import pytest

from heartloop.core import Volume
from heartloop.dose import dose_on_grid
from heartloop.dose.analytic import LinearField, axial_grid

FIELD = LinearField(10.0, (0.05, -0.03, 0.02))


def _dose() -> Volume:
    grid = axial_grid((-40.0, -40.0, -20.0), (4.0, 4.0), np.arange(11) * 4.0, (21, 21), "1.2.3")
    return FIELD.on_grid(grid)


def _ct(row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), uid="1.2.3") -> Volume:
    offsets = np.array([0.0, 2.5, 5.0, 10.0, 12.5, 15.0])  # uneven slices
    return Volume(array=np.zeros((6, 30, 30), dtype=np.int16), origin=(-30.0, -30.0, -10.0), row_direction=row,
                  column_direction=col, pixel_spacing=(1.5, 1.5), slice_offsets=offsets,
                  frame_of_reference_uid=uid)


def test_linear_field_is_reproduced_on_an_uneven_ct_grid():
    ct = _ct()
    out = dose_on_grid(_dose(), ct)
    assert out.array.dtype == np.float32 and out.shape == ct.shape
    np.testing.assert_allclose(out.array, FIELD.on_grid(ct.with_array(np.zeros(ct.shape, np.float32))).array,
                               atol=1e-4)


def test_outside_the_dose_grid_is_zero_and_the_oblique_path_agrees():
    wide = Volume(array=np.zeros((3, 10, 10), dtype=np.int16), origin=(-100.0, -100.0, 0.0),
                  row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0), pixel_spacing=(20.0, 20.0),
                  slice_offsets=np.array([0.0, 10.0, 100.0]), frame_of_reference_uid="1.2.3")
    out = dose_on_grid(_dose(), wide).array
    assert out[2].max() == 0.0 and out[0, 0, 0] == 0.0 and out[0, 5, 5] > 0
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = _ct(row=(c, s, 0.0), col=(-s, c, 0.0))
    inside = (slice(None), slice(0, 20), slice(0, 20))  # the rotated grid's far corner leaves the dose grid
    np.testing.assert_allclose(dose_on_grid(_dose(), oblique).array[inside],
                               FIELD.on_grid(oblique.with_array(np.zeros(oblique.shape, np.float32))).array[inside],
                               atol=1e-4)


def test_other_frame_of_reference_is_refused():
    with pytest.raises(ValueError, match="frame of reference"):
        dose_on_grid(_dose(), _ct(uid="9.9"))
