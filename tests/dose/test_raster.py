"""Even-odd sub-pixel coverage against a brute-force point-in-polygon test."""

from __future__ import annotations

import numpy as np
import pytest

from heartloop.dose._raster import even_odd_runs, pixel_coverage


def _inside_even_odd(points: np.ndarray, polygons: list[np.ndarray]) -> np.ndarray:
    """Brute force: crossing parity of a ray towards +x over every edge of every polygon, with the
    same half-open rule (an edge counts when the point's y is in [min y, max y) and x <= crossing)."""
    inside = np.zeros(len(points), dtype=bool)
    px, py = points[:, 0][:, None], points[:, 1][:, None]
    for poly in polygons:
        x0, y0 = poly[:, 0][None, :], poly[:, 1][None, :]
        x1, y1 = np.roll(poly[:, 0], -1)[None, :], np.roll(poly[:, 1], -1)[None, :]
        spans = (np.minimum(y0, y1) <= py) & (py < np.maximum(y0, y1))
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= (np.count_nonzero(spans & (px <= x_cross), axis=1) % 2).astype(bool)
    return inside


def _star(cx, cy, r_out, r_in, n, phase=0.0):
    t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + phase
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


@pytest.mark.parametrize("s", [1, 3, 4])
def test_coverage_and_moments_match_brute_force(s):
    rng = np.random.default_rng(5)
    planes = [
        [_star(13.3, 11.1, 11.0, 4.5, 7)],                                       # concave
        [_star(12.0, 12.0, 11.5, 9.0, 40, 0.1), _star(12.5, 11.0, 5.0, 3.0, 5)],  # with a hole
        [rng.uniform(2, 22, (9, 2))],                                            # self-intersecting
        [np.array([[3.0, 3.0], [15.0, 3.0], [15.0, 15.0], [3.0, 15.0]]),          # overlap: XOR
         np.array([[9.0, 9.0], [21.0, 9.0], [21.0, 21.0], [9.0, 21.0]])],
    ]
    rows, columns = 25, 24  # pixels; polygons in pixel units, sub-pixel coordinates = pixel * s
    rings = [p * s - 0.5 for polys in planes for p in polys]  # pixel edge 0 = sub-pixel centre -0.5
    plane_of_ring = np.repeat(np.arange(len(planes)), [len(p) for p in planes])
    runs = even_odd_runs(len(planes), rows * s, columns * s, np.concatenate(rings),
                         np.array([len(r) for r in rings]), plane_of_ring)
    count, y_moment, x_moment = pixel_coverage(runs, s, len(planes), rows, columns)

    a = (np.arange(s) + 0.5) / s - 0.5
    for p, polys in enumerate(planes):
        sub_r, sub_c = np.meshgrid(np.arange(rows * s), np.arange(columns * s), indexing="ij")
        centres = np.stack([(sub_c + 0.5) / s, (sub_r + 0.5) / s], axis=-1).reshape(-1, 2)  # pixel units
        inside = _inside_even_odd(centres, polys).reshape(rows, s, columns, s)
        assert np.array_equal(count[p], inside.sum(axis=(1, 3)))
        np.testing.assert_allclose(y_moment[p], np.einsum("rscq,s->rc", inside, a), atol=1e-9)
        np.testing.assert_allclose(x_moment[p], np.einsum("rscq,q->rc", inside, a), atol=1e-9)


def test_nothing_to_fill():
    runs = even_odd_runs(1, 4, 4, np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64))
    count, _, _ = pixel_coverage(runs, 2, 1, 2, 2)
    assert count.shape == (1, 2, 2) and not count.any()
