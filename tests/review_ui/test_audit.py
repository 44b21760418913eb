"""The tamper-evident audit log: the chain detects edited, deleted and reordered rows; the API and page."""

from __future__ import annotations

from sqlalchemy import text

from tests.review_ui.conftest import Client


def fill_log(store, n: int = 5) -> list[int]:
    return [store.append_audit(f"user{k}", "view_case", f"case:{k}", {"k": k}) for k in range(n)]


def test_untouched_chain_passes(sqlite_store):
    fill_log(sqlite_store)
    check = sqlite_store.verify_audit()
    assert check.ok and check.rows == 5 and check.broken_id is None


def test_edited_row_is_named(sqlite_store):
    ids = fill_log(sqlite_store)
    with sqlite_store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET detail_json = :d WHERE id = :id"), {"d": '{"k":99}', "id": ids[2]})
    check = sqlite_store.verify_audit()
    assert not check.ok and check.broken_id == ids[2] and "edited" in check.reason


def test_edited_actor_is_named(sqlite_store):
    ids = fill_log(sqlite_store)
    with sqlite_store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'someone_else' WHERE id = :id"), {"id": ids[1]})
    assert sqlite_store.verify_audit().broken_id == ids[1]


def test_deleted_row_breaks_the_next_link(sqlite_store):
    ids = fill_log(sqlite_store)
    with sqlite_store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": ids[3]})
    check = sqlite_store.verify_audit()
    assert not check.ok and check.broken_id == ids[4] and "deleted" in check.reason


def test_rewritten_row_with_recomputed_hash_breaks_the_next_link(sqlite_store):
    """A forger who recomputes the edited row's hash still breaks the link of the row after it."""
    from heartloop.store.people import audit_hash

    ids = fill_log(sqlite_store)
    row = sqlite_store.audit_entries(limit=10)[::-1][2]
    forged = audit_hash(row.prev_hash, row.at, row.actor, row.action, row.target, '{"k":42}')
    with sqlite_store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET detail_json = :d, hash = :h WHERE id = :id"),
                     {"d": '{"k":42}', "h": forged, "id": ids[2]})
    assert sqlite_store.verify_audit().broken_id == ids[3]


def test_audit_api_filters_and_verify(ui_app_factory, client_for, sqlite_store):
    app = ui_app_factory()
    admin = client_for(app, "admin", "phys")
    reviewer = client_for(app, "reviewer", "rev")
    fill_log(sqlite_store, 3)
    assert reviewer.get("/api/audit").status_code == 403
    entries = admin.get("/api/audit").get_json()["entries"]
    assert entries[0]["action"] == "view_case" and entries[0]["detail"] == {"k": 2}
    assert {"id", "at", "actor", "action", "target", "detail", "hash", "prev_hash"} <= set(entries[0])
    logins = admin.get("/api/audit?action=login").get_json()["entries"]
    assert sorted(e["actor"] for e in logins) == ["phys", "rev"]
    assert [e["actor"] for e in admin.get("/api/audit?actor=user1").get_json()["entries"]] == ["user1"]
    page = admin.get(f"/api/audit?limit=2&before={entries[0]['id']}").get_json()["entries"]
    assert [e["id"] for e in page] == [entries[1]["id"], entries[2]["id"]]
    assert admin.get("/api/audit?limit=0").status_code == 400

    assert admin.get("/api/audit/verify").get_json()["ok"] is True
    victim = entries[1]["id"]
    with sqlite_store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET target = 'case:666' WHERE id = :id"), {"id": victim})
    result = admin.get("/api/audit/verify").get_json()
    assert result["ok"] is False and result["broken_id"] == victim and result["reason"]


def test_logins_logouts_and_admin_actions_are_audited(ui_app_factory, client_for, sqlite_store):
    app = ui_app_factory()
    admin = client_for(app, "admin", "phys")
    admin.post("/api/users", json={"username": "newbie", "password": "long enough pw", "role": "reviewer"})
    admin.send("PATCH", "/api/users/newbie", json={"role": "admin"})
    admin.send("DELETE", "/api/session")
    actions = [(e.actor, e.action, e.target) for e in sqlite_store.audit_entries()][::-1]
    assert actions == [("phys", "login", "user:phys"), ("phys", "user_create", "user:newbie"),
                       ("phys", "user_change", "user:newbie"), ("phys", "logout", "user:phys")]
    assert sqlite_store.verify_audit().ok


def test_audit_page_for_admins(ui_app_factory, client_for):
    app = ui_app_factory()
    page = client_for(app, "admin").get("/audit")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'id="verify"' in html and "audit.js" in html
    assert Client(app).get("/audit").status_code == 302
