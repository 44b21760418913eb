"""The session API and CSRF guard the rest of the UI is built on."""

from tests.review_ui.conftest import Client


def test_login_needs_csrf_and_right_password(ui_app_factory, make_user, sqlite_store):
    app = ui_app_factory()
    make_user("ann")
    client = Client(app)
    assert client.post("/api/session", csrf=False, json={"username": "ann", "password": "x"}).status_code == 403
    assert client.login("ann", "wrong password").status_code == 401
    rsp = client.login("ann")
    assert rsp.status_code == 200
    assert rsp.get_json()["user"] == {"username": "ann", "role": "reviewer", "display_name": "ann"}
    assert client.get("/api/session").get_json()["user"]["username"] == "ann"
    actions = [e.action for e in sqlite_store.audit_entries()]
    assert actions == ["login", "login_failed"]  # newest first
    assert sqlite_store.verify_audit().ok
