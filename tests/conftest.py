"""Suite-wide fixtures: settings on free ports in a temp dir, a store on SQLite or PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from heartloop.config import load_settings
from heartloop.store import Store


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this test session. In CI its absence is a failure, not a skip."""
    from tests.helpers.postgres import PostgresServer

    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not installed here: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'heartloop.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def store(tmp_path, db_url) -> Store:
    s = Store(tmp_path / "data", db_url)
    yield s
    s.dispose()


@pytest.fixture
def sqlite_store(tmp_path) -> Store:
    s = Store(tmp_path / "data", f"sqlite:///{tmp_path / 'heartloop.db'}")
    yield s
    s.dispose()


@pytest.fixture
def make_settings(tmp_path):
    """Settings factory rooted in a temp dir; keyword sections override defaults."""

    def _make(**sections):
        # One receiving process unless a test asks for more (spawning one costs ~1 s of CPU).
        # The web UI on a free port (a fixed one would collide between services and test runs).
        data = {"storage": {"root": str(tmp_path / "data")}, "node": {"receive_processes": 1}, "http": {"port": 0}}
        for k, v in sections.items():
            if isinstance(v, dict):
                data.setdefault(k, {}).update(v)
            else:
                data[k] = v
        return load_settings(environ={}, overrides=data)

    return _make
