"""Store behaviour on SQLite and PostgreSQL: instances, series, cases, jobs, outbox, files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from heartloop.core import CaseState, JobState, OutboxState
from heartloop.store import NewInstance, Store, uid_component
from heartloop.store.db import schema_is_current
from heartloop.store.models import Base

CT = "1.2.840.10008.5.1.4.1.1.2"


def _inst(sop: str, series: str = "1.2.3.4", modality: str = "CT", frame: str | None = "1.2.3.9") -> NewInstance:
    return NewInstance(sop, CT, modality, "1.2.3", series, frame, "PAT1", {"image_position": [0, 0, float(len(sop))]})


def _put(store: Store, inst: NewInstance, data: bytes = b"DICM") -> object:
    tmp = store.files.new_temp()
    tmp.write_bytes(data)
    return store.store_instance(inst, tmp, "TPS", len(data))


def test_migrations_match_models(store):
    assert schema_is_current(store.engine)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_instance_stored_once_and_file_in_place(store):
    first = _put(store, _inst("1.2.3.4.1"), b"first")
    again = _put(store, _inst("1.2.3.4.1"), b"second")
    assert first.created and not again.created
    path = store.files.abspath(first.relpath)
    assert path.read_bytes() == b"first"  # a duplicate never overwrites what was acknowledged
    assert store.counts()["instances"] == 1
    assert list(store.files.incoming_dir.iterdir()) == []  # the duplicate's temp file is gone


def test_ct_series_creates_case_and_rt_links_later(store):
    for n in range(3):
        _put(store, _inst(f"1.2.3.4.{n}"))
    _put(store, _inst("1.2.3.5.1", series="1.2.3.5", modality="RTDOSE"))
    cases = store.list_cases()
    assert len(cases) == 1 and cases[0].state == CaseState.RECEIVED.value
    series = store.get_series("1.2.3.4")
    assert series.instance_count == 3 and series.state == "OPEN"
    assert store.get_series("1.2.3.5").case_id is None


def test_stable_series_respects_age(store):
    _put(store, _inst("1.2.3.4.1"))
    assert store.stable_series(60.0) == []
    stable = store.stable_series(0.0, now=time.time() + 1)
    assert [s.series_uid for s in stable] == ["1.2.3.4"]


def test_close_series_refuses_when_more_arrived(store):
    _put(store, _inst("1.2.3.4.1"))
    _put(store, _inst("1.2.3.4.2"))
    assert not store.close_series("1.2.3.4", "ASSEMBLED", seen_count=1)
    assert store.close_series("1.2.3.4", "ASSEMBLED", seen_count=2)
    _put(store, _inst("1.2.3.4.3"))  # late instance re-opens the series
    assert store.get_series("1.2.3.4").state == "OPEN"


def test_case_state_history(store):
    _put(store, _inst("1.2.3.4.1"))
    case = store.list_cases()[0]
    assert store.finish_assembly("1.2.3.4", 1, series_state="INCOMPLETE", case_state=CaseState.INCOMPLETE,
                                 reason="missing slice between z = 10 and z = 15 mm")
    _put(store, _inst("1.2.3.4.2"))  # more data: back to RECEIVED
    assert store.get_case(case.id).state == CaseState.RECEIVED.value
    store.set_case_state(case.id, CaseState.READY, n_slices=2)
    events = [(e.from_state, e.to_state) for e in store.case_events(case.id)]
    assert events == [(None, "RECEIVED"), ("RECEIVED", "INCOMPLETE"), ("INCOMPLETE", "RECEIVED"), ("RECEIVED", "READY")]
    assert store.get_case(case.id).n_slices == 2


def test_parallel_writers_lose_nothing(store):
    errors: list[BaseException] = []

    def push(series: int) -> None:
        try:
            for n in range(15):
                _put(store, _inst(f"1.2.{series}.{n}", series=f"1.2.{series}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert store.counts() == {"instances": 90, "series": 6, "cases": 6, "quarantined": 0}


def test_job_queue_claim_finish_retry_and_dedupe(store):
    a = store.enqueue("assemble", {"series": "1"}, dedupe_key="assemble:1")
    assert store.enqueue("assemble", {"series": "1"}, dedupe_key="assemble:1") is None
    job = store.claim_job()
    assert job.id == a and job.state == JobState.RUNNING.value and job.attempts == 1
    assert store.claim_job() is None  # leased
    assert store.fail_job(job.id, "boom", retry_in_s=0) == JobState.PENDING.value
    job = store.claim_job()
    store.finish_job(job.id)
    assert store.jobs(JobState.DONE.value)[0].id == a
    assert store.enqueue("assemble", {"series": "1"}, dedupe_key="assemble:1") is not None  # key free again


def test_job_lease_expiry_recovers_crashed_job(store):
    store.enqueue("contour", {"case": 1})
    job = store.claim_job(lease_s=0.2, worker="crashed-worker")
    assert store.claim_job() is None
    time.sleep(0.3)
    again = store.claim_job(worker="new-worker")
    assert again is not None and again.id == job.id and again.worker == "new-worker" and again.attempts == 2


def test_job_gives_up_after_max_attempts(store):
    store.enqueue("x", max_attempts=2)
    for _ in range(2):
        job = store.claim_job()
        state = store.fail_job(job.id, "bad input", retry_in_s=0)
    assert state == JobState.FAILED.value
    assert store.claim_job() is None


def test_outbox_backoff_sent_once(store):
    rel = store.files.output_relpath(1, "1.2.9")
    store.files.write_bytes(rel, b"rtstruct")
    item = store.queue_output("tps", sop_instance_uid="1.2.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.481.3",
                              relpath=rel)
    assert store.queue_output("tps", sop_instance_uid="1.2.9", sop_class_uid="x", relpath=rel) is None
    assert [o.id for o in store.due_outputs()] == [item]
    store.mark_output_failed(item, "association refused", backoff_initial_s=30, backoff_max_s=60, max_attempts=5)
    assert store.due_outputs() == []
    assert [o.id for o in store.due_outputs(now=time.time() + 31)] == [item]
    store.mark_output_sent(item)
    assert store.due_outputs(now=time.time() + 1e6) == []
    assert store.outputs()[0].state == OutboxState.SENT.value


def test_outbox_gives_up_then_manual_retry(store):
    item = store.queue_output("tps", sop_instance_uid="1.2.10", sop_class_uid="x", relpath="outputs/a.dcm")
    for _ in range(3):
        state = store.mark_output_failed(item, "down", backoff_initial_s=0, backoff_max_s=0, max_attempts=3)
    assert state == OutboxState.FAILED.value
    store.retry_output(item)
    assert [o.id for o in store.due_outputs()] == [item]


def test_quarantine_keeps_file_and_reason(store):
    tmp = store.files.new_temp()
    tmp.write_bytes(b"not dicom at all")
    qid = store.quarantine(tmp, status=0xC210, reason="not a DICOM file", calling_ae="TPS")
    row = store.quarantined()[0]
    assert row.id == qid and row.status == 0xC210 and "not a DICOM" in row.reason
    assert store.files.abspath(row.path).read_bytes() == b"not dicom at all"
    assert store.files.abspath(row.path).with_suffix(".json").exists()


@pytest.mark.parametrize("uid", ["../../etc/passwd", "/abs/path", "1.2/../../x", "a" * 200, "1.2.3\x00", ""])
def test_uid_can_never_escape_root(sqlite_store, uid):
    rel = sqlite_store.files.instance_relpath(uid, uid, uid)
    path = sqlite_store.files.abspath(rel)
    assert sqlite_store.files.root in path.parents
    assert "/" not in uid_component(uid) and ".." not in uid_component(uid)


def test_abspath_refuses_escape(sqlite_store):
    with pytest.raises(ValueError):
        sqlite_store.files.abspath("../outside.dcm")


def test_atomic_write_leaves_no_partial_file(sqlite_store, monkeypatch):
    import os

    rel = "outputs/x.dcm"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr("shutil.copyfile", boom)
    with pytest.raises(OSError):
        sqlite_store.files.write_bytes(rel, b"data")
    assert not sqlite_store.files.abspath(rel).exists()


def test_index_existing_is_idempotent(store):
    rel = store.files.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.9")
    store.files.write_bytes(rel, b"x")
    inst = _inst("1.2.3.4.9")
    assert store.index_existing(inst, rel, "", 1, 0.0)
    assert not store.index_existing(inst, rel, "", 1, 0.0)
    assert store.indexed_paths() == {rel}
    assert store.list_cases()[0].state == "RECEIVED"


def test_new_slices_reopen_a_ready_case(store):
    _put(store, _inst("1.2.3.4.1"))
    assert store.finish_assembly("1.2.3.4", 1, series_state="ASSEMBLED", case_state=CaseState.READY)
    _put(store, _inst("1.2.3.4.2"))
    case = store.list_cases()[0]
    assert case.state == CaseState.RECEIVED.value
    assert store.get_series("1.2.3.4").state == "OPEN"


def test_predictions_and_corrections_are_kept(store):
    _put(store, _inst("1.2.3.4.1"))
    case = store.list_cases()[0]
    p1 = store.record_prediction(case.id, model_version="000001", mask_path="predictions/a.npz", voxels=10,
                                 volume_cc=1.0, seconds=0.5)
    p2 = store.record_prediction(case.id, model_version="000002", mask_path="predictions/b.npz", voxels=12,
                                 volume_cc=1.2, seconds=0.4)
    assert [p.id for p in store.predictions(case.id)] == [p1, p2]
    assert store.latest_prediction(case.id).model_version == "000002"
    c = store.record_correction(case.id, kind="sparse", path="corrections/c.npz", corrected_by="A. Dosimetrist",
                                fg_voxels=5, bg_voxels=3, prediction_id=p2)
    store.set_correction_split(c, "train")
    store.set_correction_split(c, "train")
    with pytest.raises(ValueError, match="never changes"):
        store.set_correction_split(c, "val")
    with pytest.raises(ValueError):
        store.record_correction(case.id, kind="scribble", path="x", corrected_by="x", fg_voxels=0, bg_voxels=0)
    assert [(r.id, r.split) for r in store.corrections()] == [(c, "train")]
