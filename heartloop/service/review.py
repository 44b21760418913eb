"""The review UI wired into the service: `UiServices` over the store, the contouring stage, the
model registry and the trainer's status; the first administrator; the web server.

`review_ui` knows only core/store/config (DESIGN.md §2); everything it needs from the rest of
HeartLoop is built here and handed to `create_app`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Any, Callable, Sequence

import numpy as np

from heartloop.config import Settings
from heartloop.core import Volume
from heartloop.review_ui.services import CorrectionRequest, UiServices
from heartloop.service.contouring import ContouringStage, enqueue_repredictions, mask_from_npz
from heartloop.service.corrections import enqueue_finalise, submit_correction
from heartloop.service.lifecycle import case_series_uid, load_case_volume, ordered_series
from heartloop.service.training import read_trainer_status
from heartloop.store import Store

log = logging.getLogger(__name__)

#: Environment variable that sets the first administrator's password (tests, demos, automation).
ADMIN_PASSWORD_ENV = "HEARTLOOP_ADMIN_PASSWORD"
FIRST_ADMIN = "admin"


def _case_grid(store: Store, settings: Settings, case_id: int, array: np.ndarray | None = None) -> Volume:
    """`array` on the CT grid of a case, from the stored headers (no pixel data is read); without
    `array`, the bare grid (a zero-strided all-false view: no memory)."""
    geometry, _paths = ordered_series(store, settings, case_series_uid(store, case_id))
    if array is None:
        array = np.broadcast_to(np.zeros((), dtype=bool), geometry.shape)
    return geometry.to_volume(array)


def _require_case(store: Store, case_id: int) -> Any:
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(f"no case {case_id}")
    return case


def make_ui_services(store: Store, settings: Settings, contouring_stage: ContouringStage, *,
                     trainer_enabled: bool | None = None) -> UiServices:
    """The `UiServices` of a running service.

    Parameters
    ----------
    store, settings
        The service's store and settings.
    contouring_stage
        The contour job handler (its registry is the model registry; it queues re-predictions).
    trainer_enabled
        Whether a trainer runs beside the service (default: ``trainer.enabled``); when not, the
        trainer status says ``"disabled"``.
    """
    registry = contouring_stage.registry
    trainer_on = settings.trainer.enabled if trainer_enabled is None else trainer_enabled

    def load_volume(case_id: int) -> Volume:
        _require_case(store, case_id)
        return load_case_volume(store, case_id, settings)

    def load_prediction(case_id: int) -> tuple[Volume, str] | None:
        _require_case(store, case_id)
        latest = store.latest_prediction(case_id)
        if latest is None:
            return None
        mask = mask_from_npz(store.files.abspath(latest.mask_path))
        return _case_grid(store, settings, case_id, mask), latest.model_version

    def load_dose(case_id: int) -> Volume | None:
        from heartloop.dicom_node.rtdose import DoseError
        from heartloop.dose import dose_on_grid
        from heartloop.service.dose import case_dose

        _require_case(store, case_id)
        try:
            dose = case_dose(store, settings, case_id)  # MissingDoseError is a DoseError
        except DoseError as exc:
            log.info("case %d: no dose to overlay (%s)", case_id, type(exc).__name__)
            return None
        grid = _case_grid(store, settings, case_id)
        try:
            return dose_on_grid(dose, grid)
        except ValueError:
            log.warning("case %d: the dose cannot be overlaid on the CT", case_id, exc_info=True)
            return None

    def save_correction(request: CorrectionRequest) -> dict[str, Any]:
        correction_id = submit_correction(store, settings, request.case_id, foreground=request.foreground,
                                          background=request.background, corrected_by=request.person_name,
                                          kind=request.kind, active_seconds=request.active_seconds)
        enqueue_finalise(store, request.case_id, correction_id)
        case = store.get_case(request.case_id)
        return {"correction_id": correction_id, "state": case.state if case is not None else "CORRECTED"}

    def request_prediction(case_id: int, box: Sequence[int] | None) -> None:
        contouring_stage.enqueue_with_box(case_id, box)

    def list_models() -> list[dict[str, Any]]:
        current = registry.current()
        rows = []
        for meta in reversed(registry.list()):
            rows.append({"version": meta.version, "current": current is not None and meta.version == current.version,
                         "parent": meta.parent, "val_dice": meta.val_dice, "train_cases": meta.n_train_cases,
                         "val_cases": meta.n_val_cases, "created_at": meta.created_at})
        return rows

    def rollback_model(version: str) -> None:
        if version not in {m.version for m in registry.list()}:
            raise KeyError(f"no model version {version!r}")
        registry.rollback(version, reason="rollback from the review UI")
        n = enqueue_repredictions(store)
        log.info("model %s is current again; %d unreviewed case(s) queued for re-prediction", version, n)

    def trainer_status() -> dict[str, Any]:
        status = read_trainer_status(settings)
        current = registry.current()  # a rollback changes the model in use before the next epoch
        status["current_version"] = current.version if current is not None else None
        if not trainer_on:
            status["state"] = "disabled"
        return status

    return UiServices(load_volume=load_volume, load_prediction=load_prediction, load_dose=load_dose,
                      save_correction=save_correction, request_prediction=request_prediction,
                      list_models=list_models, rollback_model=rollback_model, trainer_status=trainer_status)


def ensure_first_admin(store: Store, console: Callable[[str], None] | None,
                       environ: dict[str, str] | None = None) -> str | None:
    """On the first run (no users at all): create the administrator ``admin``.

    The password is `ADMIN_PASSWORD_ENV` when set, else random and shown once on `console`
    (never logged). Returns the username created, or None when users exist.
    """
    from heartloop.review_ui.security import hash_password

    if store.count_users() > 0:
        return None
    env = os.environ if environ is None else environ
    given = env.get(ADMIN_PASSWORD_ENV)
    password = given or secrets.token_urlsafe(12)
    try:
        store.add_user(FIRST_ADMIN, hash_password(password), "admin", "Administrator")
    except ValueError:  # another process created it at the same moment
        return None
    log.info("first run: created the administrator %r", FIRST_ADMIN)
    if console is not None:
        if given:
            console(f"first run: created user '{FIRST_ADMIN}' (role admin) with the password from ${ADMIN_PASSWORD_ENV}")
        else:
            console(f"first run: created user '{FIRST_ADMIN}' (role admin), password: {password}\n"
                    f"  (shown once; change it with: heartloop user passwd {FIRST_ADMIN}; "
                    f"or set ${ADMIN_PASSWORD_ENV} before the first start)")
    return FIRST_ADMIN


class WebServer:
    """The review UI served by waitress in a daemon thread; `close` stops it."""

    def __init__(self, app: Any, host: str, port: int, threads: int) -> None:
        from waitress import create_server

        # CT slabs are ~4 MB: with waitress's 1 MB default output buffer they spill to a temp file
        # per response (measured: median 5.1 → 2.5 ms per slab with 64 MB in memory).
        self._server = create_server(app, host=host, port=port, threads=threads, ident="HeartLoop",
                                     clear_untrusted_proxy_headers=True,
                                     outbuf_overflow=64 * 1024 * 1024, outbuf_high_watermark=64 * 1024 * 1024)
        self.host = host
        self.port = int(self._server.effective_port)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartloop-http")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception:  # pragma: no cover - the loop ends when close() closes its sockets
            log.debug("web server loop ended", exc_info=True)

    def start(self) -> "WebServer":
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, close open connections, stop the worker threads."""
        from waitress import wasyncore

        server = self._server
        server.close()  # the listening socket and the trigger
        server.task_dispatcher.shutdown(timeout=timeout_s)  # type: ignore[union-attr]
        wasyncore.close_all(server._map)  # type: ignore[union-attr]
        self._thread.join(timeout_s)


def start_web(settings: Settings, store: Store, services: UiServices) -> WebServer:
    """Build the review UI and serve it on ``http.host:http.port`` (0: a free port)."""
    from heartloop.review_ui import create_app

    app = create_app(settings, store, services)
    return WebServer(app, settings.http.host, settings.http.port, settings.http.threads).start()
