"""`Volume` geometry: exact on uneven slices, valid whenever it exists."""

from __future__ import annotations

import numpy as np
import pytest

from heartloop.core import Volume


def _vol(offsets, shape=(4, 3, 2)):
    return Volume(np.zeros((len(offsets),) + shape[1:]), origin=(-10.0, 20.0, -30.0), row_direction=(1, 0, 0),
                  column_direction=(0, 1, 0), pixel_spacing=(0.8, 0.5), slice_offsets=offsets,
                  frame_of_reference_uid="1.2.3")


def test_affine_maps_indices_to_patient():
    v = _vol([0, 2.5, 5.0, 7.5])
    assert v.is_uniform
    p = v.affine @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(p[:3], [-10 + 0.5, 20 + 1.6, -30 + 7.5])
    np.testing.assert_allclose(v.voxel_to_patient(np.array([1, 2, 3])), p[:3])


def test_uneven_slices_exact_and_invertible():
    v = _vol([0, 2.0, 5.0, 6.0])
    assert not v.is_uniform
    np.testing.assert_allclose(v.voxel_to_patient(np.array([0, 0, 2]))[2], -25.0)
    np.testing.assert_allclose(v.slice_position(3), [-10, 20, -24])
    ijk = np.array([[0.5, 1.5, 0.0], [1, 2, 2.5], [0, 0, 3]])
    np.testing.assert_allclose(v.patient_to_voxel(v.voxel_to_patient(ijk)), ijk, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"slice_offsets": [0, 2, 2, 4]}, "increasing"),
    ({"slice_offsets": [1, 2, 3, 4]}, "start at 0"),
    ({"row_direction": (1, 1, 0)}, "unit"),
    ({"column_direction": (1, 0, 0)}, "orthogonal"),
    ({"pixel_spacing": (0, 1)}, "positive"),
    ({"frame_of_reference_uid": ""}, "frame_of_reference"),
])
def test_invalid_geometry_refused(kwargs, match):
    base = dict(array=np.zeros((4, 3, 2)), origin=(0, 0, 0), row_direction=(1, 0, 0), column_direction=(0, 1, 0),
                pixel_spacing=(1, 1), slice_offsets=[0, 1, 2, 3], frame_of_reference_uid="1.2")
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Volume(**base)


def test_with_array_keeps_grid_and_checks_shape():
    v = _vol([0, 2.0, 5.0, 6.0])
    m = v.with_array(np.ones(v.shape, bool))
    assert m.same_grid(v)
    with pytest.raises(ValueError):
        v.with_array(np.ones((2, 2, 2)))
