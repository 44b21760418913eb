"""Viewer test support: a small real `UiServices` over phantom patients, cases inserted straight
into the store, and the app served by waitress on a free loopback port (browser tests, bench)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from heartloop.core import CaseState, Volume
from heartloop.review_ui import CorrectionRequest, UiServices
from heartloop.store import Store
from heartloop.store.models import Case


def insert_case(store: Store, *, state: CaseState | str = CaseState.PREDICTED, n_slices: int | None = None,
                patient_id: str = "PHANTOM", frame_uid: str | None = None) -> int:
    """A case row in `state` (no instances: the test's `UiServices` provides the pixels)."""
    now = time.time()
    with store.session() as s, s.begin():
        row = Case(ct_series_uid=f"2.25.{uuid.uuid4().int}", study_uid=f"2.25.{uuid.uuid4().int}",
                   patient_id=patient_id, frame_of_reference_uid=frame_uid,
                   state=state.value if isinstance(state, CaseState) else state, reason=None,
                   n_slices=n_slices, created_at=now, updated_at=now)
        s.add(row)
        s.flush()
        return int(row.id)


@dataclass
class PhantomCase:
    volume: Volume
    prediction: np.ndarray | None = None
    model_version: str = "000001"
    dose: Volume | None = None


@dataclass
class PhantomServices:
    """In-memory case data; records what the app asks of it (corrections, boxes, loads)."""

    store: Store
    cases: dict[int, PhantomCase] = field(default_factory=dict)
    corrections: list[CorrectionRequest] = field(default_factory=list)
    boxes: list[tuple[int, Any]] = field(default_factory=list)
    volume_loads: list[int] = field(default_factory=list)
    load_delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load_volume(self, case_id: int) -> Volume:
        with self.lock:
            self.volume_loads.append(case_id)
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        if case_id not in self.cases:
            raise KeyError(f"no case {case_id}")
        return self.cases[case_id].volume

    def load_prediction(self, case_id: int) -> tuple[Volume, str] | None:
        c = self.cases[case_id]
        if c.prediction is None:
            return None
        v = c.volume
        return (Volume(c.prediction, v.origin, v.row_direction, v.column_direction, v.pixel_spacing,
                       v.slice_offsets, v.frame_of_reference_uid), c.model_version)

    def load_dose(self, case_id: int) -> Volume | None:
        return self.cases[case_id].dose

    def save_correction(self, req: CorrectionRequest) -> dict[str, Any]:
        if req.case_id not in self.cases:
            raise KeyError(f"no case {req.case_id}")
        with self.lock:
            self.corrections.append(req)
            n = len(self.corrections)
        self.store.set_case_state(req.case_id, CaseState.CORRECTED)
        return {"correction_id": n, "state": CaseState.CORRECTED.value}

    def request_prediction(self, case_id: int, box: Any) -> None:
        if case_id not in self.cases:
            raise KeyError(f"no case {case_id}")
        self.boxes.append((case_id, box))

    def ui_services(self) -> UiServices:
        return UiServices(
            load_volume=self.load_volume, load_prediction=self.load_prediction, load_dose=self.load_dose,
            save_correction=self.save_correction, request_prediction=self.request_prediction,
            list_models=lambda: [], rollback_model=lambda version: None,
            trainer_status=lambda: {"state": "idle", "current_version": None})

    def add(self, volume: Volume, *, prediction: np.ndarray | None = None, dose: Volume | None = None,
            state: CaseState | None = None) -> int:
        state = state or (CaseState.PREDICTED if prediction is not None else CaseState.NO_MODEL)
        case_id = insert_case(self.store, state=state, n_slices=volume.shape[0],
                              frame_uid=volume.frame_of_reference_uid)
        self.cases[case_id] = PhantomCase(volume, prediction, dose=dose)
        return case_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WaitressThread:
    """The WSGI app served by waitress in a daemon thread on a free 127.0.0.1 port."""

    def __init__(self, app: Any, *, threads: int = 4) -> None:
        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=0, threads=threads, ident="heartloop-test")
        self.port = int(self.server.effective_port)  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="waitress-test", daemon=True)
        self.thread.start()

    def close(self) -> None:
        from waitress import wasyncore

        server = self.server
        server.task_dispatcher.shutdown()  # finish requests in flight before the sockets go
        wasyncore.close_all(server._map)  # type: ignore[union-attr]  # listener, channels, trigger
        self.thread.join(timeout=5)
