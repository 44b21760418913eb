"""Learning curve: cases arrive one by one, the current model predicts, a simulated annotator
corrects, the trainer gets a fixed time budget before the next case.

    python -m bench.learning_curve --cases 30 --train-seconds 60 [--rows 256] [--slices 80] [--out DIR]

Per case: Dice(prediction, corrected), HD95 (mm) between their surfaces, corrected voxels (the
annotator's effort) and |mean heart dose(prediction) − mean heart dose(corrected)| on the
phantom's plan dose (`heartloop.dose.dose_on_mask`). The annotator behaves like a person: at cold
start (no model) it paints the heart and a ring of background around it; afterwards it paints
only clear errors — connected regions of missed heart (foreground) or included non-heart
(background) inside the heart's box plus ``--box-margin-mm``, skipping specks smaller than
``--speck-voxels``. Training is the service's trainer loop (`step_trainer`: epochs, validation,
promotion) for ``--train-seconds`` of wall time per case on this machine.

Writes ``learning_curve.csv`` and ``learning_curve.png`` (Dice, effort, dose difference per case)
to ``--out``; the last line is the medians over cases 16–30:
``dice=… dose_gy=… effort_ratio=…`` (effort ratio: median effort of cases 16–30 over that of
cases 2–4).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from heartloop.contouring.inference import Predictor
from heartloop.contouring.registry import ModelRegistry
from heartloop.contouring.settings import ContouringSettings
from heartloop.contouring.training import Correction, Learner, TrainerState, TrainingData, step_trainer
from heartloop.core import Volume
from heartloop.dose import dose_on_mask
from heartloop.phantom import make_patient

log = logging.getLogger(__name__)

TINY = ContouringSettings(width=8, depth=2, groupnorm_groups=4, localiser_voxel_mm=(8.0, 8.0, 8.0),
                          organ_voxel_mm=(4.0, 4.0, 4.0), localiser_patch_size=(16, 32, 32),
                          organ_patch_size=(16, 32, 32), margin_mm=10.0, learning_rate=3e-3, device="cpu")


def _spacing(volume: Volume) -> tuple[float, float, float]:
    return tuple(float(v) for v in volume.voxel_size[::-1])  # type: ignore[return-value]  # array axis order


def hd95_mm(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th percentile of the symmetric surface distances (mm); NaN when either mask is empty."""
    if not a.any() or not b.any():
        return float("nan")
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def heart_box(truth: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> np.ndarray:
    """Bool mask of the heart's bounding box widened by `margin_mm` (where the annotator looks)."""
    box = np.zeros_like(truth)
    where = np.nonzero(truth)
    window = []
    for axis, (w, s) in enumerate(zip(where, spacing)):
        pad = int(np.ceil(margin_mm / s))
        window.append(slice(max(0, int(w.min()) - pad), min(truth.shape[axis], int(w.max()) + 1 + pad)))
    box[tuple(window)] = True
    return box


def annotate(prediction: np.ndarray, truth: np.ndarray, box: np.ndarray, speck_voxels: int,
             cold_start: bool) -> tuple[np.ndarray, np.ndarray]:
    """What the simulated reviewer paints: (foreground, background)."""
    if cold_start:
        ring = ndimage.binary_dilation(truth, iterations=4) & ~ndimage.binary_dilation(truth, iterations=1)
        return truth.copy(), ring & box
    fg = np.zeros_like(truth)
    bg = np.zeros_like(truth)
    for error, paint in ((truth & ~prediction & box, fg), (prediction & ~truth & box, bg)):
        labels, n = ndimage.label(error)
        if not n:
            continue
        sizes = ndimage.sum_labels(error, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= speck_voxels) + 1
        paint |= np.isin(labels, keep)
    # Non-heart the model included outside the box is an obvious error too (a stray blob).
    outside = prediction & ~box
    if outside.sum() >= speck_voxels:
        bg |= outside
    return fg, bg


def mean_dose(mask: np.ndarray, ct: Volume, dose: Volume) -> float:
    if not mask.any():
        return float("nan")
    return float(dose_on_mask(ct.with_array(mask), dose).mean_gy)


def _override(settings: ContouringSettings, assignments: list[str]) -> ContouringSettings:
    """`settings` with ``FIELD=VALUE`` overrides (values parsed as Python literals)."""
    import ast

    changes = {}
    for item in assignments:
        name, _, text = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(ContouringSettings)}:
            raise SystemExit(f"--set {item!r}: ContouringSettings has no field {name!r}")
        try:
            changes[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            changes[name] = text
    return dataclasses.replace(settings, **changes) if changes else settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.add_argument("--rows", type=int, default=256, help="phantom image matrix")
    p.add_argument("--slices", type=int, default=80, help="phantom slices")
    p.add_argument("--seed", type=int, default=100, help="seed of the first phantom")
    p.add_argument("--speck-voxels", type=int, default=30)
    p.add_argument("--box-margin-mm", type=float, default=15.0)
    p.add_argument("--tiny", action="store_true", help="tiny network (a quick check that the bench runs)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--late-from", type=int, default=16,
                   help="first case of the summary medians (16 for the 30-case goal; lower for reduced runs)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ContouringSettings field for this run (repeatable), to compare variants")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = TINY if args.tiny else dataclasses.replace(ContouringSettings(), device="cpu")
    settings = _override(settings, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, float | int | str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        data = TrainingData(settings, seed=0)
        learner = Learner.fresh(settings, seed=0)
        state = TrainerState()
        for n in range(args.cases):
            patient = make_patient(args.seed + n, rows=args.rows, n_slices=args.slices)
            ct, truth = patient.volume, patient.heart_mask
            spacing = _spacing(ct)
            current = registry.current()
            version = current.version if current is not None else None
            if version is None:
                prediction = np.zeros_like(truth)
            else:
                prediction = Predictor.load(registry, version, runtime=settings).predict(ct).mask.array
            fg, bg = annotate(prediction, truth, heart_box(truth, spacing, args.box_margin_mm), args.speck_voxels,
                              cold_start=version is None)
            corrected = (prediction | fg) & ~bg
            effort = int(fg.sum() + bg.sum())
            dose_pred, dose_corr = mean_dose(prediction, ct, patient.dose), mean_dose(corrected, ct, patient.dose)
            row = {"case": n + 1, "model_version": version or "-", "dice": round(dice(prediction, corrected), 4),
                   "dice_truth": round(dice(prediction, truth), 4),
                   "hd95_mm": round(hd95_mm(prediction, corrected, spacing), 2), "effort_voxels": effort,
                   "dose_diff_gy": round(abs(dose_pred - dose_corr), 4) if version else float("nan")}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            if effort:
                data.add(Correction(f"case{n + 1:03d}", ct, prediction, fg, bg))
            started = time.monotonic()
            steps, reports = 0, []
            while data.train_ids and (left := args.train_seconds - (time.monotonic() - started)) > 0:
                state, report = step_trainer(learner, data, state, registry, settings, time_budget_s=left)
                steps += report.epoch.steps
                reports.append(report)
            if reports:  # what the trainer did with its time (stderr: the last stdout line stays the summary)
                last = reports[-1]
                print(f"  trained: steps={steps} epochs={len(reports)} candidate_val_dice={last.candidate.dice} "
                      f"current_val_dice={None if last.current is None else last.current.dice} "
                      f"promoted={[r.promoted_version for r in reports if r.promoted_version]}",
                      file=sys.stderr, flush=True)
    with open(args.out / "learning_curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, args.out / "learning_curve.png")
    late = rows[args.late_from - 1 : 30]
    early_effort = np.median([r["effort_voxels"] for r in rows[1:4]]) if len(rows) > 1 else float("nan")
    late_dice = np.nanmedian([r["dice"] for r in late]) if late else float("nan")
    late_dose = np.nanmedian([r["dose_diff_gy"] for r in late]) if late else float("nan")
    late_effort = np.median([r["effort_voxels"] for r in late]) if late else float("nan")
    ratio = late_effort / early_effort if early_effort else float("nan")
    print(f"wrote {args.out / 'learning_curve.csv'} and {args.out / 'learning_curve.png'}")
    print(f"dice={late_dice:.4f} dose_gy={late_dose:.4f} effort_ratio={ratio:.4f}")
    return 0


def _plot(rows: list[dict[str, float | int | str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r["case"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    for ax, key, label in zip(axes, ("dice", "effort_voxels", "dose_diff_gy"),
                              ("Dice (prediction vs corrected)", "corrected voxels (effort)",
                               "|Δ mean heart dose| (Gy)")):
        ax.plot(cases, [r[key] for r in rows], "o-")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("case (arrival order)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
