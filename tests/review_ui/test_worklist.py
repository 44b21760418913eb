"""The worklist: `/`, ``GET /api/cases`` (fields, filters, next case, query count) and ``/next``."""

from __future__ import annotations


import pytest
from sqlalchemy import event

from heartloop.store.models import Case
from tests.review_ui.conftest import Client


def add_case(store, state: str, *, arrived: float, patient_id: str = "PAT-1", n_slices: int = 40) -> int:
    with store.session() as s, s.begin():
        row = Case(ct_series_uid=f"1.2.3.{arrived!r}.{state}", study_uid="1.2.3", patient_id=patient_id,
                   frame_of_reference_uid=None, state=state, reason=None, n_slices=n_slices,
                   created_at=arrived, updated_at=arrived)
        s.add(row)
        s.flush()
        return row.id


def predict(store, case_id: int, version: str) -> None:
    store.record_prediction(case_id, model_version=version, mask_path=f"m{case_id}{version}.npz", voxels=10,
                            volume_cc=1.0, seconds=0.1)


def test_root_is_login_page_for_visitors_and_worklist_for_staff(ui_app_factory, client_for):
    app = ui_app_factory()
    anon = Client(app)
    rsp = anon.get("/")
    assert rsp.status_code == 200
    page = rsp.get_data(as_text=True)
    assert 'name="password"' in page and 'id="cases"' not in page
    staff = client_for(app)
    page = staff.get("/").get_data(as_text=True)
    assert 'id="cases"' in page and "Review next case" in page and "worklist.js" in page


def test_api_cases_fields_next_and_filters(ui_app_factory, client_for, sqlite_store):
    db = sqlite_store
    t0 = 1_700_000_000.0
    old_pred = add_case(db, "PREDICTED", arrived=t0 + 1, patient_id="PX-001")
    incomplete = add_case(db, "INCOMPLETE", arrived=t0 + 2)
    cold = add_case(db, "NO_MODEL", arrived=t0 + 3)
    corrected = add_case(db, "CORRECTED", arrived=t0 + 4)
    predict(db, old_pred, "000001")
    predict(db, old_pred, "000002")  # the newest prediction's version is shown
    db.record_dose(old_pred, label="predicted", metrics={}, mean_gy=3.0)
    db.record_dose(old_pred, label="predicted", metrics={}, mean_gy=3.5)
    db.record_dose(old_pred, label="corrected", metrics={}, mean_gy=9.0)  # not the predicted dose
    db.record_dose_delta(corrected, reference_label="predicted", other_label="corrected", delta={},
                         mean_delta_gy=0.1, flagged=False)
    db.record_dose_delta(corrected, reference_label="predicted", other_label="corrected", delta={},
                         mean_delta_gy=-1.25, flagged=True)

    client = client_for(ui_app_factory())
    data = client.get("/api/cases").get_json()
    assert [c["id"] for c in data["cases"]] == [corrected, cold, incomplete, old_pred]  # newest first
    assert data["next_case_id"] == old_pred  # the oldest reviewable
    by_id = {c["id"]: c for c in data["cases"]}
    first = by_id[old_pred]
    assert set(first) == {"id", "state", "reason", "arrived_at", "updated_at", "n_slices", "model_version",
                          "predicted_mean_gy", "mean_delta_gy", "dose_flagged", "incomplete", "reviewable",
                          "patient_name", "patient_id"}
    assert first["model_version"] == "000002" and first["predicted_mean_gy"] == 3.5
    assert first["arrived_at"] == t0 + 1 and first["reviewable"] and first["patient_id"] == "PX-001"
    assert by_id[corrected]["mean_delta_gy"] == -1.25 and by_id[corrected]["dose_flagged"]
    assert by_id[incomplete]["incomplete"] and not by_id[incomplete]["reviewable"]
    assert by_id[cold]["reviewable"] and by_id[cold]["model_version"] is None

    flagged = client.get("/api/cases?flagged=1").get_json()["cases"]
    assert sorted(c["id"] for c in flagged) == sorted([corrected, incomplete])
    unflagged = client.get("/api/cases?flagged=0").get_json()["cases"]
    assert sorted(c["id"] for c in unflagged) == sorted([cold, old_pred])
    review = client.get("/api/cases?state=PREDICTED,NO_MODEL").get_json()["cases"]
    assert sorted(c["id"] for c in review) == sorted([cold, old_pred])
    assert client.get("/api/cases?state=BOGUS").status_code == 400
    assert client.get("/api/cases?flagged=maybe").status_code == 400

    assert client.get(f"/api/cases/{old_pred}/next").get_json() == {"next_case_id": cold}
    assert client.get(f"/api/cases/{cold}/next").get_json() == {"next_case_id": old_pred}  # wraps round
    assert client.get(f"/api/cases/{corrected}/next").get_json() == {"next_case_id": old_pred}
    assert client.get("/api/cases/9999/next").status_code == 404


def test_no_reviewable_case_means_null_next(ui_app_factory, client_for, sqlite_store):
    only = add_case(sqlite_store, "PREDICTED", arrived=1.0)
    add_case(sqlite_store, "SENT", arrived=2.0)
    client = client_for(ui_app_factory())
    assert client.get(f"/api/cases/{only}/next").get_json() == {"next_case_id": None}
    sqlite_store.set_case_state(only, "CORRECTED")
    assert client.get("/api/cases").get_json()["next_case_id"] is None


def test_api_cases_query_count_does_not_grow_with_cases(ui_app_factory, client_for, sqlite_store):
    """300 cases with predictions, doses and deltas: the listing costs the same few statements as 3."""
    db = sqlite_store
    client = client_for(ui_app_factory())

    def count_statements() -> tuple[int, int]:
        statements: list[str] = []

        def on_execute(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
            statements.append(statement)

        event.listen(db.engine, "before_cursor_execute", on_execute)
        try:
            rsp = client.get("/api/cases")
        finally:
            event.remove(db.engine, "before_cursor_execute", on_execute)
        assert rsp.status_code == 200
        return len(statements), len(rsp.get_json()["cases"])

    def add(n: int, start: int) -> None:
        for k in range(start, start + n):
            cid = add_case(db, "PREDICTED" if k % 3 else "SENT", arrived=float(k))
            predict(db, cid, f"{k:06d}")
            db.record_dose(cid, label="predicted", metrics={}, mean_gy=float(k))
            if k % 5 == 0:
                db.record_dose_delta(cid, reference_label="predicted", other_label="corrected", delta={},
                                     mean_delta_gy=0.7, flagged=True)

    add(3, 0)
    few, n_few = count_statements()
    add(297, 3)
    many, n_many = count_statements()
    assert (n_few, n_many) == (3, 300)
    assert many == few, f"{few} statements for 3 cases but {many} for 300 (a query per case?)"
    assert many <= 8


def test_worklist_store_queries_on_every_database(store):
    """The grouped worklist statement and the row-value comparison of `next_reviewable_case` are
    portable (SQLite and PostgreSQL)."""
    a = add_case(store, "PREDICTED", arrived=10.0)
    b = add_case(store, "INCOMPLETE", arrived=10.0)  # same arrival time: the id breaks the tie
    c = add_case(store, "NO_MODEL", arrived=10.0)
    predict(store, a, "000004")
    store.record_dose_delta(a, reference_label="predicted", other_label="corrected", delta={}, mean_delta_gy=2.0,
                            flagged=True)
    rows = store.worklist()
    assert [r.id for r in rows] == [c, b, a]
    assert sorted(r.id for r in store.worklist(flagged=True)) == sorted([a, b])
    assert [r.id for r in store.worklist(flagged=False)] == [c]
    assert [r.id for r in store.worklist(states=["PREDICTED"])] == [a]
    assert store.worklist(case_id=a)[0].model_version == "000004"
    assert store.next_reviewable_case() == a
    assert store.next_reviewable_case(a) == c and store.next_reviewable_case(b) == c
    assert store.next_reviewable_case(c) == a
    with pytest.raises(KeyError):
        store.next_reviewable_case(999)
