"""Resampling between a CT grid and the two network grids, exact for uneven slice spacing.

Everything here works in *index space* of the CT array ``(slices, rows, columns)``: a grid is
described per axis by the fractional CT indices of its voxel centres. Rows and columns are evenly
spaced in every CT, so their mapping is linear; the slice axis goes through the CT's
``slice_offsets`` (`numpy.interp`), so an uneven series is resampled at true millimetre positions,
never at an averaged spacing (DESIGN.md §4: never lose geometry).

Two resamplings:

- `block_average`: the localiser's cheap whole-CT downsampling. Coarse voxel ``c`` on an axis is the
  mean of CT voxels ``c·f … c·f + f − 1``, so the coarse→CT index mapping is exact whatever the
  spacing (uneven slices just make the coarse voxels unevenly thick, which a 6 mm localiser
  tolerates).
- `AxisGrid` + `resample_separable`: separable linear interpolation to and from the organ grid.
  Linear interpolation on a rectilinear grid is separable, so three 1D passes (cheap, no
  coordinate arrays of the volume's size) give exactly trilinear interpolation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from heartloop.core.volume import Volume

log = logging.getLogger(__name__)


def block_factors(volume: Volume, voxel_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    """Integer block sizes ``(slices, rows, columns)`` closest to `voxel_mm` (at least 1)."""
    spacing = (volume.slice_spacing, volume.pixel_spacing[0], volume.pixel_spacing[1])
    return tuple(max(1, int(round(target / s))) for target, s in zip(voxel_mm, spacing))  # type: ignore[return-value]


def block_average(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors``-sized blocks, float32; the far edges are padded by replication so
    every CT voxel lands in a block (a trimmed edge could cut off the heart's apex)."""
    padded_shape = [int(math.ceil(s / f) * f) for s, f in zip(array.shape, factors)]
    pad = [(0, p - s) for s, p in zip(array.shape, padded_shape)]
    if any(after for _, after in pad):
        array = np.pad(array, pad, mode="edge")
    (fk, fj, fi) = factors
    (nk, nj, ni) = (padded_shape[0] // fk, padded_shape[1] // fj, padded_shape[2] // fi)
    blocks = array.reshape(nk, fk, nj, fj, ni, fi)
    # dtype=float32 accumulates in float32 without a float copy of the whole CT.
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def block_any(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """True for a block holding any true voxel: the coarse label of sparse paint (one painted fine
    voxel makes its coarse voxel annotated)."""
    padded_shape = [int(math.ceil(s / f) * f) for s, f in zip(mask.shape, factors)]
    pad = [(0, p - s) for s, p in zip(mask.shape, padded_shape)]
    if any(after for _, after in pad):
        mask = np.pad(mask, pad, mode="constant", constant_values=False)
    (fk, fj, fi) = factors
    blocks = mask.reshape(padded_shape[0] // fk, fk, padded_shape[1] // fj, fj, padded_shape[2] // fi, fi)
    return blocks.any(axis=(1, 3, 5))


def block_fraction(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Fraction of true voxels per block (float32): a dense label downsampled to the coarse grid."""
    return block_average(np.asarray(mask, dtype=np.float32), factors)


@dataclass(frozen=True)
class AxisGrid:
    """The organ grid of a CT crop: per array axis, the fractional CT indices of its voxel centres.

    Parameters
    ----------
    positions
        Three 1D float arrays ``(slices, rows, columns)``; CT index coordinates (not crop-relative).
    """

    positions: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(p) for p in self.positions)  # type: ignore[return-value]

    @classmethod
    def for_crop(cls, volume: Volume, box: tuple[tuple[int, int], ...], voxel_mm: tuple[float, float, float]) -> "AxisGrid":
        """Evenly spaced `voxel_mm` grid covering the half-open CT index `box` ``((k0, k1), (j0, j1), (i0, i1))``."""
        positions = []
        for axis, ((lo, hi), step) in enumerate(zip(box, voxel_mm)):
            if axis == 0:
                offsets = volume.slice_offsets
                start, stop = float(offsets[lo]), float(offsets[hi - 1])
                n = max(1, int(math.floor((stop - start) / step)) + 1)
                mm = start + step * np.arange(n)
                idx = np.arange(len(offsets), dtype=np.float64)
                positions.append(np.interp(mm, offsets, idx) if len(offsets) > 1 else np.zeros(n))
            else:
                spacing = volume.pixel_spacing[0] if axis == 1 else volume.pixel_spacing[1]
                ratio = step / spacing
                n = max(1, int(math.floor((hi - 1 - lo) / ratio)) + 1)
                positions.append(lo + ratio * np.arange(n))
        return cls(positions=tuple(positions))  # type: ignore[arg-type]

    def ct_positions_in_grid(self, volume: Volume, box: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, ...]:
        """For each CT voxel of the crop `box`, its fractional index on this grid (for pasting the
        organ probability back onto the CT). Slices go through millimetres, so uneven spacing is exact."""
        result = []
        for axis, ((lo, hi), grid_pos) in enumerate(zip(box, self.positions)):
            ct_idx = np.arange(lo, hi, dtype=np.float64)
            if len(grid_pos) == 1:
                result.append(np.zeros(hi - lo))
            elif axis == 0:
                offsets = volume.slice_offsets
                grid_mm = np.interp(grid_pos, np.arange(len(offsets), dtype=np.float64), offsets)
                result.append(np.interp(offsets[lo:hi], grid_mm, np.arange(len(grid_pos), dtype=np.float64)))
            else:
                result.append((ct_idx - grid_pos[0]) / (grid_pos[1] - grid_pos[0]))
        return tuple(result)


def resample_axis(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `array` along `axis` at fractional indices `positions` (clamped to
    the array: values beyond the ends repeat the edge). Returns float32."""
    size = array.shape[axis]
    pos = np.clip(np.asarray(positions, dtype=np.float64), 0.0, size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = len(pos)
    w = (pos - lo).astype(np.float32).reshape(weight_shape)
    a = np.take(array, lo, axis=axis).astype(np.float32, copy=False)
    b = np.take(array, hi, axis=axis).astype(np.float32, copy=False)
    return a + (b - a) * w


def resample_separable(array: np.ndarray, positions: tuple[np.ndarray, ...]) -> np.ndarray:
    """Trilinear resampling of a 3D array at a rectilinear grid of fractional indices (float32).

    The axis that shrinks the data most goes first, so later passes touch fewer voxels.
    """
    order = sorted(range(3), key=lambda ax: len(positions[ax]) / array.shape[ax])
    out = array
    for axis in order:
        out = resample_axis(out, positions[axis], axis)
    return out
