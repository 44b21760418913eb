"""The whole loop, end to end, through the processes and protocols a hospital would use.

A real `heartloop serve` (tiny contouring network, trainer on, review UI on a free port) receives
phantom patients with their RTDOSE from dcmtk `storescu`; a scripted reviewer logs in through the
HTTP API and corrects every case from the phantom's true heart, case after case in worklist order;
the corrected RTSTRUCT and the dose report arrive at a dcmtk `storescp` playing the TPS; every case
ends SENT; the trainer has promoted a model; the dashboard has the per-case series; and the
service's output of the whole run names no patient.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from heartloop.phantom import make_patient, write_patient
from tests.helpers.dcmtk import StoreSCP, storescu
from tests.helpers.procs import free_port, stop_pid, wait_for, wait_port
from tests.helpers.service import ApiClient, tps_destination, write_config

N_PATIENTS = 4
ADMIN_PASSWORD = "first-run admin secret"
REVIEWER = ("curie", "radium-1898-pw", "Curie^Marie")

TINY_CONTOURING = """
[contouring]
width = 8
depth = 2
groupnorm_groups = 4
localiser_voxel_mm = [8.0, 8.0, 8.0]
organ_voxel_mm = [4.0, 4.0, 4.0]
localiser_patch_size = [16, 32, 32]
organ_patch_size = [16, 32, 32]
margin_mm = 10.0
learning_rate = 0.003
training_threads = 1
epoch_length_without_validation = 48
min_epoch_length = 32

[compute]
device = "cpu"
threads = 1

[trainer]
enabled = true
"""


def _decode_prediction(data: bytes, shape: tuple[int, ...], box: list[int]) -> np.ndarray:
    """The contract's prediction: packbits (big bit order) of the bool mask cropped to `box`."""
    k0, k1, j0, j1, i0, i1 = box
    crop = (k1 - k0, j1 - j0, i1 - i0)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(np.prod(crop))).astype(bool)
    mask = np.zeros(shape, dtype=bool)
    mask[k0:k1, j0:j1, i0:i1] = bits.reshape(crop)
    return mask


def _rle(mask: np.ndarray) -> list[int]:
    """The contract's RLE: ``[start, length, ...]`` of runs over the C-order flat index."""
    flat = np.concatenate([[False], mask.ravel(), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return np.column_stack([starts, ends - starts]).ravel().tolist()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _dciodvfy_errors(path: Path) -> list[str]:
    from tests.dicom_node.test_rtstruct import dciodvfy_errors

    return dciodvfy_errors(path)


@pytest.mark.timeout(400)
def test_push_review_correct_learn_send(tmp_path):
    started = time.monotonic()
    patients = [make_patient(seed, rows=96, n_slices=32) for seed in range(11, 11 + N_PATIENTS)]
    by_id = {p.patient_id: p for p in patients}
    assert len(by_id) == N_PATIENTS
    tps = StoreSCP(tmp_path / "tps").start()
    dicom_port, http_port = free_port(), free_port()
    destinations = tps_destination(tps.port)
    config = write_config(tmp_path / "heartloop.toml", root=tmp_path / "data", port=dicom_port, stable_age_s=1.0,
                          destinations=destinations, http_port=http_port, receive_processes=1,
                          extra=TINY_CONTOURING + '\n[rtstruct]\ncorrected_approval_status = "APPROVED"\n')
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, HEARTLOOP_ADMIN_PASSWORD=ADMIN_PASSWORD)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "heartloop", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: proc.poll() is not None or _accepts(dicom_port), 60, 0.1, what="the DICOM port")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        wait_port(http_port, 30)
        base = f"http://127.0.0.1:{http_port}"
        anonymous = ApiClient(base)
        assert anonymous.call("GET", "/api/cases")[0] == 401

        # The TPS pushes each patient: CT series and plan dose.
        for patient in patients:
            directory = write_patient(patient, tmp_path / "push")
            files = sorted(directory.glob("*.dcm"))
            result = storescu(files, dicom_port, timeout_s=120)
            assert len(result.sent_ok) == len(files), result.output[-2000:]

        # The administrator (first run, password from the environment) adds a reviewer.
        admin = ApiClient(base)
        admin.login("admin", ADMIN_PASSWORD)
        admin.add_user(REVIEWER[0], REVIEWER[1], "reviewer", REVIEWER[2])
        reviewer = ApiClient(base)
        reviewer.login(REVIEWER[0], REVIEWER[1])

        def reviewable() -> list[dict]:
            cases = reviewer.get("/api/cases")["cases"]
            return [c for c in cases if c["state"] in ("PREDICTED", "NO_MODEL")]

        wait_for(lambda: len(reviewable()) == N_PATIENTS, 90, 0.5, what="every pushed case ready for review")

        corrected: list[int] = []
        predicted_cases: list[int] = []
        for n in range(N_PATIENTS):
            case_id = reviewer.get("/api/cases")["next_case_id"]
            assert case_id is not None and case_id not in corrected
            meta = reviewer.get(f"/api/cases/{case_id}")
            truth = by_id[meta["patient_id"]].heart_mask
            shape = tuple(meta["shape"])
            assert shape == truth.shape and meta["dose"] is not None  # the RTDOSE overlays the CT
            prediction = np.zeros(shape, dtype=bool)
            if meta["prediction"] is not None and meta["prediction"]["box"] is not None:
                status, data = reviewer.call("GET", f"/api/cases/{case_id}/prediction")
                assert status == 200
                prediction = _decode_prediction(data, shape, meta["prediction"]["box"])
            foreground, background = truth & ~prediction, prediction & ~truth
            kind = "sparse" if prediction.any() else "dense"  # cold start: the painted heart is all of it
            if prediction.any():
                predicted_cases.append(case_id)
            if not (foreground.any() or background.any()):  # a perfect prediction: confirm it whole
                foreground, kind = truth, "dense"
            t0 = time.time() * 1000.0
            events = [{"t": t0 + 1500.0 * k, "kind": kind_} for k, kind_ in
                      enumerate(["view", "scroll", "paint", "paint", "erase", "paint", "undo", "paint"])]
            status, body = reviewer.call("POST", f"/api/cases/{case_id}/events", {"events": events})
            assert status == 200 and body["stored"] == len(events), body
            status, body = reviewer.call("POST", f"/api/cases/{case_id}/correction", {
                "foreground": _rle(foreground), "background": _rle(background), "kind": kind,
                "active_seconds": None, "box": None})
            assert status == 201, body
            assert abs(body["active_seconds"] - 10.5) < 1e-6  # from the stored events, pauses excluded
            corrected.append(case_id)
            if n == 0:
                # The first correction trains the first model; the other cases are re-predicted by it.
                wait_for(lambda: reviewer.get("/api/models")["models"], 120, 0.5, what="a promoted model")
                wait_for(lambda: all(c["state"] == "PREDICTED" for c in reviewable()), 60, 0.5,
                         what="the waiting cases re-predicted by the first model")

        # Every case is delivered to the TPS.
        wait_for(lambda: all(c["state"] == "SENT" for c in reviewer.get("/api/cases")["cases"]), 90, 0.5,
                 what="every case SENT")
        received = [pydicom.dcmread(p) for p in tps.received()]
        structures = [ds for ds in received if ds.Modality == "RTSTRUCT"]
        reports = [ds for ds in received if ds.Modality == "SR"]
        frames = {p.volume.frame_of_reference_uid for p in patients}
        assert len(structures) == N_PATIENTS
        assert {ds.FrameOfReferenceUID for ds in structures} == frames
        for ds in structures:
            (roi,) = ds.StructureSetROISequence
            assert roi.ROIName == "Heart" and roi.ROIGenerationAlgorithm == "SEMIAUTOMATIC"
            assert ds.ApprovalStatus == "APPROVED" and str(ds.ReviewerName) == REVIEWER[2]
            assert str(ds.OperatorsName) == REVIEWER[2]
        rs_paths = [p for p in tps.received() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"]
        assert _dciodvfy_errors(rs_paths[0]) == []
        # A dose report for every case: predicted vs corrected where there was a prediction, the
        # corrected heart's dose alone for the cold-start case.
        assert predicted_cases, "the first model predicted no heart on any case"
        assert len(reports) == N_PATIENTS

        # The trainer learned: a promoted model, its status on the dashboard.
        models = reviewer.get("/api/models")["models"]
        assert models and any(m["current"] for m in models)
        trainer = reviewer.get("/api/trainer")
        assert trainer["current_version"] in {m["version"] for m in models}
        assert trainer["epochs"] >= 1 and trainer["train_cases"] >= 1

        dashboard = reviewer.get("/api/dashboard")
        rows = dashboard["cases"]
        assert [r["case_id"] for r in rows] == corrected and dashboard["window"] == 5
        for row in rows:
            assert abs(row["active_seconds"] - 10.5) < 1e-6 and row["corrected_voxels"] > 0
        by_case = {r["case_id"]: r for r in rows}
        for case_id in predicted_cases:
            assert by_case[case_id]["dice"] is not None and by_case[case_id]["abs_delta_mean_gy"] is not None
            assert by_case[case_id]["model_version"] is not None
        assert rows[0]["dice"] is None and rows[0]["model_version"] is None  # cold start
        assert len(dashboard["running_mean"]["active_seconds"]) == N_PATIENTS

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop_pid(proc)
        tps.stop()
    text = log_path.read_text(errors="replace")
    assert "review UI: http://127.0.0.1:" in text and "service stopping" in text
    assert ADMIN_PASSWORD not in text
    for patient in patients:  # no patient name or ID anywhere in the service's output
        assert patient.patient_id not in text
        assert str(patient.patient_name) not in text
    print(f"review loop: {N_PATIENTS} cases pushed, reviewed, learned from and sent in "
          f"{time.monotonic() - started:.0f} s")
