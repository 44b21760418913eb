"""Contouring latency: a 512×512×150 phantom CT, two-stage prediction vs. loading the series from disk.

    python -m bench.contour_latency [--rows 512] [--slices 150] [--seed 11] [--repeats 3]

The phantom's CT is written as DICOM files (`heartloop.phantom.write_patient`); the floor is the
time to load those files into a `Volume` (`heartloop.dicom_node.series.load_ct_volume`, headers
validated first, as the service does). Prediction uses the default `ContouringSettings` (width 16,
depth 3; 6 mm localiser, 2 mm organ grid) with random weights. Network cost does not depend on the
weights, but the organ crop's size does — a random localiser's box is arbitrary — so the timed
prediction is the localiser pass (`Predictor.localise`, timed in full) plus stage 2 on the box a
working localiser returns (the true heart's box + ``margin_mm``, the same `add_margin` rule).

Last line: ``seconds=… load_seconds=… ratio=… peak_mb=…`` (best of --repeats; peak resident memory
of this process, ru_maxrss; the phantom is made and written in a child process so only loading
and prediction count). The RTSTRUCT writing that completes "READY → prediction stored" is not
included here (built elsewhere).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from heartloop.contouring.inference import Predictor, add_margin
from heartloop.contouring.network import UNet3D, configure_runtime
from heartloop.contouring.settings import ContouringSettings
from heartloop.dicom_node.headers import read_header
from heartloop.dicom_node.series import load_ct_volume, validate_ct_series
from heartloop.phantom import make_patient, write_patient


def _load(paths: list[Path]):
    headers = [read_header(p) for p in paths]
    geometry = validate_ct_series(headers, max_slices=5000)
    by_uid = {h.sop_instance_uid: p for h, p in zip(headers, paths)}
    return load_ct_volume([by_uid[u] for u in geometry.sop_instance_uids], geometry)


def _write_phantom(seed: int, rows: int, slices: int, out_dir: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Make and write the phantom (in a child process, so its memory does not count in peak_mb);
    returns the series directory and the true heart's index box."""
    patient = make_patient(seed, rows=rows, n_slices=slices)
    directory = write_patient(patient, Path(out_dir))
    where = np.nonzero(patient.heart_mask)
    return str(directory), tuple((int(w.min()), int(w.max()) + 1) for w in where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    settings = ContouringSettings(device="cpu")
    threads = configure_runtime(settings.threads)
    with tempfile.TemporaryDirectory() as tmp:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            written, heart_box = pool.submit(_write_phantom, args.seed, args.rows, args.slices, tmp).result()
        paths = sorted(Path(written).glob("CT_*.dcm"))
        load_times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            ct = _load(paths)
            load_times.append(time.perf_counter() - started)
    load_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"CT {ct.shape} {ct.array.dtype}, pixel {ct.pixel_spacing[0]:.3f} mm, "
          f"slices {ct.slice_spacing:.2f} mm; torch threads {threads}")

    torch.manual_seed(0)
    predictor = Predictor(UNet3D.from_settings(settings), UNet3D.from_settings(settings), settings, "000000")
    box = add_margin(ct, heart_box, settings.margin_mm)  # type: ignore[arg-type]
    (k0, k1), (j0, j1), (i0, i1) = box
    # Corners of the box's voxel centres in patient mm (k1-1 etc.: half-open indices).
    box_mm = (ct.voxel_to_patient(np.array([i0, j0, k0], dtype=float)),
              ct.voxel_to_patient(np.array([i1 - 1, j1 - 1, k1 - 1], dtype=float)))

    predictor.predict(ct, box_mm=box_mm)  # warm-up: oneDNN primitive creation
    predictor.localise(ct)
    totals, stage1, stage2 = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        predictor.localise(ct)
        middle = time.perf_counter()
        prediction = predictor.predict(ct, box_mm=box_mm)
        ended = time.perf_counter()
        stage1.append(middle - started)
        stage2.append(ended - middle)
        totals.append(ended - started)
    assert prediction.box == box, (prediction.box, box)
    seconds = min(totals)
    load_seconds = min(load_times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    crop = tuple(hi - lo for lo, hi in box)
    print(f"stage 1 (localiser) {min(stage1):.2f} s; stage 2 (organ crop {crop}) {min(stage2):.2f} s; "
          f"all runs {[round(t, 2) for t in totals]}; peak after loading {load_peak_mb:.0f} MB")
    print(f"seconds={seconds:.2f} load_seconds={load_seconds:.2f} ratio={seconds / load_seconds:.2f} "
          f"peak_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
