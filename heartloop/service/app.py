"""The running service: DICOM node + scheduler-driven workers over the durable queue."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from datetime import datetime
from typing import Any, Callable

from apscheduler.schedulers.background import BackgroundScheduler

from heartloop.config import Settings
from heartloop.core import Volume
from heartloop.dicom_node.scp import make_node, run_receiver_process
from heartloop.dicom_node.scu import drain_outbox
from heartloop.service.contouring import JOB_CONTOUR, ContouringStage
from heartloop.service.corrections import JOB_FINALISE, finalise_correction, mark_sent_cases
from heartloop.service.lifecycle import JOB_ASSEMBLE, assemble_series, enqueue_stable_series, recover_index
from heartloop.store import Store

log = logging.getLogger(__name__)

JobHandler = Callable[[dict[str, Any]], None]


def _die_with_parent(parent_pid: int) -> None:  # pragma: no cover - runs in a child process
    """Linux: kill this process the moment the service dies, even by SIGKILL.

    SIGKILL, not SIGTERM: a receiver that outlived its service would keep accepting on the shared
    port (and writing partial files) while a restarted service cleans up. What it was receiving
    was never acknowledged; the TPS sends it again.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the service died before we could ask to die with it
        os._exit(0)


def _receiver_main(settings: Settings, parent_pid: int) -> None:  # pragma: no cover - child process
    _die_with_parent(parent_pid)
    run_receiver_process(settings)


def _trainer_main(settings: Settings, parent_pid: int) -> None:  # pragma: no cover - child process
    # Dies with the service too: a trainer left behind would keep writing checkpoints (and
    # promoting models) while a restarted service starts its own.
    _die_with_parent(parent_pid)
    from heartloop.service.training import trainer_main

    trainer_main(settings)


def trainer_enabled(settings: Settings, flag: bool | None = None) -> bool:
    """Whether `Service.start` runs the continual trainer: `flag` when given, else the setting
    ``trainer.enabled`` (environment: ``HEARTLOOP_TRAINER__ENABLED=false``)."""
    if flag is not None:
        return flag
    return settings.trainer.enabled


class Service:
    """Composition root of `heartloop serve`.

    Parameters
    ----------
    settings
        Validated settings.
    on_ready
        Called with ``(case_id, volume)`` when a case becomes READY (the contouring stage hooks
        in here).
    trainer
        Run the continual trainer process (`heartloop.service.training`); ``None``: as the setting
        ``trainer.enabled`` says.
    console
        Where messages for the person who started the service go (the review UI's address, the
        first administrator's password): `heartloop serve` prints them; ``None`` shows none of
        them (the address is logged either way, a password never).
    """

    def __init__(self, settings: Settings, *, on_ready: Callable[[int, Volume], None] | None = None,
                 trainer: bool | None = None, console: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.console = console
        self.web: Any = None  # the review UI's server (heartloop.service.review.WebServer) once started
        self.trainer_enabled = trainer_enabled(settings, trainer)
        self._trainer: multiprocessing.process.BaseProcess | None = None
        self.store = Store.from_settings(settings)
        self.scp = make_node(settings, self.store, reuse_port=settings.node.receive_processes > 1)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.contouring = ContouringStage(self.store, settings)
        # READY → contour job (a prediction, or NO_MODEL at cold start) unless a caller hooks in.
        self.on_ready = on_ready if on_ready is not None else self.contouring.enqueue
        self.handlers: dict[str, JobHandler] = {
            JOB_ASSEMBLE: self._job_assemble,
            JOB_CONTOUR: self.contouring.run,
            JOB_FINALISE: self._job_finalise,
        }
        self._receivers: list[multiprocessing.process.BaseProcess] = []
        self._work_lock = threading.Lock()
        self.started = threading.Event()

    # -- jobs -------------------------------------------------------------------------------------
    def register(self, kind: str, handler: JobHandler) -> None:
        """Register the handler of one job kind (explicitly; no discovery)."""
        self.handlers[kind] = handler

    def _job_assemble(self, payload: dict[str, Any]) -> None:
        assemble_series(self.store, self.settings, payload["series_uid"], on_ready=self.on_ready)

    def _job_finalise(self, payload: dict[str, Any]) -> None:
        finalise_correction(self.store, self.settings, payload)

    def run_due_jobs(self, budget_s: float = 5.0) -> int:
        """Run queued jobs until none is due or `budget_s` has passed; returns how many ran."""
        if not self._work_lock.acquire(blocking=False):
            return 0
        try:
            n = 0
            deadline = time.monotonic() + budget_s
            while time.monotonic() < deadline:
                job = self.store.claim_job(kinds=list(self.handlers))
                if job is None:
                    break
                handler = self.handlers[job.kind]
                try:
                    import json

                    handler(json.loads(job.payload_json))
                except Exception as exc:  # a failing job never blocks the queue
                    log.exception("job %d (%s) failed", job.id, job.kind)
                    self.store.fail_job(job.id, f"{type(exc).__name__}: {exc}")
                else:
                    self.store.finish_job(job.id)
                n += 1
            return n
        finally:
            self._work_lock.release()

    def tick(self) -> None:
        """One pass of everything periodic (also used by tests to drive the service directly)."""
        enqueue_stable_series(self.store, self.settings)
        self.run_due_jobs()

    def outbox_pass(self) -> None:
        """Send what is due, then mark the cases whose outputs have all arrived SENT."""
        drain_outbox(self.store, self.settings)
        mark_sent_cases(self.store)

    def _say(self, message: str) -> None:
        if self.console is not None:
            self.console(message)

    def _start_web(self) -> None:
        from heartloop.service.review import ensure_first_admin, make_ui_services, start_web

        services = make_ui_services(self.store, self.settings, self.contouring, trainer_enabled=self.trainer_enabled)
        self.web = start_web(self.settings, self.store, services)
        log.info("review UI: %s", self.web.url)
        self._say(f"review UI: {self.web.url}")
        ensure_first_admin(self.store, self.console)

    def _safe(self, fn: Callable[[], Any], what: str) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:  # keep the scheduler alive whatever a pass meets
                log.exception("%s failed; will try again", what)

        return run

    # -- start / stop -----------------------------------------------------------------------------
    @property
    def _running_marker(self):  # type: ignore[no-untyped-def]
        return self.store.files.root / ".running"

    def start(self) -> None:
        if self._running_marker.exists():
            log.warning("the previous run did not stop cleanly: checking stored files against the index")
            recover_index(self.store)
        self._running_marker.write_text(str(os.getpid()))
        removed = self.store.files.clean_incoming()
        if removed:
            log.info("removed %d unacknowledged partial file(s) left by a previous run", removed)
        if self.settings.http.enabled:  # first: a busy web port stops the start before anything runs
            self._start_web()
        self.scp.start()
        node = self.settings.node
        self._say(f"DICOM node: {node.ae_title}@{node.host}:{self.scp.port}")  # the bound port (port 0: a free one)
        for _ in range(self.settings.node.receive_processes - 1):
            proc = multiprocessing.get_context("spawn").Process(target=_receiver_main, args=(self.settings, os.getpid()),
                                                                daemon=True, name="heartloop-receiver")
            proc.start()
            self._receivers.append(proc)
        if self.trainer_enabled:
            self._trainer = multiprocessing.get_context("spawn").Process(
                target=_trainer_main, args=(self.settings, os.getpid()), daemon=True, name="heartloop-trainer")
            self._trainer.start()
            log.info("continual trainer started (pid %s)", self._trainer.pid)
        now = datetime.now().astimezone()
        s = self.settings
        self.scheduler.add_job(self._safe(lambda: enqueue_stable_series(self.store, s), "series scan"), "interval",
                               seconds=s.series.poll_interval_s, max_instances=1, coalesce=True, next_run_time=now,
                               id="scan")
        self.scheduler.add_job(self._safe(self.run_due_jobs, "job worker"), "interval", seconds=0.25,
                               max_instances=1, coalesce=True, next_run_time=now, id="work")
        self.scheduler.add_job(self._safe(self.outbox_pass, "outbox"), "interval",
                               seconds=s.outbox.poll_interval_s, max_instances=1, coalesce=True, next_run_time=now,
                               id="outbox")
        # Janitor: a partial dataset whose sender vanished (never acknowledged) is removed once it has
        # been untouched for longer than any live association could leave it.
        stale_s = max(600.0, 2 * s.node.network_timeout_s)
        self.scheduler.add_job(self._safe(lambda: self.store.files.clean_incoming(older_than_s=stale_s), "janitor"),
                               "interval", seconds=300, max_instances=1, coalesce=True, id="janitor")
        self.scheduler.start()
        self.started.set()
        log.info("HeartLoop service started (data in %s)", s.storage_root)

    def stop(self) -> None:
        log.info("HeartLoop service stopping")
        if self.web is not None:
            self.web.close()
            self.web = None
        try:
            self.scheduler.shutdown(wait=True)
        except Exception:  # pragma: no cover - not started
            pass
        self.scp.stop()
        for proc in self._receivers:
            proc.terminate()
        for proc in self._receivers:
            proc.join(timeout=10)
        if self._trainer is not None:
            # SIGTERM at any instant is safe: checkpoints and model versions are written atomically.
            self._trainer.terminate()
            self._trainer.join(timeout=10)
            if self._trainer.is_alive():  # pragma: no cover - stuck in native code
                self._trainer.kill()
                self._trainer.join(timeout=5)
            self._trainer = None
        try:
            self._running_marker.unlink()
        except FileNotFoundError:
            pass
        self.store.dispose()

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then shut down cleanly."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
