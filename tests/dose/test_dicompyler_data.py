"""Acceptance (issue 4): real data from a peer. dicompyler-core 0.5.6's source distribution ships an
RTSTRUCT with a ``Heart`` ROI and its RTDOSE; its own tests state that heart's volume and mean dose.
The sdist is fetched from the package registry with pip and cached outside the repository
(``$HEARTLOOP_TEST_CACHE``, default ``~/.cache/heartloop``); the test is skipped only when the
registry cannot be reached.

Why ours differs from dicompyler-core by about -0.12 % (volume) and -0.14 % (mean), and why that is
ours being more exact, not less:

* dicompyler-core rasterises each contour plane by testing which *dose grid nodes* (2.5 mm apart
  here) lie inside the polygon, gives each node a 2.5 × 2.5 mm pixel and each plane the plane spacing
  (3 mm), and takes the dose at those nodes (the planes here coincide with dose frames). Its mean is
  then read from a histogram with 1 cGy bins (bin centres).
* Asked for exactly that sampling (``in_plane_mm=2.5, supersample=1``: our grid is aligned to the dose
  grid, so its pixel centres *are* the dose nodes), our code reproduces dicompyler-core's volume to
  1e-9 and, binned the same way, its mean to 1.3e-6 — the issue's "a plane-by-plane rasterisation
  matches it to 0.001 %", shown below — once the dose frames are moved by the 0.0007 mm that
  separates them from the contour planes: dicompyler-core snaps a plane to the nearest frame
  within 0.5 mm, our trilinear interpolation does not (+0.0018 % on the mean, asserted).
* By default we sample each plane at 1.25 mm pixels, each split into 3 × 3 sub-pixels (partial area
  at the boundary, dose by trilinear interpolation at the centroid of the covered part), and do not
  bin the mean. Refining further (0.625 mm with 5 × 5 sub-pixels) changes our numbers by < 0.01 %,
  so the remaining -0.12 % / -0.14 % is the error of dicompyler-core's 2.5 mm node sampling of the
  polygons (the heart's outline cuts through 2.5 mm pixels all around) — our interpolation and
  supersampling, not a different convention. Slab thickness is the same in both: the 33 planes are
  evenly spaced, and both give each plane the 3 mm spacing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from heartloop.dicom_node.rtdose import read_rtdose
from heartloop.dicom_node.rtstruct import rtstruct_contours, rtstruct_to_mask
from heartloop.core import Volume
from heartloop.dose import dose_on_contours, dose_on_mask

REQUIREMENT = "dicompyler-core==0.5.6"
PACKAGE_DIR = "dicompyler-core-0.5.6"
NEEDED = ("tests/testdata/example_data/rtss.dcm", "tests/testdata/example_data/rtdose.dcm", "tests/test_dvhcalc.py")
#: What pip prints when it cannot reach the index (DNS, refused, timeouts, proxies).
NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "No route to host", "Connection refused",
    "ConnectTimeoutError", "ReadTimeoutError", "ConnectionResetError", "ProxyError", "Max retries exceeded",
    "connection error", "Failed to resolve", "timed out",
)


def _cache_root() -> Path:
    return Path(os.environ.get("HEARTLOOP_TEST_CACHE") or Path.home() / ".cache" / "heartloop")


def fetch_dicompyler_sdist() -> Path:
    """The unpacked files we need from the dicompyler-core 0.5.6 sdist (downloaded once, cached)."""
    root = _cache_root()
    unpacked = root / PACKAGE_DIR
    if all((unpacked / name).is_file() for name in NEEDED):
        return unpacked
    download_dir = root / "sdist"
    download_dir.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(download_dir.glob("dicompyler*core-0.5.6.tar.gz"))
    if not tarballs:
        # pip reports an unreachable index only in its debug log (with retries=0 not even as a
        # warning), so keep that log and look there.
        log_file = download_dir / "pip-download.log"
        log_file.unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", REQUIREMENT,
             "-d", str(download_dir), "--log", str(log_file)],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            log_text = log_file.read_text(errors="replace") if log_file.exists() else ""
            evidence = [line for line in log_text.splitlines() if any(m in line for m in NETWORK_ERRORS)]
            if evidence:
                pytest.skip(f"package registry unreachable, cannot fetch the {REQUIREMENT} sdist: "
                            + " | ".join(evidence[-3:]))
            pytest.fail(f"pip download {REQUIREMENT} failed (not a network error):\n"
                        f"{(proc.stdout + proc.stderr)[-4000:]}")
        tarballs = sorted(download_dir.glob("dicompyler*core-0.5.6.tar.gz"))
        assert tarballs, f"pip download succeeded but left no sdist in {download_dir}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] in NEEDED]
            tar.extractall(staging, members=members, filter="data")
        top = next(staging.iterdir())
        if unpacked.exists():
            shutil.rmtree(unpacked)
        os.replace(top, unpacked)  # atomic: a half-extracted copy is never seen as complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return unpacked


def _stated_heart_values(test_source: str) -> tuple[int, float, float]:
    """ROI number, volume (cm³) and mean dose (Gy) that dicompyler-core's test_dvh_calculation states."""
    body = re.search(r"def test_dvh_calculation\(self\):(.*?)\n    def ", test_source, re.S).group(1)
    roi = int(re.search(r"self\.calc_dvh\((\d+)\)", body).group(1))
    volume = float(re.search(r"assertAlmostEqual\(dvh\.volume, ([0-9.]+)\)", body).group(1))
    mean = float(re.search(r"assertAlmostEqual\(dvh\.mean, ([0-9.]+)\)", body).group(1))
    return roi, volume, mean


@pytest.fixture(scope="module")
def heart():
    root = fetch_dicompyler_sdist()
    data = root / "tests/testdata/example_data"
    roi, volume, mean = _stated_heart_values((root / "tests/test_dvhcalc.py").read_text())
    assert (volume, mean) == (440.23124999, 0.6475329)  # the issue quotes 440.23 cm³
    rtss = pydicom.dcmread(data / "rtss.dcm")
    names = {int(r.ROINumber): str(r.ROIName) for r in rtss.StructureSetROISequence}
    assert names[roi] == "Heart"
    dose = read_rtdose(pydicom.dcmread(data / "rtdose.dcm"))
    contours = rtstruct_contours(rtss, "Heart")
    return {"rtss": rtss, "dose": dose, "contours": contours, "volume_cc": volume, "mean_gy": mean}


def test_heart_volume_and_mean_dose_agree_with_dicompyler_within_1_percent(heart):
    stats = dose_on_contours(heart["contours"], heart["dose"])
    assert stats.volume_cc == pytest.approx(heart["volume_cc"], rel=0.01)
    assert stats.mean_gy == pytest.approx(heart["mean_gy"], rel=0.01)
    assert stats.outside_fraction == 0.0
    # The actual agreement (see the module docstring): -0.12 % and -0.14 %.
    assert abs(stats.volume_cc / heart["volume_cc"] - 1) < 0.002
    assert abs(stats.mean_gy / heart["mean_gy"] - 1) < 0.002


def _binned_mean(stats) -> float:
    """dicompyler-core's mean estimator: the 1 cGy differential histogram's bin centres."""
    differential = -np.diff(stats.dvh_volume_pct)
    return float(np.dot(stats.dvh_dose_gy[:-1] + 0.005, differential) / differential.sum())


def test_plane_by_plane_node_sampling_reproduces_dicompyler_to_0_001_percent(heart):
    dose, contours = heart["dose"], heart["contours"]
    z = np.array([s.z_mm for s in contours.slices])
    assert np.allclose(np.diff(z), 3.0)  # evenly spaced: the slab thickness conventions coincide
    spacing = dose.pixel_spacing[1]
    assert dose.pixel_spacing == (spacing, spacing)
    # The contour planes (z = -98.44 ... -2.44, two decimals) sit 0.0007 mm from dose frames
    # (-122.4407 + 3n). dicompyler-core snaps a plane to a frame within 0.5 mm; we interpolate.
    frames = dose.origin[2] + dose.slice_offsets
    residual = z - frames[np.abs(z[:, None] - frames[None, :]).argmin(axis=1)]
    assert np.allclose(residual, 0.0007, atol=1e-6)
    snapped = Volume(dose.array, origin=(dose.origin[0], dose.origin[1], dose.origin[2] + 0.0007),
                     row_direction=dose.row_direction, column_direction=dose.column_direction,
                     pixel_spacing=dose.pixel_spacing, slice_offsets=dose.slice_offsets,
                     frame_of_reference_uid=dose.frame_of_reference_uid)

    # Node sampling on snapped frames is dicompyler-core's computation: it matches to < 0.001 %.
    nodes = dose_on_contours(contours, snapped, in_plane_mm=spacing, supersample=1, dvh_bin_gy=0.01)
    assert nodes.volume_cc == pytest.approx(heart["volume_cc"], rel=1e-8)
    # (1.3e-6 remains: the dose is float32 (RTDOSE reading's contract), which puts 4 of the 23,479
    # samples into the neighbouring 1 cGy bin of dicompyler-core's float64 histogram.)
    assert _binned_mean(nodes) == pytest.approx(heart["mean_gy"], rel=1e-5)
    assert _binned_mean(nodes) == pytest.approx(0.6475337536, rel=1e-9)

    # Without snapping, our trilinear interpolation moves the planes' dose 0.0007 / 3 of the way
    # to the next frame: +0.0018 % on the mean — the one difference from node sampling, and ours.
    interpolated = dose_on_contours(contours, dose, in_plane_mm=spacing, supersample=1, dvh_bin_gy=0.01)
    assert interpolated.volume_cc == nodes.volume_cc
    assert interpolated.mean_gy / nodes.mean_gy - 1 == pytest.approx(1.8e-5, abs=0.3e-5)


def test_our_difference_from_dicompyler_is_its_coarser_sampling(heart):
    dose, contours = heart["dose"], heart["contours"]
    default = dose_on_contours(contours, dose)
    converged = dose_on_contours(contours, dose, in_plane_mm=0.625, supersample=5)
    for name, stated in (("volume_cc", heart["volume_cc"]), ("mean_gy", heart["mean_gy"])):
        ours, best = getattr(default, name), getattr(converged, name)
        assert ours == pytest.approx(best, rel=1e-4)  # our default is converged to 0.01 %
        assert abs(ours - best) < 0.1 * abs(ours - stated)  # so the gap to dicompyler is not ours


def test_the_heart_as_a_fine_mask_gives_the_same_numbers(heart):
    """The same contours rasterised onto a 0.5 mm grid through their planes (the other entry point)."""
    dose, contours = heart["dose"], heart["contours"]
    z = np.array([s.z_mm for s in contours.slices])
    xy = np.concatenate([p for s in contours.slices for p in s.polygons])
    lo, hi = xy.min(axis=0) - 2.0, xy.max(axis=0) + 2.0
    shape = tuple(int(v) for v in np.ceil((hi - lo) / 0.5)[::-1])
    grid = Volume(np.zeros((len(z),) + shape, bool), origin=(lo[0], lo[1], z[0]), row_direction=(1, 0, 0),
                  column_direction=(0, 1, 0), pixel_spacing=(0.5, 0.5), slice_offsets=z - z[0],
                  frame_of_reference_uid=dose.frame_of_reference_uid)
    mask = grid.with_array(rtstruct_to_mask(heart["rtss"], grid, "Heart"))
    from_mask = dose_on_mask(mask, dose)
    from_contours = dose_on_contours(contours, dose)
    assert from_mask.volume_cc == pytest.approx(from_contours.volume_cc, rel=1e-3)
    assert from_mask.mean_gy == pytest.approx(from_contours.mean_gy, rel=1e-3)
