"""`ContouringSettings`: every knob of the network, its training and its two stages, in one place.

Defined here rather than in `heartloop.config` while the contouring engine is being built; the
fields listed in `ContouringSettings` docstring under "surface globally" are the ones meant to
become a ``[contouring]`` section of the global settings (flat, so TOML stays simple).

Axis order: every 3-tuple below is in the array's axis order ``(slices, rows, columns)`` — the
order in which `heartloop.core.Volume.array` is indexed (``array[k, j, i]``). Note that this is the
reverse of `Volume.voxel_size`, which is ``(i, j, k)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_triple(name: str, value: tuple[float, ...], minimum: float) -> None:
    if len(value) != 3 or any(v < minimum for v in value):
        raise ValueError(f"{name} must be three numbers >= {minimum} in (slices, rows, columns) order, got {value}")


@dataclass(frozen=True)
class ContouringSettings:
    """Network shape, resampling, training and runtime settings of the contouring engine.

    Defaults suit a 2-core CPU (see the timings recorded in `heartloop.contouring.network`):
    a narrow U-Net (width 16, depth 3, 1.63 M parameters), 48×64×64 training patches, batch 2
    (≈0.5 s per optimiser step in bfloat16, ≈120 steps a minute); inference of a 6 mm localiser
    pass plus a 2 mm organ crop costs ≈0.5 s of network time.
    On a GPU, raise `width`, the patch sizes and `batch_size`.

    Surface globally (``[contouring]`` in the TOML file): ``width``, ``depth``, ``organ_voxel_mm``,
    ``margin_mm``, ``batch_size``, ``learning_rate``, ``epochs_without_progress_restart``,
    ``accepted_voxel_weight``; ``device`` and ``threads`` already exist as ``compute.device`` /
    ``compute.threads`` and should be read from there, with ``precision`` and
    ``training_threads`` added next to them in ``[compute]``. The rest are engineering knobs
    that can stay here until a site needs them.

    Parameters
    ----------
    width
        Channels of the first U-Net level; level ``l`` has ``width * 2**l``.
    depth
        Number of 2× downsamplings. Inputs are padded to a multiple of ``2**depth``.
    groupnorm_groups
        GroupNorm groups; must divide `width` (hence every level's channel count).
    localiser_voxel_mm
        Voxel size (mm) of the coarse whole-CT resampling the localiser sees.
    organ_voxel_mm
        Voxel size (mm) of the crop the organ network segments.
    localiser_patch_size, organ_patch_size
        Training patch shape (voxels) of each stage; multiples of ``2**depth``.
    margin_mm
        Context added on every side of the localised heart box before the organ crop
        (seed 002 pads 15 voxels; we state it in mm so it does not depend on the resampling).
    learning_rate
        Adam learning rate (see `heartloop.contouring.network` for why Adam on CPU).
    batch_size
        Patches per optimiser step (RootPainter3D uses 4 on two GPUs; 2 keeps a CPU step short).
    epochs_without_progress_restart
        Epochs without a new best validation Dice after which training restarts from fresh
        weights, keeping the best model (RootPainter3D: 60).
    resume_best_after
        Epochs in a row whose candidate was not promoted after which training continues from the
        current (best) model's weights with a fresh optimiser, instead of drifting further from
        it; 0 turns it off. New corrections arrive every few epochs, so RootPainter3D's
        without-progress counter rarely reaches its limit; this one counts only promotions.
        Default 4: `bench.learning_curve --cases 30 --train-seconds 60` median Dice over cases
        16–30 0.937 → 0.964 (off → 4), dose difference 0.124 → 0.088 Gy.
    accepted_voxel_weight
        Loss weight of voxels the reviewer did not paint but implicitly accepted, in the dense
        (confidence-weighted) loss; painted voxels weigh 1. Seed 004 eq. 12 with
        ``ω = 1 / accepted_voxel_weight - 1``.
    correction_loss
        How sparse corrections train: ``"masked"`` (painted voxels only, RootPainter3D) or
        ``"dense"`` (the whole corrected contour of the reviewed region, unpainted voxels weighing
        `accepted_voxel_weight`; seed 004 eq. 9/12). ``"dense"`` also validates against the whole
        corrected contour. Default ``"dense"``: on ``bench.learning_curve --cases 12
        --train-seconds 20`` it gave median Dice 0.70 over cases 7–12 against 0.15 for ``"masked"``
        (whose promotions stalled on the painted voxels of the first validation case).
    replay_aux_buffer_size, replay_min_weight, replay_fresh_visits
        Replay sampling parameters, see `heartloop.contouring.sampling`.
    device
        ``"auto"`` (a GPU when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    precision
        ``"auto"`` (bfloat16 autocast where the hardware has it natively, else float32),
        ``"fp32"`` or ``"bf16"``; see `heartloop.contouring.network.resolve_precision`.
    threads
        Torch intra-op threads for inference; 0 = torch's default (all cores).
    training_threads
        Torch threads of the background trainer; 0 = all cores. One thread trains 1.7× slower
        than two here, so rather than halving the trainer's threads, the trainer should pause
        between optimiser steps (~0.5 s each) while an inference job is waiting: two processes
        each running 2 OpenMP threads on 2 cores slow each other down far more than either alone.
    epoch_length_without_validation, min_epoch_length
        Training samples per epoch without validation data, and the fewest with it (RootPainter3D:
        128 and 64; see `heartloop.contouring.split.epoch_length`). Tiny models in tests lower them.
    """

    width: int = 16
    depth: int = 3
    groupnorm_groups: int = 8
    localiser_voxel_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    organ_voxel_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    localiser_patch_size: tuple[int, int, int] = (48, 64, 64)
    organ_patch_size: tuple[int, int, int] = (48, 64, 64)
    margin_mm: float = 20.0
    learning_rate: float = 1e-3
    batch_size: int = 2
    epochs_without_progress_restart: int = 60
    resume_best_after: int = 4
    accepted_voxel_weight: float = 0.25
    correction_loss: str = "dense"
    replay_aux_buffer_size: int = 20
    replay_min_weight: float = 0.2
    replay_fresh_visits: int = 8
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    training_threads: int = 0
    epoch_length_without_validation: int = 128
    min_epoch_length: int = 64

    def __post_init__(self) -> None:
        if not (4 <= self.width <= 256):
            raise ValueError(f"width = {self.width} must be between 4 and 256 (16 suits a CPU)")
        if not (1 <= self.depth <= 6):
            raise ValueError(f"depth = {self.depth} must be between 1 and 6 (3 suits a CPU)")
        if self.groupnorm_groups < 1 or self.width % self.groupnorm_groups:
            raise ValueError(
                f"groupnorm_groups = {self.groupnorm_groups} must be positive and divide width = {self.width}"
            )
        _check_triple("localiser_voxel_mm", self.localiser_voxel_mm, 0.1)
        _check_triple("organ_voxel_mm", self.organ_voxel_mm, 0.1)
        multiple = 2**self.depth
        for name in ("localiser_patch_size", "organ_patch_size"):
            size = getattr(self, name)
            _check_triple(name, size, multiple)
            if any(int(s) != s or s % multiple for s in size):
                raise ValueError(f"{name} = {size} must be integers, multiples of 2**depth = {multiple}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm = {self.margin_mm} must be zero or positive")
        if not (0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate = {self.learning_rate} must be between 0 and 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size = {self.batch_size} must be at least 1")
        if self.resume_best_after < 0:
            raise ValueError("resume_best_after must be >= 0 (0: off)")
        if self.epochs_without_progress_restart < 1:
            raise ValueError("epochs_without_progress_restart must be at least 1 (RootPainter3D uses 60)")
        if not (0 <= self.accepted_voxel_weight <= 1):
            raise ValueError(f"accepted_voxel_weight = {self.accepted_voxel_weight} must be in [0, 1]")
        if self.correction_loss not in ("masked", "dense"):
            raise ValueError(f"correction_loss = {self.correction_loss!r}: use \"masked\" or \"dense\"")
        if self.replay_aux_buffer_size < 1:
            raise ValueError("replay_aux_buffer_size must be at least 1")
        if not (0 < self.replay_min_weight <= 1):
            raise ValueError("replay_min_weight must be in (0, 1]: 0 would let old corrections be forgotten")
        if self.replay_fresh_visits < 0:
            raise ValueError("replay_fresh_visits must be zero or positive")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device = {self.device!r}: use \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"mps\"")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision = {self.precision!r}: use \"auto\", \"fp32\" or \"bf16\"")
        if self.epoch_length_without_validation < 1 or self.min_epoch_length < 1:
            raise ValueError("epoch_length_without_validation and min_epoch_length must be at least 1")
        if self.threads < 0 or self.training_threads < 0:
            raise ValueError("threads and training_threads must be zero (torch default) or positive")
