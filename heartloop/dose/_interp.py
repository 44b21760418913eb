"""Trilinear dose interpolation at points and on tensor grids (private to `heartloop.dose`).

Edge convention, shared by every caller: a point within half a voxel outside the dose grid takes
the value of the nearest edge voxel (the dose grid's voxels are cells, as a TPS displays them);
a point beyond that half voxel is *outside*: its dose is 0 and the caller is told.

Trilinear interpolation is a sum over grid nodes of ``D[n] · h(k - n_k) · h(j - n_j) · h(i - n_i)``
with ``h`` the 1-D hat function. When a grid of sample positions runs along the dose grid's axes,
the weights therefore separate by axis (`AxisWeights`), and so do averages over boxes — which is
how voxels are supersampled without evaluating every sub-voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heartloop.core import Volume

#: Slack (in voxel indices) when deciding "within half a voxel": structures drawn exactly to the
#: grid's outer cell faces must not be reported as outside because of rounding.
_EDGE_SLACK = 1e-6


@dataclass(frozen=True)
class AxisTaps:
    """Two-tap linear interpolation along one dose axis for a set of positions."""

    lo: np.ndarray
    hi: np.ndarray
    frac: np.ndarray
    inside: np.ndarray


def axis_taps(index: np.ndarray, n: int) -> AxisTaps:
    """Taps for continuous indices `index` on an axis of `n` nodes (edge clamp, see module doc)."""
    index = np.asarray(index, dtype=np.float64)
    inside = (index >= -0.5 - _EDGE_SLACK) & (index <= n - 0.5 + _EDGE_SLACK)
    clamped = np.clip(index, 0.0, n - 1.0)
    lo = np.minimum(np.floor(clamped).astype(np.intp), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    frac = clamped - lo if n > 1 else np.zeros_like(clamped)
    return AxisTaps(lo=lo, hi=hi, frac=frac, inside=inside)


@dataclass(frozen=True)
class AxisWeights:
    """Per position along one of our axes: the dose nodes ``start + t`` (``t < width``) it reads
    along the matching dose axis, their weights, and the fraction of it inside the dose grid."""

    start: np.ndarray
    weight: np.ndarray
    inside: np.ndarray


def axis_weights(index: np.ndarray, n: int, sub_weight: np.ndarray | None = None) -> AxisWeights:
    """Weights that interpolate (``index`` of shape ``(P,)``) or average over sub-positions
    (``index`` of shape ``(P, s)`` with `sub_weight` ``(P, s)`` summing to 1 per row) on an axis of
    `n` dose nodes. Outside sub-positions weigh 0 (their dose is 0)."""
    index = np.asarray(index, dtype=np.float64)
    if index.ndim == 1:
        index = index[:, None]
        sub_weight = np.ones_like(index)
    elif sub_weight is None:
        raise ValueError("averaging over sub-positions needs their weights")
    taps = axis_taps(index, n)
    w = np.where(taps.inside, sub_weight, 0.0)
    start = np.min(np.where(taps.inside, taps.lo, n), axis=1)
    start = np.where(start >= n, 0, start)
    width = int(max(1, np.max(np.where(taps.inside, taps.hi, 0) - start[:, None]) + 1))
    weight = np.zeros((len(index), width))
    rows = np.broadcast_to(np.arange(len(index))[:, None], index.shape)
    np.add.at(weight, (rows, np.clip(taps.lo - start[:, None], 0, width - 1)), w * (1 - taps.frac))
    np.add.at(weight, (rows, np.clip(taps.hi - start[:, None], 0, width - 1)), w * taps.frac)
    return AxisWeights(start=start, weight=weight, inside=w.sum(axis=1))


def _crop_bounds(weights: AxisWeights) -> tuple[int, int]:
    """Smallest node range [start, stop) that the non-zero weights touch (at least one node)."""
    used = weights.weight > 0
    if not used.any():
        return 0, 1
    node = weights.start[:, None] + np.arange(weights.weight.shape[1])
    return int(node[used].min()), int(node[used].max()) + 1


def sample_tensor(dose: Volume, wi: AxisWeights, wj: AxisWeights, wk: AxisWeights) -> np.ndarray:
    """Dose on the tensor grid ``wk × wj × wi`` (shape ``(len(wk), len(wj), len(wi))``), float32.

    Exact for trilinear interpolation (and box averages of it) when each of our axes runs along one
    dose axis: the interpolation is then done axis by axis on a crop of the dose, so the work is
    proportional to the output and no full-size float array is ever made.
    """
    (k0, k1), (j0, j1), (i0, i1) = _crop_bounds(wk), _crop_bounds(wj), _crop_bounds(wi)
    block = np.asarray(dose.array[k0:k1, j0:j1, i0:i1], dtype=np.float32)
    for axis, weights, first in ((0, wk, k0), (1, wj, j0), (2, wi, i0)):
        shape = [1, 1, 1]
        shape[axis] = -1
        out = None
        for t in range(weights.weight.shape[1]):
            w = weights.weight[:, t]
            if not np.any(w):
                continue
            nodes = np.clip(weights.start + t - first, 0, block.shape[axis] - 1)
            term = np.take(block, nodes, axis=axis) * w.astype(np.float32).reshape(shape)
            out = term if out is None else out + term
        if out is None:
            new_shape = list(block.shape)
            new_shape[axis] = len(weights.start)
            out = np.zeros(new_shape, dtype=np.float32)
        block = out
    return block


def sample_tensor_at(dose: Volume, wi: AxisWeights, wj: AxisWeights, wk: AxisWeights, selected: np.ndarray,
                     chunk_voxels: int = 1 << 22) -> np.ndarray:
    """`sample_tensor` at the `selected` samples only (float64, in C order), computed in slabs of
    the first axis so that memory stays bounded for structures as big as the whole grid."""
    rows = max(1, chunk_voxels // max(1, selected.shape[1] * selected.shape[2]))
    parts = []
    for k0 in range(0, selected.shape[0], rows):
        k1 = min(k0 + rows, selected.shape[0])
        if not selected[k0:k1].any():
            continue
        slab = AxisWeights(start=wk.start[k0:k1], weight=wk.weight[k0:k1], inside=wk.inside[k0:k1])
        parts.append(sample_tensor(dose, wi, wj, slab)[selected[k0:k1]].astype(np.float64))
    return np.concatenate(parts) if parts else np.zeros(0)


def inside_fraction(wi: AxisWeights, wj: AxisWeights, wk: AxisWeights) -> np.ndarray | None:
    """Fraction of each tensor-grid sample inside the dose grid, or None when all are fully inside."""
    if np.all(wi.inside > 1 - 1e-9) and np.all(wj.inside > 1 - 1e-9) and np.all(wk.inside > 1 - 1e-9):
        return None
    return wk.inside[:, None, None] * wj.inside[None, :, None] * wi.inside[None, None, :]


def sample_points(dose: Volume, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear dose at ``(N, 3)`` continuous dose indices ``(i, j, k)``.

    Returns
    -------
    values, inside
        float64 doses (0 where outside) and a boolean "within the grid (or half a voxel of it)".
    """
    nk, nj, ni = dose.shape
    ti, tj, tk = (axis_taps(ijk[:, a], n) for a, n in ((0, ni), (1, nj), (2, nk)))
    inside = ti.inside & tj.inside & tk.inside
    if not np.any(inside):
        return np.zeros(len(ijk)), inside

    def bounds(taps: AxisTaps) -> tuple[int, int]:
        return int(taps.lo[inside].min()), int(taps.hi[inside].max()) + 1

    (k0, k1), (j0, j1), (i0, i1) = bounds(tk), bounds(tj), bounds(ti)
    block = np.asarray(dose.array[k0:k1, j0:j1, i0:i1], dtype=np.float32)
    flat = block.reshape(-1)
    sk, sj = block.shape[1] * block.shape[2], block.shape[2]

    def local(taps: AxisTaps, first: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        return np.clip(taps.lo - first, 0, size - 1), np.clip(taps.hi - first, 0, size - 1)

    klo, khi = local(tk, k0, block.shape[0])
    jlo, jhi = local(tj, j0, block.shape[1])
    ilo, ihi = local(ti, i0, block.shape[2])
    fk, fj, fi = tk.frac, tj.frac, ti.frac
    values = np.zeros(len(ijk))
    for kk, wk in ((klo, 1 - fk), (khi, fk)):
        for jj, wj in ((jlo, 1 - fj), (jhi, fj)):
            base = kk * sk + jj * sj
            values += (wk * wj) * ((1 - fi) * flat[base + ilo] + fi * flat[base + ihi])
    values[~inside] = 0.0
    return values, inside


def same_axes(row_a: tuple[float, float, float], col_a: tuple[float, float, float],
              row_b: tuple[float, float, float], col_b: tuple[float, float, float], tol: float = 1e-6) -> bool:
    """True when grid a's row and column directions run along grid b's (either sign), so that
    each of a's axes maps onto one of b's and trilinear interpolation separates by axis."""
    return (
        abs(abs(float(np.dot(row_a, row_b))) - 1.0) < tol
        and abs(abs(float(np.dot(col_a, col_b))) - 1.0) < tol
    )
