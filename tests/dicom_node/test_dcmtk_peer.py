"""The dcmtk peer the tests and benchmarks use is dcmtk's, even with a look-alike earlier on PATH."""

from __future__ import annotations

import os
import stat

from tests.helpers import dcmtk


def test_require_skips_a_same_named_tool_that_is_not_dcmtk(tmp_path, monkeypatch):
    # What an activated .venv looks like: pynetdicom's console script named storescu comes first.
    fake = tmp_path / "storescu"
    fake.write_text("#!/bin/sh\necho 'pynetdicom storescu 3.0'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(dcmtk, "_found", {})
    path = dcmtk.require("storescu")
    assert path != str(fake)
    assert dcmtk._is_dcmtk(path)
    assert not dcmtk._is_dcmtk(str(fake))
