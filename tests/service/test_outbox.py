"""Our outbox sends an RTSTRUCT to the TPS (dcmtk storescp): retries while it is down, survives our
restart, and delivers exactly once."""

from __future__ import annotations

import time

import pydicom

from heartloop.core import OutboxState
from heartloop.phantom import make_patient, write_patient
from heartloop.service.lifecycle import load_case_volume
from heartloop.service.outputs import queue_structure
from tests.helpers.dcmtk import StoreSCP, storescu
from tests.helpers.procs import free_port, wait_for
from tests.helpers.service import ASSEMBLED, running_service


def test_rtstruct_delivered_exactly_once_after_outage_and_restart(make_settings, tmp_path):
    tps_port = free_port()
    settings = make_settings(
        node={"port": free_port()},
        series={"stable_age_s": 0.5, "poll_interval_s": 0.2, "min_slices": 5},
        outbox={"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "poll_interval_s": 0.2, "max_attempts": 1000},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}],
        limits={"min_free_disk_bytes": 1048576},
    )
    patient = make_patient(31, rows=128, n_slices=40)
    pdir = write_patient(patient, tmp_path / "tps-export")

    # 1. The CT arrives; we queue a structure while the TPS is down.
    with running_service(settings) as service:
        assert len(storescu(sorted(pdir.glob("CT_*.dcm")), service.scp.port).sent_ok) == 40
        case = wait_for(lambda: next(iter(service.store.list_cases(ASSEMBLED)), None), 15, what="READY")
        ct = load_case_volume(service.store, case.id, settings)
        item = queue_structure(service.store, settings, case.id, ct.with_array(patient.heart_mask),
                               model_version="000001")
        wait_for(lambda: service.store.outputs()[0].attempts >= 2, 15, what="failed attempts")
        out = service.store.outputs()[0]
        assert out.state == OutboxState.PENDING.value and out.last_error
    # 2. Our service is down; the TPS comes up.
    tps = StoreSCP(tmp_path / "tps-received", port=tps_port).start()
    try:
        # 3. We restart: the item is delivered, once.
        with running_service(settings) as service:
            wait_for(lambda: service.store.outputs()[0].state == OutboxState.SENT.value, 20, what="SENT")
            time.sleep(1.0)  # several more outbox passes: nothing is sent again
            received = tps.received()
            assert len(received) == 1
            ds = pydicom.dcmread(received[0])
            assert ds.Modality == "RTSTRUCT"
            assert ds.SOPInstanceUID == service.store.outputs()[0].sop_instance_uid
            assert ds.FrameOfReferenceUID == patient.volume.frame_of_reference_uid
            assert item == service.store.outputs()[0].id
    finally:
        tps.stop()
