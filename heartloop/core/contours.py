"""Planar contours in patient coordinates: the neutral form of an RTSTRUCT ROI.

`dicom_node` builds them from RTSTRUCT datasets; `dose` voxelises them onto any grid. Neither knows
the other (DESIGN.md §2), so the type lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class ContourSlice:
    """All closed polygons of one ROI on one axial plane.

    Parameters
    ----------
    z_mm
        Patient z (mm) of the plane.
    polygons
        Each an ``(N, 2)`` float array of patient ``(x, y)`` in mm, N ≥ 3, implicitly closed.
        Polygons on one plane combine by the even-odd rule (an inner polygon is a hole), as TPSs do.
    """

    z_mm: float
    polygons: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not np.isfinite(self.z_mm):
            raise ValueError("z_mm must be finite")
        clean = []
        for n, poly in enumerate(self.polygons):
            arr = np.asarray(poly, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
                raise ValueError(f"polygon {n} must be an (N >= 3, 2) array of (x, y) mm, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"polygon {n} has non-finite coordinates")
            clean.append(arr)
        object.__setattr__(self, "polygons", tuple(clean))


@dataclass(frozen=True, eq=False)
class PlanarContours:
    """An ROI as axial planar contours (sorted by z, one `ContourSlice` per distinct plane)."""

    name: str
    frame_of_reference_uid: str
    slices: tuple[ContourSlice, ...]

    def __post_init__(self) -> None:
        if not self.frame_of_reference_uid:
            raise ValueError("frame_of_reference_uid is required")
        ordered = tuple(sorted(self.slices, key=lambda s: s.z_mm))
        zs = [s.z_mm for s in ordered]
        if any(b - a < 1e-6 for a, b in zip(zs, zs[1:])):
            raise ValueError("two ContourSlices share a plane: merge their polygons into one slice")
        object.__setattr__(self, "slices", ordered)

    @property
    def is_empty(self) -> bool:
        return not self.slices
