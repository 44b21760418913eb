"""Continual training from corrections, as small objects and functions (no trainer god object).

- `Correction`: one reviewed case (CT, the prediction it corrects, painted fg/bg, or a dense label).
- `TrainingData`: the corrections, their train/validation split (`split.assign_split`, fixed forever
  per case), replay sampling (`sampling.sample_replay_batch`) and patch extraction for both stages.
- `Learner`: the two networks being trained and their optimisers.
- `TrainerState`: what must survive a restart of the trainer process (progress counters, best
  validation Dice, the weights and optimiser states, split assignments, sampling counts), written
  atomically by `TrainerState.checkpoint`.
- `train_epoch`, `validate`, `step_trainer`: one epoch; validation Dice; one epoch + validation +
  promotion decision + restart rule (RootPainter3D's, see `heartloop.contouring.promotion`).

Labels per stage. The organ network trains on the CT resampled to ``organ_voxel_mm`` around the
heart (the same crop geometry inference uses); painted masks are resampled trilinearly and kept
where at least half a fine voxel's weight is painted, so the boundary does not move. The localiser
trains on the block-averaged whole CT; a coarse voxel is foreground when *any* fine voxel in it is
painted foreground (the localiser's box must contain every bit of heart) and background when any
is painted background and none foreground.

Losses. Sparse corrections use, by ``settings.correction_loss``, the confidence-weighted
`loss.dense_loss` on the corrected contour (``"dense"``, seed 004 eq. 9/12: painted voxels weigh 1,
the rest the reviewer accepted ``accepted_voxel_weight``; validation then scores the whole corrected
contour) or `loss.masked_loss` (``"masked"``: painted voxels only, RootPainter3D, which validates on
painted voxels too); dense labels (a clinical RTSTRUCT imported from the TPS) use `loss.dense_loss`
with every voxel weighted 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from heartloop.contouring.inference import MODEL_KIND, Predictor, add_margin, settings_to_dict
from heartloop.contouring.loss import corrected_label, dense_loss, masked_loss
from heartloop.contouring.network import (
    UNet3D,
    autocast,
    normalise_hu,
    preferred_memory_format,
    resolve_device,
    resolve_precision,
)
from heartloop.contouring.promotion import (
    ProgressState,
    ValidationMetrics,
    dice_from_counts,
    should_promote,
    should_restart,
    should_resume_best,
)
from heartloop.contouring.registry import ModelMeta, ModelRegistry
from heartloop.contouring.resample import AxisGrid, block_any, block_average, block_factors, resample_separable
from heartloop.contouring.sampling import ReplayCase, ReplayParams, sample_replay_batch
from heartloop.contouring.settings import ContouringSettings
from heartloop.contouring.split import Split, assign_split, epoch_length
from heartloop.core.volume import Volume

log = logging.getLogger(__name__)

#: The two networks, in the order they are trained each step; also the registry weights' keys.
STAGES: tuple[str, str] = ("localiser", "organ")
#: Seconds the trainer sleeps, between optimiser steps, while an inference job is waiting.
YIELD_SLEEP_S = 0.5
_CHECKPOINT_FORMAT = 1


# -- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Correction:
    """One reviewed case as training data; all masks on the grid of `ct`.

    Parameters
    ----------
    case_id
        Opaque identifier (no patient data).
    ct
        int16 HU `Volume`: the whole CT, or a crop around the heart's box.
    prediction
        Bool array: the model's contour the reviewer corrected (empty at cold start).
    foreground, background
        Bool arrays of painted voxels: heart the model missed / non-heart it included.
    dense
        True when the whole label is known (a clinical contour imported from the TPS): then the
        label is `prediction` ∪ `foreground` − `background` everywhere and every voxel counts.
    revision
        Increases when the case is corrected again; part of the validation-set fingerprint.
    """

    case_id: str
    ct: Volume
    prediction: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    dense: bool = False
    revision: int = 0

    def __post_init__(self) -> None:
        if not self.case_id:
            raise ValueError("case_id is required")
        for name in ("prediction", "foreground", "background"):
            array = np.asarray(getattr(self, name), dtype=bool)
            if array.shape != self.ct.shape:
                raise ValueError(f"{name} {array.shape} is not on the CT grid {self.ct.shape}")
            object.__setattr__(self, name, array)
        if not self.dense and not (self.foreground.any() or self.background.any()):
            raise ValueError("a sparse correction needs some painted voxels")

    @property
    def label(self) -> np.ndarray:
        """The corrected contour ``prediction ∪ foreground − background``."""
        return corrected_label(self.prediction, self.foreground, self.background)

    @property
    def annotated(self) -> np.ndarray:
        """Voxels whose label is known: painted ones, or all for a dense label."""
        if self.dense:
            return np.ones(self.ct.shape, dtype=bool)
        return self.foreground | self.background

    @classmethod
    def from_label(cls, case_id: str, ct: Volume, label: np.ndarray, revision: int = 0) -> "Correction":
        """A dense correction from a complete contour (e.g. a clinical RTSTRUCT's heart)."""
        label = np.asarray(label, dtype=bool)
        empty = np.zeros(ct.shape, dtype=bool)
        return cls(case_id=case_id, ct=ct, prediction=label, foreground=empty, background=empty, dense=True,
                   revision=revision)


@dataclass(frozen=True)
class StageArrays:
    """A correction on one stage's grid: HU (float32) and the bool masks the loss needs."""

    hu: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    prediction: np.ndarray
    dense: bool
    #: Voxels that exist in the CT (False where a patch was padded); ``None``: all of them.
    region: np.ndarray | None = None


@dataclass(frozen=True)
class PatchBatch:
    """Stacked patches of one stage: ``hu`` (N, D, H, W) float32 and bool masks of that shape.
    ``region`` (optional) marks voxels that exist in the CT: padding never counts in a dense loss."""

    hu: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    prediction: np.ndarray
    dense: tuple[bool, ...]
    region: np.ndarray | None = None


def _bbox(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    where = np.nonzero(mask)
    return tuple((int(w.min()), int(w.max()) + 1) for w in where)  # type: ignore[return-value]


def organ_arrays(correction: Correction, settings: ContouringSettings) -> StageArrays:
    """The correction on the organ grid, over the heart's region plus ``margin_mm``."""
    known = correction.label | correction.foreground | correction.background
    if not known.any():  # a dense label with no heart: the whole CT is background
        box = tuple((0, n) for n in correction.ct.shape)
    else:
        box = add_margin(correction.ct, _bbox(known), settings.margin_mm)
    grid = AxisGrid.for_crop(correction.ct, box, settings.organ_voxel_mm)  # type: ignore[arg-type]
    local = tuple(p - lo for p, (lo, _) in zip(grid.positions, box))
    crop = tuple(slice(lo, hi) for lo, hi in box)

    def on_grid(mask: np.ndarray) -> np.ndarray:
        return resample_separable(mask[crop].astype(np.float32), local) >= 0.5

    return StageArrays(
        hu=resample_separable(correction.ct.array[crop], local),
        foreground=on_grid(correction.label if correction.dense else correction.foreground),
        background=on_grid(~correction.label if correction.dense else correction.background),
        prediction=on_grid(correction.label if correction.dense else correction.prediction),
        dense=correction.dense,
    )


def localiser_arrays(correction: Correction, settings: ContouringSettings) -> StageArrays:
    """The correction on the localiser grid (block average; "any painted fine voxel" labels)."""
    factors = block_factors(correction.ct, settings.localiser_voxel_mm)
    # "Any heart" is the coarse label: a block holding any heart of the corrected contour is heart,
    # even where the reviewer painted away a false-positive rim inside it.
    heart = block_any(correction.label, factors)
    if correction.dense:
        foreground = heart
        background = ~foreground
    else:
        foreground = block_any(correction.foreground, factors)
        background = block_any(correction.background, factors) & ~foreground & ~heart
    return StageArrays(
        hu=block_average(correction.ct.array, factors),
        foreground=foreground,
        background=background,
        # The corrected contour on this grid: the target of the dense (confidence-weighted) loss.
        prediction=heart,
        dense=correction.dense,
    )


def _pad_to(array: np.ndarray, size: tuple[int, ...], edge: bool) -> np.ndarray:
    pad = [(0, max(0, s - n)) for n, s in zip(array.shape, size)]
    if not any(after for _, after in pad):
        return array
    return np.pad(array, pad, mode="edge") if edge else np.pad(array, pad, mode="constant")


def extract_patch(
    arrays: StageArrays, size: tuple[int, int, int], rng: np.random.Generator
) -> StageArrays:
    """A `size` patch centred (with jitter) on a random annotated voxel — for a dense label, on
    the heart half of the time — so every patch carries training signal. Arrays smaller than the
    patch are padded (HU by edge replication, masks with False: padding is never annotated)."""
    hu = _pad_to(arrays.hu, size, edge=True)
    region = _pad_to(np.ones(arrays.hu.shape, dtype=bool) if arrays.region is None else arrays.region, size,
                     edge=False)
    fg = _pad_to(arrays.foreground, size, edge=False)
    bg = _pad_to(arrays.background, size, edge=False)
    pred = _pad_to(arrays.prediction, size, edge=False)
    candidates = fg if (arrays.dense or not bg.any() or rng.random() < 0.5) else bg
    if not candidates.any():
        candidates = fg | bg
    if candidates.any():
        flat = np.flatnonzero(candidates)
        centre = np.unravel_index(int(flat[rng.integers(len(flat))]), candidates.shape)
    else:
        centre = tuple(int(rng.integers(n)) for n in hu.shape)
    start = []
    for c, s, n in zip(centre, size, hu.shape):
        jitter = int(rng.integers(-(s // 4), s // 4 + 1))
        start.append(int(np.clip(c - s // 2 + jitter, 0, n - s)))
    window = tuple(slice(st, st + s) for st, s in zip(start, size))
    return StageArrays(hu=hu[window], foreground=fg[window], background=bg[window], prediction=pred[window],
                       dense=arrays.dense, region=region[window])


class TrainingData:
    """Corrections, their split, replay sampling and patches for both stages.

    Parameters
    ----------
    settings
        Grids, patch sizes, batch size and replay parameters.
    assignments, times_sampled
        Restored bookkeeping (from `TrainerState`); a case keeps its split forever.
    seed
        Seed of the sampling random generator.
    """

    def __init__(
        self,
        settings: ContouringSettings,
        assignments: Mapping[str, Split] | None = None,
        times_sampled: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.assignments: dict[str, Split] = {k: Split(v) for k, v in (assignments or {}).items()}
        self.times_sampled: dict[str, int] = dict(times_sampled or {})
        self._corrections: dict[str, Correction] = {}
        self._order: list[str] = []  # training cases in arrival order (newest last)
        self._cache: dict[tuple[str, str], StageArrays] = {}
        self._new_data = False
        self.rng = np.random.default_rng(seed)
        self.replay = ReplayParams.from_settings(settings)

    def add(self, correction: Correction) -> Split:
        """Add (or replace, when re-corrected) a case; returns its split."""
        split = assign_split(correction.case_id, self.assignments)
        self.assignments[correction.case_id] = split
        self._corrections[correction.case_id] = correction
        if correction.case_id in self._order:
            self._order.remove(correction.case_id)
        if split is Split.TRAIN:
            self._order.append(correction.case_id)
            # A re-corrected case is fresh again: the sampler should revisit it soon.
            self.times_sampled[correction.case_id] = 0
        for stage in STAGES:
            self._cache.pop((correction.case_id, stage), None)
        self._new_data = True
        log.info("correction added to %s (%d train, %d validation)", split.value, len(self.train_ids),
                 len(self.validation_ids))
        return split

    def consume_new_data(self) -> bool:
        """True once after any `add` (resets the epochs-without-progress counter)."""
        new, self._new_data = self._new_data, False
        return new

    @property
    def train_ids(self) -> list[str]:
        return [c for c in self._order if c in self._corrections]

    @property
    def validation_ids(self) -> list[str]:
        return [c for c, s in self.assignments.items() if s is Split.VALIDATION and c in self._corrections]

    def correction(self, case_id: str) -> Correction:
        return self._corrections[case_id]

    def validation_fingerprint(self) -> str:
        """Identifies the validation set (case ids and revisions): scores compare only on equal sets."""
        items = sorted((c, self._corrections[c].revision) for c in self.validation_ids)
        return hashlib.sha256(repr(items).encode()).hexdigest()[:16]

    def data_fingerprint(self) -> str:
        """Identifies all data a model saw (for `ModelMeta.data_snapshot`)."""
        items = sorted((c, self._corrections[c].revision, self.assignments[c].value) for c in self._corrections)
        return hashlib.sha256(repr(items).encode()).hexdigest()[:16]

    def n_validation_patches(self) -> int:
        """Organ patches needed to tile each validation case's annotated region (RootPainter3D's
        "patches containing annotation"), which sets the epoch length."""
        total = 0
        for case_id in self.validation_ids:
            arrays = self.stage_arrays(case_id, "organ")
            annotated = arrays.foreground | arrays.background
            if annotated.any():
                extent = [hi - lo for lo, hi in _bbox(annotated)]
                total += math.prod(math.ceil(e / s) for e, s in zip(extent, self.settings.organ_patch_size))
        return total

    def epoch_samples(self) -> int:
        return epoch_length(self.n_validation_patches(), has_val=bool(self.validation_ids),
                            without_validation=self.settings.epoch_length_without_validation,
                            minimum=self.settings.min_epoch_length)

    def stage_arrays(self, case_id: str, stage: str) -> StageArrays:
        """The case on a stage's grid (cached: resampling once per correction, not per patch)."""
        key = (case_id, stage)
        if key not in self._cache:
            correction = self._corrections[case_id]
            make = localiser_arrays if stage == "localiser" else organ_arrays
            self._cache[key] = make(correction, self.settings)
        return self._cache[key]

    def sample_batch(self) -> tuple[str, ...]:
        """Case ids of the next batch (replay sampling; new corrections are favoured)."""
        ids = self.train_ids
        if not ids:
            raise ValueError("no training corrections yet")
        cases = [ReplayCase(c, age=len(ids) - 1 - n, times_sampled=self.times_sampled.get(c, 0))
                 for n, c in enumerate(ids)]
        batch = sample_replay_batch(cases, self.settings.batch_size, self.replay, self.rng)
        for case_id in set(batch):
            self.times_sampled[case_id] = self.times_sampled.get(case_id, 0) + 1
        return batch

    def patches(self, case_ids: tuple[str, ...], stage: str) -> PatchBatch:
        """One patch per case id on `stage`'s grid, stacked."""
        size = self.settings.localiser_patch_size if stage == "localiser" else self.settings.organ_patch_size
        size = tuple(int(s) for s in size)
        parts = [extract_patch(self.stage_arrays(c, stage), size, self.rng) for c in case_ids]  # type: ignore[arg-type]
        return PatchBatch(
            hu=np.stack([p.hu for p in parts]).astype(np.float32, copy=False),
            foreground=np.stack([p.foreground for p in parts]),
            background=np.stack([p.background for p in parts]),
            prediction=np.stack([p.prediction for p in parts]),
            dense=tuple(p.dense for p in parts),
            region=np.stack([np.ones(p.hu.shape, dtype=bool) if p.region is None else p.region for p in parts]),
        )


# -- learning ----------------------------------------------------------------------------------------
def batch_loss(logits: torch.Tensor, batch: PatchBatch, accepted_weight: float = 0.0) -> torch.Tensor:
    """Mean over the batch of the loss of each patch.

    Dense labels: `dense_loss` with every voxel weighted 1. Sparse corrections: `masked_loss`
    (painted voxels only, RootPainter3D) when `accepted_weight` is 0; otherwise the confidence-
    weighted `dense_loss` (seed 004 eq. 9/12) on the corrected contour, painted voxels weighing 1
    and the unpainted ones the reviewer accepted `accepted_weight`. Padding never counts.
    """
    losses = []
    for n, dense in enumerate(batch.dense):
        fg = torch.from_numpy(batch.foreground[n : n + 1]).to(logits.device)
        bg = torch.from_numpy(batch.background[n : n + 1]).to(logits.device)
        region = None if batch.region is None else torch.from_numpy(batch.region[n : n + 1]).to(logits.device)
        if dense:
            pred = torch.from_numpy(batch.prediction[n : n + 1]).to(logits.device)
            empty = torch.zeros_like(fg)
            losses.append(dense_loss(logits[n : n + 1], pred, empty, empty, accepted_weight=1.0, region=region))
        elif accepted_weight > 0:
            pred = torch.from_numpy(batch.prediction[n : n + 1]).to(logits.device)
            if region is not None:  # padding is unpainted and unseen: weight 0 (dense_loss keeps painted voxels)
                fg, bg = fg & region, bg & region
            losses.append(dense_loss(logits[n : n + 1], pred, fg, bg, accepted_weight=accepted_weight, region=region))
        else:
            losses.append(masked_loss(logits[n : n + 1], fg, bg))
    return torch.stack(losses).mean()


def correction_accepted_weight(settings: ContouringSettings) -> float:
    """Weight of unpainted voxels of sparse corrections: 0 for the masked loss."""
    return settings.accepted_voxel_weight if settings.correction_loss == "dense" else 0.0


def make_optimiser(model: UNet3D, settings: ContouringSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=settings.learning_rate)


@dataclass
class Learner:
    """The two networks in training and their optimisers (keys: `STAGES`)."""

    networks: dict[str, UNet3D]
    optimisers: dict[str, torch.optim.Optimizer]

    @classmethod
    def fresh(cls, settings: ContouringSettings, seed: int | None = None) -> "Learner":
        """Newly initialised networks (Kaiming) on the settings' device."""
        if seed is not None:
            torch.manual_seed(seed)
        device = resolve_device(settings.device)
        networks = {stage: UNet3D.from_settings(settings).to(device) for stage in STAGES}
        return cls(networks, {s: make_optimiser(m, settings) for s, m in networks.items()})

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of both state dicts (registry format)."""
        return {s: {k: v.detach().to("cpu").clone() for k, v in m.state_dict().items()}
                for s, m in self.networks.items()}

    def predictor(self, settings: ContouringSettings, version: str = "candidate") -> Predictor:
        """An independent `Predictor` with copies of the current weights."""
        return Predictor.from_state_dicts(self.weights(), settings, version)


@dataclass(frozen=True)
class EpochResult:
    """What one (possibly time-limited) epoch did."""

    steps: int
    samples: int
    planned_samples: int
    mean_loss: dict[str, float]
    seconds: float
    yielded_s: float

    @property
    def completed(self) -> bool:
        return self.samples >= self.planned_samples


def train_epoch(
    models: Mapping[str, UNet3D],
    optimisers: Mapping[str, torch.optim.Optimizer],
    data: TrainingData,
    settings: ContouringSettings,
    *,
    yield_check: Callable[[], bool] = lambda: False,
    time_budget_s: float | None = None,
) -> EpochResult:
    """Train both stages for one epoch (`TrainingData.epoch_samples` samples, RootPainter3D's length).

    Each step trains the localiser and the organ network on patches of the same sampled cases.
    Between steps, while `yield_check()` is true (an inference job is waiting), the trainer sleeps
    `YIELD_SLEEP_S`: two processes sharing 2 cores slow each other far more than a pause costs.
    Stops early (``completed`` false) once `time_budget_s` is spent.
    """
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    memory_format = preferred_memory_format(device, dtype, training=True)
    planned = data.epoch_samples()
    accepted_weight = correction_accepted_weight(settings)
    steps = samples = 0
    yielded = 0.0
    loss_sums = {stage: 0.0 for stage in STAGES}
    started = time.monotonic()
    for stage in STAGES:
        models[stage].to(memory_format=memory_format).train()
    while samples < planned:
        if time_budget_s is not None and time.monotonic() - started >= time_budget_s:
            break
        while yield_check():
            time.sleep(YIELD_SLEEP_S)
            yielded += YIELD_SLEEP_S
        case_ids = data.sample_batch()
        for stage in STAGES:
            batch = data.patches(case_ids, stage)
            x = normalise_hu(batch.hu)[:, None].to(device).contiguous(memory_format=memory_format)
            optimiser = optimisers[stage]
            optimiser.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                logits = models[stage](x)
            loss = batch_loss(logits, batch, accepted_weight)
            loss.backward()
            optimiser.step()
            loss_sums[stage] += float(loss.detach())
        steps += 1
        samples += len(case_ids)
    seconds = time.monotonic() - started
    mean_loss = {s: (v / steps if steps else float("nan")) for s, v in loss_sums.items()}
    log.info("epoch: %d steps, %d/%d samples in %.1f s (yielded %.1f s), loss %s", steps, samples, planned,
             seconds, yielded, {k: round(v, 4) for k, v in mean_loss.items()})
    return EpochResult(steps=steps, samples=samples, planned_samples=planned, mean_loss=mean_loss,
                       seconds=seconds, yielded_s=yielded)


def validate(predictor: Predictor, data: TrainingData) -> ValidationMetrics:
    """Pooled Dice of `predictor`'s full two-stage predictions over the validation cases, counted
    on annotated voxels only (all voxels of dense labels), as RootPainter3D pools its counts.
    With ``correction_loss = "dense"`` the corrected contour counts everywhere (the reviewer
    accepted the rest, which is what the dense loss trains on): the score is then the Dice of the
    prediction against what the reviewer signed off. ``dice`` is ``None`` when there is no
    validation data."""
    fingerprint = data.validation_fingerprint()
    ids = data.validation_ids
    if not ids:
        return ValidationMetrics(dice=None, validation_set=fingerprint)
    accepted_counts = correction_accepted_weight(data.settings) > 0
    tp = fp = fn = 0
    for case_id in ids:
        correction = data.correction(case_id)
        predicted = predictor.predict(correction.ct).mask.array
        counted = np.ones(correction.ct.shape, dtype=bool) if accepted_counts else correction.annotated
        label = correction.label
        tp += int(np.count_nonzero(predicted & label & counted))
        fp += int(np.count_nonzero(predicted & ~label & counted))
        fn += int(np.count_nonzero(~predicted & label & counted))
    return ValidationMetrics(dice=dice_from_counts(tp, fp, fn), validation_set=fingerprint)


# -- state -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerState:
    """Everything the trainer needs to resume after a restart of its process.

    Parameters
    ----------
    progress
        Epoch and restart counters (`ProgressState`).
    best_val_dice
        Best validation Dice promoted so far (``None`` before any validation).
    current_version, current_metrics
        The model training compares against and its score (reused while the validation set and
        the registry's current version are unchanged).
    lineage_parent
        Version the weights in training descend from (``None`` after a fresh start).
    weights, optimiser_states
        Per stage, the training weights and Adam states.
    assignments, times_sampled
        The data's split and sampling counts.
    """

    progress: ProgressState = field(default_factory=ProgressState)
    best_val_dice: float | None = None
    current_version: str | None = None
    current_metrics: ValidationMetrics | None = None
    lineage_parent: str | None = None
    weights: Mapping[str, Any] = field(default_factory=dict)
    optimiser_states: Mapping[str, Any] = field(default_factory=dict)
    assignments: Mapping[str, str] = field(default_factory=dict)
    times_sampled: Mapping[str, int] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return self.progress.epochs

    def capture(self, learner: Learner, data: TrainingData, **changes: Any) -> "TrainerState":
        """This state with the learner's weights/optimisers and the data's bookkeeping."""
        return dataclasses.replace(
            self,
            weights=learner.weights(),
            optimiser_states={s: o.state_dict() for s, o in learner.optimisers.items()},
            assignments={k: v.value for k, v in data.assignments.items()},
            times_sampled=dict(data.times_sampled),
            **changes,
        )

    def restore(self, learner: Learner) -> None:
        """Load the saved weights and optimiser states into `learner` (no-op when none saved)."""
        for stage in STAGES:
            if stage in self.weights:
                learner.networks[stage].load_state_dict(self.weights[stage])
            if stage in self.optimiser_states:
                learner.optimisers[stage].load_state_dict(self.optimiser_states[stage])

    def checkpoint(self, path: str | Path) -> None:
        """Write atomically: a temp file in the same directory, fsynced, then renamed over `path`
        (a crash leaves either the old or the new checkpoint, never half of one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "format": _CHECKPOINT_FORMAT,
            "progress": dataclasses.asdict(self.progress),
            "best_val_dice": self.best_val_dice,
            "current_version": self.current_version,
            "current_metrics": None if self.current_metrics is None else dataclasses.asdict(self.current_metrics),
            "lineage_parent": self.lineage_parent,
            "weights": dict(self.weights),
            "optimiser_states": dict(self.optimiser_states),
            "assignments": dict(self.assignments),
            "times_sampled": dict(self.times_sampled),
        }
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temp, "wb") as handle:
                torch.save(document, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        try:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # pragma: no cover - platforms without directory fsync
            pass
        log.info("trainer checkpoint written (epoch %d)", self.epoch)

    @classmethod
    def resume(cls, path: str | Path) -> "TrainerState":
        """Read a checkpoint; a fresh state when `path` does not exist (first start)."""
        path = Path(path)
        if not path.exists():
            return cls()
        document = torch.load(path, map_location="cpu", weights_only=True)
        if document.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path.name}: unknown checkpoint format {document.get('format')!r}")
        metrics = document["current_metrics"]
        return cls(
            progress=ProgressState(**document["progress"]),
            best_val_dice=document["best_val_dice"],
            current_version=document["current_version"],
            current_metrics=None if metrics is None else ValidationMetrics(**metrics),
            lineage_parent=document["lineage_parent"],
            weights=document["weights"],
            optimiser_states=document["optimiser_states"],
            assignments=document["assignments"],
            times_sampled=document["times_sampled"],
        )


@dataclass(frozen=True)
class StepReport:
    """Outcome of `step_trainer`."""

    epoch: EpochResult
    candidate: ValidationMetrics
    #: The current model's score the candidate was compared with (``None`` at cold start).
    current: ValidationMetrics | None
    promoted_version: str | None
    restarted: bool


def _current_metrics(
    state: TrainerState, registry: ModelRegistry, data: TrainingData, settings: ContouringSettings
) -> tuple[str | None, ValidationMetrics | None]:
    current = registry.current()
    if current is None or current.version is None:
        return None, None
    fingerprint = data.validation_fingerprint()
    if (state.current_version == current.version and state.current_metrics is not None
            and state.current_metrics.validation_set == fingerprint):
        return current.version, state.current_metrics
    # A new validation case, a rollback or another trainer's promotion: score it afresh.
    predictor = Predictor.load(registry, current.version, runtime=settings)
    return current.version, validate(predictor, data)


def step_trainer(
    learner: Learner,
    data: TrainingData,
    state: TrainerState,
    registry: ModelRegistry,
    settings: ContouringSettings,
    *,
    yield_check: Callable[[], bool] = lambda: False,
    time_budget_s: float | None = None,
    restart_seed: int | None = None,
) -> tuple[TrainerState, StepReport]:
    """One epoch, validation of candidate and current model on the same set, promotion, restart.

    A promoted candidate is registered (parent, case counts, validation Dice, settings, data
    fingerprint) and made current. After ``settings.epochs_without_progress_restart`` epochs
    without progress the networks restart from fresh weights; the best model stays promoted.
    Returns the new state (with the learner's weights) and a report.
    """
    new_data = data.consume_new_data()
    epoch = train_epoch(learner.networks, learner.optimisers, data, settings,
                        yield_check=yield_check, time_budget_s=time_budget_s)
    candidate = validate(learner.predictor(settings), data)
    current_version, current = _current_metrics(state, registry, data, settings)
    compared_with = current
    promoted: str | None = None
    best = state.best_val_dice
    lineage = state.lineage_parent
    if epoch.steps and should_promote(candidate, current):
        meta = ModelMeta(
            kind=MODEL_KIND,
            parent=lineage,
            n_train_cases=len(data.train_ids),
            n_val_cases=len(data.validation_ids),
            val_dice=candidate.dice,
            settings=settings_to_dict(settings),
            data_snapshot=data.data_fingerprint(),
        )
        promoted = registry.register(learner.weights(), meta)
        registry.promote(promoted, reason=f"validation Dice {candidate.dice} beats {None if current is None else current.dice}")
        current_version, current, lineage = promoted, candidate, promoted
        if candidate.dice is not None:
            best = candidate.dice if best is None else max(best, candidate.dice)
    progress = state.progress.after_epoch(improved=promoted is not None, new_data=new_data)
    restarted = should_restart(progress, settings.epochs_without_progress_restart)
    if restarted:
        log.info("%d epochs without progress: restarting from fresh weights (best model kept: %s)",
                 progress.epochs_without_progress, current_version)
        fresh = Learner.fresh(settings, seed=restart_seed)
        learner.networks.update(fresh.networks)
        learner.optimisers.update(fresh.optimisers)
        progress = progress.after_restart()
        lineage = None
    elif current_version is not None and should_resume_best(progress, settings.resume_best_after):
        log.info("%d epochs without a promotion: continuing from model %s's weights",
                 progress.epochs_since_promotion, current_version)
        weights = registry.load(current_version).weights
        for stage, network in learner.networks.items():
            network.load_state_dict(weights[stage])
            learner.optimisers[stage] = make_optimiser(network, settings)
        progress = dataclasses.replace(progress, epochs_since_promotion=0)
        lineage = current_version
    new_state = state.capture(learner, data, progress=progress, best_val_dice=best, current_version=current_version,
                              current_metrics=current, lineage_parent=lineage)
    return new_state, StepReport(epoch=epoch, candidate=candidate, current=compared_with, promoted_version=promoted,
                                 restarted=restarted)
