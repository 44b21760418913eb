"""The command line as a physicist uses it: help, the demo service, cases, phantom, push, echo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom

from heartloop.service.cli import build_parser, main
from tests.helpers.procs import free_port, stop_pid, wait_for, wait_port


def test_help_explains_every_subcommand(capsys):
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"serve", "cases", "phantom", "push", "echo", "outbox", "quarantine", "config"} <= names
    for name in names:
        try:
            main([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        out = capsys.readouterr().out
        assert "usage: heartloop " + name in out


def test_serve_demo_push_cases_and_clean_shutdown(tmp_path):
    """The README's first command, minus the venv: serve with embedded defaults and a demo push."""
    data = tmp_path / "data"
    port = free_port()
    env = dict(os.environ, HEARTLOOP_SERIES__STABLE_AGE_S="1", HEARTLOOP_SERIES__POLL_INTERVAL_S="0.2",
               HEARTLOOP_HTTP__PORT="0")
    env.pop("HEARTLOOP_ADMIN_PASSWORD", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "heartloop", "serve", "--data-dir", str(data),
                                 "--dicom-port", str(port), "--demo", "1"], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        wait_for(lambda: "demo: review the cases in the browser" in log_path.read_text(), 120, 0.2,
                 what="the demo case assembled (NO_MODEL: no model trained yet) and the UI's address")
        text = log_path.read_text()
        assert "demo: case 1: NO_MODEL" in text
        # The front door shows where the review UI is and how to log in the first time.
        url = re.search(r"review UI: (http://127\.0\.0\.1:\d+/)", text).group(1)
        password = re.search(r"created user 'admin' \(role admin\), password: (\S+)", text).group(1)
        assert "heartloop user passwd admin" in text
        assert f"DICOM node: HEARTLOOP@127.0.0.1:{port}" in text  # the port it really listens on
        with urllib.request.urlopen(url + "login", timeout=10) as rsp:
            assert rsp.status == 200 and "password" in rsp.read().decode().lower()
        assert len(password) >= 12
        out = subprocess.run([sys.executable, "-m", "heartloop", "cases", "--data-dir", str(data), "--json"],
                             capture_output=True, text=True, timeout=60, env=env)
        cases = json.loads(out.stdout)
        assert len(cases) == 1 and cases[0]["state"] == "NO_MODEL" and cases[0]["n_slices"] >= 100
        assert [x["modality"] for x in cases[0]["linked"]] == ["RTDOSE"]
        assert (data / ".running").exists()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_pid(proc)
    text = log_path.read_text()
    assert "service stopping" in text
    assert not (data / ".running").exists()  # a clean stop: no recovery needed next time
    assert "PHANTOM" not in text and "Phantom^" not in text  # no patient ID or name in the log


def test_phantom_push_echo_commands(tmp_path, capsys):
    out_dir = tmp_path / "cohort"
    assert main(["phantom", "--patients", "2", "--seed", "5", "--out", str(out_dir), "--rows", "64",
                 "--slices", "12"]) == 0
    dirs = capsys.readouterr().out.split()
    assert len(dirs) == 2
    ct = pydicom.dcmread(sorted(Path(dirs[0]).glob("CT_*.dcm"))[0])
    assert ct.Rows == 64
    assert (Path(dirs[0]) / "heart_truth.nii.gz").exists()

    from heartloop.config import load_settings
    from tests.helpers.service import running_service

    settings = load_settings(environ={}, overrides={"storage": {"root": str(tmp_path / "data")},
                                                    "node": {"port": free_port()},
                                                    "limits": {"min_free_disk_bytes": 1048576}})
    with running_service(settings) as service:
        target = f"HEARTLOOP@127.0.0.1:{service.scp.port}"
        assert main(["echo", target]) == 0
        assert main(["push", str(out_dir), "--to", target, "--associations", "2"]) == 0
        assert "sent 26/26" in capsys.readouterr().out
        assert service.store.counts()["instances"] == 26
    assert main(["echo", f"HEARTLOOP@127.0.0.1:{free_port()}"]) == 1  # nobody there
    assert main(["push", str(out_dir), "--to", "not-a-target"]) == 2
    assert "AE@host:port" in capsys.readouterr().err
