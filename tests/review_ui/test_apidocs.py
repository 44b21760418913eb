"""The OpenAPI document matches the app: every ``/api/`` rule is in it and every path in it exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from heartloop.review_ui.apidocs import SPEC_PATH
from tests.review_ui.conftest import Client

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "review-api.md"


def rule_to_path(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


def app_operations(app) -> set[tuple[str, str]]:
    return {(m.lower(), rule_to_path(r.rule)) for r in app.url_map.iter_rules() if r.rule.startswith("/api/")
            for m in set(r.methods) & METHODS}


def spec_operations(spec) -> set[tuple[str, str]]:
    return {(m, path) for path, item in spec["paths"].items() for m in item if m.upper() in METHODS}


def test_spec_is_served_publicly_and_is_openapi_31(ui_app_factory):
    client = Client(ui_app_factory())
    rsp = client.get("/api/openapi.json")
    assert rsp.status_code == 200 and rsp.mimetype == "application/json"
    spec = rsp.get_json()
    assert spec["openapi"].startswith("3.1")
    schemes = spec["components"]["securitySchemes"]
    assert schemes["session"] == {**schemes["session"], "type": "apiKey", "in": "cookie", "name": "heartloop_session"}
    assert schemes["csrf"] == {**schemes["csrf"], "type": "apiKey", "in": "header", "name": "X-CSRF-Token"}


def test_every_api_rule_is_documented_and_every_documented_path_exists(ui_app_factory):
    app = ui_app_factory()
    spec = json.loads(SPEC_PATH.read_text())
    in_app, in_spec = app_operations(app), spec_operations(spec)
    assert in_app - in_spec == set(), f"undocumented endpoints: {sorted(in_app - in_spec)}"
    assert in_spec - in_app == set(), f"documented but missing from the app: {sorted(in_spec - in_app)}"


def test_every_contract_path_is_in_the_spec():
    """docs/review-api.md and openapi.json describe the same API."""
    spec = json.loads(SPEC_PATH.read_text())
    text = CONTRACT.read_text()
    contract = {rule_to_path(p.rstrip("`.,)")) for p in re.findall(r"(/api/[A-Za-z0-9_/<>{}.:-]+)", text)}
    contract = {re.sub(r"\{[^}]+\}", "{}", p) for p in contract}
    documented = {re.sub(r"\{[^}]+\}", "{}", p) for p in spec["paths"]}
    assert contract - documented == set()


def test_protected_operations_declare_401_and_state_changes_declare_403_and_csrf():
    spec = json.loads(SPEC_PATH.read_text())
    public = {("get", "/api/session"), ("post", "/api/session"), ("delete", "/api/session"), ("get", "/api/openapi.json")}
    for path, item in spec["paths"].items():
        for method, o in item.items():
            schemes = {name for req in o.get("security", spec["security"]) for name in req}
            if (method, path) not in public:
                assert "session" in schemes and "401" in o["responses"], (method, path)
            if method != "get":
                assert "csrf" in schemes and "403" in o["responses"], (method, path)


def test_docs_page_is_rendered_from_the_spec(ui_app_factory, client_for):
    app = ui_app_factory()
    html = client_for(app).get("/api/docs").get_data(as_text=True)
    spec = json.loads(SPEC_PATH.read_text())
    for path in spec["paths"]:
        assert f"<code>{path}</code>" in html
    assert "<script" not in html.split("</head>")[1] and "http://" not in html and "https://" not in html
