"""The segmentation network: a 3D U-Net with GroupNorm and residual blocks (RootPainter3D's family).

Output: **one logit per voxel** (heart vs. not heart); ``sigmoid(logit)`` is the heart probability.
A binary task needs no second channel: a two-class softmax is exactly ``sigmoid(l1 - l0)``, so one
channel carries the same information with half the head and a numerically stable
``binary_cross_entropy_with_logits``.

Design for a CPU first:

- additive skip connections (RootPainter3D) instead of concatenation: the decoder convolutions
  see ``c`` rather than ``2c`` channels, which roughly halves their cost;
- learned 2×2×2 stride-2 convolutions to go down and transposed ones to go up (cheap, no
  max-pool indices to keep for the backward pass);
- channels double per level (``width * 2**level``) while voxels drop 8×, so the full-resolution
  level dominates the cost and `width` is the knob that matters.

Timings on this machine (AMD EPYC Zen 4 with AVX512-BF16, 2 cores, torch 2.13 CPU, width 16,
depth 3, 1.63 M parameters), seconds per call, median of 4-5 interleaved runs (every rep runs
each variant once, so load from other processes hits all alike); the first three rows average
two sessions. Expect ±15 %:

    ============================================  =====  =====  =====  =====
    2 threads                                     fp32   fp32   bf16   bf16
                                                  contig  CL3D  contig  CL3D
    ============================================  =====  =====  =====  =====
    inference  1×1×64×96×96 (590 k voxels)        0.55   0.47   0.24   0.20
    fwd+bwd    1×1×64×96×96                       2.06   1.64   0.80   1.08
    fwd+bwd    2×1×48×64×64 (training batch)      0.91   0.83   0.50   0.67
    fwd+bwd    4×1×32×48×48                       0.58   0.58   0.38   0.51
    inference  1×1×96×96×96 (organ crop, 2 mm)    0.93   0.71   0.34   0.29
    inference  1×1×80×88×88 (localiser, 6 mm)     0.50   0.43   0.23   0.21
    1 thread: inference 64×96×96                  0.81   0.74   0.38   0.34
    1 thread: fwd+bwd 64×96×96                    3.12   3.02   1.39   1.98
    ============================================  =====  =====  =====  =====

What we keep (`preferred_memory_format`, `resolve_precision`): bfloat16 autocast where the CPU has it
natively (2.3-2.4× faster inference than the best fp32, 1.7-2× faster training, loss curves
indistinguishable from fp32 in the overfit test), channels-last 3D for inference (1.15-1.3×) and
for fp32 training (1.1-1.25×), contiguous for bf16 training (channels-last was 1.3-1.4× *slower*
there). Channels-last alone gave less here than the 1.3-1.6× quoted in issue 3.

A trap worth knowing: for fp32, batch 1 and small volumes torch skips oneDNN and runs the slow
im2col convolution (its heuristic wants ``N·C·D·H > 20480``): a 1×1×32³ fp32 training step costs
0.45 s against 0.05 s in bf16. bf16 always takes the oneDNN path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heartloop.contouring.settings import ContouringSettings

log = logging.getLogger(__name__)

#: HU window fed to the network: air (-1000) to dense bone (+1000); metal and beyond saturate.
HU_CLIP: tuple[float, float] = (-1000.0, 1000.0)


def normalise_hu(hu: np.ndarray | torch.Tensor) -> torch.Tensor:
    """CT numbers (HU) → network input: clipped to `HU_CLIP`, scaled to [-1, 1], float32.

    The one place where intensities are normalised, so training and inference can never
    disagree. Air maps to -1, water to 0.
    """
    tensor = torch.as_tensor(hu).to(torch.float32)
    low, high = HU_CLIP
    centre = (high + low) / 2.0
    half_range = (high - low) / 2.0
    return (tensor.clamp(low, high) - centre) / half_range


def resolve_device(setting: str) -> torch.device:
    """The torch device named by a setting: ``"auto"`` is CUDA when available, else the CPU.

    Raises `ValueError` when a device is asked for explicitly but is not present, rather than
    silently running a hospital's model on the wrong hardware.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device = {setting!r} but no CUDA device is visible; use \"auto\" or \"cpu\"")
        device = torch.device(setting)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device = {setting!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    if setting == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device = \"mps\" but Metal is not available here; use \"auto\" or \"cpu\"")
        return torch.device("mps")
    raise ValueError(f"device = {setting!r}: use \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"mps\"")


def configure_runtime(threads: int) -> int:
    """Set torch's intra-op thread count (0 = leave torch's default) and flush denormals.

    Process-wide by nature (torch has one pool per process): call it once from the entry point of
    the inference worker or the trainer process, never from library code. Denormal floats (tiny
    gradients late in training) run up to ~100× slower on x86; flushing them to zero costs
    nothing in accuracy. Returns the thread count in use.
    """
    if threads > 0:
        torch.set_num_threads(min(threads, os.cpu_count() or threads))
    torch.set_flush_denormal(True)
    return torch.get_num_threads()


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where autocast to
    bfloat16 is about 2× faster than float32; elsewhere bfloat16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(setting: str, device: torch.device) -> torch.dtype:
    """Compute precision named by a setting: ``"fp32"``, ``"bf16"`` or ``"auto"``.

    ``"auto"`` is bfloat16 autocast where the hardware has it natively (see the timings above:
    2.3× faster inference and 1.7-2× faster training here, same loss curve), float32 elsewhere.
    Weights and losses stay float32 either way; only convolutions run in bfloat16.
    """
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"precision = {setting!r}: use \"auto\", \"fp32\" or \"bf16\"")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """The autocast context for `dtype` on `device` (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def preferred_memory_format(device: torch.device, dtype: torch.dtype, training: bool) -> torch.memory_format:
    """The faster memory layout measured here (see the table above): channels-last 3D on the CPU
    except for bfloat16 training, where oneDNN's contiguous kernels won; contiguous on GPUs."""
    if device.type != "cpu":
        return torch.contiguous_format
    if training and dtype == torch.bfloat16:
        return torch.contiguous_format
    return torch.channels_last_3d


class ResidualBlock(nn.Module):
    """Two 3×3×3 convolutions with GroupNorm, added to a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.shortcut: nn.Module
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            # A 1×1×1 projection so the residual sum has matching channels.
            self.shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class UNet3D(nn.Module):
    """3D U-Net: residual blocks, GroupNorm, additive skips, one output logit per voxel.

    Input ``(N, 1, D, H, W)`` normalised CT (`normalise_hu`); output ``(N, 1, D, H, W)`` logits of
    the same spatial size for any input size: inputs are padded (edge-replicated) to a multiple
    of ``2**depth`` and the output cropped back.

    Parameters
    ----------
    width
        Channels at full resolution; level ``l`` has ``width * 2**l``.
    depth
        Number of downsamplings.
    groups
        GroupNorm groups (must divide `width`).
    """

    def __init__(self, width: int = 16, depth: int = 3, groups: int = 8) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"groups = {groups} must divide width = {width}")
        self.width = width
        self.depth = depth
        channels = [width * 2**level for level in range(depth + 1)]
        self.stem = ResidualBlock(1, channels[0], groups)
        self.downs = nn.ModuleList()
        self.encoders = nn.ModuleList()
        for level in range(1, depth + 1):
            self.downs.append(
                nn.Sequential(
                    nn.Conv3d(channels[level - 1], channels[level], kernel_size=2, stride=2, bias=False),
                    nn.GroupNorm(groups, channels[level]),
                    nn.ReLU(inplace=True),
                )
            )
            self.encoders.append(ResidualBlock(channels[level], channels[level], groups))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(depth, 0, -1):
            self.ups.append(
                nn.Sequential(
                    nn.ConvTranspose3d(channels[level], channels[level - 1], kernel_size=2, stride=2, bias=False),
                    nn.GroupNorm(groups, channels[level - 1]),
                    nn.ReLU(inplace=True),
                )
            )
            self.decoders.append(ResidualBlock(channels[level - 1], channels[level - 1], groups))
        self.head = nn.Conv3d(channels[0], 1, kernel_size=1)
        self._init_weights()

    @classmethod
    def from_settings(cls, settings: ContouringSettings) -> "UNet3D":
        return cls(width=settings.width, depth=settings.depth, groups=settings.groupnorm_groups)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                # Kaiming (He) initialisation for ReLU networks, as RootPainter3D.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The head is linear (logits): Kaiming with gain 1 rather than the ReLU gain.
        nn.init.kaiming_normal_(self.head.weight, mode="fan_in", nonlinearity="linear")

    @property
    def size_multiple(self) -> int:
        """Spatial sizes that need no padding are multiples of this."""
        return int(2**self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input (N, 1, D, H, W), got {tuple(x.shape)}")
        spatial = tuple(int(s) for s in x.shape[2:])
        multiple = self.size_multiple
        padded = tuple(int(math.ceil(s / multiple) * multiple) for s in spatial)
        if padded != spatial:
            # F.pad takes (last-dim-before, last-dim-after, ...) pairs; pad only at the far end
            # so voxel (0, 0, 0) stays where it is and the crop is a plain slice.
            pad = []
            for size, target in zip(reversed(spatial), reversed(padded)):
                pad.extend([0, target - size])
            x = F.pad(x, pad, mode="replicate")
        skips = []
        out = self.stem(x)
        for down, encoder in zip(self.downs, self.encoders):
            skips.append(out)
            out = encoder(down(out))
        for up, decoder in zip(self.ups, self.decoders):
            out = decoder(up(out) + skips.pop())
        logits = self.head(out)
        if padded != spatial:
            logits = logits[:, :, : spatial[0], : spatial[1], : spatial[2]]
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
