"""The continual trainer process: learns from stored corrections, promotes a model, re-predicts
unreviewed cases; SIGKILL mid-epoch loses no promoted model and a restart resumes the epoch count."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
from scipy import ndimage

from heartloop.contouring.registry import ModelRegistry
from heartloop.contouring.settings import ContouringSettings
from heartloop.contouring.training import TrainerState
from heartloop.core import CaseState
from heartloop.phantom import make_patient
from heartloop.service.app import Service, trainer_enabled
from heartloop.service.contouring import JOB_CONTOUR, ContouringStage, models_dir
from heartloop.service.corrections import submit_correction
from heartloop.service.training import checkpoint_path, inference_waiting, read_trainer_status, run_trainer
from heartloop.store import Store
from tests.helpers.procs import free_port, wait_for
from tests.service.test_corrections import add_case

TINY = ContouringSettings(width=8, depth=2, groupnorm_groups=4, localiser_voxel_mm=(8.0, 8.0, 8.0),
                          organ_voxel_mm=(4.0, 4.0, 4.0), localiser_patch_size=(16, 32, 32),
                          organ_patch_size=(16, 32, 32), margin_mm=10.0, learning_rate=3e-3, device="cpu",
                          training_threads=1)


def _trainer_process(settings) -> None:  # runs in a spawned child
    run_trainer(settings, contouring=TINY, seed=0, idle_poll_s=0.2)


def _strokes(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a reviewer paints on a shifted prediction (as in tests/service/test_contouring_service.py)."""
    prediction = np.roll(truth, (0, 4, -3), axis=(0, 1, 2))
    strokes = np.zeros_like(truth)
    strokes[::2] = True
    ring = ndimage.binary_dilation(truth, iterations=4) & ~ndimage.binary_dilation(truth, iterations=2)
    return prediction, truth & ~prediction & strokes, ((prediction & ~truth) | ring) & strokes


def test_trainer_promotes_repredicts_survives_sigkill_and_resumes(make_settings, tmp_path):
    settings = make_settings(series={"min_slices": 5}, compute={"device": "cpu"})
    store = Store.from_settings(settings)
    registry = ModelRegistry(models_dir(settings))
    try:
        for seed in range(4):
            patient = make_patient(seed, rows=96, n_slices=32)
            prediction, fg, bg = _strokes(patient.heart_mask)
            case_id = add_case(store, settings, patient, tmp_path, prediction=prediction)
            submit_correction(store, settings, case_id, foreground=fg, background=bg, corrected_by="sim")
        unreviewed = add_case(store, settings, make_patient(9, rows=96, n_slices=32), tmp_path)  # NO_MODEL

        proc = multiprocessing.get_context("spawn").Process(target=_trainer_process, args=(settings,), daemon=True)
        proc.start()
        try:
            wait_for(lambda: registry.current() is not None and checkpoint_path(settings).exists(), 180,
                     interval_s=0.2, what="a promoted model and a checkpoint")
            promoted_at = time.monotonic()
            # The promotion queued the unreviewed case; the trainer pauses while it is predicted.
            job = wait_for(lambda: store.claim_job(kinds=[JOB_CONTOUR]), 10, what="a re-prediction job")
            assert job.payload_json == f'{{"case_id": {unreviewed}}}'
            ContouringStage(store, settings).run({"case_id": unreviewed})
            store.finish_job(job.id)
            assert store.get_case(unreviewed).state == CaseState.PREDICTED.value
            assert store.latest_prediction(unreviewed).model_version == registry.current().version
            print(f"first promotion, then a re-prediction, in {time.monotonic() - promoted_at:.1f} s")
            time.sleep(1.0)  # training again: well inside an epoch
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=10)
        finally:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL

        # No promoted model lost: every version intact and loadable, the current one valid.
        versions = registry.list()
        current = registry.current()
        assert versions and current is not None and current.version in {m.version for m in versions}
        for meta in versions:
            registry.load(meta.version)
        epoch_at_kill = TrainerState.resume(checkpoint_path(settings)).epoch
        assert epoch_at_kill >= 1
        # The status file the dashboard reads was kept up to date, epoch by epoch.
        status = read_trainer_status(settings)
        assert status["state"] in ("training", "yielding") and 1 <= status["epochs"] <= epoch_at_kill + 1
        assert status["train_cases"] == 3 and status["val_cases"] == 1 and status["current_version"] is not None
        # Splits are fixed in the store by RootPainter3D's rule: train, validation, train, train.
        assert [c.split for c in store.corrections()] == ["train", "validation", "train", "train"]

        for job in store.jobs("PENDING"):  # a later promotion's re-prediction would make the trainer wait
            if job.kind == JOB_CONTOUR:
                store.finish_job(job.id)
        # A restarted trainer resumes from the checkpoint: the epoch counter continues.
        assert run_trainer(settings, contouring=TINY, max_epochs=1, seed=1) == 1
        assert TrainerState.resume(checkpoint_path(settings)).epoch == epoch_at_kill + 1
        assert {m.version for m in versions} <= {m.version for m in registry.list()}

    finally:
        store.dispose()


def test_idle_trainer_waits_without_corrections(make_settings):
    settings = make_settings(series={"min_slices": 5})
    Store.from_settings(settings).dispose()
    started = time.monotonic()
    assert run_trainer(settings, contouring=TINY, max_epochs=1, idle_poll_s=0.05,
                       stop=_StopAfter(0.3)) == 0
    assert time.monotonic() - started < 5
    assert not checkpoint_path(settings).exists()
    assert read_trainer_status(settings)["state"] == "waiting for corrections"


class _StopAfter:
    """A stop signal that sets itself after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def is_set(self) -> bool:
        return time.monotonic() >= self.deadline

    def wait(self, timeout: float | None = None) -> bool:
        time.sleep(min(timeout or 0.0, max(0.0, self.deadline - time.monotonic())))
        return self.is_set()


def test_trainer_switch(make_settings, tmp_path):
    from heartloop.config import load_settings

    on = make_settings()
    off = make_settings(trainer={"enabled": False})
    assert trainer_enabled(on) and not trainer_enabled(on, False)
    assert not trainer_enabled(off) and trainer_enabled(off, True)
    env = load_settings(environ={"HEARTLOOP_TRAINER__ENABLED": "false", "HEARTLOOP_STORAGE__ROOT": str(tmp_path)})
    assert not trainer_enabled(env)


def test_service_starts_and_stops_its_trainer(make_settings):
    settings = make_settings(node={"port": free_port()}, series={"min_slices": 5}, http={"port": 0})
    service = Service(settings, trainer=True)
    service.start()
    try:
        trainer = service._trainer
        assert trainer is not None
        wait_for(trainer.is_alive, 10, what="trainer process alive")
        pid = trainer.pid
    finally:
        service.stop()
    assert not trainer.is_alive() and service._trainer is None
    assert pid is not None


def test_trainer_yields_only_to_due_contour_jobs(make_settings):
    settings = make_settings(series={"min_slices": 5})
    store = Store.from_settings(settings)
    try:
        assert not inference_waiting(store)
        store.enqueue("assemble_series", {"series_uid": "1.2.3"})
        assert not inference_waiting(store)  # only inference makes training pause
        store.enqueue(JOB_CONTOUR, {"case_id": 1}, delay_s=60)
        assert not inference_waiting(store)  # a retry due in a minute does not stall training now
        store.enqueue(JOB_CONTOUR, {"case_id": 2})
        assert inference_waiting(store)
        job = store.claim_job(kinds=[JOB_CONTOUR])
        assert inference_waiting(store)  # running
        store.finish_job(job.id)
        assert not inference_waiting(store)
    finally:
        store.dispose()
