"""The continual trainer as its own process, for as long as the service runs.

`run_trainer` opens the store and the model registry, resumes `TrainerState` from
``<root>/trainer/state.pt``, rebuilds the training data from the stored corrections (each case
keeps its train/validation split forever: the store's ``corrections.split`` column is the record),
then trains epoch after epoch (`heartloop.contouring.training.step_trainer`): it yields the CPU
while a contour job is waiting, checkpoints atomically after every epoch, and queues re-prediction
of unreviewed cases when a model is promoted. With no correction yet it only polls the database,
and torch is not even imported, so an idle trainer costs next to nothing.

A SIGKILL at any instant loses at most the epoch in progress: promoted versions are in the
append-only registry, the checkpoint is replaced atomically.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from heartloop.config import Settings
from heartloop.core import JobState
from heartloop.service.contouring import JOB_CONTOUR, contouring_settings, enqueue_repredictions, models_dir
from heartloop.store import Store

log = logging.getLogger(__name__)

#: Seconds between looks at the corrections table while there is nothing to train on.
IDLE_POLL_S = 3.0


class StopSignal(Protocol):
    """A `threading.Event` or `multiprocessing.Event`."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def checkpoint_path(settings: Settings) -> Path:
    return settings.storage_root / "trainer" / "state.pt"


def status_path(settings: Settings) -> Path:
    """The trainer's status file: JSON, replaced atomically after every epoch (and on yield/idle)."""
    return settings.storage_root / "trainer" / "status.json"


#: What `read_trainer_status` answers before the trainer has finished its first epoch.
WAITING = "waiting for corrections"
STATUS_KEYS = ("state", "current_version", "best_val_dice", "epochs", "epochs_without_progress", "train_cases",
               "val_cases", "updated_at")


def write_trainer_status(settings: Settings, status: dict[str, Any]) -> None:
    """Replace the status file atomically (temp file + rename): a reader never sees half of one."""
    path = status_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps({k: status.get(k) for k in STATUS_KEYS}), encoding="utf-8")
    os.replace(temp, path)


def read_trainer_status(settings: Settings) -> dict[str, Any]:
    """The trainer's last status (see `STATUS_KEYS`); state `WAITING` before its first epoch."""
    try:
        data = json.loads(status_path(settings).read_text(encoding="utf-8"))
        return {k: data.get(k) for k in STATUS_KEYS}
    except (FileNotFoundError, ValueError):
        return {"state": WAITING, "current_version": None, "best_val_dice": None, "epochs": 0,
                "epochs_without_progress": 0, "train_cases": 0, "val_cases": 0, "updated_at": None}


@dataclass
class StatusReporter:
    """Keeps the status file in step with the trainer: after every epoch, and when it starts or
    stops yielding to inference (``training`` / ``yielding`` / ``idle``)."""

    settings: Settings
    last: dict[str, Any] = field(default_factory=dict)

    def epoch(self, state: Any, data: Any) -> None:
        self.last = {
            "current_version": state.current_version, "best_val_dice": state.best_val_dice,
            "epochs": state.progress.epochs, "epochs_without_progress": state.progress.epochs_without_progress,
            "train_cases": len(data.train_ids), "val_cases": len(data.validation_ids),
        }
        self.set_state("training", force=True)

    def set_state(self, name: str, force: bool = False) -> None:
        """Record `name` (written only when it changes, unless `force`; nothing before the first epoch)."""
        if not self.last or (self.last.get("state") == name and not force):
            return
        self.last["state"] = name
        self.last["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            write_trainer_status(self.settings, self.last)
        except OSError:  # the status is for people; training goes on
            log.warning("trainer status not written", exc_info=True)


def inference_waiting(store: Store) -> bool:
    """True while a contour job is pending (and due) or running: the trainer then pauses."""
    now = time.time()
    for state in (JobState.RUNNING.value, JobState.PENDING.value):
        for job in store.jobs(state):
            if job.kind == JOB_CONTOUR and (state == JobState.RUNNING.value or job.not_before <= now + 1.0):
                return True
    return False


def case_key(case_id: int) -> str:
    """The training-data id of a case (opaque: no patient data)."""
    return f"case{case_id:06d}"


@dataclass
class CorrectionFeed:
    """Brings stored corrections into `TrainingData`, once each, and records their split.

    The newest correction of a case replaces older ones (its ``revision`` counts them). A case's
    split comes from the store when any of its rows has one, else from the data's rule, and is
    then written to every new row of the case.
    """

    store: Store
    settings: Settings
    seen: set[int] = field(default_factory=set)

    def pending(self) -> list[Any]:
        return [row for row in self.store.corrections() if row.id not in self.seen]

    def sync(self, data: Any) -> int:
        """Add unseen corrections to `data`; returns how many were added."""
        from heartloop.contouring.split import Split
        from heartloop.contouring.training import Correction
        from heartloop.service.corrections import load_correction_arrays
        from heartloop.service.lifecycle import load_case_volume

        rows = self.store.corrections()
        fresh = [r for r in rows if r.id not in self.seen]
        if not fresh:
            return 0
        by_case: dict[int, list[Any]] = {}
        for row in rows:
            by_case.setdefault(row.case_id, []).append(row)
        for case_id, case_rows in by_case.items():  # the store's record wins over the checkpoint's
            fixed = next((r.split for r in case_rows if r.split), None)
            if fixed:
                data.assignments[case_key(case_id)] = Split(fixed)
        added = 0
        latest_new = {r.case_id: r for r in fresh}  # only the newest row of a case is loaded
        for row in fresh:
            self.seen.add(row.id)
            if latest_new[row.case_id] is not row:
                continue
            try:
                arrays = load_correction_arrays(self.store, row.path)
                ct = load_case_volume(self.store, row.case_id, self.settings)
                correction = Correction(case_key(row.case_id), ct, arrays.prediction, arrays.foreground,
                                        arrays.background, dense=row.kind == "dense",
                                        revision=len(by_case[row.case_id]) - 1)
            except Exception:  # one unreadable correction must not stop the trainer
                log.exception("correction %d of case %d could not be loaded; skipped", row.id, row.case_id)
                continue
            split = data.add(correction)
            for r in by_case[row.case_id]:
                if r.split is None:
                    self.store.set_correction_split(r.id, split.value)
            added += 1
        return added


def _apply_threads(contouring: Any) -> None:
    import torch

    if contouring.training_threads > 0:
        torch.set_num_threads(contouring.training_threads)


def run_trainer(settings: Settings, stop: StopSignal | None = None, *, contouring: Any = None,
                max_epochs: int | None = None, epoch_budget_s: float | None = None,
                idle_poll_s: float = IDLE_POLL_S, seed: int | None = None) -> int:
    """Train continually from the stored corrections until `stop` is set (or `max_epochs` ran).

    Parameters
    ----------
    settings
        Service settings (storage, database, compute).
    stop
        Set it to stop between epochs; ``None`` runs until the process is terminated.
    contouring
        `ContouringSettings` to train with; default `contouring_settings(settings)` (tests pass
        tiny ones).
    max_epochs
        Stop after this many epochs in this run (tests and benchmarks).
    epoch_budget_s
        Cut each epoch short after this many seconds (benchmarks).
    idle_poll_s
        Seconds between looks at the corrections table while there is nothing to train on.
    seed
        Seed of fresh weights and sampling (tests).

    Returns
    -------
    int
        Epochs run.
    """
    stop = stop if stop is not None else threading.Event()
    store = Store.from_settings(settings, migrate_schema=False)
    feed = CorrectionFeed(store, settings)
    try:
        while not feed.pending():  # cold and idle: no torch, just a cheap query now and then
            if stop.wait(idle_poll_s):
                return 0
        return _train(settings, store, feed, stop, contouring=contouring, max_epochs=max_epochs,
                      epoch_budget_s=epoch_budget_s, idle_poll_s=idle_poll_s, seed=seed)
    finally:
        store.dispose()


def _train(settings: Settings, store: Store, feed: CorrectionFeed, stop: StopSignal, *, contouring: Any,
           max_epochs: int | None, epoch_budget_s: float | None, idle_poll_s: float, seed: int | None) -> int:
    from heartloop.contouring.registry import ModelRegistry
    from heartloop.contouring.training import Learner, TrainerState, TrainingData, step_trainer

    cs = contouring if contouring is not None else contouring_settings(settings)
    _apply_threads(cs)
    registry = ModelRegistry(models_dir(settings))
    path = checkpoint_path(settings)
    state = TrainerState.resume(path)
    learner = Learner.fresh(cs, seed=seed)
    try:
        state.restore(learner)
    except (RuntimeError, KeyError, ValueError) as exc:  # the network's shape changed with the settings
        log.warning("trainer checkpoint does not fit the current settings (%s): training from fresh weights", exc)
        state = TrainerState(assignments=state.assignments, times_sampled=state.times_sampled)
        learner = Learner.fresh(cs, seed=seed)
    data = TrainingData(cs, assignments={k: v for k, v in state.assignments.items()},
                        times_sampled=state.times_sampled, seed=seed if seed is not None else 0)
    log.info("trainer started at epoch %d (%s)", state.epoch, "resumed" if path.exists() else "fresh")
    status = StatusReporter(settings)
    if state.epoch:
        status.epoch(state, data)  # a restarted trainer shows its resumed counters at once

    def yield_check() -> bool:
        waiting = inference_waiting(store) and not stop.is_set()
        status.set_state("yielding" if waiting else "training")
        return waiting

    epochs = 0
    while not stop.is_set():
        feed.sync(data)
        if not data.train_ids:
            status.set_state("idle")
            stop.wait(idle_poll_s)
            continue
        state, report = step_trainer(learner, data, state, registry, cs, yield_check=yield_check,
                                     time_budget_s=epoch_budget_s)
        state.checkpoint(path)
        status.epoch(state, data)
        epochs += 1
        if report.promoted_version is not None:
            n = enqueue_repredictions(store)
            log.info("model %s promoted (validation Dice %s): %d unreviewed case(s) queued for re-prediction",
                     report.promoted_version, report.candidate.dice, n)
        if max_epochs is not None and epochs >= max_epochs:
            break
    return epochs


def trainer_main(settings: Settings) -> None:  # pragma: no cover - runs in the trainer process
    """Entry point of the trainer process: lowest useful priority, runs until terminated."""
    import os

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        os.nice(10)  # inference and the DICOM node come first
    except OSError:
        pass
    run_trainer(settings)
