"""Acceptance of issue 5, security: CSRF on every state change, 401 for anonymous API calls, roles,
cookie flags, hashed passwords, idle timeout, login rate limiting."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from heartloop.core import Volume
from heartloop.review_ui import UiServices, security
from heartloop.store.models import AuditEntry, Case, Correction, InteractionEvent, User
from tests.review_ui.conftest import PASSWORD, Client

PUBLIC_API = {"/api/session", "/api/openapi.json"}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


class RecordingServices:
    """A `UiServices` whose callables record every call and answer small real values."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def build(self) -> UiServices:
        def volume(case_id: int) -> Volume:
            self._record("load_volume", case_id)
            return Volume(np.zeros((4, 8, 8), np.int16), spacing=(2.0, 1.0, 1.0))  # type: ignore[call-arg]

        def save(req: Any) -> dict[str, Any]:
            self._record("save_correction", req)
            return {"correction_id": 1, "state": "CORRECTED"}

        def models() -> list[dict[str, Any]]:
            self._record("list_models")
            return [{"version": "000002", "current": True, "parent": "000001", "val_dice": 0.9, "train_cases": 3,
                     "val_cases": 1, "created_at": 2.0},
                    {"version": "000001", "current": False, "parent": None, "val_dice": 0.8, "train_cases": 2,
                     "val_cases": 1, "created_at": 1.0}]

        def rollback(version: str) -> None:
            self._record("rollback_model", version)
            if version not in ("000001", "000002"):
                raise KeyError(version)

        return UiServices(
            load_volume=volume,
            load_prediction=lambda case_id: self._record("load_prediction", case_id),  # type: ignore[arg-type,func-returns-value]
            load_dose=lambda case_id: self._record("load_dose", case_id),  # type: ignore[arg-type,func-returns-value]
            save_correction=save,
            request_prediction=lambda case_id, box: self._record("request_prediction", case_id, box),
            list_models=models,
            rollback_model=rollback,
            trainer_status=lambda: {"state": "idle", "current_version": "000002", "best_val_dice": 0.9, "epochs": 3,
                                    "epochs_without_progress": 0, "train_cases": 3, "val_cases": 1, "updated_at": 1.0},
        )


def api_rules(app: Any) -> list[Any]:
    return sorted((r for r in app.url_map.iter_rules() if r.rule.startswith("/api/")), key=lambda r: r.rule)


def fill(rule: Any, values: dict[str, Any] | None = None) -> str:
    """A concrete URL of `rule`: int converters 1, a model version, or what `values` names."""
    values = values or {}
    args = {}
    for name in rule.arguments:
        conv = type(rule._converters[name]).__name__
        args[name] = values.get(name, 1 if conv in ("IntegerConverter", "NumberConverter") else
                                "000001" if name == "version" else "1")
    path = rule.rule
    for name, value in args.items():
        path = re.sub(r"<(?:[^:>]+:)?" + name + r">", str(value), path)
    return path


def methods(rule: Any) -> list[str]:
    return sorted(set(rule.methods) - {"HEAD", "OPTIONS"})


def db_snapshot(store: Any) -> dict[str, Any]:
    jobs = len(store.jobs())
    with store.session() as s:
        return {
            "audit": s.scalar(select(func.count()).select_from(AuditEntry)),
            "users": sorted((u.username, u.role, u.active, u.password_hash, u.display_name)
                            for u in s.scalars(select(User))),
            "cases": sorted((c.id, c.state) for c in s.scalars(select(Case))),
            "corrections": s.scalar(select(func.count()).select_from(Correction)),
            "events": s.scalar(select(func.count()).select_from(InteractionEvent)),
            "jobs": jobs,
        }


@pytest.fixture
def app_with_case(ui_app_factory, sqlite_store):
    recorder = RecordingServices()
    app = ui_app_factory(recorder.build())
    with sqlite_store.session() as s, s.begin():
        s.add(Case(ct_series_uid="1.2.3.4", study_uid="1.2.3", patient_id="P1", state="PREDICTED", n_slices=4,
                   created_at=1.0, updated_at=1.0))
    return app, recorder


def test_every_state_change_without_csrf_token_is_refused(app_with_case, client_for, make_user, sqlite_store):
    app, recorder = app_with_case
    victim = make_user("victim")
    admin = client_for(app, "admin")
    assert admin.csrf
    checked = []
    before = db_snapshot(sqlite_store)
    for rule in app.url_map.iter_rules():
        for method in sorted(set(rule.methods) & STATE_CHANGING):
            path = fill(rule, {"username": victim})
            for headers in ({}, {"X-CSRF-Token": "forged-" + admin.csrf}):
                rsp = admin.send(method, path, csrf=False, headers=headers,
                                 json={"username": "mallory", "password": "x" * 12, "role": "admin",
                                       "active": False, "events": [{"t": 1, "kind": "paint"}], "box": None,
                                       "foreground": [0, 1], "background": [], "kind": "sparse"})
                assert rsp.status_code == 403, (method, rule.rule, rsp.status_code)
                assert "CSRF" in rsp.get_data(as_text=True)
            checked.append((method, rule.rule))
    assert ("POST", "/api/session") in checked and ("POST", "/logout") in checked
    assert ("POST", "/api/users") in checked and ("POST", "/api/models/<version>/rollback") in checked
    assert db_snapshot(sqlite_store) == before, "a request without a valid CSRF token changed something"
    assert [n for n in recorder.names() if n != "list_models"] == []
    # the same session with its token does get through (the refusals were about the token)
    assert admin.get("/api/session").get_json()["user"]["role"] == "admin"
    assert admin.post("/api/models/000001/rollback").status_code == 200


def test_html_form_posts_need_the_form_token(ui_app_factory, make_user):
    app = ui_app_factory()
    make_user("ann")
    client = Client(app)
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    bad = client.http.post("/login", base_url="https://localhost",
                           data={"username": "ann", "password": PASSWORD, "csrf_token": "nope"})
    assert bad.status_code == 403
    good = client.http.post("/login", base_url="https://localhost",
                            data={"username": "ann", "password": PASSWORD, "csrf_token": token})
    assert good.status_code == 302 and good.headers["Location"].endswith("/")


def test_every_api_endpoint_answers_401_to_anonymous_calls(app_with_case):
    app, recorder = app_with_case
    client = Client(app)
    token = client.get("/api/session").get_json()["csrf_token"]  # even with a valid anonymous token
    seen = 0
    for rule in api_rules(app):
        if rule.rule in PUBLIC_API:
            continue
        for method in methods(rule):
            for headers in ({}, {"X-CSRF-Token": token}):
                rsp = client.send(method, fill(rule), csrf=False, headers=headers, json={})
                assert rsp.status_code == 401, (method, rule.rule, rsp.status_code)
                assert rsp.get_json()["status"] == 401
            seen += 1
    assert seen >= 5
    assert recorder.calls == []
    assert client.get("/api/openapi.json").status_code == 200
    assert client.get("/api/session").get_json()["user"] is None


def test_pages_redirect_anonymous_visitors_to_login(ui_app_factory):
    client = Client(ui_app_factory())
    for page in ("/admin", "/audit"):
        rsp = client.get(page)
        assert rsp.status_code == 302 and "/login?next=" in rsp.headers["Location"]


def test_reviewer_cannot_roll_back_or_administer(app_with_case, client_for, sqlite_store):
    app, recorder = app_with_case
    reviewer = client_for(app, "reviewer")
    rsp = reviewer.post("/api/models/000001/rollback")
    assert rsp.status_code == 403 and "admin" in rsp.get_json()["error"]
    assert "rollback_model" not in recorder.names()
    assert reviewer.post("/api/users", json={"username": "eve", "password": "x" * 10, "role": "admin"}).status_code == 403
    assert sqlite_store.get_user("eve") is None
    for path in ("/api/users", "/api/settings", "/api/audit", "/api/audit/verify"):
        assert reviewer.get(path).status_code == 403, path
    assert reviewer.get("/admin").status_code == 403
    assert reviewer.get("/api/models").status_code == 200  # reading the registry is for everyone

    admin = client_for(app, "admin", "physicist")
    assert admin.post("/api/models/000001/rollback").get_json() == {"current": "000001"}
    assert recorder.calls[-1] == ("rollback_model", ("000001",))
    entry = sqlite_store.audit_entries(action="rollback_model")[0]
    assert (entry.actor, entry.target) == ("physicist", "model:000001")


def test_session_cookie_flags(ui_app_factory, make_user):
    make_user("ann")
    client = Client(ui_app_factory())
    rsp = client.login("ann")
    cookie = next(v for v in rsp.headers.getlist("Set-Cookie") if v.startswith("heartloop_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags


def test_passwords_are_stored_hashed(ui_app_factory, make_user, sqlite_store):
    make_user("ann")
    with sqlite_store.session() as s:
        stored = s.scalar(select(User.password_hash).where(User.username == "ann"))
    assert PASSWORD not in stored and stored.startswith("scrypt:")
    assert security.password_matches(stored, PASSWORD) and not security.password_matches(stored, PASSWORD + "x")
    with pytest.raises(ValueError):
        security.hash_password("short")


def test_idle_timeout_ends_the_session(ui_app_factory, make_user, monkeypatch, make_settings):
    clock = [1_000_000.0]
    monkeypatch.setattr(security, "now", lambda: clock[0])
    app = ui_app_factory(settings=make_settings(http={"idle_timeout_min": 10}))
    make_user("ann")
    client = Client(app)
    assert client.login("ann").status_code == 200
    clock[0] += 9 * 60  # active within the timeout: still logged in, and the clock restarts
    assert client.get("/api/cases").status_code == 200
    clock[0] += 9 * 60
    assert client.get("/api/cases").status_code == 200
    clock[0] += 10 * 60 + 1  # idle longer than the timeout
    rsp = client.get("/api/cases")
    assert rsp.status_code == 401 and "expired" in rsp.get_json()["error"]
    assert client.get("/api/session").get_json()["user"] is None
    assert client.get("/").status_code == 200 and 'name="password"' in client.get("/").get_data(as_text=True)


def test_login_is_rate_limited_per_username(ui_app_factory, make_user, monkeypatch, sqlite_store):
    clock = [2_000_000.0]
    monkeypatch.setattr(security, "now", lambda: clock[0])
    app = ui_app_factory()
    make_user("ann")
    make_user("bob")
    client = Client(app)
    for _ in range(security.MAX_FAILURES - 1):
        assert client.login("ann", "wrong password").status_code == 401
    locked = client.login("ann", "wrong password")
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) == int(security.LOCKOUT_S)
    rsp = client.login("ann")  # the right password does not help while locked
    assert rsp.status_code == 429 and "try again" in rsp.get_json()["error"]
    assert Client(app).login("bob").status_code == 200  # other users are not affected
    clock[0] += security.LOCKOUT_S + 1
    assert client.login("ann").status_code == 200
    actions = [e.action for e in sqlite_store.audit_entries(target="user:ann")]
    assert actions.count("login_failed") == security.MAX_FAILURES and "login_locked" in actions
    # a success resets the count: one more failure does not lock
    assert Client(app).login("ann", "wrong password").status_code == 401
    assert Client(app).login("ann").status_code == 200


def test_deactivated_user_and_changed_password_end_sessions(ui_app_factory, make_user, sqlite_store):
    app = ui_app_factory()
    make_user("ann")
    first, second = Client(app), Client(app)
    assert first.login("ann").status_code == 200 and second.login("ann").status_code == 200
    sqlite_store.update_user("ann", password_hash=security.hash_password("another password"))
    assert first.get("/api/cases").status_code == 401
    assert second.login("ann", "another password").status_code == 200
    sqlite_store.update_user("ann", active=False)
    assert second.get("/api/cases").status_code == 401
    assert Client(app).login("ann", "another password").status_code == 401


def test_error_pages_escape_messages(ui_app_factory):
    client = Client(ui_app_factory())
    rsp = client.get("/no/<script>alert(1)</script>", headers={"Accept": "text/html"})
    assert rsp.status_code == 404 and "<script>alert" not in rsp.get_data(as_text=True)


def test_security_headers_and_no_caching_of_patient_data(ui_app_factory, client_for):
    client = client_for(ui_app_factory())
    for path in ("/", "/api/cases"):
        rsp = client.get(path)
        assert rsp.headers["Cache-Control"] == "no-store", path
        csp = rsp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp.split(
            "style-src")[0]
        assert rsp.headers["X-Frame-Options"] == "DENY" and rsp.headers["X-Content-Type-Options"] == "nosniff"


def test_auto_refresh_does_not_keep_an_idle_session_alive(ui_app_factory, make_user, monkeypatch, make_settings):
    clock = [3_000_000.0]
    monkeypatch.setattr(security, "now", lambda: clock[0])
    app = ui_app_factory(settings=make_settings(http={"idle_timeout_min": 10}))
    make_user("ann")
    client = Client(app)
    assert client.login("ann").status_code == 200
    background = {"X-HeartLoop-Background": "1"}
    for _ in range(9):  # a worklist left open polls every few seconds: 9 minutes of polling
        clock[0] += 60
        assert client.get("/api/cases", headers=background).status_code == 200
    clock[0] += 60 + 1  # 10 min after the last real activity
    assert client.get("/api/cases", headers=background).status_code == 401
