"""A received CT series → checked geometry (`SeriesGeometry`) → `Volume`.

`validate_ct_series` decides, from the instance headers alone, whether a series can be contoured;
when it cannot, the `SeriesError` names the case state (``INCOMPLETE``: wait or push again;
``UNSUPPORTED``: re-export differently) and says which slices are concerned and what to do.
`load_ct_volume` then reads the pixels of a validated series into one array.

Missing-slice rule
------------------
A gap between consecutive slices is a *hole* (missing slices → ``INCOMPLETE``) when it is larger
than ``max_gap_ratio`` times the *local* spacing, where the local spacing is the larger of the
median of the up to `GAP_WINDOW` (3) gaps just before it and the median of the up to 3 gaps just
after it (only one side at the ends of the series). Comparing with the local spacing rather than
with the median of the whole series accepts protocols that change spacing along the patient
(e.g. 2 mm through the heart, 3 or 5 mm elsewhere): inside a block every gap matches its
neighbours, and at a block boundary the side of the new block gives the larger reference. A
single missing slice gives one gap about twice its neighbours on *both* sides and is caught; so
are two holes one slice apart (each window median still sees the regular spacing). What cannot be
told apart from a deliberate change of spacing: a run of 3 or more consecutive doubled gaps (a
coarser block of at least 4 slices), and slices missing at either end of the series.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from heartloop.core.errors import SeriesError
from heartloop.core.states import CaseState
from heartloop.core.volume import Volume
from heartloop.dicom_node.headers import CT_IMAGE_STORAGE, InstanceHeader

log = logging.getLogger(__name__)

GAP_WINDOW = 3
"""Number of neighbouring gaps on each side whose median gives the local slice spacing."""

_ORIENTATION_TOL = 1e-4  # two ImageOrientationPatient values are "equal" within this
_AXIAL_TOL = 1e-3  # row ≈ ±x, column ≈ ±y within this (per component)
_SPACING_TOL_MM = 1e-4  # PixelSpacing values are "equal" within this
_NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
_INT16_MIN, _INT16_MAX = -32768, 32767

Vec3 = tuple[float, float, float]


# -- geometry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesGeometry:
    """The checked patient geometry of a CT series, slices ordered along the slice normal.

    Attributes
    ----------
    sop_instance_uids
        SOP Instance UIDs in slice order (increasing position along `normal`).
    origin
        ImagePositionPatient (mm) of the first slice: the centre of voxel ``(0, 0, 0)``.
    row_direction, column_direction
        Unit vectors of ImageOrientationPatient (directions of increasing column / row index).
    pixel_spacing
        PixelSpacing ``(row spacing, column spacing)`` in mm.
    slice_offsets
        Distance (mm) of each slice from the first along the normal; starts at 0, strictly
        increasing, uneven spacing kept exactly.
    rows, columns
        Image matrix size.
    frame_of_reference_uid
        The series' Frame of Reference.
    series_uid
        SeriesInstanceUID.
    """

    sop_instance_uids: tuple[str, ...]
    origin: Vec3
    row_direction: Vec3
    column_direction: Vec3
    pixel_spacing: tuple[float, float]
    slice_offsets: tuple[float, ...]
    rows: int
    columns: int
    frame_of_reference_uid: str
    series_uid: str

    def __post_init__(self) -> None:
        n = len(self.sop_instance_uids)
        if n < 1 or len(self.slice_offsets) != n:
            raise ValueError(f"{len(self.slice_offsets)} slice offsets for {n} instances")
        if len(set(self.sop_instance_uids)) != n:
            raise ValueError("sop_instance_uids must be distinct")
        if abs(self.slice_offsets[0]) > 1e-9:
            raise ValueError("slice_offsets must start at 0")
        if any(b <= a for a, b in zip(self.slice_offsets, self.slice_offsets[1:])):
            raise ValueError("slice_offsets must be strictly increasing")
        for name in ("row_direction", "column_direction"):
            vec = getattr(self, name)
            if len(vec) != 3 or abs(math.hypot(*vec) - 1.0) > 1e-6:
                raise ValueError(f"{name} must be a unit 3-vector, got {vec}")
        if abs(float(np.dot(self.row_direction, self.column_direction))) > 1e-3:
            raise ValueError("row_direction and column_direction must be orthogonal")
        if len(self.pixel_spacing) != 2 or min(self.pixel_spacing) <= 0:
            raise ValueError(f"pixel_spacing must be two positive numbers, got {self.pixel_spacing}")
        if self.rows < 1 or self.columns < 1:
            raise ValueError(f"rows and columns must be positive, got {self.rows}x{self.columns}")
        if len(self.origin) != 3:
            raise ValueError("origin must have 3 components")
        if not self.frame_of_reference_uid:
            raise ValueError("frame_of_reference_uid is required")

    @property
    def n_slices(self) -> int:
        return len(self.sop_instance_uids)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``: the shape of the loaded array."""
        return (self.n_slices, self.rows, self.columns)

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, ``row_direction × column_direction`` (the direction offsets grow in)."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def slice_spacing(self) -> float:
        """Mean slice spacing in mm, as `Volume.slice_spacing`."""
        if self.n_slices < 2:
            return 1.0
        return (self.slice_offsets[-1] - self.slice_offsets[0]) / (self.n_slices - 1)

    @property
    def is_uniform(self) -> bool:
        """True when slices are evenly spaced within 1 µm, so `affine` is exact."""
        gaps = np.diff(self.slice_offsets)
        return bool(len(gaps) < 2 or np.ptp(gaps) < 1e-3)

    @property
    def affine(self) -> np.ndarray:
        """4×4 voxel ``(i, j, k, 1)`` → patient mm matrix, identical to `Volume.affine`.

        The slice axis uses the mean spacing; for uneven series use `slice_positions` or the
        loaded `Volume.voxel_to_patient`, which are exact.
        """
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.row_direction) * self.pixel_spacing[1]
        a[:3, 1] = np.asarray(self.column_direction) * self.pixel_spacing[0]
        a[:3, 2] = self.normal * self.slice_spacing
        a[:3, 3] = self.origin
        return a

    @property
    def slice_positions(self) -> np.ndarray:
        """``(n_slices, 3)`` patient positions (mm) of each slice's first voxel."""
        return np.asarray(self.origin) + np.outer(self.slice_offsets, self.normal)

    def to_volume(self, array: np.ndarray) -> Volume:
        """Wrap a ``(slices, rows, columns)`` array on this geometry."""
        if tuple(np.shape(array)) != self.shape:
            raise ValueError(f"array shape {np.shape(array)} does not match the series {self.shape}")
        return Volume(
            array=array,
            origin=self.origin,
            row_direction=self.row_direction,
            column_direction=self.column_direction,
            pixel_spacing=self.pixel_spacing,
            slice_offsets=np.asarray(self.slice_offsets, dtype=np.float64),
            frame_of_reference_uid=self.frame_of_reference_uid,
        )


# -- validation ------------------------------------------------------------------------------------


def validate_ct_series(
    headers: Sequence[InstanceHeader],
    *,
    max_gap_ratio: float = 1.6,
    min_slices: int = 10,
    max_slices: int = 2000,
    position_tol_mm: float = 0.01,
) -> SeriesGeometry:
    """Check that the headers of one series describe a complete, contourable axial CT.

    Pure function of the headers: no pixel data is read.

    Parameters
    ----------
    headers
        One `InstanceHeader` per received instance of the series, in any order. An instance
        received twice (same SOP Instance UID, same header) counts once.
    max_gap_ratio
        A gap larger than this times the local slice spacing means missing slices (see the
        module docstring for the rule).
    min_slices, max_slices
        Fewer slices → ``INCOMPLETE``; more → ``UNSUPPORTED``.
    position_tol_mm
        Two slices closer than this along the normal are duplicates; slice positions may stray
        from one line along the normal by at most this much.

    Returns
    -------
    SeriesGeometry

    Raises
    ------
    SeriesError
        ``UNSUPPORTED`` for series that must be exported differently (not CT Image Storage,
        several frames of reference, missing geometry, mixed/non-axial orientation, inconsistent
        pixel spacing or matrix, duplicate or misaligned slices, too many slices);
        ``INCOMPLETE`` for series that may still be arriving (too few slices, holes).
    ValueError
        If `headers` mixes several series (a caller error).
    """
    if not headers:
        raise SeriesError(CaseState.INCOMPLETE, "no CT instance of this series has been received yet")
    series_uids = {h.series_uid for h in headers}
    if len(series_uids) > 1:
        raise ValueError(f"headers of {len(series_uids)} different series given; validate one series at a time")
    hs = _distinct_instances(headers)

    _check_sop_classes(hs)
    if len(hs) > max_slices:
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"the series has {len(hs)} slices, more than the {max_slices} supported: "
            "export a reconstruction with thicker slices or a shorter range",
        )
    frame_uid = _check_frame_of_reference(hs)
    _check_present(hs)
    row, col = _check_orientation(hs)
    spacing, rows, columns = _check_matrix(hs)

    normal = np.cross(row, col)
    origin0 = np.asarray(hs[0].image_position, dtype=np.float64)
    rel = np.array([h.image_position for h in hs], dtype=np.float64) - origin0
    along = rel @ normal
    order = np.argsort(along, kind="stable")
    hs = [hs[i] for i in order]
    along = along[order]
    in_plane = rel[order] - np.outer(along, normal)

    _check_duplicates(hs, along, position_tol_mm)
    _check_collinear(hs, in_plane, position_tol_mm)
    if len(hs) < min_slices:
        raise SeriesError(
            CaseState.INCOMPLETE,
            f"only {len(hs)} slice(s) received, at least {min_slices} needed: "
            "wait for the rest of the series or push it again",
        )
    _check_gaps(hs, along, max_gap_ratio)

    offsets = along - along[0]
    first = hs[0].image_position
    assert first is not None
    geometry = SeriesGeometry(
        sop_instance_uids=tuple(h.sop_instance_uid for h in hs),
        origin=(float(first[0]), float(first[1]), float(first[2])),
        row_direction=_vec3(row),
        column_direction=_vec3(col),
        pixel_spacing=spacing,
        slice_offsets=tuple(float(v) for v in offsets),
        rows=rows,
        columns=columns,
        frame_of_reference_uid=frame_uid,
        series_uid=hs[0].series_uid,
    )
    log.debug("series validated: %d slices, %dx%d, spacing %s mm", geometry.n_slices, rows, columns, spacing)
    return geometry


def _distinct_instances(headers: Sequence[InstanceHeader]) -> list[InstanceHeader]:
    by_uid: dict[str, InstanceHeader] = {}
    for h in headers:
        seen = by_uid.get(h.sop_instance_uid)
        if seen is None:
            by_uid[h.sop_instance_uid] = h
        elif seen != h:
            raise SeriesError(
                CaseState.UNSUPPORTED,
                f"SOP instance {h.sop_instance_uid} was received twice with different headers "
                f"({seen.label} and {h.label}): re-export the series with unique UIDs",
            )
    return list(by_uid.values())


def _check_sop_classes(hs: list[InstanceHeader]) -> None:
    others = [h for h in hs if h.sop_class_uid != CT_IMAGE_STORAGE]
    if not others:
        return
    names = sorted({UID(h.sop_class_uid).name or h.sop_class_uid for h in others})
    raise SeriesError(
        CaseState.UNSUPPORTED,
        f"{_labels(others)} {_verb(others, 'is', 'are')} {', '.join(names)}, not CT Image Storage: "
        "only single-frame CT Image Storage series can be contoured; export the planning CT "
        "as CT Image Storage (one file per slice)",
    )


def _check_frame_of_reference(hs: list[InstanceHeader]) -> str:
    missing = [h for h in hs if not h.frame_of_reference_uid]
    if missing:
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"{_labels(missing)} {_verb(missing, 'has', 'have')} no FrameOfReferenceUID: "
            "without it contours cannot be placed; re-export the series from the TPS",
        )
    groups = _groups(hs, lambda h: h.frame_of_reference_uid)
    if len(groups) > 1:
        parts = [f"{uid} ({_labels(members)})" for uid, members in groups]
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"the series mixes {len(groups)} frames of reference: {'; '.join(parts)}: "
            "its slices come from different registrations or scans; re-export a single CT",
        )
    uid = groups[0][0]
    assert isinstance(uid, str)
    return uid


def _check_present(hs: list[InstanceHeader]) -> None:
    for keyword, attr in (
        ("ImagePositionPatient", "image_position"),
        ("ImageOrientationPatient", "image_orientation"),
        ("PixelSpacing", "pixel_spacing"),
        ("Rows", "rows"),
        ("Columns", "columns"),
    ):
        missing = [h for h in hs if getattr(h, attr) is None]
        if missing:
            raise SeriesError(
                CaseState.UNSUPPORTED,
                f"{_labels(missing)} {_verb(missing, 'has', 'have')} no {keyword}: "
                "the slice cannot be placed in the patient; re-export the series with full image geometry",
            )


def _check_orientation(hs: list[InstanceHeader]) -> tuple[np.ndarray, np.ndarray]:
    groups = _groups(hs, lambda h: tuple(round(v / _ORIENTATION_TOL) for v in h.image_orientation))  # type: ignore[union-attr]
    if len(groups) > 1:
        main = groups[0][1]
        parts = [f"{_labels(m)} {_verb(m, 'has', 'have')} {_fmt_vec(m[0].image_orientation)}" for _, m in groups[1:]]
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"ImageOrientationPatient differs between slices: {len(main)} slice(s) have "
            f"{_fmt_vec(main[0].image_orientation)} but {'; '.join(parts)}: the series mixes "
            "reconstructions (e.g. axial and coronal); export the axial reconstruction as its own series",
        )
    iop = np.asarray(hs[0].image_orientation, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    for name, vec in (("row", row), ("column", col)):
        norm = float(np.linalg.norm(vec))
        if norm < 0.5:
            raise SeriesError(
                CaseState.UNSUPPORTED,
                f"ImageOrientationPatient {_fmt_vec(iop)} has a degenerate {name} direction: re-export the series",
            )
    row = row / np.linalg.norm(row)
    col = col / np.linalg.norm(col)
    axial = (
        abs(abs(row[0]) - 1.0) <= _AXIAL_TOL
        and abs(row[1]) <= _AXIAL_TOL
        and abs(row[2]) <= _AXIAL_TOL
        and abs(col[0]) <= _AXIAL_TOL
        and abs(abs(col[1]) - 1.0) <= _AXIAL_TOL
        and abs(col[2]) <= _AXIAL_TOL
    )
    if not axial:
        normal = np.cross(row, col)
        axis = int(np.argmax(np.abs(normal)))
        kind = {0: "sagittal", 1: "coronal", 2: "oblique or tilted axial"}[axis]
        tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / max(float(np.linalg.norm(normal)), 1e-12))))
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"the slices are not axial: ImageOrientationPatient = {_fmt_vec(iop)} ({kind}; slice normal "
            f"{tilt:.1f}° from the patient z axis, rows must run along ±x and columns along ±y): "
            "only axial CT without gantry tilt is supported; export an axial reconstruction",
        )
    return row, col


def _check_matrix(hs: list[InstanceHeader]) -> tuple[tuple[float, float], int, int]:
    spacing_groups = _groups(hs, lambda h: tuple(round(v / _SPACING_TOL_MM) for v in h.pixel_spacing))  # type: ignore[union-attr]
    if len(spacing_groups) > 1:
        main = spacing_groups[0][1]
        parts = [f"{_labels(m)} {_verb(m, 'has', 'have')} {_fmt_vec(m[0].pixel_spacing)} mm" for _, m in spacing_groups[1:]]
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"PixelSpacing differs between slices: {len(main)} slice(s) have {_fmt_vec(main[0].pixel_spacing)} mm "
            f"but {'; '.join(parts)}: the series mixes reconstructions with different fields of view; "
            "export a single reconstruction",
        )
    size_groups = _groups(hs, lambda h: (h.rows, h.columns))
    if len(size_groups) > 1:
        main = size_groups[0][1]
        parts = [f"{_labels(m)} {_verb(m, 'is', 'are')} {m[0].rows}x{m[0].columns}" for _, m in size_groups[1:]]
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"the image size differs between slices: {len(main)} slice(s) are {main[0].rows}x{main[0].columns} "
            f"(rows x columns) but {'; '.join(parts)}: export a single reconstruction",
        )
    ps = hs[0].pixel_spacing
    assert ps is not None and hs[0].rows is not None and hs[0].columns is not None
    return (float(ps[0]), float(ps[1])), int(hs[0].rows), int(hs[0].columns)


def _check_duplicates(hs: list[InstanceHeader], along: np.ndarray, tol: float) -> None:
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < tol)
    if dup.size == 0:
        return
    i = int(dup[0])
    a, b = hs[i], hs[i + 1]
    more = f" and {dup.size - 1} other position(s)" if dup.size > 1 else ""
    raise SeriesError(
        CaseState.UNSUPPORTED,
        f"two slices at z = {_mm(_z(a))} mm ({_labels([a, b])}){more}: the series was probably "
        "pushed twice with different UIDs, or mixes two reconstructions; re-export it",
    )


def _check_collinear(hs: list[InstanceHeader], in_plane: np.ndarray, tol: float) -> None:
    if len(hs) < 2 or float(np.max(np.ptp(in_plane, axis=0))) <= tol:
        return
    deviation = np.linalg.norm(in_plane - np.median(in_plane, axis=0), axis=1)
    worst = [int(i) for i in np.argsort(-deviation)[:3] if deviation[i] > tol / 2]
    parts = [f"z = {_mm(_z(hs[i]))} mm ({hs[i].label}) is {deviation[i]:.2f} mm off" for i in worst]
    raise SeriesError(
        CaseState.UNSUPPORTED,
        "the slice positions do not lie on one line along the slice normal (in-plane shift of up to "
        f"{float(np.max(np.ptp(in_plane, axis=0))):.2f} mm): {'; '.join(parts)}: the series mixes "
        "reconstructions with different centres or table positions; export a single reconstruction",
    )


def local_spacing(gaps: Sequence[float] | np.ndarray, window: int = GAP_WINDOW) -> np.ndarray:
    """The local slice spacing each gap is compared with (see the module docstring).

    Parameters
    ----------
    gaps
        Distances (mm) between consecutive slices.
    window
        Number of neighbouring gaps on each side.

    Returns
    -------
    numpy.ndarray
        For each gap, the larger of the medians of the `window` gaps before and after it
        (``nan`` when the series has a single gap).
    """
    g = [float(v) for v in gaps]
    out = np.full(len(g), np.nan)
    for i in range(len(g)):
        sides = [side for side in (g[max(0, i - window) : i], g[i + 1 : i + 1 + window]) if side]
        if sides:
            out[i] = max(float(np.median(side)) for side in sides)
    return out


def _check_gaps(hs: list[InstanceHeader], along: np.ndarray, max_gap_ratio: float) -> None:
    gaps = np.diff(along)
    if gaps.size < 2:
        return
    reference = local_spacing(gaps)
    holes = [int(i) for i in np.flatnonzero(gaps > max_gap_ratio * reference)]
    if not holes:
        return
    parts = []
    for i in holes[:3]:
        missing = max(1, round(float(gaps[i] / reference[i])) - 1)
        parts.append(
            f"between z = {_mm(_z(hs[i]))} and z = {_mm(_z(hs[i + 1]))} mm ({_labels([hs[i], hs[i + 1]])}; "
            f"gap {_mm(gaps[i])} mm, expected spacing {_mm(reference[i])} mm, about {missing} slice(s) missing)"
        )
    more = f" and {len(holes) - 3} more gap(s)" if len(holes) > 3 else ""
    raise SeriesError(
        CaseState.INCOMPLETE,
        f"missing slice(s) {'; '.join(parts)}{more}: wait for the rest of the series or push it again",
    )


# -- loading ---------------------------------------------------------------------------------------


def load_ct_volume(paths_in_order: Sequence[str | os.PathLike[str]], geometry: SeriesGeometry) -> Volume:
    """Read the pixels of a validated series into a `Volume` on exactly `geometry`.

    Parameters
    ----------
    paths_in_order
        The instance files, in the order of ``geometry.sop_instance_uids``.
    geometry
        The result of `validate_ct_series` for these files.

    Returns
    -------
    Volume
        Hounsfield units (RescaleSlope/RescaleIntercept applied per slice): ``int16`` when every
        slice rescales to integers within the int16 range, else ``float32``.

    Raises
    ------
    SeriesError
        ``UNSUPPORTED`` when a slice's pixel data cannot be decoded (compressed transfer syntax
        without an installed decoder, unusual pixel format); ``INCOMPLETE`` when a file's pixel
        data is shorter than its matrix.
    ValueError
        If the files do not match `geometry` (count, order or SOP Instance UIDs).
    """
    if len(paths_in_order) != geometry.n_slices:
        raise ValueError(f"{len(paths_in_order)} files for a series of {geometry.n_slices} slices")
    volume = np.empty(geometry.shape, dtype=np.int16)
    scratch = np.empty((geometry.rows, geometry.columns), dtype=np.int64)
    for k, path in enumerate(paths_in_order):
        ds = pydicom.dcmread(path)
        uid = str(ds.get("SOPInstanceUID", "")).strip("\0 ")
        if uid != geometry.sop_instance_uids[k]:
            raise ValueError(
                f"file {os.fspath(path)!r} (slice {k}) holds SOP instance {uid}, expected {geometry.sop_instance_uids[k]}"
            )
        label = f"instance {ds.get('InstanceNumber', uid)}"
        stored = _stored_values(ds, geometry, label)
        slope, intercept = _rescale(ds, label)
        if volume.dtype == np.int16 and _rescale_to_int16(stored, slope, intercept, scratch, out=volume[k]):
            continue
        if volume.dtype == np.int16:
            log.debug("%s: rescaled values are not all int16 integers; the volume switches to float32", label)
            volume = volume.astype(np.float32)
        volume[k] = stored * slope + intercept
    return geometry.to_volume(volume)


def _rescale(ds: Dataset, label: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of one slice (1 and 0 when absent)."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(keyword)
        try:
            value = default if raw is None or str(raw).strip() == "" else float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (keyword == "RescaleSlope" and value == 0.0):
            raise SeriesError(
                CaseState.UNSUPPORTED,
                f"{label} has an invalid {keyword} ({raw!s}): Hounsfield units cannot be computed; re-export the series",
            )
        values.append(value)
    return values[0], values[1]


def _rescale_to_int16(stored: np.ndarray, slope: float, intercept: float, scratch: np.ndarray, *, out: np.ndarray) -> bool:
    """Write ``stored * slope + intercept`` into int16 `out` if that is exact; report success.

    The result range follows from the stored min/max, so an out-of-range value is detected
    before anything is written and can never wrap around silently.
    """
    if not (slope.is_integer() and intercept.is_integer()):
        return False
    m, c = int(slope), int(intercept)
    lo, hi = int(stored.min()), int(stored.max())
    ends = (lo * m + c, hi * m + c)
    if min(ends) < _INT16_MIN or max(ends) > _INT16_MAX:
        return False
    if m == 1 and lo >= _INT16_MIN and hi <= _INT16_MAX and _INT16_MIN <= c <= _INT16_MAX:
        # Common CT case (slope 1, intercept -1024): stored values, intercept and every result
        # fit int16, so the arithmetic can run in int16 directly.
        np.copyto(out, stored, casting="unsafe")
        out += c
        return True
    np.multiply(stored, m, out=scratch, dtype=np.int64)
    scratch += c
    np.copyto(out, scratch, casting="unsafe")
    return True


def _stored_values(ds: Dataset, geometry: SeriesGeometry, label: str) -> np.ndarray:
    """The stored pixel values of one slice as a ``(rows, columns)`` integer array."""
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if (rows, columns) != (geometry.rows, geometry.columns):
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"{label} is {rows}x{columns}, the validated series {geometry.rows}x{geometry.columns}: "
            "the file changed after validation; push the series again",
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"{label} is not a single-frame greyscale image: export the CT as CT Image Storage",
        )
    meta = getattr(ds, "file_meta", None)
    syntax = UID(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ImplicitVRLittleEndian
    bits = int(ds.get("BitsAllocated", 16))
    stored_bits = int(ds.get("BitsStored", bits))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    high_bit = int(ds.get("HighBit", stored_bits - 1))
    if syntax in _NATIVE_SYNTAXES and bits in (8, 16, 32) and high_bit == stored_bits - 1 and "PixelData" in ds:
        # Fast path: the native pixel bytes viewed in place, no copy and no plugin machinery.
        dtype = np.dtype(f"{'>' if syntax == ExplicitVRBigEndian else '<'}{'i' if signed else 'u'}{bits // 8}")
        data = ds.PixelData
        count = rows * columns
        if len(data) < count * dtype.itemsize:
            raise SeriesError(
                CaseState.INCOMPLETE,
                f"{label} has {len(data)} bytes of pixel data for a {rows}x{columns} image: "
                "the file is truncated; push the series again",
            )
        arr = np.frombuffer(data, dtype=dtype, count=count).reshape(rows, columns)
        if stored_bits < bits:
            # Bits above HighBit are not part of the value (PS3.5 8.1.1): mask or sign-extend.
            shift = bits - stored_bits
            if signed:
                arr = (arr << shift) >> shift
            else:
                arr = arr & ((1 << stored_bits) - 1)
        return arr
    return _decoded_values(ds, syntax, label)


def _decoded_values(ds: Dataset, syntax: UID, label: str) -> np.ndarray:
    """Decode compressed (or unusual native) pixel data with pydicom's plugins."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        needs = f" (needs {'; '.join(decoder.missing_dependencies)})" if decoder is not None and decoder.missing_dependencies else ""
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"{label} uses transfer syntax {syntax.name or 'unknown'} ({syntax}), which cannot be decoded "
            f"here{needs}: ask the TPS to send the CT uncompressed (Explicit VR Little Endian)",
        )
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure means this slice is unusable
        log.debug("pixel decoding failed for %s", label, exc_info=True)
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"{label}: pixel data in transfer syntax {syntax.name or syntax} could not be decoded "
            f"({type(exc).__name__}): ask the TPS to send the CT uncompressed (Explicit VR Little Endian)",
        ) from exc
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise SeriesError(
            CaseState.UNSUPPORTED,
            f"{label} decodes to a {arr.dtype} array of shape {arr.shape}, not one greyscale integer image",
        )
    return arr


# -- message helpers -------------------------------------------------------------------------------


def _groups(
    hs: list[InstanceHeader], key: Callable[[InstanceHeader], Hashable]
) -> list[tuple[Hashable, list[InstanceHeader]]]:
    """Instances grouped by `key`, largest group first."""
    members: dict[Hashable, list[InstanceHeader]] = {}
    for h in hs:
        members.setdefault(key(h), []).append(h)
    counts = Counter({k: len(v) for k, v in members.items()})
    return [(k, members[k]) for k, _ in counts.most_common()]


def _labels(hs: Sequence[InstanceHeader], limit: int = 5) -> str:
    """``"instance 12"``, ``"instances 3, 4 and 7"``, ``"instances 1, 2, 3, 4, 5 and 9 more"``."""
    ordered = sorted(hs, key=lambda h: (h.instance_number is None, h.instance_number or 0, h.sop_instance_uid))
    names = [h.label.removeprefix("instance ") for h in ordered]
    if len(names) == 1:
        return f"instance {names[0]}"
    if len(names) <= limit:
        return f"instances {', '.join(names[:-1])} and {names[-1]}"
    return f"instances {', '.join(names[:limit])} and {len(names) - limit} more"


def _verb(hs: Sequence[InstanceHeader], singular: str, plural: str) -> str:
    return singular if len(hs) == 1 else plural


def _z(h: InstanceHeader) -> float:
    assert h.image_position is not None
    return float(h.image_position[2])


def _mm(value: float) -> str:
    text = f"{float(value):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _fmt_vec(values: Sequence[float] | np.ndarray | None) -> str:
    """``[1, 0, 0, 0, 0.9962, -0.0872]``: up to 4 decimals, trailing zeros dropped."""
    if values is None:
        return "[]"
    texts = [f"{float(v):.4f}".rstrip("0").rstrip(".") for v in values]
    return "[" + ", ".join("0" if t in ("-0", "") else t for t in texts) + "]"


def _vec3(v: np.ndarray) -> Vec3:
    return (float(v[0]), float(v[1]), float(v[2]))
