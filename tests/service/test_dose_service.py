"""Dose through the running service: a phantom pushed by dcmtk, a correction reported (dose rows, delta,
corrected RTSTRUCT + SR received by dcmtk storescp), and the `heartloop dose` commands."""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from heartloop.core import OutboxState
from heartloop.dicom_node.rtstruct import RoiSpec, build_rtstruct
from heartloop.dose import dose_on_mask
from heartloop.phantom import make_patient, write_patient
from heartloop.service.cli import main
from heartloop.service.dose import case_dose, record_structure_dose, report_correction
from heartloop.service.lifecycle import load_case_volume
from tests.helpers.dcmtk import StoreSCP, storescu
from tests.helpers.procs import free_port, wait_for
from tests.helpers.service import ASSEMBLED, running_service

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
LOOSE = {"delta_max_gy": 1000.0, "delta_d2_gy": 1000.0, "delta_d98_gy": 1000.0, "delta_v_pct": 100.0,
         "delta_volume_pct": 1000.0}


def _settings(make_settings, tps_port: int, **dose):
    return make_settings(
        node={"port": free_port()},
        series={"stable_age_s": 0.5, "poll_interval_s": 0.2, "min_slices": 5},
        outbox={"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "poll_interval_s": 0.2},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}],
        limits={"min_free_disk_bytes": 1048576},
        dose=dose,
    )


def _push_case(service, files, frame_uid: str, *, with_dose: bool):
    result = storescu(files, service.scp.port)
    assert len(result.sent_ok) == len(files), result.output
    case = wait_for(lambda: next((c for c in service.store.list_cases(ASSEMBLED)
                                  if c.frame_of_reference_uid == frame_uid), None), 20, what="case READY")
    if with_dose:
        wait_for(lambda: service.store.linked_series(case.id, "RTDOSE"), 20, what="RTDOSE linked")
    return case


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_correction_report_end_to_end(make_settings, tmp_path):
    tps_port = free_port()
    settings = _settings(make_settings, tps_port, delta_mean_gy=0.001, **LOOSE)
    patient = make_patient(23, rows=128, n_slices=40)
    pdir = write_patient(patient, tmp_path / "tps-export")
    no_dose = make_patient(24, rows=64, n_slices=20)
    no_dose_dir = write_patient(no_dose, tmp_path / "tps-export")
    relative = make_patient(25, rows=64, n_slices=20)
    relative_dir = write_patient(relative, tmp_path / "tps-export")
    rd = pydicom.dcmread(relative_dir / "RD.dcm")
    rd.DoseUnits = "RELATIVE"
    rd.save_as(relative_dir / "RD.dcm")
    tps = StoreSCP(tmp_path / "tps-received", port=tps_port).start()
    try:
        with running_service(settings) as service:
            store = service.store
            case = _push_case(service, sorted(pdir.glob("*.dcm")), patient.volume.frame_of_reference_uid,
                              with_dose=True)
            ct = load_case_volume(store, case.id, settings)
            truth = ct.with_array(patient.heart_mask)
            eroded = ct.with_array(ndimage.binary_erosion(patient.heart_mask, iterations=2))
            dose = case_dose(store, settings, case.id)
            assert dose.same_grid(patient.dose)
            np.testing.assert_allclose(dose.array, patient.dose.array, rtol=1e-6, atol=1e-5)

            result = report_correction(store, settings, case.id, predicted=eroded, corrected=truth,
                                       model_version="000003", corrected_by="Curie^Marie")

            # Dose rows and the delta are stored, with the numbers dose_on_mask gives.
            assert result["status"] == "REPORTED" and result["reason"] is None
            expected_true = dose_on_mask(truth, patient.dose, supersample=settings.dose.supersample)
            expected_eroded = dose_on_mask(eroded, patient.dose, supersample=settings.dose.supersample)
            rows = {r.label: r for r in store.dose_results(case.id)}
            assert set(rows) == {"predicted", "corrected"}
            assert rows["corrected"].mean_gy == pytest.approx(expected_true.mean_gy, rel=1e-5)
            assert rows["predicted"].mean_gy == pytest.approx(expected_eroded.mean_gy, rel=1e-5)
            assert rows["corrected"].rtstruct_sop_instance_uid == result["rtstruct_sop_instance_uid"]
            assert json.loads(rows["corrected"].rtdose_sop_instance_uids) == [str(patient.rtdose.SOPInstanceUID)]
            assert rows["predicted"].model_version == "000003"
            metrics = json.loads(rows["corrected"].metrics_json)
            assert metrics["volume_cc"] == pytest.approx(expected_true.volume_cc, rel=1e-6)
            assert metrics["dvh_volume_pct"][0] == pytest.approx(100.0)
            (delta,) = store.dose_deltas(case.id)
            assert (delta.reference_label, delta.other_label) == ("predicted", "corrected")
            assert delta.mean_delta_gy == pytest.approx(expected_true.mean_gy - expected_eroded.mean_gy, rel=1e-4)
            assert delta.flagged and result["flagged"]
            reasons = json.loads(delta.reasons)
            assert len(reasons) == 1 and reasons[0].startswith("mean heart dose differs by")
            assert (delta.reference_result_id, delta.other_result_id) == (rows["predicted"].id, rows["corrected"].id)

            # With the default mean threshold (0.5 Gy) this phantom's |Δ| (~0.37 Gy) is not flagged.
            calm = _settings(make_settings, tps_port, **LOOSE)
            assert 0.1 < abs(delta.mean_delta_gy) < calm.dose.delta_mean_gy == 0.5
            again = report_correction(store, calm, case.id, predicted=eroded, corrected=truth,
                                      model_version="000003", corrected_by="Curie^Marie")
            assert again["status"] == "REPORTED" and not again["flagged"] and again["reasons"] == []
            assert store.dose_deltas(case.id)[-1].flagged is False

            # record_structure_dose stores any labelled structure.
            stats = record_structure_dose(store, settings, case.id, truth, label="model:000003",
                                          model_version="000003", description="cohort re-run")
            assert stats.mean_gy == pytest.approx(expected_true.mean_gy, rel=1e-5)
            assert store.dose_results(case.id, label="model:000003")[0].description == "cohort re-run"

            # An empty prediction: the corrected structure, its dose and a report of it alone; no delta.
            n_deltas, n_outputs = len(store.dose_deltas(case.id)), len(store.outputs(case.id))
            nothing = ct.with_array(np.zeros_like(patient.heart_mask))
            empty = report_correction(store, settings, case.id, predicted=nothing, corrected=truth,
                                      model_version="000003", corrected_by="Curie^Marie")
            assert empty["status"] == "EMPTY_PREDICTION" and "delta_id" not in empty and "mean_delta_gy" not in empty
            # The TPS still gets the corrected heart's dose: an SR without a predicted contour.
            assert empty["report_sop_instance_uid"] and empty["report_outbox_id"]
            assert empty["corrected"]["mean_gy"] == pytest.approx(expected_true.mean_gy, rel=1e-5)
            assert len(store.dose_deltas(case.id)) == n_deltas and len(store.outputs(case.id)) == n_outputs + 2
            # An empty correction is refused before anything is queued.
            with pytest.raises(ValueError, match="empty"):
                report_correction(store, settings, case.id, predicted=truth, corrected=nothing,
                                  model_version="000003", corrected_by="Curie^Marie")
            assert len(store.outputs(case.id)) == n_outputs + 2

            # A case without RTDOSE: the structure goes out, no dose rows, no report.
            bare = _push_case(service, sorted(no_dose_dir.glob("CT_*.dcm")), no_dose.volume.frame_of_reference_uid,
                              with_dose=False)
            bare_ct = load_case_volume(store, bare.id, settings)
            bare_result = report_correction(store, settings, bare.id,
                                            predicted=bare_ct.with_array(no_dose.heart_mask),
                                            corrected=bare_ct.with_array(no_dose.heart_mask),
                                            model_version="000003", corrected_by="Curie^Marie")
            assert bare_result["status"] == "NO_RTDOSE" and "no RTDOSE" in bare_result["reason"]
            assert "report_sop_instance_uid" not in bare_result
            assert store.dose_results(bare.id) == [] and store.dose_deltas(bare.id) == []
            assert [o.sop_class_uid for o in store.outputs(bare.id)] == ["1.2.840.10008.5.1.4.1.1.481.3"]

            # A RELATIVE dose: the same, with the reason a physicist can act on.
            rel = _push_case(service, sorted(relative_dir.glob("*.dcm")), relative.volume.frame_of_reference_uid,
                             with_dose=True)
            rel_ct = load_case_volume(store, rel.id, settings)
            rel_result = report_correction(store, settings, rel.id,
                                           predicted=rel_ct.with_array(relative.heart_mask),
                                           corrected=rel_ct.with_array(relative.heart_mask),
                                           model_version="000003", corrected_by="Curie^Marie")
            assert rel_result["status"] == "DOSE_ERROR" and "RELATIVE" in rel_result["reason"]
            assert store.dose_results(rel.id) == []

            # Everything queued is delivered to the TPS.
            wait_for(lambda: all(o.state == OutboxState.SENT.value for o in store.outputs()), 30, what="all SENT")
            received = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in tps.received())}
            assert set(received) == {o.sop_instance_uid for o in store.outputs()}

        rtstruct = received[result["rtstruct_sop_instance_uid"]]
        assert rtstruct.Modality == "RTSTRUCT"
        assert rtstruct.StructureSetROISequence[0].ROIName == settings.rtstruct.corrected_roi_name == "Heart"
        assert rtstruct.StructureSetROISequence[0].ROIGenerationAlgorithm == "SEMIAUTOMATIC"
        assert str(rtstruct.OperatorsName) == "Curie^Marie"
        sr = received[result["report_sop_instance_uid"]]
        assert sr.SOPClassUID == SR_STORAGE
        assert sr.StudyInstanceUID == patient.ct_datasets[0].StudyInstanceUID
        assert sr.PatientID == patient.patient_id
        items = list(_walk(sr.ContentSequence))
        referenced = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in items if i.ValueType == "COMPOSITE"}
        assert referenced == {result["rtstruct_sop_instance_uid"], str(patient.rtdose.SOPInstanceUID)}
        means = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                 if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "128533"]
        assert means == pytest.approx([expected_eroded.mean_gy, expected_true.mean_gy], abs=1e-4)
        assert [str(i.PersonName) for i in items if i.ValueType == "PNAME"] == ["Curie^Marie"]
        assert "000003" in {str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    finally:
        tps.stop()

    # `heartloop dose export`: every row, as JSON and as CSV.
    root = str(settings.storage_root)
    out = tmp_path / "dose.json"
    assert main(["dose", "export", "--data-dir", root, "--format", "json", "--out", str(out)]) == 0
    exported = json.loads(out.read_text())
    assert {(r["case_id"], r["label"]) for r in exported["results"]} >= {(case.id, "predicted"), (case.id, "corrected"),
                                                                          (case.id, "model:000003")}
    assert exported["deltas"][0]["case_id"] == case.id and exported["deltas"][0]["flagged"] is True
    assert exported["deltas"][0]["mean_delta_gy"] == pytest.approx(result["mean_delta_gy"])
    csv_out = tmp_path / "dose.csv"
    assert main(["dose", "export", "--data-dir", root, "--out", str(csv_out)]) == 0
    table = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    kinds = [r["kind"] for r in table]
    assert kinds.count("result") == len(exported["results"]) and kinds.count("delta") == len(exported["deltas"])
    first_corrected = next(r for r in table if r["label"] == "corrected")
    assert float(first_corrected["mean_gy"]) == pytest.approx(expected_true.mean_gy, rel=1e-6)
    assert float(first_corrected["volume_cc"]) == pytest.approx(expected_true.volume_cc, rel=1e-6)
    assert patient.patient_id not in csv_out.read_text()


# -- heartloop dose stats ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    patient = make_patient(29, rows=128, n_slices=40)
    directory = write_patient(patient, tmp_path_factory.mktemp("phantom"))
    mask = patient.volume.with_array(patient.heart_mask)
    rtstruct = build_rtstruct(mask, patient.ct_datasets, roi=RoiSpec(name="Heart"), model_version="000001")
    pydicom.dcmwrite(directory / "RS.dcm", rtstruct, enforce_file_format=True)
    return patient, directory


def test_dose_stats_json_matches_dose_on_mask(phantom_files, tmp_path):
    patient, directory = phantom_files
    png = tmp_path / "dvh.png"
    r = subprocess.run([sys.executable, "-m", "heartloop", "dose", "stats", "--rtstruct", str(directory / "RS.dcm"),
                        "--rtdose", str(directory / "RD.dcm"), "--json", "--plot", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    stats = json.loads(lines[0])
    for key in ("volume_cc", "mean_gy", "min_gy", "max_gy", "d2_gy", "d98_gy", "v5_pct", "v10_pct", "v20_pct",
                "v30_pct"):
        assert isinstance(stats[key], float), key
    expected = dose_on_mask(patient.volume.with_array(patient.heart_mask), patient.dose)
    assert stats["mean_gy"] == pytest.approx(expected.mean_gy, rel=0.01)
    assert stats["volume_cc"] == pytest.approx(expected.volume_cc, rel=0.01)
    assert stats["roi_name"] == "Heart"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dose_stats_text_output(phantom_files, capsys):
    _, directory = phantom_files
    assert main(["dose", "stats", "--rtstruct", str(directory / "RS.dcm"), "--rtdose", str(directory / "RD.dcm")]) == 0
    out = capsys.readouterr().out
    assert "ROI 'Heart'" in out and "mean_gy" in out and " Gy" in out


def test_dose_stats_clear_errors(phantom_files, tmp_path, capsys):
    patient, directory = phantom_files
    rs, rd = str(directory / "RS.dcm"), str(directory / "RD.dcm")

    assert main(["dose", "stats", "--rtstruct", rs, "--rtdose", rd, "--roi", "Lung_L"]) == 2
    err = capsys.readouterr().err
    assert "no ROI named 'Lung_L'" in err and "available ROIs: ['Heart']" in err

    relative = copy.deepcopy(pydicom.dcmread(rd))
    relative.DoseUnits = "RELATIVE"
    relative.save_as(tmp_path / "RD_relative.dcm")
    assert main(["dose", "stats", "--rtstruct", rs, "--rtdose", str(tmp_path / "RD_relative.dcm")]) == 2
    assert "RELATIVE" in capsys.readouterr().err

    other = pydicom.dcmread(rd)
    other.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    other.save_as(tmp_path / "RD_other_frame.dcm")
    assert main(["dose", "stats", "--rtstruct", rs, "--rtdose", str(tmp_path / "RD_other_frame.dcm")]) == 2
    err = capsys.readouterr().err
    assert "1.2.826.0.1.3680043.8.498.1" in err and patient.volume.frame_of_reference_uid in err

    assert main(["dose", "stats", "--rtstruct", rd, "--rtdose", rd]) == 2
    assert "is not an RTSTRUCT" in capsys.readouterr().err
