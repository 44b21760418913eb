"""Contouring latency: a 512×512×150 phantom CT, series READY → prediction and RTSTRUCT stored, vs.
loading the series from disk.

    python -m bench.contour_latency [--rows 512] [--slices 150] [--seed 11] [--repeats 3]

The phantom's CT is written as DICOM files (`heartloop.phantom.write_patient`) and stored in a real
`Store` the way the node stores received instances; `assemble_series` makes the case READY. The
timed work is the service's own contour job (`heartloop.service.contouring.ContouringStage.run`):
validate and load the series, two-stage prediction with the current registry model (default
`ContouringSettings`, random weights registered as a model), mask written, ``Heart_AI`` RTSTRUCT
built and written, prediction row committed, case PREDICTED.

Random weights cost the same as trained ones, but the organ crop's size depends on the box, and a
random localiser's box is arbitrary. So the job runs with the box a working localiser returns
(the true heart's box + ``margin_mm``, passed as the job's box: the reviewer-box path, which skips
stage 1), and the localiser pass (`Predictor.localise`, which runs in full whatever its weights) is
timed on its own and added: ``seconds`` = job + localiser.

Floor: the time to validate and load the same stored series into a `Volume` (what the job itself
does first). Last line: ``seconds=… load_seconds=… ratio=… peak_mb=…`` (best of --repeats; peak
resident memory of this process, ru_maxrss; the phantom is made and written in a child process so
only storing, loading and contouring count).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from heartloop.config import load_settings
from heartloop.contouring.inference import MODEL_KIND, Predictor, add_margin, settings_to_dict
from heartloop.contouring.network import configure_runtime
from heartloop.contouring.registry import ModelMeta, ModelRegistry
from heartloop.contouring.training import Learner
from heartloop.core import CaseState
from heartloop.dicom_node.headers import read_header
from heartloop.dicom_node.scp import header_to_new_instance
from heartloop.dicom_node.series import load_ct_volume
from heartloop.phantom import make_patient, write_patient
from heartloop.service.contouring import ContouringStage, contouring_settings, models_dir
from heartloop.service.lifecycle import assemble_series, case_series_uid, ordered_series
from heartloop.store import Store


def _write_phantom(seed: int, rows: int, slices: int, out_dir: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Make and write the phantom (in a child process, so its memory does not count in peak_mb);
    returns the series directory and the true heart's index box."""
    patient = make_patient(seed, rows=rows, n_slices=slices)
    directory = write_patient(patient, Path(out_dir))
    where = np.nonzero(patient.heart_mask)
    return str(directory), tuple((int(w.min()), int(w.max()) + 1) for w in where)


def _store_series(store: Store, paths: list[Path]) -> str:
    """Store the files as the node does (copy into incoming/, durable placement, row); the series UID."""
    series_uid = ""
    for path in paths:
        header = read_header(path)
        temp = store.files.new_temp(suffix=".dcm")
        shutil.copyfile(path, temp)
        store.store_instance(header_to_new_instance(header), temp, "BENCH", path.stat().st_size)
        series_uid = header.series_uid
    return series_uid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        settings = load_settings(environ={}, overrides={"storage": {"root": str(root)}, "compute": {"device": "cpu"},
                                                        "http": {"enabled": False}})
        cs = contouring_settings(settings)
        threads = configure_runtime(cs.threads)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            written, heart_box = pool.submit(_write_phantom, args.seed, args.rows, args.slices, tmp).result()
        store = Store.from_settings(settings)
        series_uid = _store_series(store, sorted(Path(written).glob("CT_*.dcm")))
        result = assemble_series(store, settings, series_uid)
        case_id = result.case_id
        assert case_id is not None and store.get_case(case_id).state == CaseState.READY.value, result

        load_times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            geometry, paths = ordered_series(store, settings, case_series_uid(store, case_id))
            ct = load_ct_volume(paths, geometry)
            load_times.append(time.perf_counter() - started)
        print(f"CT {ct.shape} {ct.array.dtype}, pixel {ct.pixel_spacing[0]:.3f} mm, "
              f"slices {ct.slice_spacing:.2f} mm; torch threads {threads}")

        # A model in the registry, as the trainer would leave it (random weights: same cost).
        registry = ModelRegistry(models_dir(settings))
        learner = Learner.fresh(cs, seed=0)
        version = registry.register(learner.weights(), ModelMeta(kind=MODEL_KIND, settings=settings_to_dict(cs)))
        registry.promote(version, "benchmark")
        stage = ContouringStage(store, settings)
        box = add_margin(ct, heart_box, cs.margin_mm)  # type: ignore[arg-type]
        flat_box = [v for pair in box for v in pair]
        predictor = Predictor.load(registry, version, runtime=cs)
        del ct

        # Warm-up: oneDNN primitive creation, the stage's predictor cache.
        predictor.localise(load_ct_volume(paths, geometry))
        stage.run({"case_id": case_id, "box": flat_box})
        job_times, localise_times = [], []
        for _ in range(args.repeats):
            store.set_case_state(case_id, CaseState.READY, None)
            started = time.perf_counter()
            stage.run({"case_id": case_id, "box": flat_box})
            job_times.append(time.perf_counter() - started)
            case = store.get_case(case_id)
            latest = store.latest_prediction(case_id)
            assert case.state == CaseState.PREDICTED.value, (case.state, case.reason)
            assert latest is not None and latest.rtstruct_path and store.files.abspath(latest.rtstruct_path).exists()
            assert store.files.abspath(latest.mask_path).exists()
            ct = load_ct_volume(paths, geometry)
            started = time.perf_counter()
            predictor.localise(ct)
            localise_times.append(time.perf_counter() - started)
            del ct
        store.dispose()

    job_s, localise_s, load_s = min(job_times), min(localise_times), min(load_times)
    seconds = job_s + localise_s
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    crop = tuple(hi - lo for lo, hi in box)
    print(f"contour job (load, organ crop {crop}, mask + RTSTRUCT stored, PREDICTED) {job_s:.2f} s "
          f"(runs {[round(t, 2) for t in job_times]}); localiser {localise_s:.2f} s")
    print(f"seconds={seconds:.2f} load_seconds={load_s:.2f} ratio={seconds / load_s:.2f} peak_mb={peak_mb:.0f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
