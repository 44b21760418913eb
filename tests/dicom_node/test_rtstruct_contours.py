"""`rtstruct_contours`: an RTSTRUCT ROI as planar contours per z plane, for dose without a CT mask."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from heartloop.dicom_node.rtstruct import RoiSpec, build_rtstruct, rtstruct_contours, rtstruct_to_mask
from heartloop.phantom import make_patient


def _rtstruct(frame: str, contours: list[tuple[str, list[list[float]]]], roi_for: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Modality = "RTSTRUCT"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref])
    roi = Dataset()
    roi.ROINumber = 4
    roi.ROIName = "Heart"
    if roi_for:
        roi.ReferencedFrameOfReferenceUID = roi_for
    other = Dataset()
    other.ROINumber = 5
    other.ROIName = "Lung_L"
    ds.StructureSetROISequence = DicomSequence([other, roi])
    items = []
    for kind, points in contours:
        item = Dataset()
        item.ContourGeometricType = kind
        item.NumberOfContourPoints = len(points)
        item.ContourData = [v for p in points for v in p]
        items.append(item)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 4
    roi_contour.ContourSequence = DicomSequence(items)
    ds.ROIContourSequence = DicomSequence([roi_contour])
    return ds


def _square(z: float, half: float = 10.0, zs: list[float] | None = None) -> list[list[float]]:
    corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    zs = zs or [z] * 4
    return [[x, y, zz] for (x, y), zz in zip(corners, zs)]


def test_contours_grouped_per_plane_with_holes_and_skips():
    frame = generate_uid()
    ds = _rtstruct(frame, [
        ("CLOSED_PLANAR", _square(-5.0)),
        ("CLOSED_PLANAR", _square(-5.004, half=3.0)),  # a hole on the same plane (z within 0.01 mm)
        ("CLOSED_PLANAR", _square(0.0)),
        ("OPEN_PLANAR", _square(2.5)),
        ("CLOSED_PLANAR", _square(5.0, zs=[5.0, 5.0, 6.0, 5.0])),  # not in one axial plane
        ("POINT", [[1.0, 2.0, 3.0]]),
    ])
    contours = rtstruct_contours(ds, roi_name="heart ")
    assert contours.name == "Heart" and contours.frame_of_reference_uid == frame
    assert [round(s.z_mm, 3) for s in contours.slices] == [-5.002, 0.0]
    assert len(contours.slices[0].polygons) == 2 and len(contours.slices[1].polygons) == 1
    np.testing.assert_allclose(contours.slices[1].polygons[0], [[-10, -10], [10, -10], [10, 10], [-10, 10]])


def test_roi_frame_of_reference_preferred_and_missing_roi_lists_names():
    ds = _rtstruct(generate_uid(), [("CLOSED_PLANAR", _square(0.0))], roi_for="1.2.3.4")
    assert rtstruct_contours(ds, roi_names=("HEART",)).frame_of_reference_uid == "1.2.3.4"
    with pytest.raises(ValueError, match=r"available ROIs: \['Lung_L', 'Heart'\]"):
        rtstruct_contours(ds, roi_name="Heart_AI")
    with pytest.raises(ValueError, match="name the ROI"):
        rtstruct_contours(ds)


def test_empty_roi_gives_empty_contours():
    ds = _rtstruct(generate_uid(), [("OPEN_PLANAR", _square(0.0))])
    assert rtstruct_contours(ds, roi_name="Heart").is_empty


def test_our_rtstruct_reads_back_on_the_ct_slices():
    patient = make_patient(3, rows=64, n_slices=20)
    mask = patient.volume.with_array(patient.heart_mask)
    ds = build_rtstruct(mask, patient.ct_datasets, roi=RoiSpec(name="Heart"), model_version="000001")
    contours = rtstruct_contours(ds, roi_name="Heart")
    ks = np.nonzero(patient.heart_mask.any(axis=(1, 2)))[0]
    expected_z = [float(patient.volume.slice_position(k)[2]) for k in ks]
    np.testing.assert_allclose([s.z_mm for s in contours.slices], expected_z, atol=1e-3)
    assert contours.frame_of_reference_uid == patient.volume.frame_of_reference_uid
    # Same ROI, same voxels as the mask reader.
    assert rtstruct_to_mask(ds, patient.volume, roi_name="Heart").sum() == patient.heart_mask.sum()
