"""Deltas between two contours' dose statistics: differences, flags, reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from heartloop.dose import DoseStats, DoseThresholds, compare


def _stats(volume_cc=600.0, mean_gy=3.0, max_gy=20.0, d2_gy=15.0, d98_gy=0.5, v=(12.0, 6.0, 2.0, 0.0)) -> DoseStats:
    return DoseStats(
        volume_cc=volume_cc, mean_gy=mean_gy, min_gy=0.1, max_gy=max_gy, d2_gy=d2_gy, d98_gy=d98_gy,
        v5_pct=v[0], v10_pct=v[1], v20_pct=v[2], v30_pct=v[3],
        v5_cc=v[0] * volume_cc / 100, v10_cc=v[1] * volume_cc / 100, v20_cc=v[2] * volume_cc / 100,
        v30_cc=v[3] * volume_cc / 100, outside_fraction=0.0,
        dvh_dose_gy=np.array([0.0, 10.0, 20.0, 30.0]), dvh_volume_pct=np.array([100.0, 6.0, 2.0, 0.0]),
    )


def test_identical_stats_are_not_flagged():
    delta = compare(_stats(), _stats())
    assert not delta.flagged and delta.reasons == ()
    assert all(v == 0.0 for v in delta.differences.values())


def test_every_difference_is_other_minus_reference():
    ref, other = _stats(), _stats(volume_cc=660.0, mean_gy=3.3, max_gy=21.0, v=(13.0, 6.5, 2.0, 0.0))
    delta = compare(ref, other)
    assert delta.differences["mean_gy"] == pytest.approx(0.3)
    assert delta.mean_gy == pytest.approx(0.3)
    assert delta.differences["max_gy"] == pytest.approx(1.0)
    assert delta.differences["volume_cc"] == pytest.approx(60.0)
    assert delta.differences["volume_pct"] == pytest.approx(10.0)
    assert delta.differences["v5_pct"] == pytest.approx(1.0)
    assert set(delta.differences) >= set(ref.to_dict())
    assert not delta.flagged  # all within the defaults (10 % volume is not more than 10 %)


def test_mean_dose_flag_and_reason():
    delta = compare(_stats(mean_gy=3.0), _stats(mean_gy=2.38))
    assert delta.flagged
    assert delta.reasons == ("mean heart dose differs by 0.62 Gy (> 0.5 Gy)",)


def test_each_metric_has_its_own_threshold():
    ref = _stats()
    other = _stats(volume_cc=700.0, mean_gy=3.1, max_gy=23.0, d2_gy=16.5, d98_gy=0.4, v=(19.0, 6.0, 2.0, 0.0))
    delta = compare(ref, other)
    assert delta.flagged
    text = "\n".join(delta.reasons)
    assert "max dose differs by 3.00 Gy (> 2 Gy)" in text
    assert "D2% differs by 1.50 Gy (> 1 Gy)" in text
    assert "V5Gy differs by 7.0 percentage points (> 5)" in text
    assert "volume differs by 16.7 %" in text
    assert "mean heart dose" not in text and "D98%" not in text
    # Custom thresholds (e.g. from settings) change what is flagged.
    lenient = DoseThresholds(mean_gy=1.0, max_gy=5.0, d2_gy=2.0, d98_gy=1.0, v_pct=10.0, volume_pct=20.0)
    assert not compare(ref, other, lenient).flagged
    strict = DoseThresholds(mean_gy=0.05)
    assert any(r.startswith("mean heart dose differs by 0.10 Gy") for r in compare(ref, other, strict).reasons)


def test_to_dict_is_json_safe():
    delta = compare(_stats(), _stats(mean_gy=4.0))
    data = json.loads(json.dumps(delta.to_dict()))
    assert data["flagged"] is True and data["differences"]["mean_gy"] == pytest.approx(1.0)
    assert data["reasons"] == list(delta.reasons)


@pytest.mark.parametrize("bad", [{"mean_gy": -0.1}, {"v_pct": float("inf")}, {"max_gy": "2"}, {"d2_gy": True}])
def test_thresholds_validate(bad):
    with pytest.raises(ValueError):
        DoseThresholds(**bad)
