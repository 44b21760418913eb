"""Behaviour of the synthetic thorax phantoms (heartloop.phantom)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread, dcmwrite

from heartloop.core.volume import Volume
from heartloop.phantom import (
    ct_datasets_from_volume,
    make_patient,
    mean_heart_dose_gy,
    rtdose_dataset,
    threshold_only_dice,
    write_patient,
)
from heartloop.phantom.metrics import mask_volume_cc

SMALL = {"rows": 128, "n_slices": 40}


@pytest.fixture(scope="module")
def small():
    return make_patient(7, **SMALL)


@pytest.fixture(scope="module")
def cohort():
    """A handful of small patients covering both plans, with and without a tumour."""
    return [make_patient(s, **SMALL) for s in range(5)] + [
        make_patient(11, plan="lung", tumour=True, **SMALL),
        make_patient(12, plan="breast", tumour=True, **SMALL),
    ]


def _floats(value) -> list[float]:
    return [float(v) for v in value]


# -- determinism --------------------------------------------------------------------------------
def test_same_seed_and_arguments_give_identical_patients(small):
    again = make_patient(7, **SMALL)
    assert np.array_equal(small.volume.array, again.volume.array)
    assert np.array_equal(small.heart_mask, again.heart_mask)
    assert np.array_equal(small.dose.array, again.dose.array)
    assert [d.SOPInstanceUID for d in small.ct_datasets] == [d.SOPInstanceUID for d in again.ct_datasets]
    assert small.rtdose.SOPInstanceUID == again.rtdose.SOPInstanceUID
    assert small.rtdose.PixelData == again.rtdose.PixelData
    assert small.volume.frame_of_reference_uid == again.volume.frame_of_reference_uid


def test_different_seeds_give_different_anatomy(cohort):
    volumes = [mask_volume_cc(p.heart_mask, p.volume) for p in cohort[:5]]
    assert len({round(v) for v in volumes}) == 5
    assert len({p.volume.pixel_spacing for p in cohort[:5]}) > 1
    uids = {p.ct_datasets[0].StudyInstanceUID for p in cohort}
    assert len(uids) == len(cohort)


def test_uids_are_unique_within_a_patient(small):
    uids = [d.SOPInstanceUID for d in small.ct_datasets] + [small.rtdose.SOPInstanceUID]
    assert len(set(uids)) == len(uids)
    assert small.rtdose.SeriesInstanceUID != small.ct_datasets[0].SeriesInstanceUID
    assert small.rtdose.StudyInstanceUID == small.ct_datasets[0].StudyInstanceUID
    assert small.rtdose.FrameOfReferenceUID == small.ct_datasets[0].FrameOfReferenceUID


def test_other_arguments_give_other_uids_but_same_identity():
    a = make_patient(3, rows=64, n_slices=30)
    b = make_patient(3, rows=96, n_slices=30)
    assert a.patient_id == b.patient_id == "PHANTOM-0003"
    assert a.ct_datasets[0].SeriesInstanceUID != b.ct_datasets[0].SeriesInstanceUID


# -- geometry -----------------------------------------------------------------------------------
def test_volume_geometry_matches_the_datasets_exactly(small):
    vol = small.volume
    assert vol.array.dtype == np.int16
    assert vol.shape == (40, 128, 128)
    assert vol.slice_offsets[0] == 0.0
    for k, d in enumerate(small.ct_datasets):
        assert _floats(d.ImagePositionPatient) == list(vol.slice_position(k))
        assert _floats(d.PixelSpacing) == list(vol.pixel_spacing)
        assert _floats(d.ImageOrientationPatient) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert (d.Rows, d.Columns) == vol.shape[1:]
        assert d.InstanceNumber == k + 1
        assert float(d.SliceLocation) == float(d.ImagePositionPatient[2])
    z = np.array([float(d.ImagePositionPatient[2]) for d in small.ct_datasets])
    assert np.all(np.diff(z) > 0), "slice z grows with k (head-first supine: k=0 is inferior)"
    assert np.array_equal(z - z[0], vol.slice_offsets)
    # The affine maps voxel (i, j, k) to the same positions.
    ipp0 = _floats(small.ct_datasets[0].ImagePositionPatient)
    assert list(vol.affine[:3, 3]) == ipp0
    assert vol.affine[0, 0] == vol.pixel_spacing[1] and vol.affine[1, 1] == vol.pixel_spacing[0]
    last = vol.voxel_to_patient(np.array([0.0, 0.0, vol.shape[0] - 1]))
    assert list(last) == _floats(small.ct_datasets[-1].ImagePositionPatient)


def test_dose_geometry_matches_the_rtdose_exactly(small):
    dose, rd = small.dose, small.rtdose
    assert _floats(rd.ImagePositionPatient) == list(dose.origin)
    assert _floats(rd.PixelSpacing) == list(dose.pixel_spacing)
    assert _floats(rd.GridFrameOffsetVector) == list(dose.slice_offsets)
    assert float(rd.GridFrameOffsetVector[0]) == 0.0
    assert (rd.NumberOfFrames, rd.Rows, rd.Columns) == dose.shape
    assert rd.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2"
    assert (rd.DoseUnits, rd.DoseType, rd.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert (rd.BitsAllocated, rd.PixelRepresentation) == (32, 0)
    assert np.array_equal(rd.pixel_array * float(rd.DoseGridScaling), dose.array)
    assert dose.pixel_spacing[0] >= small.volume.pixel_spacing[0], "dose grid is coarser than the CT"


def test_field_of_view_is_physical_and_pixels_follow_rows():
    big = make_patient(5, rows=512, n_slices=40)
    little = make_patient(5, rows=128, n_slices=40)
    assert 0.9 <= big.volume.pixel_spacing[0] <= 1.2
    assert little.volume.pixel_spacing[0] == pytest.approx(4 * big.volume.pixel_spacing[0])
    assert mask_volume_cc(big.heart_mask, big.volume) == pytest.approx(
        mask_volume_cc(little.heart_mask, little.volume), rel=0.08)


def test_random_series_look_like_planning_cts():
    p = make_patient(2, rows=64)
    assert 100 <= p.volume.shape[0] <= 200
    thickness = {float(d.SliceThickness) for d in p.ct_datasets}
    assert len(thickness) == 1 and 2.0 <= thickness.pop() <= 3.0
    assert p.volume.is_uniform


def test_uneven_spacing_is_uneven_and_gap_free():
    p = make_patient(4, rows=64, n_slices=60, uneven=True)
    offsets = p.volume.slice_offsets
    gaps = np.diff(offsets)
    assert not p.volume.is_uniform
    assert np.all(gaps > 0) and gaps.min() >= 2.0 and gaps.max() <= 3.0
    thickness = np.array([float(d.SliceThickness) for d in p.ct_datasets])
    # Contiguous slices: each gap is half of each neighbour's thickness.
    assert np.array_equal(gaps, 0.5 * (thickness[:-1] + thickness[1:]))
    z = np.array([float(d.ImagePositionPatient[2]) for d in p.ct_datasets])
    assert np.array_equal(z - z[0], offsets)
    _assert_heart_well_inside(p)


def test_too_few_explicit_slices_are_refused():
    with pytest.raises(ValueError, match="too short for the heart"):
        make_patient(1, rows=64, n_slices=10, slice_thickness=2.0)


def test_few_slices_are_thickened_to_keep_the_heart():
    p = make_patient(1, rows=64, n_slices=12)
    _assert_heart_well_inside(p)
    assert float(p.ct_datasets[0].SliceThickness) > 3.0


# -- anatomy ------------------------------------------------------------------------------------
def _assert_heart_well_inside(p) -> None:
    heart = p.heart_mask
    assert heart.any()
    assert not heart[0].any() and not heart[-1].any(), "heart must not touch the first/last slice"
    assert not heart[:, [0, -1], :].any() and not heart[:, :, [0, -1]].any()
    assert not (heart & ~p.body_mask).any(), "heart inside the body"


def test_heart_has_a_realistic_volume_and_stays_inside(cohort):
    for p in cohort:
        assert 450.0 <= mask_volume_cc(p.heart_mask, p.volume) <= 950.0
        _assert_heart_well_inside(p)
        # Left-anterior of the mediastinum: centre left of the body midline.
        k, j, i = np.nonzero(p.heart_mask)
        heart_x = p.volume.voxel_to_patient(np.array([i.mean(), j.mean(), k.mean()]))[0]
        _, body_i = np.nonzero(p.body_mask[int(k.mean())])
        body_x = p.volume.voxel_to_patient(np.array([body_i.mean(), 0.0, 0.0]))[0]
        assert heart_x > body_x, "heart centre lies to the patient's left (+x)"


def test_ct_numbers_are_plausible(small):
    hu = small.volume.array
    heart = hu[small.heart_mask]
    assert 20 < np.median(heart) < 70
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert (hu > 300).sum() > 0, "bones"
    assert (hu[small.body_mask] < -700).mean() > 0.05, "lungs"


def test_threshold_window_cannot_separate_the_heart(cohort):
    for p in cohort[:3]:
        assert threshold_only_dice(p) < 0.6


# -- dose ---------------------------------------------------------------------------------------
def test_mean_heart_dose_is_low_to_moderate(cohort):
    plans = set()
    for p in cohort:
        plans.add(p.plan)
        mhd = mean_heart_dose_gy(p)
        assert 0.3 <= mhd <= 12.0, (p.seed, p.plan, mhd)
        assert 40.0 <= p.prescription_gy <= 66.0
        assert p.dose.array.max() <= 1.25 * p.prescription_gy
        assert not np.any(p.dose.array < 0)
    assert plans == {"breast", "lung"}


def test_plan_and_tumour_arguments_are_honoured():
    breast = make_patient(21, plan="breast", tumour=True, rows=64, n_slices=30)
    assert breast.plan == "breast" and breast.tumour
    assert breast.ct_datasets[0].PatientSex == "F"
    lung = make_patient(21, plan="lung", tumour=False, rows=64, n_slices=30)
    assert lung.plan == "lung" and not lung.tumour


# -- DICOM --------------------------------------------------------------------------------------
def _raw_ds_values(dataset: pydicom.Dataset):
    """Every DS value string as it is encoded in the file."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    buffer.seek(0)
    raw = dcmread(buffer)
    for tag in list(raw.keys()):
        elem = raw.get_item(tag)
        if getattr(elem, "VR", None) == "DS" and isinstance(elem.value, bytes):
            for part in elem.value.split(b"\\"):
                yield tag, part.strip(b" \x00")


def test_every_ds_value_fits_sixteen_characters(small):
    uneven = make_patient(9, rows=100, n_slices=30, uneven=True)
    datasets = [*small.ct_datasets[:3], small.rtdose, *uneven.ct_datasets, uneven.rtdose]
    seen = 0
    for d in datasets:
        for tag, value in _raw_ds_values(d):
            seen += 1
            assert len(value) <= 16, (tag, value)
    assert seen > 50


def test_mandatory_attributes_are_present(small):
    ct = small.ct_datasets[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality", "SeriesNumber",
                    "InstanceNumber", "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
                    "ImageType", "KVP", "SliceThickness", "SliceLocation", "AcquisitionNumber", "PatientPosition"):
        assert keyword in ct, keyword
    assert ct.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ct.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ct.WindowCenter, ct.WindowWidth) == (40, 400)
    assert (ct.RescaleIntercept, ct.RescaleSlope, ct.PhotometricInterpretation) == (-1024, 1, "MONOCHROME2")
    assert ct.PatientPosition == "HFS"


def test_builders_work_on_other_volumes(small):
    hu = np.full((3, 8, 8), -2000, dtype=np.int16)
    hu[:, 2:6, 2:6] = 40
    volume = Volume(hu, (0.0, 0.0, 0.0), (1, 0, 0), (0, 1, 0), (2.0, 2.0), np.array([0.0, 2.5, 5.0]), "1.2.3")
    cts = ct_datasets_from_volume(volume, patient_id="X", patient_name="X^Y", study_uid="1.2.3.4", series_uid="1.2.3.5")
    assert cts[0].PixelRepresentation == 1, "values below -1024 need signed pixels"
    back = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in cts])
    assert np.array_equal(back, hu)
    dose = small.dose
    other = Volume(dose.array, dose.origin, dose.row_direction, dose.column_direction, dose.pixel_spacing,
                   dose.slice_offsets, "9.9.9")
    with pytest.raises(ValueError, match="frame of reference"):
        rtdose_dataset(other, small.ct_datasets)
    with pytest.raises(ValueError, match="integer"):
        ct_datasets_from_volume(volume.with_array(hu.astype(float)), patient_id="X", patient_name="X",
                                study_uid="1.2", series_uid="1.3")


def test_write_patient_round_trips(small, tmp_path):
    import nibabel as nib

    directory = write_patient(small, tmp_path)
    files = sorted(directory.glob("CT_*.dcm"))
    assert [f.name for f in files[:2]] == ["CT_0000.dcm", "CT_0001.dcm"] and len(files) == 40
    cts = [dcmread(f) for f in files]
    hu = np.stack([d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept) for d in cts])
    assert np.array_equal(hu, small.volume.array)
    rd = dcmread(directory / "RD.dcm")
    assert np.array_equal(rd.pixel_array * float(rd.DoseGridScaling), small.dose.array)
    assert rd.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian

    nifti = nib.load(str(directory / "heart_truth.nii.gz"))
    data = np.asarray(nifti.dataobj).astype(bool)
    assert np.array_equal(data.transpose(2, 1, 0), small.heart_mask)
    # Voxel (i, j, k) maps to RAS = (-x, -y, z) of the DICOM (LPS) position.
    corner = nifti.affine @ np.array([5.0, 7.0, 3.0, 1.0])
    x, y, z = small.volume.voxel_to_patient(np.array([5.0, 7.0, 3.0]))
    assert np.allclose(corner[:3], [-x, -y, z])

    truth = json.loads((directory / "truth.json").read_text())
    assert truth["seed"] == 7 and truth["plan"] == small.plan and truth["tumour"] == small.tumour
    assert truth["heart_volume_cc"] == pytest.approx(mask_volume_cc(small.heart_mask, small.volume), abs=1e-3)
    assert truth["mean_heart_dose_gy"] == pytest.approx(mean_heart_dose_gy(small), abs=1e-4)
    assert "PHANTOM" not in json.dumps(truth)


def _dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy output that report an error."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    if run.returncode != 0 and "bitsallocated <= bytesinword" in output:
        # dicom3tools aborts on any 32-bit pixel data (an assertion in its reader, not a finding
        # about the file). Check every other attribute on a copy with 16-bit pixels instead.
        copy = dcmread(path)
        stored = copy.pixel_array
        factor = max(1, int(np.ceil(stored.max() / 65535)))
        copy.BitsAllocated, copy.BitsStored, copy.HighBit = 16, 16, 15
        copy.PixelData = (stored // factor).astype("<u2").tobytes()
        copy16 = path.with_name(path.stem + "_16bit.dcm")
        copy.save_as(copy16, enforce_file_format=True)
        return _dciodvfy_errors(copy16)
    assert run.returncode == 0 or "Error" in output, output
    return [line for line in output.splitlines() if "Error" in line]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dciodvfy_reports_no_errors(tmp_path):
    p = make_patient(8, rows=64, n_slices=20, uneven=True)
    directory = write_patient(p, tmp_path)
    assert _dciodvfy_errors(directory / "CT_0000.dcm") == []
    assert _dciodvfy_errors(directory / "CT_0010.dcm") == []
    assert _dciodvfy_errors(directory / "RD.dcm") == []
