"""Analytic phantoms with closed-form dose statistics, to validate `heartloop.dose` (tests, bench).

An `Ellipsoid` (a sphere, or rotated) rasterised onto any grid or cut into exact planar sections,
and dose fields whose mean over it is known exactly:

* `LinearField` ``D = a + g·r``: the mean over any ellipsoid is the dose at its centre;
* `QuadraticField` ``D = a + k·|r - r0|²``: the mean over an ellipsoid with semi-axes ``A, B, C``
  centred at ``c`` is ``a + k·(|c - r0|² + (A² + B² + C²) / 5)`` (a sphere of radius R centred at
  r0: ``a + k·3R²/5``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from heartloop.core import Volume
from heartloop.core.contours import ContourSlice, PlanarContours


@dataclass(frozen=True)
class Ellipsoid:
    """A solid ellipsoid in patient coordinates (mm).

    Parameters
    ----------
    centre
        Centre (x, y, z).
    semi_axes
        Semi-axis lengths along the columns of `rotation`.
    rotation
        3×3 orthonormal matrix whose columns are the principal directions (identity: axis-aligned).
    """

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        rot = np.asarray(self.rotation, dtype=np.float64)
        if rot.shape != (3, 3) or not np.allclose(rot.T @ rot, np.eye(3), atol=1e-9):
            raise ValueError("rotation must be a 3×3 orthonormal matrix")
        if len(self.semi_axes) != 3 or min(self.semi_axes) <= 0:
            raise ValueError(f"semi_axes must be three positive lengths, got {self.semi_axes}")
        object.__setattr__(self, "centre", tuple(float(v) for v in self.centre))
        object.__setattr__(self, "semi_axes", tuple(float(v) for v in self.semi_axes))
        object.__setattr__(self, "rotation", rot)

    @classmethod
    def sphere(cls, centre: tuple[float, float, float], radius: float) -> "Ellipsoid":
        return cls(centre=centre, semi_axes=(radius, radius, radius))

    @property
    def volume_cc(self) -> float:
        a, b, c = self.semi_axes
        return 4.0 / 3.0 * math.pi * a * b * c / 1000.0

    @property
    def quadric(self) -> np.ndarray:
        """M with ``(r - centre)ᵀ M (r - centre) <= 1`` inside."""
        return self.rotation @ np.diag(1.0 / np.square(self.semi_axes)) @ self.rotation.T

    def mask(self, grid: Volume) -> Volume:
        """Boolean mask on `grid`'s geometry: voxels whose centre is inside (exact per slice)."""
        basis = np.stack([np.asarray(grid.row_direction), np.asarray(grid.column_direction), grid.normal], axis=1)
        m = basis.T @ self.quadric @ basis  # the quadric in the grid's orthonormal axes
        q0 = basis.T @ (np.asarray(grid.origin) - np.asarray(self.centre))
        nk, nj, ni = grid.shape
        u = (q0[0] + np.arange(ni) * grid.pixel_spacing[1])[None, None, :]
        v = (q0[1] + np.arange(nj) * grid.pixel_spacing[0])[None, :, None]
        w = (q0[2] + np.asarray(grid.slice_offsets))[:, None, None]
        value = (m[0, 0] * u * u + m[1, 1] * v * v + m[2, 2] * w * w
                 + 2 * m[0, 1] * u * v + 2 * m[0, 2] * u * w + 2 * m[1, 2] * v * w)
        return grid.with_array(value <= 1.0)

    def section(self, z_mm: float, n_vertices: int = 128) -> np.ndarray | None:
        """Vertices (on the curve) of the axial cross-section at patient z, or None if it misses."""
        m = self.quadric
        w = z_mm - self.centre[2]
        m2 = m[:2, :2]
        shift = -w * np.linalg.solve(m2, m[:2, 2])
        rest = 1.0 - (w * w * m[2, 2] + w * (m[2, :2] @ shift))
        if rest <= 0:
            return None
        eigval, eigvec = np.linalg.eigh(m2)
        t = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
        radii = np.sqrt(rest / eigval)
        pts = eigvec @ (radii[:, None] * np.stack([np.cos(t), np.sin(t)]))
        return (pts.T + shift + np.asarray(self.centre[:2])).astype(np.float64)

    def contours(self, z_planes: np.ndarray, frame_of_reference_uid: str, n_vertices: int = 128,
                 name: str = "Phantom") -> PlanarContours:
        """Exact cross-sections at the given planes, as a TPS would draw them (polygons inscribed in
        the true curve: each section's area is ``polygon_area_factor(n_vertices)`` of the ellipse's)."""
        slices = []
        for z in np.asarray(z_planes, dtype=np.float64):
            poly = self.section(float(z), n_vertices)
            if poly is not None:
                slices.append(ContourSlice(z_mm=float(z), polygons=(poly,)))
        return PlanarContours(name=name, frame_of_reference_uid=frame_of_reference_uid, slices=tuple(slices))


def polygon_area_factor(n_vertices: int) -> float:
    """Area of an n-gon inscribed in an ellipse (equally spaced parameter) over the ellipse's area."""
    return n_vertices / (2 * math.pi) * math.sin(2 * math.pi / n_vertices)


@dataclass(frozen=True)
class LinearField:
    """``D(r) = offset_gy + gradient · r`` (Gy, r in mm)."""

    offset_gy: float
    gradient_gy_per_mm: tuple[float, float, float]

    def mean_over(self, shape: Ellipsoid) -> float:
        return float(self.offset_gy + np.dot(self.gradient_gy_per_mm, shape.centre))

    def on_grid(self, grid: Volume) -> Volume:
        g = np.asarray(self.gradient_gy_per_mm, dtype=np.float64)
        nk, nj, ni = grid.shape
        di = float(g @ np.asarray(grid.row_direction)) * grid.pixel_spacing[1]
        dj = float(g @ np.asarray(grid.column_direction)) * grid.pixel_spacing[0]
        dk = float(g @ grid.normal)
        value = (self.offset_gy + float(g @ np.asarray(grid.origin))
                 + (dk * np.asarray(grid.slice_offsets))[:, None, None]
                 + (dj * np.arange(nj))[None, :, None] + (di * np.arange(ni))[None, None, :])
        return grid.with_array(value.astype(np.float32))


@dataclass(frozen=True)
class QuadraticField:
    """``D(r) = offset_gy + k · |r - r0|²`` (Gy, r in mm)."""

    offset_gy: float
    k_gy_per_mm2: float
    r0: tuple[float, float, float]

    def mean_over(self, shape: Ellipsoid) -> float:
        d2 = float(np.sum(np.square(np.subtract(shape.centre, self.r0))))
        return self.offset_gy + self.k_gy_per_mm2 * (d2 + sum(a * a for a in shape.semi_axes) / 5.0)

    def on_grid(self, grid: Volume) -> Volume:
        basis = np.stack([np.asarray(grid.row_direction), np.asarray(grid.column_direction), grid.normal], axis=1)
        q0 = basis.T @ (np.asarray(grid.origin) - np.asarray(self.r0))
        nk, nj, ni = grid.shape
        u = q0[0] + np.arange(ni) * grid.pixel_spacing[1]
        v = q0[1] + np.arange(nj) * grid.pixel_spacing[0]
        w = q0[2] + np.asarray(grid.slice_offsets)
        value = self.offset_gy + self.k_gy_per_mm2 * (
            (w * w)[:, None, None] + (v * v)[None, :, None] + (u * u)[None, None, :]
        )
        return grid.with_array(value.astype(np.float32))


def axial_grid(origin: tuple[float, float, float], spacing_mm: tuple[float, float], slice_offsets: np.ndarray,
               shape_ij: tuple[int, int], frame_of_reference_uid: str) -> Volume:
    """An empty (zeros) axial `Volume`: ``spacing_mm`` is ``(x spacing, y spacing)``, ``shape_ij``
    is ``(rows, columns)``."""
    offsets = np.asarray(slice_offsets, dtype=np.float64)
    return Volume(
        array=np.zeros((len(offsets), shape_ij[0], shape_ij[1]), dtype=np.float32),
        origin=origin,
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        pixel_spacing=(spacing_mm[1], spacing_mm[0]),
        slice_offsets=offsets,
        frame_of_reference_uid=frame_of_reference_uid,
    )


def covering_grid(shape: Ellipsoid, spacing_mm: tuple[float, float, float], frame_of_reference_uid: str,
                  margin_mm: float = 10.0, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Volume:
    """An axial grid with even spacing ``(x, y, z)`` covering `shape` plus a margin; `shift_mm` moves
    its nodes off any symmetric placement."""
    extent = np.sqrt(np.diag(np.linalg.inv(shape.quadric)))  # half-widths of the bounding box
    lo = np.asarray(shape.centre) - extent - margin_mm + np.asarray(shift_mm)
    counts = np.ceil((2 * extent + 2 * margin_mm) / np.asarray(spacing_mm)).astype(int) + 1
    return axial_grid(tuple(lo), (spacing_mm[0], spacing_mm[1]), np.arange(counts[2]) * spacing_mm[2],
                      (int(counts[1]), int(counts[0])), frame_of_reference_uid)


def rotation_matrix(z_deg: float, y_deg: float, x_deg: float) -> np.ndarray:
    """Rotation ``Rz · Ry · Rx`` (degrees), for rotated ellipsoids."""
    def rz(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])

    def ry(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])

    def rx(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])

    return rz(math.radians(z_deg)) @ ry(math.radians(y_deg)) @ rx(math.radians(x_deg))
