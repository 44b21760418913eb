"""Administration: users, models and rollback, settings — admin only, every change audited."""

from __future__ import annotations

import json

from heartloop.review_ui.admin import redact_url, redacted
from heartloop.review_ui.security import password_matches
from tests.review_ui.conftest import Client
from tests.review_ui.test_security import RecordingServices


def test_user_lifecycle(ui_app_factory, client_for, sqlite_store):
    app = ui_app_factory()
    admin = client_for(app, "admin", "phys")
    rsp = admin.post("/api/users", json={"username": "dana", "password": "dana's password", "role": "reviewer",
                                         "display_name": "Doe^Dana"})
    assert rsp.status_code == 201
    assert rsp.get_json()["user"] == {"username": "dana", "display_name": "Doe^Dana", "role": "reviewer",
                                      "active": True, "created_at": rsp.get_json()["user"]["created_at"]}
    assert "password" not in json.dumps(admin.get("/api/users").get_json())
    assert admin.post("/api/users", json={"username": "dana", "password": "x" * 10, "role": "reviewer"}).status_code == 409
    assert admin.post("/api/users", json={"username": "erin", "password": "short", "role": "reviewer"}).status_code == 400
    assert admin.post("/api/users", json={"username": "erin", "password": "x" * 10, "role": "root"}).status_code == 400
    assert admin.post("/api/users", json={"username": "bad name!", "password": "x" * 10, "role": "reviewer"}).status_code == 400
    assert sqlite_store.get_user("erin") is None

    dana = Client(app)
    assert dana.login("dana", "dana's password").status_code == 200
    assert admin.send("PATCH", "/api/users/dana", json={"role": "admin"}).get_json()["user"]["role"] == "admin"
    assert dana.get("/api/users").status_code == 200  # the new role counts at once
    assert admin.send("PATCH", "/api/users/dana", json={"password": "a new password"}).status_code == 200
    assert password_matches(sqlite_store.get_user("dana").password_hash, "a new password")
    assert dana.get("/api/users").status_code == 401  # a password reset ends her sessions
    assert admin.send("PATCH", "/api/users/dana", json={"active": False}).get_json()["user"]["active"] is False
    assert Client(app).login("dana", "a new password").status_code == 401
    assert admin.send("PATCH", "/api/users/dana", json={"active": "no"}).status_code == 400
    assert admin.send("PATCH", "/api/users/dana", json={"password_hash": "x"}).status_code == 400
    assert admin.send("PATCH", "/api/users/nobody", json={"active": False}).status_code == 404

    changes = [(e.action, e.target, json.loads(e.detail_json).get("changed"))
               for e in sqlite_store.audit_entries(actor="phys")][::-1]
    assert changes == [("login", "user:phys", None), ("user_create", "user:dana", None),
                       ("user_change", "user:dana", ["role"]), ("user_change", "user:dana", ["password"]),
                       ("user_change", "user:dana", ["active"])]
    assert "a new password" not in json.dumps([e.detail_json for e in sqlite_store.audit_entries()])


def test_last_admin_cannot_lock_everyone_out(ui_app_factory, client_for):
    app = ui_app_factory()
    admin = client_for(app, "admin", "phys")
    assert admin.send("PATCH", "/api/users/phys", json={"role": "reviewer"}).status_code == 409
    assert admin.send("PATCH", "/api/users/phys", json={"active": False}).status_code == 409
    client_for(app, "admin", "other")
    assert admin.send("PATCH", "/api/users/phys", json={"role": "reviewer"}).status_code == 200


def test_models_and_rollback(ui_app_factory, client_for, sqlite_store):
    recorder = RecordingServices()
    app = ui_app_factory(recorder.build())
    admin = client_for(app, "admin", "phys")
    models = admin.get("/api/models").get_json()["models"]
    assert [m["version"] for m in models] == ["000002", "000001"] and models[0]["current"]
    assert admin.post("/api/models/000009/rollback").status_code == 404
    assert admin.post("/api/models/000001/rollback").get_json() == {"current": "000001"}
    assert [a for a in recorder.calls if a[0] == "rollback_model"] == [("rollback_model", ("000009",)),
                                                                        ("rollback_model", ("000001",))]
    actions = [(e.action, e.target) for e in sqlite_store.audit_entries(actor="phys")][:2]
    assert actions == [("rollback_model", "model:000001"), ("rollback_model_refused", "model:000009")]


def test_without_services_model_endpoints_answer_503(ui_app_factory, client_for):
    admin = client_for(ui_app_factory(), "admin")
    assert admin.get("/api/models").status_code == 503
    assert admin.post("/api/models/000001/rollback").status_code == 503


def test_settings_view_hides_passwords(ui_app_factory, client_for, make_settings, sqlite_store):
    settings = make_settings(storage={"database_url": "postgresql+psycopg://heart:s3cret@db.local:5432/heartloop"})
    app = ui_app_factory(settings=settings)
    admin = client_for(app, "admin", "phys")
    data = admin.get("/api/settings").get_json()["settings"]
    assert data["storage"]["database_url"] == "postgresql+psycopg://heart:***@db.local:5432/heartloop"
    assert data["http"]["idle_timeout_min"] == settings.http.idle_timeout_min
    assert "s3cret" not in admin.get("/api/settings").get_data(as_text=True)
    assert sqlite_store.audit_entries(action="view_settings")


def test_redaction_helpers():
    assert redact_url("sqlite:////srv/heartloop.db") == "sqlite:////srv/heartloop.db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    assert redacted({"a": {"admin_password": "x", "n": 3, "urls": ["http://a:b@c"]}}) == \
        {"a": {"admin_password": "***", "n": 3, "urls": ["http://a:***@c"]}}


def test_admin_page(ui_app_factory, client_for):
    app = ui_app_factory()
    html = client_for(app, "admin").get("/admin").get_data(as_text=True)
    assert 'id="new-user"' in html and "admin.js" in html
    assert client_for(app, "reviewer").get("/admin").status_code == 403
