"""Fixtures of the review UI tests: the real app on a temp store, users, logged-in clients."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from heartloop.review_ui import UiServices, create_app
from heartloop.review_ui.security import hash_password

BASE_URL = "https://localhost"  # session cookies are Secure: the test client must speak "https"
PASSWORD = "correct horse battery"


class Client:
    """A Flask test client that remembers the session's CSRF token and sends it when asked."""

    def __init__(self, app: Any) -> None:
        self.http = app.test_client()
        self.csrf: str | None = None

    def get(self, path: str, **kw: Any) -> Any:
        return self.http.get(path, base_url=BASE_URL, **kw)

    def send(self, method: str, path: str, *, csrf: bool = True, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}) or {})
        if csrf:
            if self.csrf is None:
                self.csrf = self.get("/api/session").get_json()["csrf_token"]
            headers["X-CSRF-Token"] = self.csrf
        return self.http.open(path, method=method, base_url=BASE_URL, headers=headers, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.send("POST", path, **kw)

    def login(self, username: str, password: str = PASSWORD) -> Any:
        rsp = self.post("/api/session", json={"username": username, "password": password})
        if rsp.status_code == 200:
            self.csrf = rsp.get_json()["csrf_token"]
        return rsp


@pytest.fixture
def ui_settings(make_settings):
    return make_settings()


@pytest.fixture
def ui_app_factory(sqlite_store, ui_settings) -> Callable[..., Any]:
    """``factory(services=None, settings=None)`` → the real app on a temp SQLite store."""

    def make(services: UiServices | None = None, settings: Any = None) -> Any:
        return create_app(settings or ui_settings, sqlite_store, services, testing=True)

    return make


@pytest.fixture
def make_user(sqlite_store) -> Callable[..., str]:
    """``make_user(name, role="reviewer")`` → the username (password `PASSWORD`)."""

    def make(username: str, role: str = "reviewer") -> str:
        sqlite_store.add_user(username, hash_password(PASSWORD), role)
        return username

    return make


@pytest.fixture
def client_for(make_user) -> Callable[..., Client]:
    """``client_for(app, role="reviewer", username=None)`` → a logged-in `Client`."""
    counter = iter(range(1_000_000))

    def make(app: Any, role: str = "reviewer", username: str | None = None) -> Client:
        name = make_user(username or f"{role}{next(counter)}", role)
        client = Client(app)
        rsp = client.login(name)
        assert rsp.status_code == 200, rsp.get_data(as_text=True)
        return client

    return make
