"""RTDOSE reading: values and geometry exactly as written, both GridFrameOffsetVector forms, reversed
frames, refusals (RELATIVE units, another frame of reference) and the PLAN/BEAM rule of a case."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from heartloop.core import Volume
from heartloop.dicom_node.rtdose import (
    DoseError,
    MissingDoseError,
    read_rtdose,
    select_case_dose,
    select_dose_datasets,
)
from heartloop.phantom import make_patient, rtdose_dataset


@pytest.fixture(scope="module")
def patient():
    return make_patient(7, rows=64, n_slices=20)


def _file_round_trip(ds: Dataset) -> Dataset:
    """Write and read back, as the node stores and reads it."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _stored(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<u4").reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)


def _assert_same_dose(volume: Volume, expected: Volume) -> None:
    assert volume.array.dtype == np.float32
    assert volume.same_grid(expected, tol_mm=1e-3), (volume.origin, expected.origin)
    np.testing.assert_allclose(volume.array, expected.array, rtol=1e-6, atol=1e-5)


def _beam(patient, part_gy: np.ndarray, *, plan_uid: str, beam_number: int | None = None,
          summation: str = "BEAM", dose: Volume | None = None) -> Dataset:
    base = dose or patient.dose
    ds = rtdose_dataset(base.with_array(part_gy), patient.ct_datasets, sop_instance_uid=generate_uid(),
                        series_uid=generate_uid(), plan_uid=plan_uid, dose_grid_scaling=float(patient.rtdose.DoseGridScaling),
                        dose_summation_type=summation)
    if beam_number is not None:
        beam = Dataset()
        beam.ReferencedBeamNumber = beam_number
        group = Dataset()
        group.ReferencedFractionGroupNumber = 1
        group.ReferencedBeamSequence = DicomSequence([beam])
        ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence = DicomSequence([group])
    return ds


def _split_in_two(patient) -> tuple[np.ndarray, np.ndarray]:
    """Two beam doses whose stored integers add up exactly to the plan dose's."""
    scaling = float(patient.rtdose.DoseGridScaling)
    stored = _stored(patient.rtdose).astype(np.int64)
    first = (stored * 2) // 5
    return first * scaling, (stored - first) * scaling


# -- one dataset ----------------------------------------------------------------------------------


def test_phantom_rtdose_round_trip_equals_the_phantom_dose(patient):
    ds = _file_round_trip(patient.rtdose)
    volume = read_rtdose(ds, frame_of_reference_uid=patient.volume.frame_of_reference_uid)
    _assert_same_dose(volume, patient.dose)
    assert volume.frame_of_reference_uid == patient.volume.frame_of_reference_uid


def test_absolute_grid_frame_offsets_read_like_relative(patient):
    ds = copy.deepcopy(patient.rtdose)
    z0 = float(ds.ImagePositionPatient[2])
    ds.GridFrameOffsetVector = [f"{z0 + float(o):.3f}" for o in patient.dose.slice_offsets]
    assert float(ds.GridFrameOffsetVector[0]) != 0.0
    _assert_same_dose(read_rtdose(_file_round_trip(ds)), patient.dose)


def test_offsets_neither_relative_nor_absolute_are_refused(patient):
    ds = copy.deepcopy(patient.rtdose)
    ds.GridFrameOffsetVector = [f"{7.0 + float(o):.3f}" for o in patient.dose.slice_offsets]
    with pytest.raises(DoseError, match="neither 0 .* nor the ImagePositionPatient z"):
        read_rtdose(ds)


@pytest.mark.parametrize("absolute", [False, True])
def test_reversed_frame_order_is_put_back(patient, absolute):
    ds = copy.deepcopy(patient.rtdose)
    offsets = np.asarray(patient.dose.slice_offsets)
    ds.PixelData = _stored(patient.rtdose)[::-1].astype("<u4").tobytes()
    top = np.asarray(patient.dose.origin) + patient.dose.normal * offsets[-1]
    ds.ImagePositionPatient = [f"{v:.3f}" for v in top]
    relative = offsets[::-1] - offsets[-1]  # 0, -g, -2g ...: frames run against the normal
    ds.GridFrameOffsetVector = [f"{(top[2] + r) if absolute else r:.3f}" for r in relative]
    _assert_same_dose(read_rtdose(_file_round_trip(ds)), patient.dose)


def test_sixteen_bit_dose_grid(patient):
    ds = copy.deepcopy(patient.rtdose)
    scaling = float(np.ceil(patient.dose.array.max() / 65000.0 * 1e6) / 1e6)
    stored16 = np.rint(np.asarray(patient.dose.array) / scaling).astype("<u2")
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.DoseGridScaling = f"{scaling:.6g}"
    ds.PixelData = stored16.tobytes()
    volume = read_rtdose(_file_round_trip(ds))
    np.testing.assert_allclose(volume.array, stored16 * float(ds.DoseGridScaling), rtol=1e-6, atol=1e-5)
    assert np.max(np.abs(volume.array - patient.dose.array)) <= scaling


def test_single_frame_dose_without_offset_vector(patient):
    ds = copy.deepcopy(patient.rtdose)
    ds.NumberOfFrames = 1
    ds.PixelData = _stored(patient.rtdose)[3:4].astype("<u4").tobytes()
    z = float(patient.dose.slice_position(3)[2])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], f"{z:.3f}"]
    del ds.GridFrameOffsetVector
    volume = read_rtdose(_file_round_trip(ds))
    assert volume.shape == (1, *patient.dose.shape[1:])
    np.testing.assert_allclose(volume.array[0], patient.dose.array[3], rtol=1e-6, atol=1e-5)


def test_relative_units_refused_with_a_clear_message(patient):
    ds = copy.deepcopy(patient.rtdose)
    ds.DoseUnits = "RELATIVE"
    with pytest.raises(DoseError) as info:
        read_rtdose(ds)
    message = str(info.value)
    assert "RELATIVE" in message and "GY" in message and str(ds.SOPInstanceUID) in message


def test_mismatched_frame_of_reference_refused_naming_both(patient):
    other = generate_uid()
    with pytest.raises(DoseError) as info:
        read_rtdose(patient.rtdose, frame_of_reference_uid=other)
    assert other in str(info.value) and patient.volume.frame_of_reference_uid in str(info.value)


def test_dose_without_pixel_data_refused(patient):
    ds = copy.deepcopy(patient.rtdose)
    del ds.PixelData
    with pytest.raises(DoseError, match="no dose grid"):
        read_rtdose(ds)


def test_dvh_only_rtdose_is_not_a_candidate(patient):
    dvh_only = _beam(patient, np.asarray(patient.dose.array), plan_uid=generate_uid(), summation="PLAN")
    del dvh_only.PixelData
    selection = select_dose_datasets([dvh_only, patient.rtdose])
    assert selection.sop_instance_uids == (str(patient.rtdose.SOPInstanceUID),)


def test_dose_type_error_refused(patient):
    ds = copy.deepcopy(patient.rtdose)
    ds.DoseType = "ERROR"
    with pytest.raises(DoseError, match="ERROR"):
        read_rtdose(ds)


# -- the doses of a case --------------------------------------------------------------------------


def test_two_beam_doses_of_one_plan_sum_to_the_plan_dose(patient):
    plan_uid = str(patient.rtdose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID)
    a, b = _split_in_two(patient)
    beams = [_file_round_trip(_beam(patient, a, plan_uid=plan_uid)),
             _file_round_trip(_beam(patient, b, plan_uid=plan_uid))]
    selection = select_dose_datasets(beams)
    assert selection.summation == "BEAM" and selection.plan_uid == plan_uid
    assert selection.sop_instance_uids == tuple(str(d.SOPInstanceUID) for d in beams)
    summed = select_case_dose(beams, frame_of_reference_uid=patient.volume.frame_of_reference_uid)
    _assert_same_dose(summed, read_rtdose(patient.rtdose))


def test_plan_dose_preferred_over_beams_of_the_same_plan(patient):
    plan_uid = str(patient.rtdose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID)
    a, _ = _split_in_two(patient)
    selection = select_dose_datasets([_beam(patient, a, plan_uid=plan_uid), patient.rtdose])
    assert selection.summation == "PLAN"
    assert selection.sop_instance_uids == (str(patient.rtdose.SOPInstanceUID),)


def test_same_instance_twice_counts_once(patient):
    assert select_dose_datasets([patient.rtdose, copy.deepcopy(patient.rtdose)]).summation == "PLAN"


def test_two_plan_doses_are_ambiguous(patient):
    second = _beam(patient, np.asarray(patient.dose.array), plan_uid=generate_uid(), summation="PLAN")
    with pytest.raises(DoseError) as info:
        select_case_dose([patient.rtdose, second])
    message = str(info.value)
    assert "2 PLAN doses" in message
    assert str(patient.rtdose.SOPInstanceUID) in message and str(second.SOPInstanceUID) in message


def test_beams_of_different_plans_are_ambiguous(patient):
    a, b = _split_in_two(patient)
    beams = [_beam(patient, a, plan_uid=generate_uid()), _beam(patient, b, plan_uid=generate_uid())]
    with pytest.raises(DoseError, match="same single RT Plan"):
        select_case_dose(beams)


def test_plan_dose_with_beams_of_another_plan_is_ambiguous(patient):
    a, _ = _split_in_two(patient)
    with pytest.raises(DoseError, match="do not belong to its plan"):
        select_case_dose([patient.rtdose, _beam(patient, a, plan_uid=generate_uid())])


def test_fraction_and_plan_mixture_is_ambiguous(patient):
    fraction = _beam(patient, np.asarray(patient.dose.array) / 25.0, plan_uid=generate_uid(), summation="FRACTION")
    with pytest.raises(DoseError) as info:
        select_case_dose([patient.rtdose, fraction])
    assert "FRACTION" in str(info.value) and "PLAN" in str(info.value)


def test_beams_on_different_grids_are_not_summed(patient):
    plan_uid = generate_uid()
    a, b = _split_in_two(patient)
    d = patient.dose
    shifted = Volume(array=b, origin=(d.origin[0] + 2.5, d.origin[1], d.origin[2]), row_direction=d.row_direction,
                     column_direction=d.column_direction, pixel_spacing=d.pixel_spacing,
                     slice_offsets=d.slice_offsets, frame_of_reference_uid=d.frame_of_reference_uid)
    beams = [_beam(patient, a, plan_uid=plan_uid), _beam(patient, b, plan_uid=plan_uid, dose=shifted)]
    with pytest.raises(DoseError, match="different grid"):
        select_case_dose(beams)


def test_beams_checked_against_the_plan_when_it_is_known(patient):
    plan_uid = generate_uid()
    a, b = _split_in_two(patient)
    plan = Dataset()
    plan.SOPInstanceUID = plan_uid
    plan.BeamSequence = DicomSequence()
    for number in (1, 2, 3):
        beam = Dataset()
        beam.BeamNumber = number
        beam.TreatmentDeliveryType = "TREATMENT"
        plan.BeamSequence.append(beam)
    beams = [_beam(patient, a, plan_uid=plan_uid, beam_number=1), _beam(patient, b, plan_uid=plan_uid, beam_number=2)]
    with pytest.raises(DoseError, match=r"treatment beams are \[1, 2, 3\].*cover beams \[1, 2\]"):
        select_case_dose(beams, rtplans=[plan])
    plan.BeamSequence[2].TreatmentDeliveryType = "SETUP"  # a setup beam carries no dose
    assert select_dose_datasets(beams, rtplans=[plan]).summation == "BEAM"


def test_no_dose_at_all(patient):
    with pytest.raises(MissingDoseError, match="no RTDOSE"):
        select_case_dose([])
