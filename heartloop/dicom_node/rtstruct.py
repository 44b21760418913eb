"""RT Structure Set writing and reading: a mask on a CT `Volume` ⇄ an RTSTRUCT dataset.

The dataset is built directly with pydicom. rt-utils 1.2.7 (a project dependency) was read as a
reference for the scaffolding, but not called: it needs a directory of CT files, and every defect
listed in DESIGN.md §5 lives in its contour path (average-gap z, 17+ character DS values,
1–2 point islands, contours through boundary-voxel centres, no guard for ContourData over 64 KiB).
It also swaps row and column spacing for non-square pixels.

Conventions (what a reader of our files — or of this code — must know)

* **Outline of the voxel squares.** Each contour is the exact boundary of the union of the voxel
  squares of a connected region of one slice: its vertices are voxel corners (half-integer
  ``(i, j)``), traced on a doubled lattice so that nothing is lost at the edge. Reading it back with
  the centre-inside rule gives the very same voxels (round trip Dice 1.0 up to coordinate rounding).
  Regions touching only at a corner are one contour that touches itself at that corner.
* **Holes** (a ring) are written as an outer contour plus an inner contour on the same slice; the
  reader combines all contours of a slice by the even-odd (XOR) rule, as treatment planning systems
  do. No "pin hole" keyhole cuts.
* **z is exact.** For axial series each contour's z is the text of its slice's
  ImagePositionPatient z, character for character; x and y are rounded to 0.01 mm (DS ≤ 16 chars).
  Oblique series get all three coordinates from the exact per-slice geometry, rounded to 0.01 mm.
* **No tiny contours.** A single voxel is a 4-point square; a contour of fewer than 3 points is
  never written.
* **Encodable.** A contour whose ContourData would exceed 65,534 bytes (the Explicit VR limit) is
  not simplified but split: its slice region is cut into bands of rows, each traced on its own.
  The bands have disjoint interiors, so even-odd and union readers both see the same voxels.
* **Speed.** ContourData is stored as a raw (already encoded) element and the contour items are
  marked as Explicit VR Little Endian, so pydicom neither builds one DSfloat per number when the
  dataset is made nor when it is written in Explicit VR Little Endian. Accessing ``ContourData``
  still gives the decoded values; writing in another transfer syntax (e.g. an Implicit VR
  association) decodes them first — correct, only slower.
* **Empty masks are refused** (``ValueError("mask is empty: ...")``): an RTSTRUCT without
  contours would reach the TPS as a silently empty heart.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import cv2
import numpy as np
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from heartloop.core import Volume
from heartloop.core.contours import ContourSlice, PlanarContours

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: The SOP Class every TPS expects in RTReferencedStudySequence (retired, still universal).
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
#: Largest value a 16-bit Explicit VR length can hold (even, as values are padded to even length).
MAX_CONTOUR_DATA_BYTES = 65534
ROI_GENERATION_ALGORITHMS = frozenset({"AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"})
#: Defined terms of RT ROI Interpreted Type (PS3.3 C.8.8.8.1.1).
RT_ROI_INTERPRETED_TYPES = frozenset(
    {
        "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS",
        "AVOIDANCE", "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY",
        "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT",
        "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
    }
)
MANUFACTURER = "HeartLoop"
MANUFACTURER_MODEL_NAME = "HeartLoop heart contouring"

_CONTOUR_DATA = Tag(0x3006, 0x0050)
_GEOMETRIC_TYPE = Tag(0x3006, 0x0042)
_NUMBER_OF_POINTS = Tag(0x3006, 0x0046)
_CONTOUR_NUMBER = Tag(0x3006, 0x0048)
_REF_SOP_CLASS = Tag(0x0008, 0x1150)
_REF_SOP_INSTANCE = Tag(0x0008, 0x1155)
_XY_DECIMALS = 2
_MAX_COORD_MM = 1e9  # keeps "%.2f" far below 16 characters
_GEOMETRY_TOL_MM = 0.01
_ORIENTATION_TOL = 1e-4
_AXIAL_TOL = 1e-6  # |z| of the row/column directions below which slices are axial planes


@dataclass(frozen=True)
class RoiSpec:
    """What one ROI is called and how it was made; valid whenever it exists.

    Parameters
    ----------
    name
        ROI Name, 1–16 characters (TG-263 style), e.g. ``"Heart_AI"``.
    color
        ROI Display Color ``(r, g, b)``, each 0–255.
    algorithm
        ROI Generation Algorithm: ``"AUTOMATIC"`` for model output, ``"SEMIAUTOMATIC"`` or
        ``"MANUAL"`` once a person has corrected it.
    interpreted_type
        RT ROI Interpreted Type (a DICOM defined term), ``"ORGAN"`` for the heart.
    description
        Optional ROI Description (≤ 64 characters).
    """

    name: str = "Heart_AI"
    color: tuple[int, int, int] = (255, 0, 0)
    algorithm: str = "AUTOMATIC"
    interpreted_type: str = "ORGAN"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name.strip()) <= 16 or len(self.name) > 16:
            raise ValueError(f"ROI name must be 1-16 characters, got {self.name!r}")
        _check_text("ROI name", self.name)
        color = tuple(self.color)
        if len(color) != 3 or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in color
        ):
            raise ValueError(f"ROI colour must be three integers 0-255, got {self.color!r}")
        object.__setattr__(self, "color", tuple(int(c) for c in color))
        if self.algorithm not in ROI_GENERATION_ALGORITHMS:
            raise ValueError(
                f"ROI generation algorithm must be one of {sorted(ROI_GENERATION_ALGORITHMS)}, "
                f"got {self.algorithm!r}"
            )
        if self.interpreted_type not in RT_ROI_INTERPRETED_TYPES:
            raise ValueError(
                f"RT ROI interpreted type must be a DICOM defined term such as 'ORGAN', "
                f"got {self.interpreted_type!r}"
            )
        if len(self.description) > 64:
            raise ValueError(f"ROI description must be at most 64 characters, got {len(self.description)}")
        _check_text("ROI description", self.description)


_PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_PATIENT_STUDY_TYPE3 = (
    "IssuerOfPatientID", "PatientBirthTime", "OtherPatientIDsSequence", "EthnicGroup",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
)


# -- writing ------------------------------------------------------------------------------------


def build_rtstruct(
    mask: Volume,
    ct_datasets: Sequence[Dataset],
    *,
    roi: RoiSpec,
    model_version: str,
    label: str = "HeartLoop",
    operator: str | None = None,
    approval_status: str = "UNAPPROVED",
) -> Dataset:
    """Build an RT Structure Set holding one ROI traced from a mask.

    Parameters
    ----------
    mask
        Boolean (or 0/1 integer) `Volume` on the CT grid, ``array[k, j, i]``.
    ct_datasets
        The CT datasets of the series, one per slice, in the same ``k`` order as `mask`.
    roi
        Name, colour, generation algorithm and type of the ROI.
    model_version
        Registry version of the model that made (or seeded) the contour, e.g. ``"000007"``; it is
        recorded in ROIGenerationDescription, SeriesDescription and SoftwareVersions.
    label
        Structure Set Label, 1–16 characters.
    operator
        Person responsible (the reviewer of a corrected structure): OperatorsName and
        ROIInterpreter. Empty when ``None``.
    approval_status
        ``"UNAPPROVED"`` (default: a person approves in the TPS) or ``"APPROVED"`` (a department
        that counts the reviewer's save as approval): then `operator` is the ReviewerName and
        ReviewDate/ReviewTime are now.

    Returns
    -------
    Dataset
        A new RTSTRUCT (new Series and SOP Instance UIDs, ApprovalStatus `approval_status`) with
        ``file_meta`` for Explicit VR Little Endian; write it with
        ``dcmwrite(path, ds, enforce_file_format=True)``.

    Raises
    ------
    ValueError
        If the mask is empty or not boolean, or the CT datasets do not match the mask's grid.
    """
    model_version = str(model_version)
    if not 1 <= len(model_version) <= 32:  # keeps every LO that quotes it within 64 characters
        raise ValueError(f"model_version must be 1-32 characters, got {model_version!r}")
    _check_text("model_version", model_version)
    if not isinstance(label, str) or not 1 <= len(label.strip()) or len(label) > 16:
        raise ValueError(f"structure set label must be 1-16 characters, got {label!r}")
    _check_text("label", label)
    if operator is not None:
        _check_text("operator", operator)
    if approval_status not in ("UNAPPROVED", "APPROVED"):
        raise ValueError(f"approval_status must be \"UNAPPROVED\" or \"APPROVED\", got {approval_status!r}")
    if approval_status == "APPROVED" and not operator:
        raise ValueError("an APPROVED structure set needs the reviewer who approved it (operator)")

    voxels = _as_bool_mask(mask.array)
    n_voxels = int(np.count_nonzero(voxels))
    if n_voxels == 0:
        raise ValueError(
            f"mask is empty: no voxel is set on the {mask.shape} grid; refusing to write an RTSTRUCT "
            f"with no contours for ROI {roi.name!r}"
        )
    slices = _check_series(mask, ct_datasets)
    contours = _trace_mask(voxels, mask, slices)

    first = ct_datasets[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    for_uid = mask.frame_of_reference_uid
    corrected = roi.algorithm != "AUTOMATIC"
    generation = f"HeartLoop model {model_version}" + (", corrected" if corrected else "")

    ds = Dataset()
    charset = first.get("SpecificCharacterSet")
    if charset:
        ds.SpecificCharacterSet = charset
    elif not all(s.isascii() for s in (operator or "", roi.name, roi.description, label, model_version)):
        ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient, General Study, Patient Study: copied from the CT (type 2 present even when empty).
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(ds, keyword, first.get(keyword, ""))
    for keyword in _PATIENT_STUDY_TYPE3:
        if keyword in first:
            ds[keyword] = first[keyword]
    ds.StudyInstanceUID = first.StudyInstanceUID
    # Frame of Reference (required by the current RT Structure Set IOD): the CT's.
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = generation
    ds.OperatorsName = operator or ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER_MODEL_NAME
    ds.SoftwareVersions = [f"heartloop {_package_version()}", f"model {model_version}"]
    # Structure Set
    ds.StructureSetLabel = label
    ds.StructureSetName = f"{roi.name} {model_version}"[:64]
    ds.StructureSetDescription = f"{roi.name} by {generation}"[:1024]
    ds.InstanceNumber = 1
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(first, for_uid, ct_datasets)])
    roi_number = 1
    ss_roi = Dataset()
    ss_roi.ROINumber = roi_number
    ss_roi.ReferencedFrameOfReferenceUID = for_uid
    ss_roi.ROIName = roi.name
    if roi.description:
        ss_roi.ROIDescription = roi.description
    ss_roi.ROIGenerationAlgorithm = roi.algorithm
    ss_roi.ROIGenerationDescription = generation
    ds.StructureSetROISequence = DicomSequence([ss_roi])
    # ROI Contour
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = list(roi.color)
    roi_contour.ContourSequence = DicomSequence(
        [_contour_item(number, slices[k], data, n) for number, (k, data, n) in enumerate(contours, start=1)]
    )
    roi_contour.ReferencedROINumber = roi_number
    ds.ROIContourSequence = DicomSequence([roi_contour])
    # RT ROI Observations
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = roi_number
    observation.RTROIInterpretedType = roi.interpreted_type
    observation.ROIInterpreter = operator or ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    # Approval: UNAPPROVED until a person approves in the TPS, unless the site counts the
    # reviewer's save as approval (then who and when are stated: type 2C when APPROVED).
    ds.ApprovalStatus = approval_status
    if approval_status == "APPROVED":
        ds.ReviewDate = date
        ds.ReviewTime = time
        ds.ReviewerName = operator

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    log.info(
        "RTSTRUCT %s: ROI %r (%s, model %s), %d voxels, %d contours on %d slices",
        ds.SOPInstanceUID, roi.name, roi.algorithm, model_version, n_voxels, len(contours),
        len({k for k, _, _ in contours}),
    )
    return ds


@dataclass(frozen=True)
class _SliceRef:
    """What a contour needs of its CT slice."""

    sop_class_uid: str
    sop_instance_uid: str
    position: np.ndarray  # ImagePositionPatient (mm), as written in the CT
    z_text: str | None  # the CT's own IPP z text, for axial slices


def _check_series(mask: Volume, ct_datasets: Sequence[Dataset]) -> list[_SliceRef]:
    """Check that `ct_datasets` are the slices of `mask`'s grid, in order; describe each slice."""
    n_slices, rows, columns = mask.shape
    if len(ct_datasets) != n_slices:
        raise ValueError(f"{len(ct_datasets)} CT datasets for a mask of {n_slices} slices")
    first = ct_datasets[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in ct_datasets}
        if len(values) != 1 or "" in values:
            raise ValueError(f"CT datasets must share one non-empty {keyword}, found {len(values)} values")
    if str(first.FrameOfReferenceUID) != mask.frame_of_reference_uid:
        raise ValueError(
            f"CT frame of reference {first.FrameOfReferenceUID} differs from the mask's "
            f"{mask.frame_of_reference_uid}"
        )
    axial = abs(mask.row_direction[2]) < _AXIAL_TOL and abs(mask.column_direction[2]) < _AXIAL_TOL
    slices: list[_SliceRef] = []
    seen: set[str] = set()
    for k, ct in enumerate(ct_datasets):
        if (int(ct.Rows), int(ct.Columns)) != (rows, columns):
            raise ValueError(f"CT slice {k} is {ct.Rows}x{ct.Columns}, the mask grid {rows}x{columns}")
        orientation = np.asarray([float(v) for v in ct.ImageOrientationPatient])
        expected = np.concatenate([mask.row_direction, mask.column_direction])
        if not np.allclose(orientation, expected, atol=_ORIENTATION_TOL):
            raise ValueError(f"CT slice {k} orientation {orientation.tolist()} differs from the mask grid")
        spacing = [float(v) for v in ct.PixelSpacing]
        if not np.allclose(spacing, mask.pixel_spacing, rtol=1e-6, atol=1e-6):
            raise ValueError(f"CT slice {k} pixel spacing {spacing} differs from the mask grid")
        position = np.asarray([float(v) for v in ct.ImagePositionPatient])
        if not np.allclose(position, mask.slice_position(k), atol=_GEOMETRY_TOL_MM):
            raise ValueError(
                f"CT slice {k} is at {position.tolist()}, the mask's slice {k} at "
                f"{mask.slice_position(k).tolist()}: datasets not in the mask's k order?"
            )
        uid = str(ct.SOPInstanceUID)
        if uid in seen:
            raise ValueError(f"CT slice {k} repeats SOP Instance UID {uid}")
        seen.add(uid)
        slices.append(
            _SliceRef(
                sop_class_uid=str(ct.SOPClassUID),
                sop_instance_uid=uid,
                position=position,
                z_text=_ds_text(ct.ImagePositionPatient[2]) if axial else None,
            )
        )
    return slices


def _ds_text(value: object) -> str:
    """The DS text of a value as the CT wrote it (so z compares equal), ≤ 16 characters."""
    text = str(value).strip()
    if len(text) <= 16:
        try:
            float(text)
            return text
        except ValueError:
            pass
    text = format_number_as_ds(float(value))  # type: ignore[arg-type]
    log.warning("CT ImagePositionPatient z %r is not a valid DS; writing %s", str(value), text)
    return text


def _as_bool_mask(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.integer) and (array.size == 0 or (array.min() >= 0 and array.max() <= 1)):
        return array.astype(bool)
    raise ValueError(f"mask must be boolean (or integer 0/1), got dtype {array.dtype}")


def _trace_mask(voxels: np.ndarray, mask: Volume, slices: list[_SliceRef]) -> list[tuple[int, bytes, int]]:
    """Trace every slice with voxels: ``(k, encoded ContourData, number of points)`` per contour."""
    row = np.asarray(mask.row_direction) * mask.pixel_spacing[1]
    col = np.asarray(mask.column_direction) * mask.pixel_spacing[0]
    out: list[tuple[int, bytes, int]] = []
    occupied = np.flatnonzero(voxels.reshape(voxels.shape[0], -1).any(axis=1))
    for k in occupied.tolist():
        plane = voxels[k]
        rows_any = np.flatnonzero(plane.any(axis=1))
        cols_any = np.flatnonzero(plane.any(axis=0))
        j0, j1, i0, i1 = rows_any[0], rows_any[-1] + 1, cols_any[0], cols_any[-1] + 1
        ref = slices[k]

        def encode(ij: np.ndarray, ref: _SliceRef = ref) -> bytes:
            return _encode_points(ref.position + ij[:, :1] * row + ij[:, 1:2] * col, ref.z_text)

        for data, n in _slice_contours(plane[j0:j1, i0:i1], j0, i0, encode):
            out.append((k, data, n))
    return out


def _slice_contours(
    region: np.ndarray, j0: int, i0: int, encode: Callable[[np.ndarray], bytes]
) -> list[tuple[bytes, int]]:
    """Encoded contours of a slice region at ``(j0, i0)``; split into row bands when too long."""
    polygons = [p + (i0, j0) for p in _trace_outlines(region)]
    encoded = [(encode(p), len(p)) for p in polygons]
    if all(len(data) <= MAX_CONTOUR_DATA_BYTES for data, _ in encoded):
        return encoded
    if region.shape[0] < 2:  # one row of voxels is a set of rectangles: cannot happen
        raise RuntimeError("a one-row contour exceeds the ContourData limit")
    half = region.shape[0] // 2
    log.info("contour over %d bytes: splitting rows %d-%d in two bands", MAX_CONTOUR_DATA_BYTES, j0, j0 + region.shape[0] - 1)
    out: list[tuple[bytes, int]] = []
    for sub, offset in ((region[:half], j0), (region[half:], j0 + half)):
        if sub.any():
            out.extend(_slice_contours(sub, offset, i0, encode))
    return out


def _trace_outlines(region: np.ndarray) -> list[np.ndarray]:
    """Exact outlines of the voxel squares of a 2D boolean region.

    Returns ``(n, 2)`` float arrays of ``(i, j)`` voxel coordinates relative to `region`; vertices
    are voxel corners (half-integers). Outer boundaries and hole boundaries alike.
    """
    h, w = region.shape
    # Doubled lattice: voxel (j, i) centre at (2j+2, 2i+2), its corners at odd indices. Dilating
    # the centres by 3x3 gives the closed voxel squares; the lattice border stays 0 for OpenCV.
    lattice = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    lattice[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = region
    lattice = cv2.dilate(lattice, np.ones((3, 3), np.uint8))
    traced, _ = cv2.findContours(lattice, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not traced:
        return []
    # All chains of the region at once (a noisy slice can have thousands of small ones).
    p = np.concatenate(traced)[:, 0, :].astype(np.int64)  # (x, y) = (lattice column, lattice row)
    lengths = np.fromiter((len(c) for c in traced), np.int64, len(traced))
    q = p[_next_in_ring(lengths)]
    step = q - p
    # 8-connected tracing cuts concave corners with one diagonal step; put the corner back:
    # of (q.x, p.y) and (p.x, q.y) exactly one has both indices odd (a voxel corner).
    diagonal = (step[:, 0] != 0) & (step[:, 1] != 0)
    first_is_corner = ((q[:, 0] & 1) == 1) & ((p[:, 1] & 1) == 1)
    corner = np.where(
        first_is_corner[:, None], np.stack([q[:, 0], p[:, 1]], 1), np.stack([p[:, 0], q[:, 1]], 1)
    )
    keep = np.stack([np.ones_like(diagonal), diagonal], 1).reshape(-1)
    path = np.stack([p, corner], 1).reshape(-1, 2)[keep]
    ring = np.repeat(np.arange(len(lengths)), lengths + np.add.reduceat(diagonal, np.r_[0, np.cumsum(lengths)[:-1]]))
    path_lengths = np.bincount(ring, minlength=len(lengths))
    # Keep only the turning points: the voxel corners where the direction changes.
    following = _next_in_ring(path_lengths)
    before = np.empty_like(path)
    before[following] = np.sign(path[following] - path)
    after = np.sign(path[following] - path)
    turning = np.any(before != after, axis=1)
    vertices = path[turning].astype(np.float64) / 2.0 - 1.0
    counts = np.bincount(ring[turning], minlength=len(lengths))
    polygons = []
    for polygon in np.split(vertices, np.cumsum(counts)[:-1]):
        if len(polygon) < 3:  # cannot happen on the doubled lattice; never write one
            log.warning("dropping a degenerate %d-point outline", len(polygon))
            continue
        polygons.append(polygon)
    return polygons


def _next_in_ring(lengths: np.ndarray) -> np.ndarray:
    """Index of the next point for points stored ring after ring (last wraps to first)."""
    following = np.arange(1, int(lengths.sum()) + 1)
    ends = np.cumsum(lengths)
    following[ends - 1] = ends - lengths
    return following


def _encode_points(points: np.ndarray, z_text: str | None) -> bytes:
    """ContourData bytes for ``(n, 3)`` patient points: DS values ≤ 16 chars, padded to even length."""
    if not np.all(np.abs(points) < _MAX_COORD_MM):
        raise ValueError("contour coordinates beyond 1e9 mm: the CT geometry is not sane")
    n = len(points)
    if z_text is not None:  # axial: z is the slice's own IPP z text
        template = ("%.2f\\%.2f\\" + z_text + "\\") * n
        text = template[:-1] % tuple(points[:, :2].ravel().tolist())
    else:
        text = ("%.2f\\" * (3 * n))[:-1] % tuple(points.ravel().tolist())
    data = text.encode("ascii")
    return data + b" " if len(data) % 2 else data


def _contour_item(number: int, ref: _SliceRef, data: bytes, n_points: int) -> Dataset:
    """One ContourSequence item. Built from pre-encoded elements: a structure can have thousands
    of contours, and pydicom's per-element conversion and validation would dominate the time."""
    image = Dataset()
    image[_REF_SOP_CLASS] = _raw_element(_REF_SOP_CLASS, "UI", ref.sop_class_uid)
    image[_REF_SOP_INSTANCE] = _raw_element(_REF_SOP_INSTANCE, "UI", ref.sop_instance_uid)
    image.set_original_encoding(False, True, default_encoding)
    item = Dataset()
    item.ContourImageSequence = DicomSequence([image])
    item[_GEOMETRIC_TYPE] = _raw_element(_GEOMETRIC_TYPE, "CS", "CLOSED_PLANAR")
    item[_NUMBER_OF_POINTS] = _raw_element(_NUMBER_OF_POINTS, "IS", str(n_points))
    item[_CONTOUR_NUMBER] = _raw_element(_CONTOUR_NUMBER, "IS", str(number))
    item[_CONTOUR_DATA] = RawDataElement(_CONTOUR_DATA, "DS", len(data), data, 0, False, True)
    # Marked as read in Explicit VR LE, so pydicom writes the raw bytes as they are.
    item.set_original_encoding(False, True, default_encoding)
    return item


def _raw_element(tag: BaseTag, vr: str, text: str) -> RawDataElement:
    """An encoded (Explicit VR LE) element with an ASCII value, padded to even length."""
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return RawDataElement(tag, vr, len(data), data, 0, False, True)


def _referenced_frame(first: Dataset, for_uid: str, ct_datasets: Sequence[Dataset]) -> Dataset:
    images = []
    for ct in ct_datasets:
        image = Dataset()
        image.ReferencedSOPClassUID = ct.SOPClassUID
        image.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = for_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _check_text(what: str, text: str) -> None:
    if "\\" in text or any(ord(c) < 32 for c in text):
        raise ValueError(f"{what} must not contain backslashes or control characters: {text!r}")


def _package_version() -> str:
    try:
        return metadata.version("heartloop")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- reading ------------------------------------------------------------------------------------


def list_rois(rtstruct: Dataset) -> list[str]:
    """ROI names of an RTSTRUCT, in StructureSetROISequence order."""
    return [str(item.get("ROIName", "")) for item in rtstruct.get("StructureSetROISequence", [])]


def rtstruct_to_mask(
    rtstruct: Dataset,
    reference: Volume,
    roi_name: str | None = None,
    roi_names: Sequence[str] = (),
) -> np.ndarray:
    """Rasterise one ROI of an RTSTRUCT onto a reference grid.

    A voxel is inside when its centre is inside the contours of its slice, all contours of a slice
    combined by the even-odd (XOR) rule, so inner contours are holes. Contours are matched to
    slices by their distance along the slice normal, to the nearest slice within 1 % of the local
    slice gap; contours on no slice, non-planar ones and non-CLOSED_PLANAR ones are skipped (logged).

    Parameters
    ----------
    rtstruct
        The RT Structure Set.
    reference
        The CT `Volume` whose grid the mask is made on (its frame of reference must match).
    roi_name, roi_names
        Names to look for, in order (`roi_name` first); the first name that an ROI has wins,
        compared case-insensitively and ignoring surrounding spaces. With no name at all, the
        RTSTRUCT must hold exactly one ROI.

    Returns
    -------
    numpy.ndarray
        Boolean array of ``reference.shape``.

    Raises
    ------
    ValueError
        If no ROI matches (the message lists the available names) or the frames of reference differ.
    """
    roi_number, roi_for = _select_roi(rtstruct, roi_name, roi_names)
    if roi_for is None:
        frames = rtstruct.get("ReferencedFrameOfReferenceSequence", [])
        roi_for = str(frames[0].get("FrameOfReferenceUID", "")) if len(frames) == 1 else None
    if not roi_for:
        raise ValueError("the RTSTRUCT does not state the frame of reference of its ROI")
    if roi_for != reference.frame_of_reference_uid:
        raise ValueError(
            f"RTSTRUCT frame of reference {roi_for} differs from the reference volume's "
            f"{reference.frame_of_reference_uid}"
        )
    contour_items = []
    for roi_contour in rtstruct.get("ROIContourSequence", []):
        if _int_or_none(roi_contour.get("ReferencedROINumber")) == roi_number:
            contour_items = list(roi_contour.get("ContourSequence", []))
            break
    out = np.zeros(reference.shape, dtype=bool)
    if not contour_items:
        log.warning("ROI %d has no contours: empty mask", roi_number)
        return out

    rings: list[np.ndarray] = []
    skipped_type = skipped_malformed = 0
    for item in contour_items:
        if str(item.get("ContourGeometricType", "")).strip() != "CLOSED_PLANAR":
            skipped_type += 1
            continue
        points = _contour_points(item)
        if points is None or len(points) < 3:
            skipped_malformed += 1
            continue
        rings.append(points)
    if not rings:
        log.warning("ROI %d: no usable CLOSED_PLANAR contour: empty mask", roi_number)
        return out
    points = np.concatenate(rings)
    lengths = np.fromiter((len(r) for r in rings), np.int64, len(rings))
    starts = np.cumsum(lengths) - lengths
    # Match each contour to the nearest slice along the normal, within 1 % of the smaller gap.
    offsets = reference.slice_offsets
    gaps = np.diff(offsets) if len(offsets) > 1 else np.array([1.0])
    tolerance = 0.01 * np.minimum(np.r_[gaps[:1], gaps], np.r_[gaps, gaps[-1:]])
    distance = (points - np.asarray(reference.origin)) @ reference.normal
    mean = np.add.reduceat(distance, starts) / lengths
    if len(offsets) == 1:
        k = np.zeros(len(rings), np.int64)
    else:
        above = np.clip(np.searchsorted(offsets, mean), 1, len(offsets) - 1)
        k = np.where(np.abs(offsets[above] - mean) < np.abs(offsets[above - 1] - mean), above, above - 1)
    spread = np.maximum.reduceat(np.abs(distance - np.repeat(offsets[k], lengths)), starts)
    on_slice = spread <= tolerance[k]
    if skipped_type or skipped_malformed or not on_slice.all():
        log.warning(
            "ROI %d: skipped %d non-CLOSED_PLANAR, %d malformed, %d off-slice or non-planar contours",
            roi_number, skipped_type, skipped_malformed, int(np.count_nonzero(~on_slice)),
        )
    point_on_slice = np.repeat(on_slice, lengths)
    ij = reference.patient_to_voxel(points[point_on_slice])[:, :2]
    _fill_even_odd(out, ij, lengths[on_slice], k[on_slice])
    return out


def _select_roi(rtstruct: Dataset, roi_name: str | None, roi_names: Sequence[str]) -> tuple[int, str | None]:
    rois = list(rtstruct.get("StructureSetROISequence", []))
    names = [str(r.get("ROIName", "")) for r in rois]
    wanted = ([roi_name] if roi_name is not None else []) + [str(n) for n in roi_names]
    chosen = None
    if wanted:
        folded = [n.strip().casefold() for n in names]
        for name in wanted:
            key = name.strip().casefold()
            if key in folded:
                chosen = rois[folded.index(key)]
                break
        if chosen is None:
            raise ValueError(f"no ROI named {' or '.join(map(repr, wanted))}; available ROIs: {names}")
    elif len(rois) == 1:
        chosen = rois[0]
    else:
        raise ValueError(f"name the ROI to read; available ROIs: {names}")
    number = _int_or_none(chosen.get("ROINumber"))
    if number is None:
        raise ValueError(f"ROI {chosen.get('ROIName', '')!r} has no ROI Number")
    for_uid = chosen.get("ReferencedFrameOfReferenceUID")
    return number, (str(for_uid) if for_uid else None)


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _contour_points(item: Dataset) -> np.ndarray | None:
    """ContourData as ``(n, 3)`` floats; parses raw bytes directly (no DSfloat per number)."""
    if _CONTOUR_DATA not in item:
        return None
    element = item.get_item(_CONTOUR_DATA)
    try:
        if isinstance(element, RawDataElement) and isinstance(element.value, bytes):
            values = np.array(element.value.split(b"\\"), dtype=np.float64)
        else:
            assert isinstance(element, DataElement)
            raw = element.value
            values = np.asarray([raw] if isinstance(raw, (int, float)) else list(raw), dtype=np.float64)
    except ValueError:
        return None
    if values.size % 3 or not np.all(np.isfinite(values)):
        return None
    return values.reshape(-1, 3)


def _fill_even_odd(out: np.ndarray, ij: np.ndarray, lengths: np.ndarray, slice_of_ring: np.ndarray) -> None:
    """Set voxels whose centre lies inside the rings of their slice (even-odd rule), in place.

    `ij` holds ``(i, j)`` points ring after ring, `lengths` the points per ring and
    `slice_of_ring` each ring's slice. Scanline fill over all slices at once: every edge crossing
    row ``j`` (half-open in y) toggles the voxels at and right of ``ceil(x)``; crossings sorted
    along each row pair up into runs.
    """
    if len(lengths) == 0:
        return
    n_slices, rows, columns = out.shape
    ks = np.repeat(slice_of_ring.astype(np.int64), lengths)
    starts, ends = ij, ij[_next_in_ring(lengths)]
    x0, y0, x1, y1 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    first_row = np.clip(np.ceil(np.minimum(y0, y1)), 0, rows).astype(np.int64)
    stop_row = np.clip(np.ceil(np.maximum(y0, y1)), 0, rows).astype(np.int64)
    count = np.where(y0 != y1, np.maximum(stop_row - first_row, 0), 0)
    total = int(count.sum())
    if total == 0:
        return
    edge = np.repeat(np.arange(len(count)), count)
    j = first_row[edge] + (np.arange(total) - np.repeat(np.cumsum(count) - count, count))
    x = x0[edge] + (j - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    column = np.clip(np.ceil(x), 0, columns).astype(np.int64)
    row_id = ks[edge] * rows + j
    order = np.lexsort((column, row_id))
    row_id, column = row_id[order], column[order]
    # Closed polygons cross every row an even number of times, so runs pair up globally.
    run_rows, run_start, run_stop = row_id[0::2], column[0::2], column[1::2]
    if not np.array_equal(run_rows, row_id[1::2]):  # a defensive check; cannot happen
        raise RuntimeError("unpaired contour crossings")
    keep = run_stop > run_start
    run_rows, run_start, run_stop = run_rows[keep], run_start[keep], run_stop[keep]
    if run_rows.size == 0:
        return
    unique_rows, which = np.unique(run_rows, return_inverse=True)
    lo, hi = int(run_start.min()), int(run_stop.max())
    width = hi - lo + 1
    diff = np.zeros(len(unique_rows) * width, np.int32)
    np.add.at(diff, which * width + (run_start - lo), 1)
    np.add.at(diff, which * width + (run_stop - lo), -1)
    inside = np.cumsum(diff.reshape(-1, width), axis=1)[:, : hi - lo] > 0
    flat = out.reshape(n_slices * rows, columns)
    flat[unique_rows, lo:hi] |= inside


#: Contour points of one CLOSED_PLANAR axial contour may differ in z by at most this much (mm); and
#: contours whose z differ by less lie on one plane.
_PLANE_TOL_MM = 0.01


def rtstruct_contours(
    ds: Dataset,
    roi_name: str | None = None,
    roi_names: Sequence[str] = (),
) -> PlanarContours:
    """One ROI of an RTSTRUCT as axial planar contours (no reference grid needed).

    The ROI's CLOSED_PLANAR contours are grouped per z plane (contours within 0.01 mm of z share a
    plane); each polygon is its ``(N, 2)`` patient ``(x, y)`` in mm. Contours of another geometric
    type, with fewer than 3 points, with malformed ContourData, or not lying in one axial plane
    are skipped and counted in a warning. ROI selection is as in `rtstruct_to_mask`.

    Parameters
    ----------
    ds
        The RT Structure Set.
    roi_name, roi_names
        Names to look for, in order; compared case-insensitively. With no name at all the RTSTRUCT
        must hold exactly one ROI.

    Returns
    -------
    PlanarContours
        Named after the ROI as written in the RTSTRUCT, in the ROI's frame of reference
        (its ReferencedFrameOfReferenceUID, else the structure set's single referenced frame,
        else the dataset's FrameOfReferenceUID). Empty (``is_empty``) when the ROI has no usable
        contour.

    Raises
    ------
    ValueError
        If no ROI matches (the message lists the available names) or no frame of reference is stated.
    """
    roi_number, roi_for = _select_roi(ds, roi_name, roi_names)
    if not roi_for:
        frames = ds.get("ReferencedFrameOfReferenceSequence", [])
        if len(frames) == 1 and frames[0].get("FrameOfReferenceUID"):
            roi_for = str(frames[0].FrameOfReferenceUID)
        elif ds.get("FrameOfReferenceUID"):
            roi_for = str(ds.FrameOfReferenceUID)
    if not roi_for:
        raise ValueError("the RTSTRUCT does not state the frame of reference of its ROI")
    name = next(
        (str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])
         if _int_or_none(r.get("ROINumber")) == roi_number),
        "",
    )
    contour_items: list[Dataset] = []
    for roi_contour in ds.get("ROIContourSequence", []):
        if _int_or_none(roi_contour.get("ReferencedROINumber")) == roi_number:
            contour_items = list(roi_contour.get("ContourSequence", []))
            break
    planes: list[tuple[float, np.ndarray]] = []
    skipped_type = skipped_malformed = skipped_nonplanar = 0
    for item in contour_items:
        if str(item.get("ContourGeometricType", "")).strip() != "CLOSED_PLANAR":
            skipped_type += 1
            continue
        points = _contour_points(item)
        if points is None or len(points) < 3:
            skipped_malformed += 1
            continue
        z = points[:, 2]
        if float(np.ptp(z)) > _PLANE_TOL_MM:
            skipped_nonplanar += 1
            continue
        planes.append((float(np.mean(z)), points[:, :2].copy()))
    if skipped_type or skipped_malformed or skipped_nonplanar:
        log.warning(
            "ROI %d: skipped %d non-CLOSED_PLANAR, %d malformed, %d non-axial contours",
            roi_number, skipped_type, skipped_malformed, skipped_nonplanar,
        )
    planes.sort(key=lambda p: p[0])
    slices: list[ContourSlice] = []
    group: list[tuple[float, np.ndarray]] = []
    for z, polygon in planes:
        if group and z - group[0][0] > _PLANE_TOL_MM:
            slices.append(ContourSlice(float(np.mean([g[0] for g in group])), tuple(g[1] for g in group)))
            group = []
        group.append((z, polygon))
    if group:
        slices.append(ContourSlice(float(np.mean([g[0] for g in group])), tuple(g[1] for g in group)))
    if not slices:
        log.warning("ROI %d has no usable CLOSED_PLANAR contour", roi_number)
    return PlanarContours(name=name, frame_of_reference_uid=roi_for, slices=tuple(slices))


__all__ = [
    "MAX_CONTOUR_DATA_BYTES",
    "RoiSpec",
    "build_rtstruct",
    "list_rois",
    "rtstruct_contours",
    "rtstruct_to_mask",
]
