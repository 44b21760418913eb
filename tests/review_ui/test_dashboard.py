"""The dashboard: per-case series in correction order with running means, the trainer panel, the page."""

from __future__ import annotations

import pytest

from heartloop.review_ui import UiServices
from heartloop.review_ui.dashboard import running_mean
from tests.helpers.viewer import insert_case
from tests.review_ui.conftest import Client

TRAINER = {"state": "training", "current_version": "000003", "best_val_dice": 0.91, "epochs": 42,
           "epochs_without_progress": 4, "train_cases": 10, "val_cases": 2, "updated_at": "2026-01-01T10:00:00+00:00"}


def _services() -> UiServices:
    def unused(*_args):  # the dashboard needs only the trainer's status
        raise AssertionError("not used by the dashboard")

    return UiServices(load_volume=unused, load_prediction=unused, load_dose=unused, save_correction=unused,
                      request_prediction=unused, list_models=unused, rollback_model=unused,
                      trainer_status=lambda: dict(TRAINER))


def _correct(store, case_id: int, *, prediction_version: str | None, seconds: float | None, dice: float | None,
             fg: int = 10, bg: int = 5) -> int:
    prediction_id = None
    if prediction_version is not None:
        prediction_id = store.record_prediction(case_id, model_version=prediction_version, mask_path="m.npz",
                                                voxels=100, volume_cc=1.0, seconds=0.1)
    return store.record_correction(case_id, kind="sparse" if prediction_id else "dense", path="c.npz",
                                   corrected_by="Curie^Marie", fg_voxels=fg, bg_voxels=bg, prediction_id=prediction_id,
                                   active_seconds=seconds, dice=dice)


def test_running_mean_skips_missing_values():
    assert running_mean([], 5) == []
    assert running_mean([None, 2.0, 4.0, None], 2) == [None, 2.0, 3.0, 4.0]
    assert running_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 5) == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 4.0])


def test_dashboard_series_in_correction_order(ui_app_factory, client_for, sqlite_store):
    app = ui_app_factory(_services())
    client = client_for(app)
    assert client.get("/api/dashboard").get_json() == {"cases": [], "running_mean": {
        "active_seconds": [], "dice": [], "abs_delta_mean_gy": []}, "window": 5}

    first, second, third = (insert_case(sqlite_store) for _ in range(3))
    _correct(sqlite_store, second, prediction_version=None, seconds=300.0, dice=None, fg=5000, bg=0)  # cold start
    _correct(sqlite_store, first, prediction_version="000001", seconds=120.0, dice=0.80)
    sqlite_store.record_dose_delta(first, reference_label="predicted", other_label="corrected", delta={},
                                   mean_delta_gy=-0.75, flagged=True)
    _correct(sqlite_store, third, prediction_version="000002", seconds=None, dice=0.90)
    _correct(sqlite_store, first, prediction_version="000002", seconds=60.0, dice=0.95)  # corrected again: moves last
    sqlite_store.record_dose_delta(first, reference_label="predicted", other_label="corrected", delta={},
                                   mean_delta_gy=0.25, flagged=False)

    data = client.get("/api/dashboard").get_json()
    rows = data["cases"]
    assert [r["case_id"] for r in rows] == [second, third, first]
    assert [r["order"] for r in rows] == [1, 2, 3]
    assert rows[0] | {"corrected_at": None} == {"order": 1, "case_id": second, "corrected_at": None,
                                                "active_seconds": 300.0, "dice": None, "abs_delta_mean_gy": None,
                                                "model_version": None, "corrected_voxels": 5000}
    assert rows[1]["model_version"] == "000002" and rows[1]["active_seconds"] is None
    assert rows[1]["abs_delta_mean_gy"] is None
    assert rows[2]["dice"] == 0.95 and rows[2]["abs_delta_mean_gy"] == 0.25  # the latest correction's delta
    assert rows[2]["corrected_voxels"] == 15
    assert data["running_mean"]["active_seconds"] == [300.0, 300.0, 180.0]
    assert data["running_mean"]["dice"] == [None, 0.90, pytest.approx(0.925)]
    assert data["running_mean"]["abs_delta_mean_gy"] == [None, None, 0.25]
    assert rows[0]["corrected_at"] <= rows[1]["corrected_at"] <= rows[2]["corrected_at"]


def test_trainer_endpoint_and_page(ui_app_factory, client_for):
    app = ui_app_factory(_services())
    assert Client(app).get("/api/trainer").status_code == 401
    assert Client(app).get("/api/dashboard").status_code == 401
    assert Client(app).get("/dashboard").status_code == 302  # pages send visitors to the login page
    client = client_for(app)
    assert client.get("/api/trainer").get_json() == TRAINER
    page = client.get("/dashboard")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for needle in ("js/dashboard.js", "css/dashboard.css", 'id="fig-time"', 'id="fig-dice"', 'id="fig-dose"',
                   'id="t-version"', 'id="t-stall"', 'id="t-cases"'):
        assert needle in html
    assert "http://" not in html and "https://" not in html  # no CDN: everything from the package
    js = client.get("/static/js/dashboard.js")
    assert js.status_code == 200 and b"HL.api" in js.data


def test_without_services_the_trainer_endpoint_is_503(ui_app_factory, client_for):
    client = client_for(ui_app_factory(None))
    assert client.get("/api/trainer").status_code == 503
    assert client.get("/api/dashboard").status_code == 200  # the series come from the store alone
