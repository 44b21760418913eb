"""RTSTRUCT writer and reader: DICOM validity, exact geometry, encodability, round trip."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from heartloop.core import Volume
from heartloop.dicom_node.rtstruct import (
    MAX_CONTOUR_DATA_BYTES,
    RoiSpec,
    build_rtstruct,
    list_rois,
    rtstruct_to_mask,
)

UNEVEN_Z = [-40.0, -38.0, -36.0, -33.0, -30.0, -27.5, -25.0, -22.5, -19.7, -17.0, -14.25, -12.0, -9.5]
CONTOUR_DATA = 0x30060050


# -- fixtures: a minimal synthetic CT series ------------------------------------------------------


def make_ct(
    offsets: list[float],
    rows: int = 64,
    columns: int | None = None,
    spacing: tuple[float, float] = (0.8, 0.7),
    origin: tuple[float, float, float] = (-120.3, -95.15, 0.0),
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0),
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0),
    pixels: bool = False,
) -> tuple[Volume, list[Dataset]]:
    """CT datasets (one per slice, k order) and their `Volume`, slices at `offsets` mm along the normal."""
    columns = columns or rows
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(row_direction, column_direction)
    datasets = []
    for k, offset in enumerate(offsets):
        position = np.asarray(origin) + normal * (offset - offsets[0])
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = "SYN0001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}".rstrip("0").rstrip(".") for v in position]
        ds.ImageOrientationPatient = [*row_direction, *column_direction]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = 2
        ds.Rows = rows
        ds.Columns = columns
        if pixels:
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.PixelData = np.zeros((rows, columns), np.int16).tobytes()
        datasets.append(ds)
    first = np.asarray([float(v) for v in datasets[0].ImagePositionPatient])
    measured = [float(np.dot(np.asarray([float(v) for v in d.ImagePositionPatient]) - first, normal)) for d in datasets]
    volume = Volume(
        array=np.zeros((len(offsets), rows, columns), np.int16),
        origin=tuple(first),
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=spacing,
        slice_offsets=np.asarray(measured),
        frame_of_reference_uid=frame,
    )
    return volume, datasets


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + ((i - centre[2]) / radii[2]) ** 2 < 1


@pytest.fixture
def uneven_case() -> tuple[Volume, list[Dataset], np.ndarray]:
    """Unevenly spaced series; a lumpy 'heart' with a hole, single-voxel islands and a diagonal pair."""
    volume, datasets = make_ct(UNEVEN_Z, rows=64, columns=72)
    mask = ellipsoid(volume.shape, (6, 34, 36), (5.2, 16, 22))
    mask[6, 30:37, 28:40] = False  # a hole: ring on slice 6
    mask[3, 5, 5] = True  # single-voxel islands
    mask[9, 60, 70] = True
    mask[1, 2, 2] = mask[1, 3, 3] = True  # touching only at a corner
    return volume, datasets, mask


def write(ds: Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pydicom's "exceeds 64 kByte ... changed to UN"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def contour_items(ds: Dataset) -> list[Dataset]:
    return list(ds.ROIContourSequence[0].ContourSequence)


def ds_texts(ds: Dataset) -> list[str]:
    """Every DS value in a dataset read from a file, as written (raw), sequences included."""
    texts: list[str] = []
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if elem.VR == "SQ":
            for item in ds[tag].value:
                texts.extend(ds_texts(item))
        elif elem.VR == "DS":
            raw = elem.value if isinstance(elem, RawDataElement) else None
            assert isinstance(raw, bytes), f"{tag} was decoded before the check"
            texts.extend(v.strip().decode("ascii") for v in raw.split(b"\\"))
    return texts


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def check_contours_on_slices(ds: Dataset, datasets: list[Dataset]) -> None:
    by_uid = {d.SOPInstanceUID: d for d in datasets}
    for item in contour_items(ds):
        assert item.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
        assert item.NumberOfContourPoints == len(points) >= 3
        (image,) = item.ContourImageSequence
        ct = by_uid[image.ReferencedSOPInstanceUID]
        assert image.ReferencedSOPClassUID == ct.SOPClassUID
        assert np.all(points[:, 2] == float(ct.ImagePositionPatient[2]))


# -- RoiSpec -------------------------------------------------------------------------------------


def test_roi_spec_defaults_are_the_ai_heart() -> None:
    roi = RoiSpec()
    assert (roi.name, roi.color, roi.algorithm, roi.interpreted_type) == ("Heart_AI", (255, 0, 0), "AUTOMATIC", "ORGAN")
    assert RoiSpec(color=[0, 128, 255]).color == (0, 128, 255)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "Heart_AI_corrected"},  # 18 characters
        {"name": "Heart\\AI"},
        {"color": (256, 0, 0)},
        {"color": (0, 0)},
        {"algorithm": "AI"},
        {"interpreted_type": "HEART"},
        {"description": "x" * 65},
    ],
)
def test_roi_spec_rejects_invalid_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RoiSpec(**kwargs)


# -- writer: content -----------------------------------------------------------------------------


def test_rtstruct_states_who_made_what_on_which_ct(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="000007")
    ct = datasets[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == ct.StudyInstanceUID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        ct.PatientName, ct.PatientID, ct.PatientBirthDate, ct.PatientSex,
    )
    assert ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == ct.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [d.SOPInstanceUID for d in datasets]
    (roi,) = ds.StructureSetROISequence
    assert (roi.ROINumber, roi.ROIName, roi.ROIGenerationAlgorithm) == (1, "Heart_AI", "AUTOMATIC")
    assert roi.ReferencedFrameOfReferenceUID == ct.FrameOfReferenceUID
    assert roi.ROIGenerationDescription == "HeartLoop model 000007"
    (roi_contour,) = ds.ROIContourSequence
    assert roi_contour.ReferencedROINumber == 1 and list(roi_contour.ROIDisplayColor) == [255, 0, 0]
    (observation,) = ds.RTROIObservationsSequence
    assert observation.ReferencedROINumber == 1 and observation.RTROIInterpretedType == "ORGAN"
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert ds.StructureSetLabel == "HeartLoop" and len(ds.StructureSetLabel) <= 16
    assert "000007" in ds.SeriesDescription
    assert ds.Manufacturer == "HeartLoop" and ds.ManufacturerModelName
    assert any("000007" in v for v in ds.SoftwareVersions)
    assert ds.StructureSetDate and ds.StructureSetTime and ds.InstanceCreationDate and ds.InstanceCreationTime
    assert ds.OperatorsName == ""


def test_corrected_structure_is_stated_truthfully(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    roi = RoiSpec(name="Heart", color=(0, 255, 0), algorithm="SEMIAUTOMATIC", description="reviewed")
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=roi, model_version="000012", label="HL review", operator="Doe^Jane")
    (ss_roi,) = ds.StructureSetROISequence
    assert (ss_roi.ROIName, ss_roi.ROIGenerationAlgorithm, ss_roi.ROIDescription) == ("Heart", "SEMIAUTOMATIC", "reviewed")
    assert "000012" in ss_roi.ROIGenerationDescription
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [0, 255, 0]
    assert ds.OperatorsName == "Doe^Jane" and ds.RTROIObservationsSequence[0].ROIInterpreter == "Doe^Jane"
    assert ds.StructureSetLabel == "HL review" and ds.ApprovalStatus == "UNAPPROVED"


def test_every_call_makes_a_new_series_and_instance(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    a = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    b = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SeriesInstanceUID not in {d.SeriesInstanceUID for d in datasets}


def test_empty_mask_is_refused(uneven_case) -> None:
    volume, datasets, _ = uneven_case
    with pytest.raises(ValueError, match="mask is empty"):
        build_rtstruct(volume.with_array(np.zeros(volume.shape, bool)), datasets, roi=RoiSpec(), model_version="7")


def test_bad_inputs_are_refused(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    with pytest.raises(ValueError, match="not in the mask's k order"):
        build_rtstruct(volume.with_array(mask), datasets[::-1], roi=RoiSpec(), model_version="7")
    with pytest.raises(ValueError, match="CT datasets"):
        build_rtstruct(volume.with_array(mask), datasets[:-1], roi=RoiSpec(), model_version="7")
    with pytest.raises(ValueError, match="boolean"):
        build_rtstruct(volume.with_array(mask * 0.7), datasets, roi=RoiSpec(), model_version="7")
    with pytest.raises(ValueError, match="label"):
        build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7", label="a" * 17)
    with pytest.raises(ValueError, match="model_version"):
        build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="")


# -- writer: geometry and encoding ---------------------------------------------------------------


def test_contours_lie_exactly_on_their_slices_of_an_uneven_series(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="000007")
    check_contours_on_slices(ds, datasets)
    slices_with_voxels = set(np.flatnonzero(mask.any(axis=(1, 2))))
    referenced = {item.ContourImageSequence[0].ReferencedSOPInstanceUID for item in contour_items(ds)}
    assert referenced == {datasets[k].SOPInstanceUID for k in slices_with_voxels}


def test_written_file_has_short_ds_values_and_no_tiny_contours(uneven_case, tmp_path: Path) -> None:
    volume, datasets, mask = uneven_case
    path = write(build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="000007"), tmp_path / "rs.dcm")
    ds = pydicom.dcmread(path)
    texts = ds_texts(ds)
    assert len(texts) > 1000
    assert max(len(t) for t in texts) <= 16
    for t in texts:
        float(t)
    assert all(item.NumberOfContourPoints >= 3 for item in contour_items(ds))
    check_contours_on_slices(ds, datasets)


def test_single_voxels_become_squares_and_holes_inner_contours(uneven_case) -> None:
    volume, datasets, _ = uneven_case
    mask = np.zeros(volume.shape, bool)
    mask[2, 10, 10] = True
    mask[4, 20:30, 20:30] = True
    mask[4, 23:26, 24:27] = False
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    items = contour_items(ds)
    assert [item.NumberOfContourPoints for item in items] == [4, 4, 4]
    square = np.asarray(items[0].ContourData, dtype=float).reshape(-1, 3)
    # The voxel's square outline: half a pixel either side of the voxel centre.
    centre = volume.voxel_to_patient(np.array([10.0, 10.0, 2.0]))
    assert np.allclose(np.sort(np.unique(square[:, 0])), centre[0] + np.array([-0.35, 0.35]), atol=0.006)
    assert np.allclose(np.sort(np.unique(square[:, 1])), centre[1] + np.array([-0.4, 0.4]), atol=0.006)
    assert np.array_equal(rtstruct_to_mask(ds, volume), mask)


def test_huge_jagged_contour_stays_encodable(tmp_path: Path) -> None:
    volume, datasets = make_ct([0.0, 2.5, 5.0], rows=512, spacing=(0.9765625, 0.9765625), origin=(-250.0, -250.0, -100.0))
    plane = np.zeros((512, 512), bool)
    plane[:, 0] = True  # spine
    plane[3::4, :] = True  # teeth ...
    plane[1::4, 1::2] = plane[2::4, 1::2] = True  # ... each with 255 spikes: one outline of ~130,000 corners
    mask = np.zeros(volume.shape, bool)
    mask[1] = plane
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    read = pydicom.dcmread(write(ds, tmp_path / "rs.dcm"))
    lengths = []
    for item in contour_items(read):
        elem = item.get_item(CONTOUR_DATA)
        assert elem.VR == "DS"
        lengths.append(elem.length)
    assert max(lengths) <= MAX_CONTOUR_DATA_BYTES
    assert sum(lengths) > 20 * MAX_CONTOUR_DATA_BYTES  # it really was huge
    assert np.array_equal(rtstruct_to_mask(read, volume), mask)
    check_contours_on_slices(read, datasets)


def test_dciodvfy_finds_no_error(uneven_case, tmp_path: Path) -> None:
    volume, datasets, mask = uneven_case
    path = write(build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="000007", operator="Doe^Jane"), tmp_path / "rs.dcm")
    assert dciodvfy_errors(path) == []


def test_approved_structure_names_its_reviewer_and_stays_valid(uneven_case, tmp_path: Path) -> None:
    volume, datasets, mask = uneven_case
    roi = RoiSpec(name="Heart", color=(255, 0, 0), algorithm="SEMIAUTOMATIC")
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=roi, model_version="000007", operator="Doe^Jane",
                        approval_status="APPROVED")
    assert ds.ApprovalStatus == "APPROVED" and ds.ReviewerName == "Doe^Jane"
    assert ds.ReviewDate == ds.StructureSetDate and ds.ReviewTime == ds.StructureSetTime
    assert dciodvfy_errors(write(ds, tmp_path / "approved.dcm")) == []
    unapproved = build_rtstruct(volume.with_array(mask), datasets, roi=roi, model_version="000007", operator="Doe^Jane")
    assert unapproved.ApprovalStatus == "UNAPPROVED" and "ReviewerName" not in unapproved
    with pytest.raises(ValueError, match="reviewer"):
        build_rtstruct(volume.with_array(mask), datasets, roi=roi, model_version="000007", approval_status="APPROVED")
    with pytest.raises(ValueError, match="approval_status"):
        build_rtstruct(volume.with_array(mask), datasets, roi=roi, model_version="000007", operator="Doe^Jane",
                       approval_status="REJECTED")


# -- round trip and reader -----------------------------------------------------------------------


def test_round_trip_is_exact_through_a_file(uneven_case, tmp_path: Path) -> None:
    volume, datasets, mask = uneven_case
    path = write(build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7"), tmp_path / "rs.dcm")
    back = rtstruct_to_mask(pydicom.dcmread(path), volume, "Heart_AI")
    assert back.dtype == bool and back.shape == mask.shape
    assert np.array_equal(back, mask)


def test_round_trip_random_masks_keep_every_voxel() -> None:
    volume, datasets = make_ct([0.0, 1.0, 3.0, 4.5], rows=40, columns=48, spacing=(1.1, 0.6))
    rng = np.random.default_rng(3)
    for density in (0.1, 0.5, 0.9):
        mask = rng.random(volume.shape) < density  # diagonal touches, holes, islands everywhere
        ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
        assert np.array_equal(rtstruct_to_mask(ds, volume), mask)
        assert min(item.NumberOfContourPoints for item in contour_items(ds)) >= 4


def test_round_trip_on_an_oblique_series() -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    volume, datasets = make_ct(
        [0.0, 2.0, 5.0, 7.0, 9.5], rows=48, row_direction=(c, 0.0, s), column_direction=(0.0, 1.0, 0.0)
    )
    mask = ellipsoid(volume.shape, (2, 24, 24), (2.5, 12, 15))
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    assert np.array_equal(rtstruct_to_mask(ds, volume), mask)


def test_reader_matches_slices_robustly_and_skips_off_slice_contours(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    items = contour_items(ds)
    # Another TPS formats z differently: 1e-3 mm off is still its slice.
    for item in items:
        points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
        points[:, 2] += 1e-3
        item.ContourData = [f"{v:.4f}" for v in points.ravel()]
    assert np.array_equal(rtstruct_to_mask(ds, volume), mask)
    # Between two slices: belongs to none.
    moved = items[0]
    k = int(np.flatnonzero(mask.any(axis=(1, 2)))[0])
    points = np.asarray(moved.ContourData, dtype=float).reshape(-1, 3)
    points[:, 2] = float(datasets[k].ImagePositionPatient[2]) + 0.5
    moved.ContourData = [f"{v:.3f}" for v in points.ravel()]
    back = rtstruct_to_mask(ds, volume)
    assert np.count_nonzero(back != mask) > 0 and not (back & ~mask).any()


def test_reader_picks_roi_by_name_and_explains_failures(uneven_case) -> None:
    volume, datasets, mask = uneven_case
    ds = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(name="Heart"), model_version="7")
    assert list_rois(ds) == ["Heart"]
    assert np.array_equal(rtstruct_to_mask(ds, volume), mask)  # the only ROI
    assert np.array_equal(rtstruct_to_mask(ds, volume, "Coeur", roi_names=("HEART ",)), mask)
    with pytest.raises(ValueError, match=r"available ROIs: \['Heart'\]"):
        rtstruct_to_mask(ds, volume, "Lung_L", roi_names=("Lung_R",))
    other_frame = Volume(
        array=volume.array, origin=volume.origin, row_direction=volume.row_direction,
        column_direction=volume.column_direction, pixel_spacing=volume.pixel_spacing,
        slice_offsets=volume.slice_offsets, frame_of_reference_uid=generate_uid(),
    )
    with pytest.raises(ValueError, match="frame of reference"):
        rtstruct_to_mask(ds, other_frame, "Heart")


# -- the rt-utils defect we work around ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # rt-utils sets FileDataset.is_little_endian
def test_rt_utils_puts_contours_off_uneven_slices_and_we_do_not(tmp_path: Path) -> None:
    rt_utils = pytest.importorskip("rt_utils")
    volume, datasets = make_ct(UNEVEN_Z, rows=32, pixels=True)
    mask = ellipsoid(volume.shape, (6, 16, 16), (5.5, 8, 10))
    for k, ct in enumerate(datasets):
        ct.file_meta = FileMetaDataset()
        ct.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(tmp_path / f"ct{k:03d}.dcm", ct, enforce_file_format=True)
    theirs = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(tmp_path))
    theirs.add_roi(mask=np.transpose(mask, (1, 2, 0)), name="Heart")
    z_of = {ct.SOPInstanceUID: float(ct.ImagePositionPatient[2]) for ct in datasets}

    def worst_z_error(ds: Dataset) -> float:
        worst = 0.0
        for item in ds.ROIContourSequence[-1].ContourSequence:
            z = np.asarray(item.ContourData, dtype=float)[2::3]
            worst = max(worst, float(np.max(np.abs(z - z_of[item.ContourImageSequence[0].ReferencedSOPInstanceUID]))))
        return worst

    assert worst_z_error(theirs.ds) > 0.5  # rt-utils: z from the average gap
    ours = build_rtstruct(volume.with_array(mask), datasets, roi=RoiSpec(), model_version="7")
    assert worst_z_error(ours) == 0.0
    assert np.array_equal(rtstruct_to_mask(ours, volume), mask)
    # rt-utils also traces through boundary-voxel centres: half a voxel lost all round, which a
    # centre-inside reader (a TPS) turns into missing voxels.
    for item in theirs.ds.ROIContourSequence[-1].ContourSequence:  # put z back on the slices
        points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
        points[:, 2] = z_of[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
        item.ContourData = [f"{v:.3f}" for v in points.ravel()]
    their_area = np.count_nonzero(rtstruct_to_mask(theirs.ds, volume, "Heart"))
    assert their_area < 0.95 * np.count_nonzero(mask)


# -- phantom patients (when heartloop.phantom provides make_patient) ------------------------------


def _make_patient():
    phantom = pytest.importorskip("heartloop.phantom")
    if not hasattr(phantom, "make_patient"):
        pytest.skip("heartloop.phantom.make_patient is not available yet")
    return phantom.make_patient


@pytest.mark.parametrize(
    ("seed", "kwargs"),
    [
        (0, {"rows": 128, "n_slices": 40}),
        (1, {"rows": 128, "n_slices": 40, "uneven": True}),
        (2, {"rows": 128, "n_slices": 40, "uneven": True}),
        (3, {"rows": 512, "uneven": True}),
    ],
)
def test_phantom_heart_rtstruct(seed: int, kwargs: dict, tmp_path: Path) -> None:
    patient = _make_patient()(seed, **kwargs)
    volume, heart, datasets = patient.volume, np.asarray(patient.heart_mask, bool), patient.ct_datasets
    ds = build_rtstruct(volume.with_array(heart), datasets, roi=RoiSpec(), model_version="000007")
    path = write(ds, tmp_path / "rs.dcm")
    assert dciodvfy_errors(path) == []
    read = pydicom.dcmread(path)
    assert max(len(t) for t in ds_texts(read)) <= 16
    read = pydicom.dcmread(path)
    assert all(item.get_item(CONTOUR_DATA).length <= MAX_CONTOUR_DATA_BYTES for item in contour_items(read))
    check_contours_on_slices(read, datasets)
    assert read.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert read.RTROIObservationsSequence[0].RTROIInterpretedType == "ORGAN"
    assert read.ApprovalStatus == "UNAPPROVED"
    assert "000007" in read.StructureSetROISequence[0].ROIGenerationDescription
    back = rtstruct_to_mask(read, volume, "Heart_AI")
    assert dice(back, heart) >= 0.98
    assert abs(int(back.sum()) - int(heart.sum())) <= 0.02 * heart.sum()
