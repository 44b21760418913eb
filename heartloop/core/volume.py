"""`Volume`: a 3D array that never travels without its patient geometry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_TOL = 1e-4


def _unit3(name: str, value: object) -> np.ndarray:
    vec = np.asarray(value, dtype=np.float64).reshape(-1)
    if vec.shape != (3,):
        raise ValueError(f"{name} must have 3 components, got {vec.shape}")
    norm = float(np.linalg.norm(vec))
    if abs(norm - 1.0) > 1e-3:
        raise ValueError(f"{name} must be a unit vector, has length {norm:.6f}")
    return vec / norm


@dataclass(frozen=True, eq=False)
class Volume:
    """A voxel array on a DICOM patient grid.

    The array is indexed ``array[k, j, i]``: ``k`` the slice, ``j`` the image row, ``i`` the
    image column, as a CT series is stacked. Geometry follows DICOM (LPS, millimetres).

    Parameters
    ----------
    array
        3D array ``(slices, rows, columns)``; Hounsfield units for CT, Gy for dose, bool for masks.
    origin
        Patient position (mm) of the centre of voxel ``(0, 0, 0)`` — ImagePositionPatient of slice 0.
    row_direction
        Unit vector along which the column index ``i`` grows (first triplet of ImageOrientationPatient).
    column_direction
        Unit vector along which the row index ``j`` grows (second triplet of ImageOrientationPatient).
    pixel_spacing
        ``(row spacing, column spacing)`` in mm, in DICOM PixelSpacing order: the distance between
        rows (along ``column_direction``) first.
    slice_offsets
        Distance (mm) of each slice from slice 0 along the slice normal; strictly increasing, starts
        at 0. Uneven spacing is allowed — it is kept exactly, never averaged.
    frame_of_reference_uid
        The DICOM Frame of Reference the coordinates belong to.
    """

    array: np.ndarray
    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slice_offsets: np.ndarray
    frame_of_reference_uid: str
    normal: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3 or min(arr.shape) < 1:
            raise ValueError(f"Volume array must be 3D and non-empty, got shape {arr.shape}")
        row = _unit3("row_direction", self.row_direction)
        col = _unit3("column_direction", self.column_direction)
        if abs(float(row @ col)) > 1e-3:
            raise ValueError("row_direction and column_direction must be orthogonal")
        spacing = tuple(float(s) for s in self.pixel_spacing)
        if len(spacing) != 2 or min(spacing) <= 0:
            raise ValueError(f"pixel_spacing must be two positive numbers, got {self.pixel_spacing}")
        offsets = np.asarray(self.slice_offsets, dtype=np.float64).reshape(-1)
        if offsets.shape[0] != arr.shape[0]:
            raise ValueError(f"{offsets.shape[0]} slice offsets for {arr.shape[0]} slices")
        if abs(offsets[0]) > _TOL:
            raise ValueError("slice_offsets must start at 0")
        if offsets.shape[0] > 1 and np.any(np.diff(offsets) <= 0):
            raise ValueError("slice_offsets must be strictly increasing")
        origin = np.asarray(self.origin, dtype=np.float64).reshape(-1)
        if origin.shape != (3,):
            raise ValueError("origin must have 3 components")
        if not self.frame_of_reference_uid:
            raise ValueError("frame_of_reference_uid is required")
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "origin", tuple(float(v) for v in origin))
        object.__setattr__(self, "row_direction", tuple(float(v) for v in row))
        object.__setattr__(self, "column_direction", tuple(float(v) for v in col))
        object.__setattr__(self, "pixel_spacing", spacing)
        offsets = offsets.copy()
        offsets.setflags(write=False)
        object.__setattr__(self, "slice_offsets", offsets)
        object.__setattr__(self, "normal", np.cross(row, col))

    # -- geometry -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def is_uniform(self) -> bool:
        """True when slices are evenly spaced (within 1 µm), so `affine` is exact."""
        if len(self.slice_offsets) < 3:
            return True
        gaps = np.diff(self.slice_offsets)
        return bool(np.ptp(gaps) < 1e-3)

    @property
    def slice_spacing(self) -> float:
        """Mean slice spacing in mm (exact for uniform series; see `slice_offsets` otherwise)."""
        if len(self.slice_offsets) < 2:
            return 1.0
        return float((self.slice_offsets[-1] - self.slice_offsets[0]) / (len(self.slice_offsets) - 1))

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """``(column spacing, row spacing, slice spacing)`` in mm, in (i, j, k) order."""
        return (self.pixel_spacing[1], self.pixel_spacing[0], self.slice_spacing)

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous ``(i, j, k, 1)`` to patient ``(x, y, z, 1)`` in mm.

        Exact for evenly spaced series; for uneven ones the slice axis uses the mean spacing —
        use `voxel_to_patient`, which is exact for every series.
        """
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.row_direction) * self.pixel_spacing[1]
        a[:3, 1] = np.asarray(self.column_direction) * self.pixel_spacing[0]
        a[:3, 2] = self.normal * self.slice_spacing
        a[:3, 3] = self.origin
        return a

    def slice_position(self, k: int) -> np.ndarray:
        """Patient position (mm) of the centre of voxel ``(0, 0, k)``: slice k's ImagePositionPatient."""
        return np.asarray(self.origin) + self.normal * float(self.slice_offsets[k])

    def voxel_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel indices ``(i, j, k)`` (fractional allowed) to patient mm, exactly."""
        ijk = np.asarray(ijk, dtype=np.float64)
        k = ijk[..., 2]
        idx = np.arange(len(self.slice_offsets), dtype=np.float64)
        if len(idx) > 1:
            # Piecewise-linear in k, extrapolated with the end gaps.
            off = np.interp(k, idx, self.slice_offsets)
            lo = k < 0
            hi = k > idx[-1]
            off = np.where(lo, k * (self.slice_offsets[1] - self.slice_offsets[0]), off)
            off = np.where(hi, self.slice_offsets[-1] + (k - idx[-1]) * (self.slice_offsets[-1] - self.slice_offsets[-2]), off)
        else:
            off = k * 0.0
        return (
            np.asarray(self.origin)
            + ijk[..., 0:1] * np.asarray(self.row_direction) * self.pixel_spacing[1]
            + ijk[..., 1:2] * np.asarray(self.column_direction) * self.pixel_spacing[0]
            + off[..., None] * self.normal
        )

    def patient_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Inverse of `voxel_to_patient`: ``(..., 3)`` patient mm → fractional ``(i, j, k)``."""
        xyz = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin)
        i = xyz @ np.asarray(self.row_direction) / self.pixel_spacing[1]
        j = xyz @ np.asarray(self.column_direction) / self.pixel_spacing[0]
        d = xyz @ self.normal
        idx = np.arange(len(self.slice_offsets), dtype=np.float64)
        if len(idx) > 1:
            k = np.interp(d, self.slice_offsets, idx)
            g0 = self.slice_offsets[1] - self.slice_offsets[0]
            g1 = self.slice_offsets[-1] - self.slice_offsets[-2]
            k = np.where(d < 0, d / g0, k)
            k = np.where(d > self.slice_offsets[-1], idx[-1] + (d - self.slice_offsets[-1]) / g1, k)
        else:
            k = d * 0.0
        return np.stack([i, j, k], axis=-1)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new `Volume` on the same grid (e.g. a mask or a probability map)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(
            array=array,
            origin=self.origin,
            row_direction=self.row_direction,
            column_direction=self.column_direction,
            pixel_spacing=self.pixel_spacing,
            slice_offsets=self.slice_offsets,
            frame_of_reference_uid=self.frame_of_reference_uid,
        )

    def same_grid(self, other: "Volume", tol_mm: float = 1e-3) -> bool:
        """True when `other` has exactly this geometry (shape, positions, orientation, frame)."""
        return (
            self.shape == other.shape
            and self.frame_of_reference_uid == other.frame_of_reference_uid
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.row_direction, other.row_direction, atol=1e-6)
            and np.allclose(self.column_direction, other.column_direction, atol=1e-6)
            and np.allclose(self.pixel_spacing, other.pixel_spacing, atol=1e-6)
            and np.allclose(self.slice_offsets, other.slice_offsets, atol=tol_mm)
        )
