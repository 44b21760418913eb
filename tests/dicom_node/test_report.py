"""The dose report (Comprehensive SR): dciodvfy-clean, values in Gy (UCUM), references, model, person."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from heartloop.dicom_node.report import (
    COMPREHENSIVE_SR_STORAGE,
    PRIVATE_SCHEME,
    Codes,
    ContourDose,
    InstanceRef,
    build_dose_report,
)
from heartloop.dicom_node.rtstruct import RoiSpec, build_rtstruct
from heartloop.phantom import make_patient


@pytest.fixture(scope="module")
def case():
    patient = make_patient(11, rows=64, n_slices=20)
    mask = patient.volume.with_array(patient.heart_mask)
    predicted = build_rtstruct(mask, patient.ct_datasets, roi=RoiSpec(name="Heart_AI"), model_version="000007")
    corrected = build_rtstruct(mask, patient.ct_datasets, roi=RoiSpec(name="Heart", algorithm="SEMIAUTOMATIC"),
                               model_version="000007", operator="Curie^Marie")
    return patient, predicted, corrected


def _report(case, **overrides):
    patient, predicted, corrected = case
    kwargs = dict(
        predicted=ContourDose(3.2117, "Heart_AI", InstanceRef.from_dataset(predicted), 601.25),
        corrected=ContourDose(3.6342, "Heart", InstanceRef.from_dataset(corrected), 640.5),
        rtdoses=[InstanceRef.from_dataset(patient.rtdose)],
        model_version="000007",
        corrected_by="Curie^Marie",
        assessment="Within thresholds (mean heart dose difference 0.42 Gy, threshold 0.5 Gy)",
    )
    kwargs.update(overrides)
    return build_dose_report(patient.ct_datasets[0], **kwargs)


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _name(item) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def _num(item) -> tuple[float, str, str]:
    value = item.MeasuredValueSequence[0]
    unit = value.MeasurementUnitsCodeSequence[0]
    return float(value.NumericValue), str(unit.CodeValue), str(unit.CodingSchemeDesignator)


def _written(tmp_path: Path, ds) -> Path:
    path = tmp_path / "report.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    r = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    output = r.stdout + r.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def test_report_passes_dciodvfy_without_errors(case, tmp_path):
    errors, output = _dciodvfy_errors(_written(tmp_path, _report(case)))
    assert errors == [], output
    assert "ComprehensiveSR" in output


def test_report_without_predicted_rtstruct_and_non_ascii_text_passes_dciodvfy(case, tmp_path):
    ds = _report(case, predicted=ContourDose(2.5, "Heart_AI"), corrected_by="Müller^Jörg",
                 assessment="Flagged: volume differs by 12.0 % (600.0 → 672.0 cc; > 10 %)")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    path = _written(tmp_path, ds)
    errors, output = _dciodvfy_errors(path)
    assert errors == [], output
    back = pydicom.dcmread(path)
    names = [str(i.PersonName) for i in _walk(back.ContentSequence) if i.ValueType == "PNAME"]
    assert names == ["Müller^Jörg"]


def test_report_values_units_and_concepts(case, tmp_path):
    back = pydicom.dcmread(_written(tmp_path, _report(case)))
    assert back.SOPClassUID == COMPREHENSIVE_SR_STORAGE and back.Modality == "SR"
    assert _name(back) == (PRIVATE_SCHEME, Codes.REPORT.value)
    containers = {_name(i): i for i in back.ContentSequence if i.ValueType == "CONTAINER"}
    means = {}
    for key, label in ((Codes.PREDICTED_CONTOUR, "predicted"), (Codes.CORRECTED_CONTOUR, "corrected")):
        container = containers[(PRIVATE_SCHEME, key.value)]
        nums = [i for i in container.ContentSequence if i.ValueType == "NUM"]
        mean = next(i for i in nums if _name(i) == ("DCM", "128533"))
        assert mean.ConceptNameCodeSequence[0].CodeMeaning == "Mean Absorbed Radiation Dose"
        value, unit, scheme = _num(mean)
        assert (unit, scheme) == ("Gy", "UCUM")
        means[label] = value
        volume = next(i for i in nums if _name(i) == ("SCT", "118565006"))
        assert _num(volume)[1:] == ("cm3", "UCUM")
    assert means == {"predicted": pytest.approx(3.2117), "corrected": pytest.approx(3.6342)}
    difference = next(i for i in back.ContentSequence if _name(i) == (PRIVATE_SCHEME, Codes.MEAN_DOSE_DIFFERENCE.value))
    value, unit, scheme = _num(difference)
    assert value == pytest.approx(3.6342 - 3.2117, abs=1e-4) and (unit, scheme) == ("Gy", "UCUM")
    # The private coding scheme is declared.
    assert [str(s.CodingSchemeDesignator) for s in back.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"


def test_report_references_structures_dose_model_and_person(case, tmp_path):
    patient, predicted, corrected = case
    back = pydicom.dcmread(_written(tmp_path, _report(case)))
    refs = {
        (_name(i), str(i.ReferencedSOPSequence[0].ReferencedSOPClassUID), str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        for i in _walk(back.ContentSequence) if i.ValueType == "COMPOSITE"
    }
    assert (("DCM", "121112"), str(predicted.SOPClassUID), str(predicted.SOPInstanceUID)) in refs
    assert (("DCM", "121112"), str(corrected.SOPClassUID), str(corrected.SOPInstanceUID)) in refs
    assert ((PRIVATE_SCHEME, Codes.DOSE_USED.value), str(patient.rtdose.SOPClassUID),
            str(patient.rtdose.SOPInstanceUID)) in refs
    evidence = {str(s.ReferencedSOPInstanceUID)
                for study in back.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for s in series.ReferencedSOPSequence}
    assert evidence == {str(predicted.SOPInstanceUID), str(corrected.SOPInstanceUID), str(patient.rtdose.SOPInstanceUID)}
    texts = {_name(i): str(i.TextValue) for i in _walk(back.ContentSequence) if i.ValueType == "TEXT"}
    assert texts[("DCM", "111003")] == "000007"
    assert texts[("DCM", "111001")] == "HeartLoop heart contouring"
    persons = {_name(i): str(i.PersonName) for i in _walk(back.ContentSequence) if i.ValueType == "PNAME"}
    assert persons == {(PRIVATE_SCHEME, Codes.CORRECTED_BY.value): "Curie^Marie"}


def test_report_in_the_ct_patient_and_study_with_new_uids(case, tmp_path):
    patient, predicted, corrected = case
    ct = patient.ct_datasets[0]
    first = _report(case)
    second = _report(case)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "AccessionNumber", "StudyDate"):
        assert str(first[keyword].value) == str(ct[keyword].value), keyword
    uids = {str(ct.SeriesInstanceUID), str(corrected.SeriesInstanceUID), str(patient.rtdose.SeriesInstanceUID)}
    assert str(first.SeriesInstanceUID) not in uids
    assert first.SeriesInstanceUID != second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID


def test_report_refuses_what_it_cannot_state(case):
    patient, predicted, corrected = case
    with pytest.raises(ValueError, match="corrected contour's RTSTRUCT is required"):
        _report(case, corrected=ContourDose(3.0, "Heart"))
    with pytest.raises(ValueError, match="no RTDOSE"):
        _report(case, rtdoses=[])
    with pytest.raises(ValueError, match="corrected_by"):
        _report(case, corrected_by=" ")
    other_study = InstanceRef(str(corrected.SOPClassUID), str(corrected.SOPInstanceUID), str(corrected.SeriesInstanceUID),
                              generate_uid())
    with pytest.raises(ValueError, match="not in the CT's study"):
        _report(case, corrected=ContourDose(3.0, "Heart", other_study))
    with pytest.raises(ValueError, match="finite non-negative"):
        ContourDose(float("nan"), "Heart")


def test_report_without_a_prediction_gives_the_corrected_dose_alone(case, tmp_path):
    """Cold start: the heart was drawn by hand. The TPS still gets its mean dose, with no difference."""
    path = _written(tmp_path, _report(case, predicted=None))
    errors, output = _dciodvfy_errors(path)
    assert errors == [], output
    back = pydicom.dcmread(path)
    concepts = [str(i.ConceptNameCodeSequence[0].CodeValue) for i in _walk(back.ContentSequence)]
    assert Codes.CORRECTED_CONTOUR.value in concepts
    assert Codes.PREDICTED_CONTOUR.value not in concepts
    assert Codes.MEAN_DOSE_DIFFERENCE.value not in concepts
