"""Dose results and deltas in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from heartloop.store import NewInstance, Store

CT = "1.2.840.10008.5.1.4.1.1.2"


def _case(store: Store, series: str) -> int:
    tmp = store.files.new_temp()
    tmp.write_bytes(b"DICM")
    inst = NewInstance(f"{series}.1", CT, "CT", "1.2.3", series, "1.2.3.9", "PAT1", {})
    return store.store_instance(inst, tmp, "TPS", 4).case_id


def test_dose_results_and_deltas_round_trip(store):
    case_a, case_b = _case(store, "1.2.3.4"), _case(store, "1.2.3.5")
    metrics = {"volume_cc": 612.5, "mean_gy": 3.25, "dvh_dose_gy": [0.0, 0.1], "dvh_volume_pct": [100.0, 0.0]}
    pred = store.record_dose(case_a, label="predicted", metrics=metrics, mean_gy=3.25, roi_name="Heart_AI",
                             rtdose_sop_instance_uids=["1.2.9.1", "1.2.9.2"], model_version="000007")
    corr = store.record_dose(case_a, label="corrected", metrics={**metrics, "mean_gy": 3.5}, mean_gy=3.5,
                             roi_name="Heart", rtstruct_sop_instance_uid="1.2.8.1", description="corrected")
    store.record_dose(case_b, label="model:000008", metrics=metrics, mean_gy=3.0)
    delta = store.record_dose_delta(case_a, reference_label="predicted", other_label="corrected",
                                    delta={"differences": {"mean_gy": 0.25}}, mean_delta_gy=0.25, flagged=True,
                                    reasons=["mean heart dose differs by 0.25 Gy (> 0.2 Gy)"],
                                    reference_result_id=pred, other_result_id=corr)

    rows = store.dose_results(case_a)
    assert [r.label for r in rows] == ["predicted", "corrected"]
    assert json.loads(rows[0].metrics_json) == metrics
    assert json.loads(rows[0].rtdose_sop_instance_uids) == ["1.2.9.1", "1.2.9.2"]
    assert rows[0].model_version == "000007" and rows[1].rtstruct_sop_instance_uid == "1.2.8.1"
    assert [r.id for r in store.dose_results(case_a, label="corrected")] == [corr]
    (d,) = store.dose_deltas(case_a)
    assert d.id == delta and d.flagged is True and d.mean_delta_gy == pytest.approx(0.25)
    assert json.loads(d.reasons) == ["mean heart dose differs by 0.25 Gy (> 0.2 Gy)"]
    assert (d.reference_result_id, d.other_result_id) == (pred, corr)
    assert store.dose_deltas(case_b) == []

    everything = store.all_dose_rows()
    assert [(r.case_id, r.label) for r in everything.results] == [
        (case_a, "predicted"), (case_a, "corrected"), (case_b, "model:000008")]
    assert [x.id for x in everything.deltas] == [delta]


def test_dose_label_required(store):
    case = _case(store, "1.2.3.6")
    with pytest.raises(ValueError, match="label"):
        store.record_dose(case, label="", metrics={}, mean_gy=None)
