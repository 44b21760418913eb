"""Settings: TOML + HEARTLOOP_* environment, and start-up errors that name the key and the fix."""

from __future__ import annotations

import os
import stat

import pytest

from heartloop.config import ConfigError, load_settings


def _toml(tmp_path, text: str):
    p = tmp_path / "heartloop.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_embedded_sqlite_and_cpu_friendly(tmp_path):
    s = load_settings(environ={"HEARTLOOP_STORAGE__ROOT": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'heartloop.db'}"
    assert s.node.ae_title == "HEARTLOOP" and s.rtstruct.roi_name == "Heart_AI"
    assert s.compute.device == "auto"


def test_file_then_environment_override(tmp_path):
    cfg = _toml(tmp_path, f"""
[node]
ae_title = "HL_NODE"
port = 11112
allowed_callers = [{{ ae_title = "ECLIPSE", hosts = ["10.0.0.5"] }}]
[storage]
root = "{tmp_path}"
[[destinations]]
name = "tps"
ae_title = "ECLIPSE"
host = "10.0.0.5"
port = 104
""")
    s = load_settings(cfg, environ={"HEARTLOOP_NODE__PORT": "4242", "HEARTLOOP_SERIES__STABLE_AGE_S": "3.5"})
    assert s.node.port == 4242 and s.node.ae_title == "HL_NODE"
    assert s.series.stable_age_s == 3.5
    assert s.node.allowed_callers[0].hosts == ("10.0.0.5",)
    assert s.destination().ae_title == "ECLIPSE" and s.destination("tps").port == 104


@pytest.mark.parametrize("text, key", [
    ("[node]\nprot = 104\n", "node.prot"),
    ("[nodes]\nport = 104\n", "nodes"),
    ("[node]\nport = 70000\n", "node.port"),
    ("[node]\nport = \"eleven\"\n", "node.port"),
    ("[node]\nae_title = \"THIS_TITLE_IS_TOO_LONG\"\n", "node.ae_title"),
    ("[node]\nae_title = \"BAD\\\\AE\"\n", "node.ae_title"),
    ("[node]\nae_title = \"\"\n", "node.ae_title"),
    ("[[destinations]]\nname = \"tps\"\nae_title = \"TPS\"\nhost = \"h\"\nport = 0\n", "destinations[0].port"),
    ("[series]\nstable_age_s = -1\n", "series.stable_age_s"),
    ("[rtstruct]\nroi_name = \"A_VERY_LONG_ROI_NAME\"\n", "rtstruct.roi_name"),
    ("[compute]\ndevice = \"gpu0\"\n", "compute.device"),
])
def test_bad_values_fail_with_the_key_named(tmp_path, text, key):
    cfg = _toml(tmp_path, f"[storage]\nroot = \"{tmp_path}\"\n" + text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    assert key in str(err.value)


def test_unknown_environment_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="node.prot"):
        load_settings(environ={"HEARTLOOP_NODE__PROT": "1", "HEARTLOOP_STORAGE__ROOT": str(tmp_path)})


def test_unwritable_storage_root_named(tmp_path, monkeypatch):
    """The permission answer is the kernel's (os.access); as root every directory is writable, so
    the refusal of this one directory is simulated at that single call."""
    import heartloop.config.settings as settings_mod

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(settings_mod.os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"HEARTLOOP_STORAGE__ROOT": str(ro / "data")})
    assert "storage.root" in str(err.value) and "not writable" in str(err.value)
    # And a writable root passes the same check.
    load_settings(environ={"HEARTLOOP_STORAGE__ROOT": str(tmp_path / "data")})


def test_storage_root_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="storage.root"):
        load_settings(environ={"HEARTLOOP_STORAGE__ROOT": str(f / "data")})


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_toml(tmp_path, "[node\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_cli_reports_config_error_and_exits_2(tmp_path, capsys):
    from heartloop.service.cli import main

    cfg = _toml(tmp_path, "[node]\nport = 0.5\n")
    assert main(["config", "--config", str(cfg)]) == 2
    assert "node.port" in capsys.readouterr().err


def test_contouring_correction_loss_reaches_the_engine(tmp_path):
    from heartloop.config import ConfigError
    from heartloop.service.contouring import contouring_settings

    base = {"storage": {"root": str(tmp_path / "d")}}
    settings = load_settings(environ={"HEARTLOOP_CONTOURING__CORRECTION_LOSS": "masked"}, overrides=base)
    assert contouring_settings(settings).correction_loss == "masked"
    assert contouring_settings(load_settings(environ={}, overrides=base)).correction_loss == "dense"
    bad = load_settings(environ={}, overrides={**base, "contouring": {"correction_loss": "sparse"}})
    with pytest.raises(ConfigError, match="correction_loss"):
        contouring_settings(bad)
