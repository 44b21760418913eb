"""The CT grid a phantom is sampled on, and where the body frame sits in patient coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.valuerep import format_number_as_ds

from heartloop.core.volume import Volume

#: Largest z span (mm) of a randomly sized series: neck to upper abdomen, centred on the heart.
MAX_RANDOM_SPAN_MM = 420.0
#: Physical field of view range (mm); 512 columns give 0.9–1.2 mm pixels.
FOV_RANGE_MM = (461, 614)
AXIAL_ROW = (1.0, 0.0, 0.0)
AXIAL_COLUMN = (0.0, 1.0, 0.0)


def ds_value(x: float) -> float:
    """``x`` as it reads back from a DICOM DS string (≤ 16 characters)."""
    value = float(format_number_as_ds(float(x)))
    return 0.0 if value == 0.0 else value


@dataclass(frozen=True, eq=False)
class CtGrid:
    """An axial, head-first-supine CT grid (LPS, mm) with possibly uneven slice spacing.

    Every number is exactly representable as a DICOM DS string, so the `Volume` built from it
    and the datasets written from it agree to the last bit.
    """

    rows: int
    pixel_spacing: float
    origin: tuple[float, float, float]
    slice_offsets: np.ndarray
    slice_thicknesses: np.ndarray

    @property
    def n_slices(self) -> int:
        return len(self.slice_offsets)

    @property
    def x(self) -> np.ndarray:
        """Patient x (mm) of each column."""
        return self.origin[0] + np.arange(self.rows) * self.pixel_spacing

    @property
    def y(self) -> np.ndarray:
        """Patient y (mm) of each row."""
        return self.origin[1] + np.arange(self.rows) * self.pixel_spacing

    @property
    def z(self) -> np.ndarray:
        """Patient z (mm) of each slice (increasing with the slice index)."""
        return self.origin[2] + self.slice_offsets

    def volume(self, array: np.ndarray, frame_of_reference_uid: str) -> Volume:
        return Volume(
            array=array,
            origin=self.origin,
            row_direction=AXIAL_ROW,
            column_direction=AXIAL_COLUMN,
            pixel_spacing=(self.pixel_spacing, self.pixel_spacing),
            slice_offsets=self.slice_offsets,
            frame_of_reference_uid=frame_of_reference_uid,
        )


@dataclass(frozen=True)
class Placement:
    """Where the body frame's origin lies in patient coordinates (mm)."""

    body_x: float
    body_y: float
    heart_z: float
    image_centre_x: float

    def to_body(self, grid: CtGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body-frame coordinates ``(u per column, v per row, w per slice)`` as float32."""
        return (
            (grid.x - self.body_x).astype(np.float32),
            (grid.y - self.body_y).astype(np.float32),
            (grid.z - self.heart_z).astype(np.float32),
        )


def _uneven_thicknesses(rng: np.random.Generator, n: int, fine: float) -> np.ndarray:
    """Per-slice thicknesses in blocks (e.g. 3 mm | 2 mm | 3 mm), never all equal.

    Thicknesses are ``fine``, ``fine + 0.5`` and ``fine + 1`` mm (2 / 2.5 / 3 mm by default).
    """
    coarse = fine + 1.0
    pattern = int(rng.integers(3))
    t = np.full(n, fine)
    if pattern == 0:  # fine block, then coarse
        t[int(n * rng.uniform(0.3, 0.7)) :] = coarse
    elif pattern == 1:  # coarse, fine around the heart, coarse
        a, b = sorted(int(x) for x in n * rng.uniform([0.15, 0.6], [0.4, 0.85]))
        t[:a] = coarse
        t[b:] = coarse
    else:  # mixed blocks
        k = 0
        while k < n:
            length = int(rng.integers(4, 16))
            t[k : k + length] = fine + 0.5 * int(rng.integers(3))
            k += length
    if np.ptp(t) == 0:
        t[n // 2 :] = fine + 0.5
    return t


def _offsets(thicknesses: np.ndarray) -> np.ndarray:
    """Gap-free slice offsets: neighbouring slices touch, so each gap is the mean thickness."""
    gaps = 0.5 * (thicknesses[:-1] + thicknesses[1:])
    return np.concatenate([[0.0], np.cumsum(gaps)])


def choose_grid(
    rng: np.random.Generator,
    *,
    heart_w_range: tuple[float, float],
    body_half_width: float,
    body_front: float,
    body_back: float,
    rows: int,
    n_slices: int | None,
    slice_thickness: float | None,
    uneven: bool,
) -> tuple[CtGrid, Placement]:
    """Choose a CT grid centred on the heart and place the body in it.

    Parameters
    ----------
    heart_w_range
        Lowest and highest body-frame ``w`` of the heart (mm); the slices cover it with margin.
    body_half_width, body_front, body_back
        Largest lateral half width, anterior ``v`` (negative) and posterior ``v`` of the body (mm).
    rows, n_slices, slice_thickness, uneven
        As in `heartloop.phantom.make_patient`.

    Raises
    ------
    ValueError
        If an explicit ``n_slices`` and ``slice_thickness`` cannot cover the heart.
    """
    fov = int(rng.integers(FOV_RANGE_MM[0], FOV_RANGE_MM[1] + 1))
    fov = max(fov, int(math.ceil(2.0 * body_half_width + 70.0)), int(math.ceil(body_back - body_front + 110.0)))
    pixel_spacing = ds_value(fov / rows)
    xc = 0.5 * float(rng.integers(-20, 21))
    yc = 0.5 * float(rng.integers(-20, 21))
    body_x = xc + float(rng.uniform(-12.0, 12.0))
    # Centre the patient vertically, leaving room for the couch under the back.
    body_y = yc - 0.5 * (body_back + body_front) - 15.0 + float(rng.uniform(-8.0, 8.0))
    half = (rows - 1) / 2.0 * pixel_spacing
    x0, y0 = ds_value(xc - half), ds_value(yc - half)

    base = float(slice_thickness) if slice_thickness is not None else float(rng.choice([2.0, 2.5, 3.0]))
    if uneven and slice_thickness is None:
        base = 2.0  # blocks of 2, 2.5 and 3 mm
    if n_slices is not None:
        n = int(n_slices)
    else:
        typical = base + 0.5 if uneven else base  # uneven blocks average about 2.5 mm
        hi = min(200, int(MAX_RANDOM_SPAN_MM / typical) + 1)
        n = int(rng.integers(min(100, hi), hi + 1))
    thick = _uneven_thicknesses(rng, n, base) if uneven else np.full(n, base)
    heart_lo, heart_hi = heart_w_range

    def needed(t: np.ndarray) -> float:
        return (heart_hi - heart_lo) + 2.0 * (float(np.max(t)) + 3.0)

    span = float(_offsets(thick)[-1])
    if span < needed(thick):
        if slice_thickness is not None and n_slices is not None:
            raise ValueError(
                f"{n} slices of {base} mm span {span:.1f} mm, too short for the heart "
                f"({needed(thick):.1f} mm with margins); ask for more or thicker slices"
            )
        if n_slices is None:
            while float(_offsets(thick)[-1]) < needed(thick):
                thick = np.append(thick, thick[-1])
        else:
            # Too few slices asked for: thicken them (in 0.25 mm steps) until the heart fits.
            scale = needed(thick) / span
            while True:
                trial = np.ceil(thick * scale * 4.0) / 4.0
                if float(_offsets(trial)[-1]) >= needed(trial):
                    thick = trial
                    break
                scale *= 1.02
    offsets = _offsets(thick)
    span = float(offsets[-1])
    z0 = ds_value(0.5 * float(rng.integers(-1200, -400)))
    heart_z = z0 + 0.5 * span - 0.5 * (heart_lo + heart_hi)
    grid = CtGrid(
        rows=rows,
        pixel_spacing=pixel_spacing,
        origin=(x0, y0, z0),
        slice_offsets=np.array([ds_value(z0 + o) - z0 for o in offsets]),
        slice_thicknesses=np.array([ds_value(t) for t in thick]),
    )
    return grid, Placement(body_x=body_x, body_y=body_y, heart_z=heart_z, image_centre_x=xc)
