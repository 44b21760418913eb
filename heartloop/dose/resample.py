"""A dose `Volume` resampled onto another grid (the CT's), trilinearly — for display.

The edge convention is `heartloop.dose._interp`'s: within half a dose voxel outside the dose grid
the nearest edge value, beyond it 0 Gy. When the target's axes run along the dose grid's (the
usual axial CT and axial dose), interpolation separates by axis and is done slab by slab on a
crop of the dose; otherwise every target voxel is sampled as a point, slice by slice.
"""

from __future__ import annotations

import numpy as np

from heartloop.core import Volume
from heartloop.dose._interp import axis_weights, sample_points, sample_tensor

#: Target slices computed per step (bounds the temporary arrays of a 512×512 CT to a few MB each).
CHUNK_SLICES = 16


def _aligned(grid: Volume, dose: Volume, tol: float = 1e-6) -> bool:
    """Each axis of `grid` runs along the same-numbered axis of `dose` (either sign)."""
    return (abs(abs(float(np.dot(grid.row_direction, dose.row_direction))) - 1.0) < tol
            and abs(abs(float(np.dot(grid.column_direction, dose.column_direction))) - 1.0) < tol)


def dose_on_grid(dose: Volume, grid: Volume) -> Volume:
    """`dose` (Gy) sampled at the voxel centres of `grid`: a float32 `Volume` on `grid`.

    Parameters
    ----------
    dose
        The dose grid (e.g. an RTDOSE read by `heartloop.dicom_node.rtdose`).
    grid
        The target grid (its array is not read), in the same frame of reference.

    Raises
    ------
    ValueError
        The two grids are in different frames of reference.
    """
    if dose.frame_of_reference_uid != grid.frame_of_reference_uid:
        raise ValueError(f"the dose is in frame of reference {dose.frame_of_reference_uid}, the grid in "
                         f"{grid.frame_of_reference_uid}: they cannot be overlaid")
    nk, nj, ni = grid.shape
    dk_n, dj_n, di_n = dose.shape
    out = np.empty(grid.shape, dtype=np.float32)
    if _aligned(grid, dose):
        zeros_i, zeros_j, zeros_k = np.zeros(ni), np.zeros(nj), np.zeros(nk)
        along_i = dose.patient_to_voxel(grid.voxel_to_patient(np.stack([np.arange(ni), zeros_i, zeros_i], axis=1)))
        along_j = dose.patient_to_voxel(grid.voxel_to_patient(np.stack([zeros_j, np.arange(nj), zeros_j], axis=1)))
        along_k = dose.patient_to_voxel(grid.voxel_to_patient(np.stack([zeros_k, zeros_k, np.arange(nk)], axis=1)))
        wi = axis_weights(along_i[:, 0], di_n)
        wj = axis_weights(along_j[:, 1], dj_n)
        for k0 in range(0, nk, CHUNK_SLICES):
            k1 = min(nk, k0 + CHUNK_SLICES)
            out[k0:k1] = sample_tensor(dose, wi, wj, axis_weights(along_k[k0:k1, 2], dk_n))
        return grid.with_array(out)
    jj, ii = np.meshgrid(np.arange(nj, dtype=np.float64), np.arange(ni, dtype=np.float64), indexing="ij")
    for k in range(nk):
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, float(k))], axis=1)
        values, _inside = sample_points(dose, dose.patient_to_voxel(grid.voxel_to_patient(ijk)))
        out[k] = values.reshape(nj, ni)
    return grid.with_array(out)
