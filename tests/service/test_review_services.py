"""`make_ui_services` and what a save sets off, in process: the correction row (time, Dice), the
finalise job (corrected RTSTRUCT with the reviewer and approval status, SR), SENT only after
delivery, failures as readable reasons, the reviewer's box limiting (re-)predictions, the dose on
the CT grid, models, rollback and the trainer's status."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from heartloop.contouring.inference import MODEL_KIND, settings_to_dict
from heartloop.contouring.registry import ModelMeta
from heartloop.contouring.training import Learner
from heartloop.core import CaseState
from heartloop.dose import dose_on_grid
from heartloop.phantom import make_patient, write_patient
from heartloop.review_ui.services import CorrectionRequest
from heartloop.service.contouring import JOB_CONTOUR, ContouringStage, mask_to_npz
from heartloop.service.corrections import JOB_FINALISE, finalise_correction, mark_sent_cases
from heartloop.service.review import ensure_first_admin, make_ui_services
from heartloop.service.training import WAITING, write_trainer_status
from heartloop.store import Store
from tests.service.test_corrections import ingest
from tests.service.test_trainer_process import TINY

TPS = [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104}]


@pytest.fixture
def env(make_settings):
    settings = make_settings(series={"min_slices": 5}, compute={"device": "cpu"}, destinations=TPS,
                             rtstruct={"corrected_approval_status": "APPROVED"})
    store = Store.from_settings(settings)
    stage = ContouringStage(store, settings)
    yield settings, store, stage, make_ui_services(store, settings, stage)
    store.dispose()


def add_patient(store, settings, patient, tmp_path, *, prediction: np.ndarray | None, with_dose: bool = True) -> int:
    directory = write_patient(patient, tmp_path / "tps")
    files = sorted(directory.glob("CT_*.dcm")) + (sorted(directory.glob("RD*.dcm")) if with_dose else [])
    ingest(store, settings, files)
    case = next(c for c in store.list_cases() if c.frame_of_reference_uid == patient.volume.frame_of_reference_uid)
    if prediction is None:
        store.set_case_state(case.id, CaseState.NO_MODEL, "no model")
    else:
        rel = f"predictions/case{case.id:06d}/000001.npz"
        store.files.write_bytes(rel, mask_to_npz(prediction))
        store.record_prediction(case.id, model_version="000001", mask_path=rel, voxels=int(prediction.sum()),
                                volume_cc=1.0, seconds=0.1)
        store.set_case_state(case.id, CaseState.PREDICTED)
    return case.id


def _finalise_jobs(store):
    return [j for j in store.jobs("PENDING") if j.kind == JOB_FINALISE]


def test_save_finalise_and_sent_after_delivery(env, tmp_path):
    settings, store, _stage, services = env
    patient = make_patient(21, rows=64, n_slices=20)
    truth = patient.heart_mask
    predicted = np.roll(truth, 3, axis=2)
    case_id = add_patient(store, settings, patient, tmp_path, prediction=predicted)

    volume, version = services.load_prediction(case_id)
    assert version == "000001" and np.array_equal(volume.array, predicted)
    assert volume.frame_of_reference_uid == patient.volume.frame_of_reference_uid

    fg, bg = truth & ~predicted, predicted & ~truth
    result = services.save_correction(CorrectionRequest(case_id=case_id, foreground=fg, background=bg,
                                                        username="curie", person_name="Curie^Marie",
                                                        active_seconds=42.5))
    assert result["state"] == CaseState.CORRECTED.value
    row = store.latest_correction(case_id)
    assert row.id == result["correction_id"] and row.active_seconds == 42.5
    expected_dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert row.dice == pytest.approx(expected_dice)
    (job,) = _finalise_jobs(store)
    assert json.loads(job.payload_json) == {"case_id": case_id, "correction_id": row.id}
    assert mark_sent_cases(store) == 0  # nothing finalised, nothing sent

    claimed = store.claim_job(kinds=[JOB_FINALISE])
    report = finalise_correction(store, settings, json.loads(claimed.payload_json))
    store.finish_job(claimed.id)
    assert report["status"] == "REPORTED"
    outputs = store.outputs(case_id)
    assert len(outputs) == 2 and {o.destination for o in outputs} == {"tps"}
    rs = pydicom.dcmread(store.files.abspath(outputs[0].path))
    assert rs.Modality == "RTSTRUCT" and rs.StructureSetROISequence[0].ROIName == "Heart"
    assert rs.ApprovalStatus == "APPROVED" and str(rs.ReviewerName) == "Curie^Marie"
    assert rs.StructureSetROISequence[0].ROIGenerationAlgorithm == "SEMIAUTOMATIC"
    sr = pydicom.dcmread(store.files.abspath(outputs[1].path))
    assert sr.Modality == "SR"
    case = store.get_case(case_id)
    assert case.state == CaseState.CORRECTED.value and "dose report queued" in case.reason

    assert mark_sent_cases(store) == 0  # queued, not delivered
    store.mark_output_sent(outputs[0].id)
    assert mark_sent_cases(store) == 0  # the SR is still on its way
    store.mark_output_sent(outputs[1].id)
    assert mark_sent_cases(store) == 1
    assert store.get_case(case_id).state == CaseState.SENT.value
    (sent,) = store.audit_entries(action="send")
    assert sent.actor == "system" and sent.target == f"case:{case_id}"
    assert {o["sop_instance_uid"] for o in json.loads(sent.detail_json)["outputs"]} == \
        {outputs[0].sop_instance_uid, outputs[1].sop_instance_uid}
    assert store.verify_audit().ok
    assert [e.to_state for e in store.case_events(case_id)][-2:] == [CaseState.CORRECTED.value, CaseState.SENT.value]


def test_cold_start_without_dose_and_a_failing_finalise(env, tmp_path):
    settings, store, _stage, services = env
    patient = make_patient(22, rows=64, n_slices=20)
    case_id = add_patient(store, settings, patient, tmp_path, prediction=None, with_dose=False)
    assert services.load_prediction(case_id) is None
    assert services.load_dose(case_id) is None
    with pytest.raises(ValueError, match="empty"):
        services.save_correction(CorrectionRequest(case_id=case_id, foreground=np.zeros(patient.heart_mask.shape, bool),
                                                   background=np.zeros(patient.heart_mask.shape, bool),
                                                   username="u", person_name="U", kind="dense"))
    result = services.save_correction(CorrectionRequest(case_id=case_id, foreground=patient.heart_mask,
                                                        background=np.zeros_like(patient.heart_mask),
                                                        username="u", person_name="U", kind="dense"))
    row = store.get_correction(result["correction_id"])
    assert row.dice is None and row.active_seconds is None
    report = finalise_correction(store, settings, {"case_id": case_id, "correction_id": row.id})
    assert report["status"] == "NO_RTDOSE" and len(store.outputs(case_id)) == 1  # the structure goes alone
    assert "no dose report" in store.get_case(case_id).reason

    # A correction whose file vanished: the case says why, nothing is raised, nothing queued.
    again = services.save_correction(CorrectionRequest(case_id=case_id, foreground=patient.heart_mask,
                                                       background=np.zeros_like(patient.heart_mask),
                                                       username="u", person_name="U", kind="dense"))
    store.files.abspath(store.get_correction(again["correction_id"]).path).unlink()
    assert finalise_correction(store, settings, {"case_id": case_id, "correction_id": again["correction_id"]}) is None
    case = store.get_case(case_id)
    assert case.state == CaseState.FAILED.value and "corrected structure not sent" in case.reason
    assert len(store.outputs(case_id)) == 1
    # An older correction is never sent once a newer one exists.
    assert finalise_correction(store, settings, {"case_id": case_id, "correction_id": row.id}) is None


def test_dose_on_the_ct_grid(env, tmp_path):
    settings, store, _stage, services = env
    patient = make_patient(23, rows=64, n_slices=20)
    case_id = add_patient(store, settings, patient, tmp_path, prediction=None)
    dose = services.load_dose(case_id)
    assert dose.shape == patient.volume.shape and dose.array.dtype == np.float32
    expected = dose_on_grid(patient.dose, patient.volume).array
    assert float(np.abs(dose.array - expected).max()) < 0.01 * float(expected.max())  # RTDOSE quantisation
    with pytest.raises(KeyError):
        services.load_dose(999)


def _register(registry, seed: int) -> str:
    learner = Learner.fresh(TINY, seed=seed)
    version = registry.register(learner.weights(), ModelMeta(kind=MODEL_KIND, settings=settings_to_dict(TINY),
                                                             n_train_cases=seed, val_dice=0.5))
    registry.promote(version)
    return version


def test_reviewer_box_limits_predictions_until_cleared(env, tmp_path):
    settings, store, stage, services = env
    patient = make_patient(24, rows=64, n_slices=20)
    case_id = add_patient(store, settings, patient, tmp_path, prediction=None)
    with pytest.raises(ValueError, match="no model"):
        services.request_prediction(case_id, [2, 10, 10, 40, 10, 40])
    _register(stage.registry, 1)
    with pytest.raises(ValueError, match="box"):
        services.request_prediction(case_id, [2, 10, 10])
    with pytest.raises(KeyError):
        services.request_prediction(999, None)

    box = [2, 10, 12, 40, 14, 44]
    services.request_prediction(case_id, box)
    job = store.claim_job(kinds=[JOB_CONTOUR])
    assert json.loads(job.payload_json) == {"case_id": case_id, "box": box}
    stage.run(json.loads(job.payload_json))
    store.finish_job(job.id)

    def outside_box_is_empty() -> bool:
        mask, _version = services.load_prediction(case_id)
        inside = np.zeros(mask.shape, dtype=bool)
        inside[2:10, 12:40, 14:44] = True
        return not (mask.array & ~inside).any()

    assert store.get_case(case_id).state == CaseState.PREDICTED.value
    assert outside_box_is_empty()
    n_before = len(store.predictions(case_id))
    stage.run({"case_id": case_id})  # a promotion's re-prediction keeps the reviewer's box
    assert len(store.predictions(case_id)) == n_before + 1 and outside_box_is_empty()
    services.request_prediction(case_id, None)  # cleared: the localiser decides again
    job = store.claim_job(kinds=[JOB_CONTOUR])
    assert json.loads(job.payload_json) == {"case_id": case_id, "box": None}


def test_models_rollback_and_trainer_status(env, make_settings):
    settings, store, stage, services = env
    status = services.trainer_status()
    assert status["state"] == WAITING and status["current_version"] is None and status["epochs"] == 0
    assert services.list_models() == []
    first, second = _register(stage.registry, 1), _register(stage.registry, 2)
    models = services.list_models()
    assert [m["version"] for m in models] == [second, first] and [m["current"] for m in models] == [True, False]
    assert set(models[0]) == {"version", "current", "parent", "val_dice", "train_cases", "val_cases", "created_at"}
    assert models[1]["train_cases"] == 1 and models[1]["val_dice"] == 0.5
    services.rollback_model(first)
    assert services.trainer_status()["current_version"] == first
    assert [m["current"] for m in services.list_models()] == [False, True]
    with pytest.raises(KeyError):
        services.rollback_model("000099")

    write_trainer_status(settings, {"state": "training", "current_version": second, "best_val_dice": 0.8,
                                    "epochs": 7, "epochs_without_progress": 2, "train_cases": 3, "val_cases": 1,
                                    "updated_at": "2026-01-01T00:00:00+00:00"})
    status = services.trainer_status()
    assert status["state"] == "training" and status["epochs"] == 7 and status["train_cases"] == 3
    assert status["current_version"] == first  # the registry's word wins: the rollback applies at once
    off = make_ui_services(store, settings, stage, trainer_enabled=False)
    assert off.trainer_status()["state"] == "disabled"


def test_first_admin_once(env, capsys):
    _settings, store, _stage, _services = env
    said: list[str] = []
    assert ensure_first_admin(store, said.append, environ={}) == "admin"
    assert store.get_user("admin").role == "admin"
    assert "password: " in said[0] and "heartloop user passwd admin" in said[0]
    assert ensure_first_admin(store, said.append, environ={}) is None and len(said) == 1  # users exist: nothing
