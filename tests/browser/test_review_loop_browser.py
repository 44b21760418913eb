"""Acceptance in real headless Chromium, Phase B: the whole loop through a real `heartloop serve`.

dcmtk `storescu` (the TPS) pushes a phantom CT and its RTDOSE; the case reaches review (NO_MODEL
at a cold start, PREDICTED once a model exists); a reviewer logs in through the login form, opens
the case from the worklist, scrolls, windows, paints a foreground and a background stroke, undoes
the background one and saves; the correction stored by the service is exactly the remaining
stroke, and dcmtk `storescp` (the TPS) receives the corrected RTSTRUCT — plus the dose report when
the case had a prediction to compare with (tests/service/test_review_loop.py covers that path
through the API; training a first model here would not fit the browser tests' time budget).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from heartloop.phantom import make_patient, write_patient
from heartloop.store import Store
from tests.browser.reviewer import login, mask_indices, open_next_from_worklist, review_current_case
from tests.helpers.dcmtk import StoreSCP, storescu
from tests.helpers.procs import free_port, stop_pid, wait_for, wait_port
from tests.helpers.service import ApiClient, tps_destination, write_config

ADMIN_PASSWORD = "first-run admin secret"
REVIEWER = ("lovelace", "analytical-engine-1843", "Lovelace^Ada")
SERVICE_EXTRA = """
[compute]
device = "cpu"
threads = 1

[trainer]
enabled = false
"""


@pytest.mark.timeout(180)
def test_tps_push_browser_correction_reaches_the_tps(chrome, tmp_path, screenshots):
    from heartloop.service.corrections import load_correction_arrays

    patient = make_patient(21, rows=128, n_slices=40)
    tps = StoreSCP(tmp_path / "tps").start()
    dicom_port, http_port = free_port(), free_port()
    destinations = tps_destination(tps.port)
    root = tmp_path / "data"
    config = write_config(tmp_path / "heartloop.toml", root=root, port=dicom_port, stable_age_s=0.5,
                          destinations=destinations, http_port=http_port, receive_processes=1,
                          extra=SERVICE_EXTRA)
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, HEARTLOOP_ADMIN_PASSWORD=ADMIN_PASSWORD)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "heartloop", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_port(dicom_port, 60)
        wait_port(http_port, 30)
        base = f"http://127.0.0.1:{http_port}"
        files = sorted(write_patient(patient, tmp_path / "push").glob("*.dcm"))
        pushed = storescu(files, dicom_port, timeout_s=120)
        assert len(pushed.sent_ok) == len(files), pushed.output[-2000:]

        admin = ApiClient(base)
        admin.login("admin", ADMIN_PASSWORD)
        admin.add_user(REVIEWER[0], REVIEWER[1], "reviewer", REVIEWER[2])
        wait_for(lambda: admin.get("/api/cases")["next_case_id"] is not None, 60, 0.3, what="a case to review")
        case_id = admin.get("/api/cases")["next_case_id"]

        login(chrome, base, REVIEWER[0], REVIEWER[1])
        assert open_next_from_worklist(chrome) == case_id
        review = review_current_case(chrome, shots=screenshots, prefix="serve_")
        assert review.meta["state"] in ("NO_MODEL", "PREDICTED") and review.meta["dose"] is not None
        assert review.next_url.rstrip("/") == base  # no other case: back to the worklist

        # The stored correction is exactly the remaining (foreground) stroke.
        store = Store(root, f"sqlite:///{root / 'heartloop.db'}", migrate_schema=False)
        try:
            (row,) = [c for c in store.corrections() if c.case_id == case_id]
            arrays = load_correction_arrays(store, row.path)
            assert mask_indices(arrays.foreground) == review.foreground
            assert not np.asarray(arrays.background).any()
            assert row.corrected_by == REVIEWER[2] and row.active_seconds is not None
        finally:
            store.dispose()

        # The TPS receives the corrected RTSTRUCT (and the dose report when one was made).
        wait_for(lambda: admin.get(f"/api/cases/{case_id}?refresh=1")["state"] in ("SENT", "FAILED"), 60, 0.3,
                 what="the case SENT")
        case = admin.get(f"/api/cases/{case_id}?refresh=1")
        assert case["state"] == "SENT", case
        received = [pydicom.dcmread(p) for p in tps.received()]
        structures = [ds for ds in received if ds.Modality == "RTSTRUCT"]
        reports = [ds for ds in received if ds.Modality == "SR"]
        (rs,) = structures
        (roi,) = rs.StructureSetROISequence
        assert roi.ROIName == "Heart" and str(rs.OperatorsName) == REVIEWER[2]
        assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == patient.volume.frame_of_reference_uid
        # And the dose report (SR): predicted vs corrected mean heart dose, or at cold start (no
        # prediction) the corrected heart's dose alone.
        (sr,) = reports
        assert sr.StudyInstanceUID == rs.StudyInstanceUID
        refs = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        assert rs.SOPInstanceUID in refs
        log_text = log_path.read_text(errors="replace")
        assert patient.patient_id not in log_text and str(patient.patient_name).split("^")[0] not in log_text
    finally:
        stop_pid(proc)
        tps.stop()
