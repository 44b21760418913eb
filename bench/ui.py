"""Viewer data latency: a 512×512×200 phantom case served by the review UI vs. a static file server.

    python -m bench.ui [--rows 512] [--slices 200] [--rounds 20] [--seed 7]

The review UI (the real Flask app in `heartloop serve`'s waitress server, `WebServer`, logged in, on
a free loopback port) and, in the
same run, Python's ``http.server.ThreadingHTTPServer`` (HTTP/1.1 keep-alive, the floor) serve the
very same byte payloads: the case meta JSON, every CT slab, the first slice and the packed
prediction — for the floor written as plain files. One keep-alive ``http.client`` connection per
server requests them all, `--rounds` times, interleaved; every answer is checked byte for byte.

Time to first image (login excluded): from requesting the case meta on a cold app (empty viewer
cache) to having the first slice's bytes. It includes loading the case through
``UiServices.load_volume``, which reads the DICOM series from disk with the real series reader
(`heartloop.dicom_node.series`), and the dose overlay's resampling to the CT grid.

Last line: ``p95_ms=… floor_p95_ms=… ratio=… first_image_s=…``.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import logging
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from heartloop.config import load_settings
from heartloop.core import CaseState, Volume
from heartloop.dicom_node.headers import read_header
from heartloop.dicom_node.series import load_ct_volume, validate_ct_series
from heartloop.dose import dose_on_grid
from heartloop.phantom import make_patient, write_patient
from heartloop.review_ui import UiServices, create_app
from heartloop.review_ui.security import hash_password
from heartloop.service.review import WebServer
from heartloop.store import Store
from heartloop.store.models import Case

log = logging.getLogger("bench.ui")
PASSWORD = "bench-reviewer-pw"


def load_series(paths: list[Path]) -> Volume:
    """The CT `Volume` from DICOM files, headers validated first (as the service does)."""
    headers = [read_header(p) for p in paths]
    geometry = validate_ct_series(headers, max_slices=5000)
    by_uid = {h.sop_instance_uid: p for h, p in zip(headers, paths)}
    return load_ct_volume([by_uid[u] for u in geometry.sop_instance_uids], geometry)


def insert_case(store: Store, n_slices: int) -> int:
    now = time.time()
    with store.session() as s, s.begin():
        row = Case(ct_series_uid=f"2.25.{uuid.uuid4().int}", study_uid=f"2.25.{uuid.uuid4().int}",
                   patient_id="BENCH", state=CaseState.PREDICTED.value, n_slices=n_slices,
                   created_at=now, updated_at=now)
        s.add(row)
        s.flush()
        return int(row.id)


class Http:
    """One keep-alive connection with the session cookie and CSRF token of a logged-in user."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.cookie = ""
        self.csrf = ""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers.update({"Content-Type": "application/json", "X-CSRF-Token": self.csrf})
        self.conn.request(method, path, body=data, headers=headers)
        rsp = self.conn.getresponse()
        payload = rsp.read()
        cookie = rsp.getheader("Set-Cookie")
        if cookie and cookie.startswith("heartloop_session="):
            self.cookie = cookie.split(";", 1)[0]
        return rsp.status, payload

    def login(self, username: str) -> None:
        self.csrf = json.loads(self.request("GET", "/api/session")[1])["csrf_token"]
        status, body = self.request("POST", "/api/session", {"username": username, "password": PASSWORD})
        if status != 200:
            raise RuntimeError(f"login answered {status}: {body[:200]!r}")
        self.csrf = json.loads(body)["csrf_token"]




def p95(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    with tempfile.TemporaryDirectory(prefix="heartloop-bench-ui-") as tmp_name:
        tmp = Path(tmp_name)
        patient = make_patient(args.seed, rows=args.rows, n_slices=args.slices)
        ct_paths = sorted(write_patient(patient, tmp / "tps").glob("CT_*.dcm"))
        prediction = np.roll(patient.heart_mask, 3, axis=2)
        plan_dose = patient.dose
        del patient
        settings = load_settings(environ={}, overrides={"storage": {"root": str(tmp / "data")}})
        store = Store(tmp / "data", f"sqlite:///{tmp / 'heartloop.db'}")
        case_id = insert_case(store, args.slices)
        store.add_user("bench", hash_password(PASSWORD), "reviewer")
        grid: dict[str, Volume] = {}

        def load_volume(cid: int) -> Volume:
            volume = load_series(ct_paths)
            grid["ct"] = volume
            return volume

        def load_prediction(cid: int) -> tuple[Volume, str] | None:
            v = grid.get("ct") or load_series(ct_paths)
            return Volume(prediction, v.origin, v.row_direction, v.column_direction, v.pixel_spacing,
                          v.slice_offsets, v.frame_of_reference_uid), "000001"

        def load_dose(cid: int) -> Volume | None:
            return dose_on_grid(plan_dose, grid.get("ct") or load_series(ct_paths))

        services = UiServices(load_volume=load_volume, load_prediction=load_prediction, load_dose=load_dose,
                              save_correction=lambda req: {}, request_prediction=lambda cid, box: None,
                              list_models=lambda: [], rollback_model=lambda v: None, trainer_status=lambda: {})
        app = create_app(settings, store, services)
        server = WebServer(app, "127.0.0.1", 0, settings.http.threads).start()  # as `heartloop serve` does
        port = server.port
        try:
            ours = Http(port)
            ours.login("bench")
            # Cold: the first open of the case loads the series from disk.
            t0 = time.perf_counter()
            status, meta_bytes = ours.request("GET", f"/api/cases/{case_id}")
            meta = json.loads(meta_bytes)
            status2, first = ours.request("GET", f"/api/cases/{case_id}/ct/slice/{meta['first_slice']}")
            first_image_s = time.perf_counter() - t0
            assert status == 200 and status2 == 200 and len(first) == args.rows * args.rows * 2
            log.info("first image %.3f s (meta %s, %d slabs)", first_image_s, meta["shape"], meta["n_slabs"])

            paths = [f"/api/cases/{case_id}"] + [f"/api/cases/{case_id}/ct/{n}" for n in range(meta["n_slabs"])]
            paths += [f"/api/cases/{case_id}/ct/slice/{meta['first_slice']}", f"/api/cases/{case_id}/prediction"]
            payloads: dict[str, bytes] = {}
            floor_dir = tmp / "static"
            names: dict[str, str] = {}
            for n, path in enumerate(paths):
                status, body = ours.request("GET", path)
                assert status == 200, (path, status)
                payloads[path] = body
                names[path] = f"/{n:03d}.bin"
                (floor_dir / f"{n:03d}.bin").parent.mkdir(parents=True, exist_ok=True)
                (floor_dir / f"{n:03d}.bin").write_bytes(body)
            http.server.SimpleHTTPRequestHandler.protocol_version = "HTTP/1.1"
            handler = partial(_QuietHandler, directory=str(floor_dir))
            floor_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            floor_thread = threading.Thread(target=floor_server.serve_forever, daemon=True)
            floor_thread.start()
            try:
                floor = Http(floor_server.server_address[1])
                ours_ms: list[float] = []
                floor_ms: list[float] = []
                for _ in range(args.rounds):
                    for path in paths:
                        t = time.perf_counter()
                        status, body = ours.request("GET", path)
                        ours_ms.append((time.perf_counter() - t) * 1000)
                        if path != paths[0]:  # the meta's next_case_id/updated_at are stable; checked anyway
                            assert body == payloads[path], path
                        t = time.perf_counter()
                        status_f, body_f = floor.request("GET", names[path])
                        floor_ms.append((time.perf_counter() - t) * 1000)
                        assert status_f == 200 and body_f == payloads[path], path
            finally:
                floor_server.shutdown()
                floor_server.server_close()
        finally:
            server.close()
            store.dispose()
    ours_p95, floor_p95 = p95(ours_ms), p95(floor_ms)
    log.info("%d requests each: ours median %.2f ms, floor median %.2f ms", len(ours_ms),
             float(np.median(ours_ms)), float(np.median(floor_ms)))
    print(f"p95_ms={ours_p95:.2f} floor_p95_ms={floor_p95:.2f} ratio={ours_p95 / floor_p95:.2f} "
          f"first_image_s={first_image_s:.3f}")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the base class's name
        pass


if __name__ == "__main__":
    main()
