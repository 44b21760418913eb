"""Instance headers, CT series validation and loading (`heartloop.dicom_node.headers/series`)."""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from heartloop.core import CaseState, DatasetRejected, SeriesError, Volume
from heartloop.dicom_node import headers as hdr
from heartloop.dicom_node.headers import InstanceHeader, read_header
from heartloop.dicom_node.series import SeriesGeometry, load_ct_volume, local_spacing, validate_ct_series

PATIENT_ID = "SECRET-PID-4711"
PATIENT_NAME = "Doe^Jane"
ROWS, COLS = 24, 32  # rows != columns and non-square pixels catch transposition errors
SPACING = (0.8, 0.7)  # (row spacing, column spacing)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# -- synthetic CT ----------------------------------------------------------------------------------


def stored_pixels(k: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Deterministic stored values of slice k (unsigned, 0..4095 like a 12-bit CT)."""
    rng = np.random.default_rng(1000 + k)
    return rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)


def ct_slice(
    k: int,
    z: float,
    *,
    uids: dict[str, str],
    iop: Sequence[float] = AXIAL,
    xy: tuple[float, float] = (-12.5, -20.25),
    spacing: tuple[float, float] = SPACING,
    rows: int = ROWS,
    cols: int = COLS,
    intercept: float = -1024.0,
    slope: float = 1.0,
    position: Sequence[float] | None = None,
) -> Dataset:
    """One CT Image Storage dataset; `position` overrides the (x, y, z) built from `xy` and `z`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = hdr.CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality = "CT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = list(position) if position is not None else [xy[0], xy[1], z]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.PixelData = stored_pixels(k, rows, cols).tobytes()
    return ds


def new_uids() -> dict[str, str]:
    return {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}


def ct_series(zs: Sequence[float], **kwargs: object) -> list[Dataset]:
    uids = new_uids()
    return [ct_slice(k, z, uids=uids, **kwargs) for k, z in enumerate(zs)]  # type: ignore[arg-type]


def write(tmp_path: Path, datasets: Sequence[Dataset]) -> dict[str, Path]:
    paths = {}
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths[str(ds.SOPInstanceUID)] = path
    return paths


def headers_of(datasets: Sequence[Dataset]) -> list[InstanceHeader]:
    """Headers of in-memory datasets; any SOP class, so that validation sees foreign ones too."""
    return [read_header(ds, supported_sop_classes=None) for ds in datasets]


def round_trip(tmp_path: Path, datasets: Sequence[Dataset], **validate_kwargs: object) -> tuple[SeriesGeometry, Volume]:
    """Write → read_header (from the files) → validate → load."""
    paths = write(tmp_path, datasets)
    headers = [read_header(p) for p in paths.values()]
    geometry = validate_ct_series(headers, **validate_kwargs)  # type: ignore[arg-type]
    volume = load_ct_volume([paths[uid] for uid in geometry.sop_instance_uids], geometry)
    return geometry, volume


def zs_even(n: int = 30, start: float = -123.5, step: float = 2.5) -> list[float]:
    return [start + k * step for k in range(n)]


def assert_geometry_matches_slices(volume: Volume, datasets: Sequence[Dataset]) -> None:
    """Every slice's IPP, and every voxel's position, must be what the DICOM headers say."""
    by_z = sorted(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, volume.normal)))
    row = np.asarray(volume.row_direction)
    col = np.asarray(volume.column_direction)
    for k, ds in enumerate(by_z):
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(volume.voxel_to_patient(np.array([0.0, 0.0, k])), ipp, atol=1e-9)
        np.testing.assert_allclose(volume.slice_position(k), ipp, atol=1e-9)
        ij = np.array([COLS - 1.0, ROWS - 1.0, k])  # the last voxel of the slice
        expected = ipp + (COLS - 1) * row * float(ds.PixelSpacing[1]) + (ROWS - 1) * col * float(ds.PixelSpacing[0])
        np.testing.assert_allclose(volume.voxel_to_patient(ij), expected, atol=1e-9)
        if volume.is_uniform:
            np.testing.assert_allclose((volume.affine @ [0, 0, k, 1])[:3], ipp, atol=1e-9)
            np.testing.assert_allclose((volume.affine @ [*ij[:2], k, 1])[:3], expected, atol=1e-9)


# -- good series -----------------------------------------------------------------------------------


def test_good_series_loads_with_exact_geometry_and_hu(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(30))
    geometry, volume = round_trip(tmp_path, datasets)

    assert geometry.n_slices == 30 and volume.shape == (30, ROWS, COLS)
    assert geometry.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    assert geometry.origin == (-12.5, -20.25, -123.5)
    assert geometry.pixel_spacing == SPACING
    assert geometry.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    np.testing.assert_allclose(geometry.slice_offsets, [2.5 * k for k in range(30)], atol=1e-9)
    np.testing.assert_allclose(geometry.affine, volume.affine, atol=1e-12)
    np.testing.assert_allclose(geometry.slice_positions, [ds.ImagePositionPatient for ds in datasets], atol=1e-9)
    assert volume.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert volume.is_uniform
    assert_geometry_matches_slices(volume, datasets)
    # Pixel values round-trip exactly as HU = stored - 1024, in int16.
    assert volume.array.dtype == np.int16
    for k in range(30):
        np.testing.assert_array_equal(volume.array[k], stored_pixels(k).astype(np.int32) - 1024)


def test_shuffled_arrival_gives_the_same_geometry(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(25))
    shuffled = list(headers_of(datasets))
    random.Random(3).shuffle(shuffled)
    assert validate_ct_series(shuffled) == validate_ct_series(headers_of(datasets))

    paths = write(tmp_path, datasets)
    geometry = validate_ct_series(shuffled)
    volume = load_ct_volume([paths[uid] for uid in geometry.sop_instance_uids], geometry)
    for k in range(25):
        np.testing.assert_array_equal(volume.array[k], stored_pixels(k).astype(np.int32) - 1024)


def test_slices_are_ordered_along_the_normal_not_by_z(tmp_path: Path) -> None:
    # Rows along -x, columns along +y: normal = -z, so slice 0 is the most superior one.
    datasets = ct_series(zs_even(20), iop=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    geometry, volume = round_trip(tmp_path, datasets)
    assert np.allclose(geometry.normal, [0, 0, -1])
    assert geometry.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in reversed(datasets))
    assert geometry.origin[2] == pytest.approx(datasets[-1].ImagePositionPatient[2])
    assert all(b > a for a, b in zip(geometry.slice_offsets, geometry.slice_offsets[1:]))
    assert_geometry_matches_slices(volume, datasets)
    np.testing.assert_array_equal(volume.array[0], stored_pixels(19).astype(np.int32) - 1024)


@pytest.mark.parametrize(
    "gaps",
    [
        [2.0] * 15 + [3.0] * 15,  # two blocks, 2 mm then 3 mm
        [5.0] * 8 + [2.0] * 16 + [5.0] * 8,  # 2 mm through the heart, 5 mm elsewhere
        [2.5, 2.4, 2.6, 2.5, 2.55, 2.45] * 5,  # jitter
        [3.0] * 6 + [1.5] * 4 + [3.0] * 6,  # a denser block in between
    ],
    ids=["2mm-3mm", "5mm-2mm-5mm", "jitter", "dense-block"],
)
def test_uneven_gap_free_spacing_is_accepted_with_exact_offsets(tmp_path: Path, gaps: list[float]) -> None:
    zs = list(np.concatenate([[-80.0], -80.0 + np.cumsum(gaps)]))
    datasets = ct_series(zs)
    geometry, volume = round_trip(tmp_path, datasets)
    np.testing.assert_allclose(geometry.slice_offsets, np.asarray(zs) - zs[0], atol=1e-9)
    np.testing.assert_allclose(volume.slice_offsets, np.asarray(zs) - zs[0], atol=1e-9)
    assert_geometry_matches_slices(volume, datasets)
    np.testing.assert_allclose(geometry.affine, volume.affine, atol=1e-12)


def test_same_instance_received_twice_counts_once() -> None:
    headers = headers_of(ct_series(zs_even(12)))
    geometry = validate_ct_series(headers + headers[3:5])
    assert geometry.n_slices == 12


def test_implicit_vr_files_load(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12))
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    _, volume = round_trip(tmp_path, datasets)
    np.testing.assert_array_equal(volume.array[5], stored_pixels(5).astype(np.int32) - 1024)


# -- bad series: state and an actionable reason ----------------------------------------------------


def _drop(index: int) -> Callable[[list[Dataset]], list[Dataset]]:
    return lambda dss: dss[:index] + dss[index + 1 :]


def _no_ipp(dss: list[Dataset]) -> list[Dataset]:
    del dss[6].ImagePositionPatient
    return dss


def _no_spacing(dss: list[Dataset]) -> list[Dataset]:
    del dss[2].PixelSpacing
    return dss


def _mixed_orientation(dss: list[Dataset]) -> list[Dataset]:
    for ds in dss[20:22]:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    return dss


def _tilt(dss: list[Dataset]) -> list[Dataset]:
    t = math.radians(5.0)
    for ds in dss:
        ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(t), -math.sin(t)]
    return dss


def _sagittal(dss: list[Dataset]) -> list[Dataset]:
    for k, ds in enumerate(dss):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-50.0 + 2.5 * k, -100.0, 100.0]
    return dss


def _duplicate(dss: list[Dataset]) -> list[Dataset]:
    uids = {"study": dss[0].StudyInstanceUID, "series": dss[0].SeriesInstanceUID, "frame": dss[0].FrameOfReferenceUID}
    return dss + [ct_slice(56, -123.5, uids=uids)]  # InstanceNumber 57 at the z of instance 1


def _two_frames(dss: list[Dataset]) -> list[Dataset]:
    other = generate_uid()
    for ds in dss[25:]:
        ds.FrameOfReferenceUID = other
    return dss


def _no_frame(dss: list[Dataset]) -> list[Dataset]:
    del dss[4].FrameOfReferenceUID
    return dss


def _spacing(dss: list[Dataset]) -> list[Dataset]:
    dss[10].PixelSpacing = [0.9, 0.9]
    return dss


def _matrix(dss: list[Dataset]) -> list[Dataset]:
    ds = dss[11]
    ds.Rows, ds.Columns = 16, 16
    ds.PixelData = stored_pixels(11, 16, 16).tobytes()
    return dss


def _drift(dss: list[Dataset]) -> list[Dataset]:
    dss[14].ImagePositionPatient = [-12.5 + 0.4, -20.25, dss[14].ImagePositionPatient[2]]
    return dss


def _not_ct(dss: list[Dataset]) -> list[Dataset]:
    dss[3].SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    return dss


def _enhanced_ct(dss: list[Dataset]) -> list[Dataset]:
    for ds in dss:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    return dss


def _two_holes(dss: list[Dataset]) -> list[Dataset]:
    return dss[:10] + [dss[11]] + dss[13:]


BAD_SERIES = [
    # (id, mutation of a 30-slice 2.5 mm series from z = -123.5, state, substrings of the reason)
    ("no-ipp", _no_ipp, CaseState.UNSUPPORTED, ["instance 7 has no ImagePositionPatient", "re-export"]),
    ("no-pixel-spacing", _no_spacing, CaseState.UNSUPPORTED, ["instance 3 has no PixelSpacing"]),
    ("mixed-orientation", _mixed_orientation, CaseState.UNSUPPORTED,
     ["ImageOrientationPatient differs", "instances 21 and 22 have [0, 1, 0, 0, 0, -1]", "28 slice(s) have [1, 0, 0, 0, 1, 0]"]),
    ("gantry-tilt", _tilt, CaseState.UNSUPPORTED, ["not axial", "5.0°", "tilt"]),
    ("sagittal", _sagittal, CaseState.UNSUPPORTED, ["not axial", "sagittal", "90.0°"]),
    ("duplicate", _duplicate, CaseState.UNSUPPORTED,
     ["two slices at z = -123.5 mm (instances 1 and 57)", "pushed twice", "re-export"]),
    ("missing-slice", _drop(12), CaseState.INCOMPLETE,
     ["missing slice(s) between z = -96 and z = -91 mm", "(instances 12 and 14; gap 5 mm", "expected spacing 2.5 mm",
      "about 1 slice(s) missing", "wait for the rest of the series or push it again"]),
    ("two-holes-one-slice-apart", _two_holes, CaseState.INCOMPLETE,
     ["between z = -101 and z = -96 mm (instances 10 and 12", "between z = -96 and z = -91 mm (instances 12 and 14"]),
    ("two-frames", _two_frames, CaseState.UNSUPPORTED, ["2 frames of reference", "instances 26, 27, 28, 29 and 30"]),
    ("no-frame", _no_frame, CaseState.UNSUPPORTED, ["instance 5 has no FrameOfReferenceUID"]),
    ("pixel-spacing", _spacing, CaseState.UNSUPPORTED,
     ["PixelSpacing differs", "instance 11 has [0.9, 0.9] mm", "29 slice(s) have [0.8, 0.7] mm"]),
    ("matrix", _matrix, CaseState.UNSUPPORTED, ["image size differs", "instance 12 is 16x16", "24x32"]),
    ("in-plane-drift", _drift, CaseState.UNSUPPORTED, ["not lie on one line", "z = -88.5 mm (instance 15) is 0.40 mm off"]),
    ("too-few", lambda dss: dss[:6], CaseState.INCOMPLETE, ["only 6 slice(s) received, at least 10 needed"]),
    ("not-ct", _not_ct, CaseState.UNSUPPORTED, ["instance 4 is MR Image Storage, not CT Image Storage"]),
    ("enhanced-ct", _enhanced_ct, CaseState.UNSUPPORTED, ["Enhanced CT Image Storage", "one file per slice"]),
]


@pytest.mark.parametrize("mutate, state, fragments", [b[1:] for b in BAD_SERIES], ids=[b[0] for b in BAD_SERIES])
def test_bad_series_raise_series_error_with_specifics(
    mutate: Callable[[list[Dataset]], list[Dataset]], state: CaseState, fragments: list[str]
) -> None:
    datasets = mutate(ct_series(zs_even(30)))
    with pytest.raises(SeriesError) as info:
        validate_ct_series(headers_of(datasets))
    err = info.value
    assert err.state is state, err.reason
    for fragment in fragments:
        assert fragment in err.reason, f"{fragment!r} not in {err.reason!r}"
    assert PATIENT_ID not in err.reason and "Doe" not in err.reason


def test_too_many_slices_is_unsupported() -> None:
    with pytest.raises(SeriesError) as info:
        validate_ct_series(headers_of(ct_series(zs_even(25))), max_slices=20)
    assert info.value.state is CaseState.UNSUPPORTED
    assert "25 slices, more than the 20 supported" in info.value.reason


def test_empty_series_is_incomplete() -> None:
    with pytest.raises(SeriesError) as info:
        validate_ct_series([])
    assert info.value.state is CaseState.INCOMPLETE


def test_headers_of_two_series_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="2 different series"):
        validate_ct_series(headers_of(ct_series(zs_even(12))) + headers_of(ct_series(zs_even(12))))


def test_a_block_of_doubled_spacing_is_not_a_hole_but_an_isolated_double_gap_is() -> None:
    # The local rule: isolated 2x gap -> hole; a run of >= 3 coarser gaps -> a new block.
    g = [2.5] * 10 + [5.0] + [2.5] * 10
    ref = local_spacing(g)
    assert ref[10] == pytest.approx(2.5) and g[10] > 1.6 * ref[10]
    block = [2.5] * 10 + [5.0] * 4 + [2.5] * 10
    ref = local_spacing(block)
    assert all(gap <= 1.6 * r for gap, r in zip(block, ref))


def test_hole_next_to_a_coarser_block_is_found() -> None:
    zs = list(np.concatenate([[0.0], np.cumsum([2.0] * 12 + [5.0] * 8)]))
    del zs[15]  # a 10 mm hole inside the 5 mm block, right after the 2 mm block
    with pytest.raises(SeriesError) as info:
        validate_ct_series(headers_of(ct_series(zs)))
    assert info.value.state is CaseState.INCOMPLETE
    assert "expected spacing 5 mm" in info.value.reason


def test_geometry_is_valid_whenever_it_exists() -> None:
    geometry = validate_ct_series(headers_of(ct_series(zs_even(12))))
    with pytest.raises(ValueError):
        SeriesGeometry(**{**geometry.__dict__, "slice_offsets": geometry.slice_offsets[::-1]})
    with pytest.raises(ValueError):
        SeriesGeometry(**{**geometry.__dict__, "row_direction": (1.0, 1.0, 0.0)})
    with pytest.raises(ValueError):
        geometry.to_volume(np.zeros((3, ROWS, COLS)))


# -- pixel values ----------------------------------------------------------------------------------


def test_signed_stored_values_with_12_bits_and_garbage_high_bits(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12), intercept=0.0)
    rng = np.random.default_rng(5)
    truth = []
    for ds in datasets:
        values = rng.integers(-2048, 2048, size=(ROWS, COLS)).astype(np.int16)
        noisy = (values.view(np.uint16) & 0x0FFF) | 0xA000  # bits 12-15 must be ignored
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
        ds.PixelData = noisy.astype(np.uint16).tobytes()
        truth.append(values)
    _, volume = round_trip(tmp_path, datasets)
    np.testing.assert_array_equal(volume.array, np.stack(truth))


def test_non_integer_rescale_falls_back_to_float32(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12))
    datasets[7].RescaleSlope = 0.5  # only one slice: the volume switches dtype mid-load
    _, volume = round_trip(tmp_path, datasets)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], stored_pixels(0).astype(np.float32) - 1024)
    np.testing.assert_array_equal(volume.array[7], stored_pixels(7).astype(np.float32) * 0.5 - 1024)
    np.testing.assert_array_equal(volume.array[11], stored_pixels(11).astype(np.float32) - 1024)


def test_values_beyond_int16_fall_back_to_float32(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12), intercept=0.0)
    big = np.full((ROWS, COLS), 60000, dtype=np.uint16)
    datasets[0].PixelData = big.tobytes()
    _, volume = round_trip(tmp_path, datasets)
    assert volume.array.dtype == np.float32
    assert float(volume.array[0].max()) == 60000.0
    np.testing.assert_array_equal(volume.array[1], stored_pixels(1).astype(np.float32))


def test_rle_compressed_series_is_decoded(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12))
    for ds in datasets:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    _, volume = round_trip(tmp_path, datasets)
    np.testing.assert_array_equal(volume.array[3], stored_pixels(3).astype(np.int32) - 1024)


def test_undecodable_transfer_syntax_is_unsupported(tmp_path: Path) -> None:
    """MPEG-2: pydicom has no decoder for it at all, so this holds whatever plugins are installed
    (a JPEG 2000 decoder arrives with highdicom's dependencies)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    datasets = ct_series(zs_even(12))
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\0" * 60])
        ds["PixelData"].VR = "OB"
    with pytest.raises(SeriesError) as info:
        round_trip(tmp_path, datasets)
    assert info.value.state is CaseState.UNSUPPORTED
    assert "MPEG2" in info.value.reason and "cannot be decoded" in info.value.reason
    assert MPEG2MPML in info.value.reason


def test_load_rejects_files_in_the_wrong_order(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12))
    paths = write(tmp_path, datasets)
    geometry = validate_ct_series([read_header(p) for p in paths.values()])
    ordered = [paths[uid] for uid in geometry.sop_instance_uids]
    with pytest.raises(ValueError, match="expected"):
        load_ct_volume(ordered[::-1], geometry)
    with pytest.raises(ValueError, match="11 files"):
        load_ct_volume(ordered[:-1], geometry)


# -- read_header -----------------------------------------------------------------------------------


def test_status_constants() -> None:
    assert hdr.CANNOT_UNDERSTAND == 0xC210
    assert hdr.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert hdr.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert hdr.OUT_OF_RESOURCES == 0xA700


def test_read_header_of_a_ct_file(tmp_path: Path) -> None:
    ds = ct_series([12.5])[0]
    path = write(tmp_path, [ds])[ds.SOPInstanceUID]
    h = read_header(path)
    assert h == read_header(ds) == read_header(str(path)) == read_header(io.BytesIO(path.read_bytes()))
    assert h.sop_class_uid == hdr.CT_IMAGE_STORAGE and h.modality == "CT"
    assert (h.sop_instance_uid, h.study_uid, h.series_uid, h.frame_of_reference_uid) == (
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID)
    assert h.image_position == (-12.5, -20.25, 12.5)
    assert h.image_orientation == AXIAL
    assert h.pixel_spacing == SPACING
    assert (h.rows, h.columns, h.instance_number) == (ROWS, COLS, 1)
    assert h.patient_id == PATIENT_ID
    assert PATIENT_ID not in repr(h) and "Doe" not in repr(h)


def _rt_base(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = PATIENT_ID
    return ds


def test_read_header_of_rt_objects(tmp_path: Path) -> None:
    frame, ct_series_uid, plan_uid, struct_uid = generate_uid(), generate_uid(), generate_uid(), generate_uid()

    rs = _rt_base(hdr.RT_STRUCTURE_SET_STORAGE, "RTSTRUCT")
    series_item = Dataset()
    series_item.SeriesInstanceUID = ct_series_uid
    study_item = Dataset()
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    rs.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])
    roi = Dataset()
    roi.ContourSequence = DicomSequence([Dataset()])
    rs.ROIContourSequence = DicomSequence([roi])

    plan = _rt_base(hdr.RT_PLAN_STORAGE, "RTPLAN")
    plan.FrameOfReferenceUID = frame
    ref_struct = Dataset()
    ref_struct.ReferencedSOPClassUID = hdr.RT_STRUCTURE_SET_STORAGE
    ref_struct.ReferencedSOPInstanceUID = struct_uid
    plan.ReferencedStructureSetSequence = DicomSequence([ref_struct])

    dose = _rt_base(hdr.RT_DOSE_STORAGE, "RTDOSE")
    dose.FrameOfReferenceUID = frame
    ref_plan = Dataset()
    ref_plan.ReferencedSOPClassUID = hdr.RT_PLAN_STORAGE
    ref_plan.ReferencedSOPInstanceUID = plan_uid
    dose.ReferencedRTPlanSequence = DicomSequence([ref_plan])
    dose.ImagePositionPatient = [-100.0, -80.0, -50.0]
    dose.ImageOrientationPatient = list(AXIAL)
    dose.PixelSpacing = [2.5, 2.5]
    dose.Rows, dose.Columns, dose.NumberOfFrames = 4, 5, 3
    dose.SamplesPerPixel, dose.PhotometricInterpretation = 1, "MONOCHROME2"
    dose.BitsAllocated, dose.BitsStored, dose.HighBit, dose.PixelRepresentation = 32, 32, 31, 0
    dose.PixelData = np.zeros((3, 4, 5), np.uint32).tobytes()

    paths = write(tmp_path, [rs, plan, dose])
    h_rs, h_plan, h_dose = (read_header(paths[ds.SOPInstanceUID]) for ds in (rs, plan, dose))
    assert h_rs.modality == "RTSTRUCT" and h_rs.frame_of_reference_uid is None
    assert h_rs.referenced_frame_of_reference_uids == (frame,)
    assert h_rs.referenced_series_uids == (ct_series_uid,)
    assert h_plan.frame_of_reference_uid == frame
    assert h_plan.referenced_structure_set_uids == (struct_uid,)
    assert h_dose.frame_of_reference_uid == frame
    assert h_dose.referenced_rt_plan_uids == (plan_uid,)
    assert (h_dose.rows, h_dose.columns) == (4, 5)
    assert h_rs == read_header(rs) and h_dose == read_header(dose)


def _rejected(source: object) -> DatasetRejected:
    with pytest.raises(DatasetRejected) as info:
        read_header(source)  # type: ignore[arg-type]
    assert PATIENT_ID not in info.value.reason
    return info.value


def test_read_header_rejects_non_dicom_bytes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all\n" * 100)
    err = _rejected(junk)
    assert err.status == hdr.CANNOT_UNDERSTAND and "not a DICOM file" in err.reason
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert _rejected(empty).status == hdr.CANNOT_UNDERSTAND
    with pytest.raises(FileNotFoundError):  # I/O trouble is not the sender's fault
        read_header(tmp_path / "does-not-exist.dcm")
    preamble_only = tmp_path / "preamble.dcm"
    preamble_only.write_bytes(b"\0" * 128 + b"DICM")
    assert _rejected(preamble_only).status == hdr.CANNOT_UNDERSTAND


@pytest.mark.parametrize("keep", [100, 140, 300, 0.5, 0.95, -1], ids=lambda k: f"keep-{k}")
def test_read_header_rejects_truncated_files(tmp_path: Path, keep: float) -> None:
    ds = ct_series([0.0])[0]
    full = write(tmp_path, [ds])[ds.SOPInstanceUID].read_bytes()
    pixel_start = full.rfind(b"\xe0\x7f\x10\x00")
    cut = {0.5: pixel_start // 2, 0.95: pixel_start + (len(full) - pixel_start) // 2, -1: len(full) - 1}.get(keep, keep)
    path = tmp_path / "cut.dcm"
    path.write_bytes(full[: int(cut)])
    err = _rejected(path)
    assert err.status == hdr.CANNOT_UNDERSTAND
    assert "truncated" in err.reason or "not a DICOM file" in err.reason


def test_read_header_rejects_truncated_encapsulated_pixel_data(tmp_path: Path) -> None:
    ds = ct_series([0.0])[0]
    ds.compress(RLELossless, encoding_plugin="pydicom")
    full = write(tmp_path, [ds])[ds.SOPInstanceUID].read_bytes()
    read_header(io.BytesIO(full))  # complete: fine
    err = _rejected(io.BytesIO(full[:-20]))
    assert err.status == hdr.CANNOT_UNDERSTAND and "truncated" in err.reason


def test_read_header_rejects_missing_uids_and_foreign_sop_classes(tmp_path: Path) -> None:
    ds = ct_series([0.0])[0]
    del ds.SeriesInstanceUID
    err = _rejected(ds)
    assert err.status == hdr.DATASET_DOES_NOT_MATCH_SOP_CLASS and "SeriesInstanceUID" in err.reason

    ds = ct_series([0.0])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value on assignment
        ds.SOPInstanceUID = "1.2.3/../../etc"
    err = _rejected(ds)
    assert err.status == hdr.DATASET_DOES_NOT_MATCH_SOP_CLASS and "not a valid UID" in err.reason

    mr = ct_series([0.0])[0]
    mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    path = write(tmp_path, [mr])[mr.SOPInstanceUID]
    err = _rejected(path)
    assert err.status == hdr.SOP_CLASS_NOT_SUPPORTED and "MR Image Storage" in err.reason
    assert read_header(path, supported_sop_classes=None).sop_class_uid == mr.SOPClassUID

    no_pixels = ct_series([0.0])[0]
    del no_pixels.PixelData
    assert _rejected(no_pixels).status == hdr.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_read_header_rejects_malformed_geometry() -> None:
    ds = ct_series([0.0])[0]
    ds.ImagePositionPatient = [1.0, 2.0]
    err = _rejected(ds)
    assert err.status == hdr.CANNOT_UNDERSTAND and "ImagePositionPatient must have 3 values" in err.reason


def test_integer_slope_other_than_one_stays_int16_and_exact(tmp_path: Path) -> None:
    datasets = ct_series(zs_even(12), slope=2.0, intercept=-1000.0)
    _, volume = round_trip(tmp_path, datasets)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[4], stored_pixels(4).astype(np.int32) * 2 - 1000)


def test_position_tolerance_is_0_01_mm() -> None:
    datasets = ct_series(zs_even(12))
    for k, ds in enumerate(datasets):  # sub-tolerance jitter, as DS rounding produces
        ds.ImagePositionPatient = [-12.5 + 0.004 * (k % 2), -20.25, ds.ImagePositionPatient[2]]
    validate_ct_series(headers_of(datasets))
    datasets[5].ImagePositionPatient = [-12.5, -20.25, datasets[4].ImagePositionPatient[2] + 0.005]
    with pytest.raises(SeriesError, match="two slices at z = -113.5 mm") as info:
        validate_ct_series(headers_of(datasets))
    assert info.value.state is CaseState.UNSUPPORTED


def test_read_header_of_a_file_with_a_large_header(tmp_path: Path) -> None:
    # A 100 kB private block and a sequence before the pixels: the header no longer fits in the
    # first chunk read_header parses, so it must fall back to reading the whole file.
    ds = ct_series([7.5])[0]
    ds.add_new(0x00091010, "LO", "HEARTLOOP TEST")
    ds.add_new(0x00091011, "OB", b"\x01" * 100_000)
    ref = Dataset()
    ref.ReferencedSOPClassUID = hdr.CT_IMAGE_STORAGE
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = DicomSequence([ref])
    path = write(tmp_path, [ds])[ds.SOPInstanceUID]
    assert read_header(path) == read_header(ds)
    full = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full[:80_000])  # inside the private block
    assert _rejected(cut).status == hdr.CANNOT_UNDERSTAND
    cut.write_bytes(full[:-100])  # inside the pixel data
    assert "truncated" in _rejected(cut).reason


def test_label_falls_back_to_the_sop_instance_uid() -> None:
    datasets = ct_series(zs_even(12))
    del datasets[3].InstanceNumber
    del datasets[3].ImagePositionPatient
    with pytest.raises(SeriesError, match=f"instance {datasets[3].SOPInstanceUID} has no ImagePositionPatient"):
        validate_ct_series(headers_of(datasets))
