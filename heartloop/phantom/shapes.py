"""Analytic shapes the phantom is drawn from, evaluated on broadcast coordinate arrays.

All shapes live in the *body frame* (millimetres): ``u`` towards the patient's left, ``v``
posterior, ``w`` superior — DICOM LPS axes shifted so that the body centre at heart level is
``u = v = 0`` and the heart centre is ``w = 0``. Functions take ``du, dv, dw`` arrays that
broadcast against each other (typically shapes ``(1, 1, n)``, ``(1, m, 1)``, ``(k, 1, 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Array = np.ndarray


def smoothstep(x: Array | float, lo: float, hi: float) -> Array:
    """0 below ``lo``, 1 above ``hi``, a cubic ramp in between."""
    t = np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def unit(v: Array) -> Array:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def random_unit(rng: np.random.Generator, n: int) -> Array:
    g = rng.normal(size=(n, 3))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


@dataclass(frozen=True, eq=False)
class Blob:
    """A smooth, lumpy, optionally egg-shaped ellipsoid.

    A point is inside when ``rho < 1 + sum(amp * cos(freq * (n . dir) + phase))`` where ``rho`` is
    the ellipsoidal radius in the local frame (the two short axes shrink by ``1 - taper * q1``
    towards the ``+e1`` end) and ``n`` the local unit direction.

    Parameters
    ----------
    centre
        Body-frame centre (mm).
    axes
        ``(3, 3)`` rows ``e1, e2, e3``: orthonormal local axes.
    semi
        Semi-axis lengths (mm) along ``e1, e2, e3``.
    taper
        Narrowing of the cross-section towards ``+e1`` (0 = ellipsoid).
    bump_dirs, bump_freq, bump_phase, bump_amp
        Low-frequency radial modulation (``(m, 3)``, ``(m,)`` ...); relative amplitudes.
    """

    centre: Array
    axes: Array
    semi: Array
    taper: float = 0.0
    bump_dirs: Array = field(default_factory=lambda: np.zeros((0, 3)))
    bump_freq: Array = field(default_factory=lambda: np.zeros(0))
    bump_phase: Array = field(default_factory=lambda: np.zeros(0))
    bump_amp: Array = field(default_factory=lambda: np.zeros(0))

    @property
    def max_radius(self) -> float:
        """Upper bound (mm) of the distance from the centre to the surface."""
        return float(np.max(self.semi) * (1.0 + self.taper) * (1.0 + np.sum(np.abs(self.bump_amp))))

    def local(self, du: Array, dv: Array, dw: Array) -> tuple[Array, Array, Array]:
        """Normalised local coordinates ``q1, q2, q3`` (before tapering)."""
        e = self.axes
        q = []
        for m in range(3):
            q.append((du * np.float32(e[m, 0]) + dv * np.float32(e[m, 1]) + dw * np.float32(e[m, 2]))
                     * np.float32(1.0 / self.semi[m]))
        return q[0], q[1], q[2]

    def evaluate(self, du: Array, dv: Array, dw: Array) -> tuple[Array, Array, tuple[Array, Array, Array], Array]:
        """``(rho, r_surface, q, radius_mm)`` at offsets ``d* = point - centre``.

        ``rho < r_surface`` is inside; ``radius_mm`` converts a ``rho`` difference to millimetres
        along the local direction (for rims of a given physical thickness).
        """
        q1, q2, q3 = self.local(du, dv, dw)
        if self.taper:
            shrink = np.maximum(np.float32(1.0) - np.float32(self.taper) * q1, np.float32(0.35))
            t2, t3 = q2 / shrink, q3 / shrink
        else:
            t2, t3 = q2, q3
        rho = np.sqrt(q1 * q1 + t2 * t2 + t3 * t3)
        inv = np.float32(1.0) / np.maximum(rho, np.float32(1e-6))
        n1, n2, n3 = q1 * inv, t2 * inv, t3 * inv
        r_surface = np.ones_like(rho)
        for d, f, p, a in zip(self.bump_dirs, self.bump_freq, self.bump_phase, self.bump_amp, strict=True):
            proj = n1 * np.float32(d[0]) + n2 * np.float32(d[1]) + n3 * np.float32(d[2])
            r_surface += np.float32(a) * np.cos(np.float32(f) * proj + np.float32(p))
        s = self.semi.astype(np.float32)
        radius_mm = np.sqrt((n1 * s[0]) ** 2 + (n2 * s[1]) ** 2 + (n3 * s[2]) ** 2)
        return rho, r_surface, (q1, t2, t3), radius_mm

    def contains(self, points: Array) -> Array:
        """Inside test for ``(n, 3)`` body-frame points."""
        d = np.asarray(points, dtype=np.float32) - self.centre.astype(np.float32)
        rho, r_surface, _, _ = self.evaluate(d[:, 0], d[:, 1], d[:, 2])
        return rho < r_surface

    def surface_distances(self, directions: Array) -> Array:
        """Distance (mm) from the centre to the surface along each of ``(n, 3)`` directions."""
        dirs = np.asarray(directions, dtype=np.float64)
        dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        lo = np.zeros(len(dirs))
        hi = np.full(len(dirs), self.max_radius * 1.5)
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            inside = self.contains(self.centre + mid[:, None] * dirs)
            lo = np.where(inside, mid, lo)
            hi = np.where(inside, hi, mid)
        return lo

    def surface_distance(self, direction: Array) -> float:
        """Distance (mm) from the centre to the surface along one body-frame direction."""
        return float(self.surface_distances(np.asarray(direction, dtype=np.float64)[None, :])[0])

    def surface_points(self, n: int = 4000) -> Array:
        """``(n, 3)`` body-frame points on the surface, along evenly spread directions."""
        dirs = fibonacci_sphere(n)
        return self.centre + self.surface_distances(dirs)[:, None] * dirs

    def extent(self) -> tuple[Array, Array]:
        """Body-frame ``(low, high)`` corners of the shape's bounding box (±1 mm)."""
        pts = self.surface_points()
        return pts.min(axis=0) - 1.0, pts.max(axis=0) + 1.0

    def half_extents(self) -> Array:
        """A cheap upper bound of the bounding box half sizes (mm) along u, v, w."""
        grow = (1.0 + self.taper) * (1.0 + float(np.sum(np.abs(self.bump_amp))))
        return np.sqrt(((self.axes * self.semi[:, None]) ** 2).sum(axis=0)) * grow


def fibonacci_sphere(n: int) -> Array:
    """``n`` nearly evenly spread unit vectors."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(1.0 - z * z)
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def ellipsoid(centre: Array, semi: Array, axes: Array | None = None) -> Blob:
    """A plain (optionally rotated) ellipsoid as a `Blob`."""
    return Blob(
        centre=np.asarray(centre, dtype=np.float64),
        axes=np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64),
        semi=np.asarray(semi, dtype=np.float64),
    )


def lumpy_blob(
    rng: np.random.Generator,
    centre: Array,
    axes: Array,
    semi: Array,
    *,
    taper: float = 0.0,
    n_bumps: int = 4,
    amp: float = 0.04,
    freq: tuple[float, float] = (1.5, 3.5),
) -> Blob:
    """A `Blob` with ``n_bumps`` random low-frequency surface modulations of amplitude ≤ ``amp``."""
    return Blob(
        centre=np.asarray(centre, dtype=np.float64),
        axes=np.asarray(axes, dtype=np.float64),
        semi=np.asarray(semi, dtype=np.float64),
        taper=taper,
        bump_dirs=random_unit(rng, n_bumps),
        bump_freq=rng.uniform(freq[0], freq[1], n_bumps),
        bump_phase=rng.uniform(0.0, 2.0 * np.pi, n_bumps),
        bump_amp=rng.uniform(-amp, amp, n_bumps),
    )


@dataclass(frozen=True, eq=False)
class Tube:
    """A tube (vessel, airway, bone) along a polyline with per-point radii (mm)."""

    points: Array  # (n, 3) body frame
    radii: Array  # (n,)

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.points.shape[1] != 3 or len(self.points) < 2:
            raise ValueError("a tube needs at least two 3D points")
        if self.radii.shape != (len(self.points),):
            raise ValueError("one radius per point")


def spline(control: Array, radii: Array, step_mm: float = 8.0) -> Tube:
    """A Catmull–Rom spline through control points, resampled every ``step_mm``."""
    p = np.asarray(control, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    pts, rad = [], []
    for s in range(len(p) - 1):
        p0, p1, p2, p3 = ext[s], ext[s + 1], ext[s + 2], ext[s + 3]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
        seg = 0.5 * (
            2 * p1
            + (-p0 + p2) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        )
        pts.append(seg)
        rad.append(r[s] + (r[s + 1] - r[s]) * t[:, 0])
    pts.append(p[-1:])
    rad.append(r[-1:])
    return Tube(points=np.vstack(pts), radii=np.concatenate(rad))


def segment_distance(
    du: Array, dv: Array, dw: Array, d: Array
) -> tuple[Array, Array]:
    """Distance from points (offsets from segment start) to a segment ``0 → d``; also ``t`` in [0, 1]."""
    length2 = float(d @ d)
    d32 = d.astype(np.float32)
    if length2 < 1e-9:
        t = np.zeros(np.broadcast_shapes(np.shape(du), np.shape(dv), np.shape(dw)), dtype=np.float32)
    else:
        t = (du * d32[0] + dv * d32[1] + dw * d32[2]) * np.float32(1.0 / length2)
        np.clip(t, 0.0, 1.0, out=t)
    ex = du - t * d32[0]
    ey = dv - t * d32[1]
    ez = dw - t * d32[2]
    return np.sqrt(ex * ex + ey * ey + ez * ez), t
