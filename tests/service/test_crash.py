"""SIGKILL the service in the middle of a push: what was answered success survives, nothing partial,
nothing twice, and the case completes after a restart and a re-push."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pydicom

from heartloop.config import load_settings
from heartloop.phantom import make_patient, write_patient
from heartloop.store import Store
from tests.helpers.dcmtk import DCMTK_ENV, parse_storescu, require, storescu
from tests.helpers.procs import free_port, stop_pid, wait_for
from tests.helpers.service import ASSEMBLED, start_serve, write_config


def test_sigkill_mid_push_loses_nothing_acknowledged(tmp_path):
    port = free_port()
    root = tmp_path / "data"
    cfg = write_config(tmp_path / "heartloop.toml", root=root, port=port, stable_age_s=1.0)
    settings = load_settings(cfg, environ={})
    patient = make_patient(21, rows=256, n_slices=120)
    pdir = write_patient(patient, tmp_path / "tps")
    cts = sorted(pdir.glob("CT_*.dcm"))

    service = start_serve(cfg, port, tmp_path / "serve.log")
    observer = Store.from_settings(settings)
    push = subprocess.Popen([require("storescu"), "-v", "-aec", "HEARTLOOP", "-aet", "TPS", "127.0.0.1", str(port),
                             *map(str, cts)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: observer.counts()["instances"] >= 30, 60, 0.01, what="30 instances stored")
        os.kill(service.pid, signal.SIGKILL)  # mid-push, no goodbye
        service.wait(10)
        out, _ = push.communicate(timeout=60)
    finally:
        stop_pid(push)
        stop_pid(service)
    acknowledged = parse_storescu(out).sent_ok
    assert 30 <= len(acknowledged) < len(cts), f"{len(acknowledged)} acknowledged: the kill was not mid-push"

    # Restart: everything acknowledged is there, complete, once.
    service = start_serve(cfg, port, tmp_path / "serve.log")
    try:
        stored = {r.sop_instance_uid: r for r in observer.series_instances(patient.ct_datasets[0].SeriesInstanceUID)}
        for path in acknowledged:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in stored, f"{path.name} was answered success but is not in the database"
        files = sorted((root / "instances").rglob("*.dcm"))
        assert len(files) >= len(stored)
        for f in files:  # no partial files: every file parses completely
            ds = pydicom.dcmread(f)
            assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
        leftovers = list((root / "incoming").iterdir())
        assert leftovers == [], f"unacknowledged partials not cleaned: {leftovers}; pids {service.pid}, log: " \
            + (tmp_path / "serve.log").read_text()[-3000:]

        again = storescu(cts, port)  # the TPS re-sends the whole series
        assert len(again.sent_ok) == len(cts), again.output[-1500:]
        case = wait_for(lambda: next((c for c in observer.list_cases(ASSEMBLED) if c.n_slices == len(cts)), None),
                        30, what="case READY with every slice")
        assert case.n_slices == len(cts)
        assert observer.counts()["instances"] == len(cts)  # no duplicates
    finally:
        stop_pid(service)
        observer.dispose()
