"""The TPS (dcmtk storescu/echoscu) pushes to our node: durable storage, assembly into READY cases."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from heartloop.core import CaseState
from heartloop.phantom import make_patient, write_patient
from heartloop.service.lifecycle import load_case_volume
from tests.helpers.dcmtk import echoscu, storescu
from tests.helpers.procs import free_port, wait_for
from tests.helpers.service import ASSEMBLED, running_service


@pytest.fixture
def node_settings(make_settings):
    def _make(**extra):
        sections = {
            "node": {"port": free_port(), "allowed_callers": [{"ae_title": "TPS", "hosts": ["127.0.0.1"]},
                                                              {"ae_title": "TPS2"}]},
            "series": {"stable_age_s": 1.0, "poll_interval_s": 0.2, "min_slices": 5},
            "limits": {"min_free_disk_bytes": 1048576},
        }
        for k, v in extra.items():
            sections.setdefault(k, {}).update(v)
        return make_settings(**sections)

    return _make


def _files(pdir: Path) -> tuple[list[Path], Path]:
    cts = sorted(pdir.glob("CT_*.dcm"))
    return cts, pdir / "RD.dcm"


def test_echo_known_and_unknown_calling_ae(node_settings):
    settings = node_settings()
    with running_service(settings) as service:
        ok = echoscu(service.scp.port, calling="TPS")
        assert ok.returncode == 0, ok.stderr
        refused = echoscu(service.scp.port, calling="STRANGER")
        assert refused.returncode != 0
        assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower()


def test_push_ct_and_rtdose_becomes_ready_with_exact_geometry(node_settings, tmp_path):
    settings = node_settings()
    patient = make_patient(3, rows=512, n_slices=150)
    pdir = write_patient(patient, tmp_path / "tps")
    cts, rd = _files(pdir)
    with running_service(settings) as service:
        res = storescu(cts + [rd], service.scp.port)
        assert res.returncode == 0 and len(res.sent_ok) == 151, res.output[-2000:]
        pushed_at = time.time()
        case = wait_for(lambda: next((c for c in service.store.list_cases() if c.state in ASSEMBLED), None),
                        timeout_s=settings.series.stable_age_s + 2 + 10, what="case assembled")
        ready_at = next(e.at for e in service.store.case_events(case.id) if e.to_state == "READY")
        ready_after = ready_at - pushed_at
        assert ready_after <= settings.series.stable_age_s + 2.0, f"READY after {ready_after:.2f} s"
        # Cold start: no model yet, so the contour job leaves it for a person to contour.
        case = wait_for(lambda: (c := service.store.get_case(case.id)).state == "NO_MODEL" and c, 10,
                        what="NO_MODEL")
        assert "contour this case by hand" in case.reason
        counts = service.store.counts()
        assert counts["instances"] == 151 and counts["cases"] == 1 and counts["quarantined"] == 0
        for row in service.store.series_instances(patient.ct_datasets[0].SeriesInstanceUID):
            stored = pydicom.dcmread(service.store.files.abspath(row.path))
            assert stored.SOPInstanceUID == row.sop_instance_uid
        linked = service.store.linked_series(case.id)
        assert [s.modality for s in linked] == ["RTDOSE"]
        volume = load_case_volume(service.store, case.id, settings)
    assert case.n_slices == 150
    np.testing.assert_array_equal(volume.affine, patient.volume.affine)
    np.testing.assert_array_equal(volume.slice_offsets, patient.volume.slice_offsets)
    assert volume.frame_of_reference_uid == patient.volume.frame_of_reference_uid
    np.testing.assert_array_equal(volume.array, patient.volume.array)


def test_eight_parallel_associations_lose_nothing(node_settings, tmp_path):
    settings = node_settings(node={"receive_processes": 2})  # two processes share the port
    pushes = []
    for seed in range(8):
        p = make_patient(100 + seed, rows=128, n_slices=30)
        pushes.append(_files(write_patient(p, tmp_path / "tps"))[0])
    results: dict[int, object] = {}
    with running_service(settings) as service:
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, storescu(pushes[k], service.scp.port)))
                   for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert all(len(results[k].sent_ok) == 30 for k in range(8)), [len(results[k].sent_ok) for k in range(8)]
        wait_for(lambda: len(service.store.list_cases(ASSEMBLED)) == 8, 30, what="8 assembled cases")
        assert service.store.counts()["instances"] == 240


def test_duplicate_push_is_stored_once(node_settings, tmp_path):
    settings = node_settings()
    cts, _ = _files(write_patient(make_patient(5, rows=128, n_slices=20), tmp_path / "tps"))
    with running_service(settings) as service:
        first = storescu(cts, service.scp.port)
        again = storescu(cts, service.scp.port, calling="TPS2")
        assert len(first.sent_ok) == 20 and len(again.sent_ok) == 20  # the TPS sees success both times
        assert service.store.counts()["instances"] == 20
        files = list((service.store.files.root / "instances").rglob("*.dcm"))
        assert len(files) == 20
