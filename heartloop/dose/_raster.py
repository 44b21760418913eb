"""Even-odd polygon rasterisation with sub-pixel coverage, many planes at once (private).

Coordinates are continuous *sub-pixel* indices: with ``s`` sub-pixels per pixel side, sub-pixel
``(row r, column c)`` has its centre at ``(c, r)`` and belongs to pixel ``(r // s, c // s)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Runs:
    """Maximal runs of inside sub-pixels: sub-row ``row`` (plane × sub-rows + sub-row), columns
    ``[start, stop)``."""

    row: np.ndarray
    start: np.ndarray
    stop: np.ndarray


def even_odd_runs(n_planes: int, rows: int, columns: int, uv: np.ndarray, lengths: np.ndarray,
                  plane: np.ndarray) -> Runs:
    """Inside runs of each sub-row of a ``(n_planes, rows, columns)`` sub-pixel grid.

    Parameters
    ----------
    uv
        ``(N, 2)`` polygon vertices in continuous sub-pixel indices ``(column, row)``, ring after ring.
    lengths
        Vertices per ring (each ring implicitly closed).
    plane
        The plane of each ring.

    Notes
    -----
    A scanline fill over all planes at once, with no per-pixel Python loop: every polygon edge
    crossing sub-row ``r`` (half-open in the row coordinate, so a vertex on a row counts once)
    toggles the sub-pixels at and right of the crossing. All crossings of a row, whatever their
    polygon, are sorted and paired into runs — which is exactly the even-odd rule, so inner polygons
    are holes and overlapping polygons cancel where they overlap, as treatment planning systems
    read them.
    """
    empty = Runs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(lengths) == 0:
        return empty
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    nxt = np.arange(len(uv)) + 1
    nxt[starts + lengths - 1] = starts  # the closing edge of each ring
    x0, y0 = uv[:, 0], uv[:, 1]
    x1, y1 = uv[nxt, 0], uv[nxt, 1]
    ring_plane = np.repeat(np.asarray(plane, dtype=np.int64), lengths)
    first_row = np.clip(np.ceil(np.minimum(y0, y1)), 0, rows).astype(np.int64)
    stop_row = np.clip(np.ceil(np.maximum(y0, y1)), 0, rows).astype(np.int64)
    count = np.where(y0 != y1, np.maximum(stop_row - first_row, 0), 0)
    total = int(count.sum())
    if total == 0:
        return empty
    edge = np.repeat(np.arange(len(count)), count)
    row = first_row[edge] + (np.arange(total) - np.repeat(np.cumsum(count) - count, count))
    slope = (x1 - x0) / np.where(y1 != y0, y1 - y0, 1.0)
    x = x0[edge] + (row - y0[edge]) * slope[edge]
    column = np.clip(np.ceil(x), 0, columns).astype(np.int64)
    row_id = ring_plane[edge] * rows + row
    order = np.lexsort((column, row_id))
    row_id, column = row_id[order], column[order]
    # A closed ring crosses each row an even number of times, so crossings pair up row by row.
    if not np.array_equal(row_id[0::2], row_id[1::2]):
        raise RuntimeError("unpaired polygon crossings")  # cannot happen for closed rings
    run_row, run_start, run_stop = row_id[0::2], column[0::2], column[1::2]
    keep = run_stop > run_start
    return Runs(run_row[keep], run_start[keep], run_stop[keep])


def pixel_coverage(runs: Runs, s: int, n_planes: int, rows: int, columns: int) -> tuple[np.ndarray, ...]:
    """Per pixel of a ``(n_planes, rows, columns)`` grid (``s × s`` sub-pixels each): the number of
    inside sub-pixels and the sums of their centre offsets along rows (y) and columns (x), in pixel
    units (offsets ``(t + 0.5) / s - 0.5``).

    Computed from the runs alone, never materialising the sub-pixel grid: a run ``[a, b)`` covers
    ``clamp(b - m·s, 0, s) - clamp(a - m·s, 0, s)`` sub-pixels of pixel column ``m``, a function of
    ``m`` with four steps, so each run adds four entries to a difference array whose cumulative sum
    along the row is the coverage; the x-moment works the same way with prefix sums of the offsets.
    """
    width = columns + 2  # steps land at most one past the last pixel column
    offsets = (np.arange(s) + 0.5) / s - 0.5
    prefix = np.concatenate([[0.0], np.cumsum(offsets)])  # Σ of the first r offsets; prefix[s] = 0
    sub_rows = rows * s
    plane, sub_row = np.divmod(runs.row, sub_rows)
    base = (plane * rows + sub_row // s) * width
    qa, ra = np.divmod(runs.start, s)
    qb, rb = np.divmod(runs.stop, s)
    index = np.concatenate([base + qb, base + qb + 1, base + qa, base + qa + 1])
    steps = np.concatenate([rb - s, -rb, s - ra, ra]).astype(np.float64)
    y_offset = np.tile(offsets[sub_row % s], 4)
    x_steps = np.concatenate([prefix[rb], -prefix[rb], -prefix[ra], prefix[ra]])
    size = n_planes * rows * width

    def integrate(weights: np.ndarray) -> np.ndarray:
        diff = np.bincount(index, weights=weights, minlength=size).reshape(n_planes, rows, width)
        return np.cumsum(diff, axis=2)[:, :, :columns]

    return integrate(steps), integrate(steps * y_offset), integrate(x_steps)
