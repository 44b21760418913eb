"""dicompyler-core 0.5.6 as a peer for `bench.dose`: its example data, its own environment, and a
subprocess that runs `dicompylercore.dvhcalc.get_dvh` and reports JSON.

dicompyler-core 0.5.6 does not import under pydicom 3, so it gets a small cached virtual environment
(``$HEARTLOOP_TEST_CACHE`` or ``~/.cache/heartloop``, shared with the tests' download cache) with
pydicom 2.4 and numpy < 2. Everything is fetched from the package registry with pip, once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
from pathlib import Path

REQUIREMENT = "dicompyler-core==0.5.6"
#: dicompyler-core's install_requires (numpy, six, pydicom, matplotlib), pinned to what 0.5.6 runs with.
VENV_REQUIREMENTS = (REQUIREMENT, "pydicom==2.4.*", "numpy<2", "matplotlib", "six")
PACKAGE_DIR = "dicompyler-core-0.5.6"
EXAMPLE_FILES = ("tests/testdata/example_data/rtss.dcm", "tests/testdata/example_data/rtdose.dcm",
                 "tests/test_dvhcalc.py")

#: Runs inside dicompyler's environment: imports first, then times each get_dvh call (reading the
#: files included, as get_dvh is given file names), so interpreter start-up is not counted.
_WORKER = r"""
import json, logging, sys, time
logging.disable(logging.WARNING)
from dicompylercore import dicomparser, dvhcalc  # noqa: F401  (imported before timing)
out = []
for case in json.load(sys.stdin):
    t0 = time.perf_counter()
    dvh = dvhcalc.get_dvh(case["rtss"], case["rtdose"], case["roi"])
    seconds = time.perf_counter() - t0
    out.append({"seconds": seconds, "volume_cc": float(dvh.volume), "mean_gy": float(dvh.mean),
                "min_gy": float(dvh.min), "max_gy": float(dvh.max)})
print(json.dumps(out))
"""


def cache_root() -> Path:
    return Path(os.environ.get("HEARTLOOP_TEST_CACHE") or Path.home() / ".cache" / "heartloop")


def example_data() -> Path:
    """Directory holding dicompyler-core's ``rtss.dcm`` and ``rtdose.dcm`` (sdist fetched once)."""
    root = cache_root()
    unpacked = root / PACKAGE_DIR
    if not all((unpacked / name).is_file() for name in EXAMPLE_FILES):
        download_dir = root / "sdist"
        download_dir.mkdir(parents=True, exist_ok=True)
        tarballs = sorted(download_dir.glob("dicompyler*core-0.5.6.tar.gz"))
        if not tarballs:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   REQUIREMENT, "-d", str(download_dir)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"pip download {REQUIREMENT} failed:\n{proc.stderr[-4000:]}")
            tarballs = sorted(download_dir.glob("dicompyler*core-0.5.6.tar.gz"))
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
        try:
            with tarfile.open(tarballs[0]) as tar:
                members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] in EXAMPLE_FILES]
                tar.extractall(staging, members=members, filter="data")
            if unpacked.exists():
                shutil.rmtree(unpacked)
            os.replace(next(staging.iterdir()), unpacked)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return unpacked / "tests/testdata/example_data"


def python() -> Path:
    """The interpreter of dicompyler-core's cached environment (created on first use)."""
    env = cache_root() / "dicompyler-venv"
    exe = env / "bin" / "python"
    marker = env / ".heartloop-requirements"
    wanted = "\n".join(VENV_REQUIREMENTS)
    if exe.exists() and marker.exists() and marker.read_text() == wanted:
        return exe
    if env.exists():
        shutil.rmtree(env)
    venv.EnvBuilder(with_pip=True).create(env)
    proc = subprocess.run([str(exe), "-m", "pip", "install", "--quiet", *VENV_REQUIREMENTS],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"could not install {' '.join(VENV_REQUIREMENTS)}:\n{proc.stderr[-4000:]}")
    marker.write_text(wanted)
    return exe


def get_dvh(cases: list[dict]) -> list[dict]:
    """Run dicompyler-core's get_dvh on ``[{"rtss": path, "rtdose": path, "roi": number}, ...]`` in one
    subprocess; per case: seconds (inside the subprocess), volume_cc, mean_gy, min_gy, max_gy."""
    proc = subprocess.run([str(python()), "-c", _WORKER], input=json.dumps(cases), capture_output=True,
                          text=True, check=False, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"dicompyler-core failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
