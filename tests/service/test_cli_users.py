"""`heartloop user add/list/passwd/disable`."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from heartloop.review_ui.security import password_matches
from heartloop.service import cli_users
from heartloop.service.cli import main
from heartloop.store import Store


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def open_store(data_dir) -> Store:
    return Store(data_dir, f"sqlite:///{data_dir / 'heartloop.db'}")


def run(monkeypatch, argv: list[str], stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv)


def test_add_list_passwd_disable(data_dir, monkeypatch, capsys):
    dd = ["--data-dir", str(data_dir)]
    assert run(monkeypatch, ["user", "add", "ann", "--role", "admin", "--display-name", "Smith^Ann",
                             "--password-stdin", *dd], "first password\n") == 0
    assert "ann added" in capsys.readouterr().out
    assert run(monkeypatch, ["user", "add", "bob", "--role", "reviewer", "--password-stdin", *dd],
               "bob's password\n") == 0
    capsys.readouterr()
    assert run(monkeypatch, ["user", "list", *dd]) == 0
    listing = capsys.readouterr().out
    assert "ann" in listing and "admin" in listing and "Smith^Ann" in listing and "bob" in listing
    assert "first password" not in listing

    store = open_store(data_dir)
    try:
        ann = store.get_user("ann")
        assert (ann.role, ann.display_name, ann.active) == ("admin", "Smith^Ann", True)
        assert ann.password_hash.startswith("scrypt:") and password_matches(ann.password_hash, "first password")

        assert run(monkeypatch, ["user", "passwd", "ann", "--password-stdin", *dd], "second password\n") == 0
        assert password_matches(store.get_user("ann").password_hash, "second password")
        assert run(monkeypatch, ["user", "disable", "bob", *dd]) == 0
        assert store.get_user("bob").active is False

        actions = [(e.action, e.target) for e in store.audit_entries()][::-1]
        assert actions == [("user_create", "user:ann"), ("user_create", "user:bob"), ("user_change", "user:ann"),
                           ("user_change", "user:bob")]
        assert all(e.actor.startswith("cli:") for e in store.audit_entries())
        assert store.verify_audit().ok
    finally:
        store.dispose()


def test_refusals_change_nothing(data_dir, monkeypatch, capsys):
    dd = ["--data-dir", str(data_dir)]
    assert run(monkeypatch, ["user", "add", "ann", "--role", "reviewer", "--password-stdin", *dd], "short\n") == 2
    assert "8 characters" in capsys.readouterr().err
    assert run(monkeypatch, ["user", "add", "ann", "--role", "reviewer", "--password-stdin", *dd], "long enough\n") == 0
    assert run(monkeypatch, ["user", "add", "ann", "--role", "admin", "--password-stdin", *dd], "long enough\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert run(monkeypatch, ["user", "passwd", "nobody", "--password-stdin", *dd], "long enough\n") == 2
    assert run(monkeypatch, ["user", "disable", "nobody", *dd]) == 2
    with pytest.raises(SystemExit):
        main(["user", "add", "eve", "--role", "superuser", *dd])
    store = open_store(data_dir)
    try:
        assert [u.username for u in store.list_users()] == ["ann"]
        assert store.get_user("ann").role == "reviewer"
    finally:
        store.dispose()


def test_interactive_password_is_asked_twice(data_dir, monkeypatch, capsys):
    answers = iter(["typed password", "typed passwort"])
    monkeypatch.setattr(cli_users.getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    assert main(["user", "add", "ann", "--role", "reviewer", "--data-dir", str(data_dir)]) == 2
    assert "differ" in capsys.readouterr().err
    answers = iter(["typed password", "typed password"])
    assert main(["user", "add", "ann", "--role", "reviewer", "--data-dir", str(data_dir)]) == 0
    store = open_store(data_dir)
    try:
        assert password_matches(store.get_user("ann").password_hash, "typed password")
    finally:
        store.dispose()


def test_command_line_entry_point(data_dir):
    """The installed way: a subprocess with the password on stdin; the password is never echoed."""
    rsp = subprocess.run([sys.executable, "-m", "heartloop.service.cli", "user", "add", "carol", "--role", "admin",
                          "--password-stdin", "--data-dir", str(data_dir)],
                         input="a secret phrase\n", capture_output=True, text=True, timeout=120)
    assert rsp.returncode == 0, rsp.stderr
    assert "a secret phrase" not in rsp.stdout + rsp.stderr
    listing = subprocess.run([sys.executable, "-m", "heartloop.service.cli", "user", "list", "--data-dir",
                              str(data_dir)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "carol" in listing.stdout
