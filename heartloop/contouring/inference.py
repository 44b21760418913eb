"""Two-stage heart prediction (seed 002): localise on a coarse whole CT, segment a fine crop.

Stage 1 — the localiser sees the whole CT block-averaged to ``settings.localiser_voxel_mm``
(`heartloop.contouring.resample.block_average`); its largest connected component above 0.5 gives
the heart's bounding box (a missing or implausibly sized component falls back to other thresholds,
then to a heart-sized default box: `Predictor.localise`), widened by ``settings.margin_mm`` on every side and mapped back to CT
voxel indices exactly (the coarse→CT mapping of block averaging is exact in index space; the margin
along the slice axis goes through ``slice_offsets``, so uneven series are handled). A reviewer's
explicit box (patient millimetres) replaces stage 1.

Stage 2 — the CT is cropped to the box (kept int16 until then: a float copy of a 512×512×150 CT is
157 MB), resampled trilinearly to ``settings.organ_voxel_mm``, segmented by the organ network,
and the probability resampled back to the CT crop, thresholded at 0.5 and pasted into a full-size
bool mask. Nothing outside the box is ever predicted.

Both networks run under ``torch.inference_mode`` with the precision and memory format chosen by
`heartloop.contouring.network` (bfloat16 autocast + channels-last 3D on CPUs that have native
bfloat16).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from heartloop.contouring.network import (
    UNet3D,
    autocast,
    normalise_hu,
    preferred_memory_format,
    resolve_device,
    resolve_precision,
)
from heartloop.contouring.registry import ModelRegistry
from heartloop.contouring.resample import AxisGrid, block_average, block_factors, resample_separable
from heartloop.contouring.settings import ContouringSettings
from heartloop.core.volume import Volume

log = logging.getLogger(__name__)

#: Probability above which a voxel is heart.
THRESHOLD = 0.5
#: Box as half-open CT index ranges in array order: ``((k0, k1), (j0, j1), (i0, i1))``.
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
#: Kind of weights a `Predictor` saves to the registry.
MODEL_KIND = "localiser+organ"
#: Volumes (ml) of a localiser component that can be a whole adult heart. Outside them the
#: localiser is not trusted as is (see `Predictor.localise`).
PLAUSIBLE_HEART_ML = (100.0, 2500.0)
#: Lower probability thresholds tried when the localiser's component at 0.5 is missing or too small.
FALLBACK_THRESHOLDS = (0.3, 0.15, 0.05)
#: Higher thresholds tried when the component at 0.5 is too big (heart merged with neighbours).
SPLIT_THRESHOLDS = (0.7, 0.85)
#: Extent (mm) of the default heart box (before `margin_mm`) when the localiser finds nothing:
#: larger than an adult heart (≈ 120 × 90 × 120 mm) so a rough centre still covers it.
DEFAULT_HEART_BOX_MM = 150.0
#: Where an adult heart's centre lies relative to the body's centre on an axial slice (LPS mm):
#: left of the midline and anterior (−y) of the body's centre of mass.
HEART_OFFSET_FROM_BODY_MM = (15.0, -25.0, 0.0)
#: HU above which a voxel of the coarse CT is body (air and lung are below).
BODY_HU = -300.0

# Settings fields that decide the networks' shape and input grids: they travel with the weights.
_MODEL_FIELDS = ("width", "depth", "groupnorm_groups", "localiser_voxel_mm", "organ_voxel_mm", "margin_mm")


def settings_to_dict(settings: ContouringSettings) -> dict[str, Any]:
    """JSON-serialisable form of `settings` (tuples become lists), for `ModelMeta.settings`."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}


def settings_from_dict(data: Mapping[str, Any], base: ContouringSettings | None = None) -> ContouringSettings:
    """Settings stored with a model, over `base` (unknown keys ignored, lists back to tuples)."""
    base = base or ContouringSettings()
    names = {f.name for f in dataclasses.fields(ContouringSettings)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return dataclasses.replace(base, **values)


@dataclass(frozen=True, eq=False)
class Prediction:
    """A predicted heart, tied to its CT's geometry.

    Parameters
    ----------
    mask
        Bool `Volume` on the CT grid; false everywhere outside `box`.
    probability
        Float32 heart probability on the **crop** grid: a `Volume` with the CT's spacing and
        orientation covering exactly `box` (the rest of the CT is 0 by construction; a full-size
        float map of a 512×512×150 CT would cost 157 MB). `probability_on_ct` pastes it back.
        ``None`` when nothing was predicted.
    box
        Half-open CT index ranges ``((k0, k1), (j0, j1), (i0, i1))`` that were segmented, or
        ``None`` when the localiser found no heart.
    model_version
        Registry version of the model (e.g. ``"000042"``), recorded in everything made from it.
    box_source
        ``"localiser"`` or ``"reviewer"`` (an explicit box).
    reason
        Empty on success; otherwise why the mask is empty (e.g. the localiser found nothing).
    """

    mask: Volume
    probability: Volume | None
    box: Box | None
    model_version: str
    box_source: str = "localiser"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.mask.array.dtype != np.bool_:
            raise ValueError(f"mask must be bool, got {self.mask.array.dtype}")
        if self.box_source not in ("localiser", "reviewer"):
            raise ValueError(f"box_source = {self.box_source!r} must be \"localiser\" or \"reviewer\"")
        if self.box is None:
            if not self.reason:
                raise ValueError("a prediction without a box must say why (reason)")
            if self.probability is not None:
                raise ValueError("a prediction without a box has no probability map")
        else:
            shape = tuple(hi - lo for lo, hi in self.box)
            if any(lo < 0 or hi > n or hi <= lo for (lo, hi), n in zip(self.box, self.mask.shape)):
                raise ValueError(f"box {self.box} is not inside the grid {self.mask.shape}")
            if self.probability is None or self.probability.shape != shape:
                raise ValueError(f"probability must cover the box {shape}")
            if self.probability.array.dtype != np.float32:
                raise ValueError("probability must be float32")

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.array.any())

    def probability_on_ct(self) -> Volume:
        """The probability as a full-size float32 `Volume` on the CT grid (0 outside the box)."""
        full = np.zeros(self.mask.shape, dtype=np.float32)
        if self.box is not None and self.probability is not None:
            full[_slices(self.box)] = self.probability.array
        return self.mask.with_array(full)


def _slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in box)  # type: ignore[return-value]


def crop_volume(volume: Volume, box: Box, array: np.ndarray | None = None) -> Volume:
    """The sub-grid `box` of `volume` as a `Volume` (same spacing and orientation, exact slice
    positions), holding `array` (default: the cropped voxels)."""
    (k0, k1), (j0, j1), (i0, i1) = box
    data = volume.array[_slices(box)] if array is None else array
    origin = volume.voxel_to_patient(np.array([i0, j0, k0], dtype=np.float64))
    offsets = volume.slice_offsets[k0:k1] - volume.slice_offsets[k0]
    return Volume(
        array=data,
        origin=tuple(float(v) for v in origin),
        row_direction=volume.row_direction,
        column_direction=volume.column_direction,
        pixel_spacing=volume.pixel_spacing,
        slice_offsets=offsets,
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )


def box_from_mm(volume: Volume, box_mm: tuple[Any, Any]) -> Box:
    """CT index box of all voxels whose centres lie inside a patient-coordinate box.

    `box_mm` is ``(min corner, max corner)``, each ``(x, y, z)`` in mm (LPS). The eight corners are
    mapped to fractional voxel indices (exact, uneven slices included), so an oblique orientation
    gives the enclosing index box. Raises `ValueError` when the box misses the CT.
    """
    low = np.asarray(box_mm[0], dtype=np.float64).reshape(3)
    high = np.asarray(box_mm[1], dtype=np.float64).reshape(3)
    if np.any(high < low):
        raise ValueError(f"box_mm max corner {high} is below its min corner {low}")
    corners = np.array(list(itertools.product(*zip(low, high))), dtype=np.float64)
    ijk = volume.patient_to_voxel(corners)
    lo_ijk = np.ceil(ijk.min(axis=0) - 1e-6).astype(int)
    hi_ijk = np.floor(ijk.max(axis=0) + 1e-6).astype(int) + 1
    shape_ijk = volume.shape[::-1]
    lo_ijk = np.maximum(lo_ijk, 0)
    hi_ijk = np.minimum(hi_ijk, shape_ijk)
    if np.any(hi_ijk <= lo_ijk):
        raise ValueError("box_mm does not contain any voxel centre of this CT")
    return tuple((int(lo_ijk[a]), int(hi_ijk[a])) for a in (2, 1, 0))  # type: ignore[return-value]


def check_box(box: Any, shape: tuple[int, ...]) -> Box:
    """`box` as a `Box` of ints, or `ValueError` when it is empty or not inside a grid of `shape`."""
    try:
        ranges = tuple((int(lo), int(hi)) for lo, hi in box)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"box {box!r} is not ((k0, k1), (j0, j1), (i0, i1))") from exc
    if len(ranges) != 3 or any(lo < 0 or hi > n or hi <= lo for (lo, hi), n in zip(ranges, shape)):
        raise ValueError(f"box {box!r} is empty or not inside the CT grid {tuple(shape)} (half-open voxel ranges)")
    return ranges  # type: ignore[return-value]


def add_margin(volume: Volume, box: Box, margin_mm: float) -> Box:
    """Widen `box` by `margin_mm` on every side, clipped to the CT; slices by true offsets."""
    (k0, k1), (j0, j1), (i0, i1) = box
    offsets = volume.slice_offsets
    # Slices whose centre lies within margin_mm of the box's end slices (uneven spacing exact).
    k_lo = int(np.searchsorted(offsets, offsets[k0] - margin_mm - 1e-6, side="left"))
    k_hi = int(np.searchsorted(offsets, offsets[k1 - 1] + margin_mm + 1e-6, side="right"))
    row_margin = int(math.floor(margin_mm / volume.pixel_spacing[0] + 1e-6))
    col_margin = int(math.floor(margin_mm / volume.pixel_spacing[1] + 1e-6))
    rows, cols = volume.shape[1], volume.shape[2]
    return (
        (max(0, k_lo), min(volume.shape[0], k_hi)),
        (max(0, j0 - row_margin), min(rows, j1 + row_margin)),
        (max(0, i0 - col_margin), min(cols, i1 + col_margin)),
    )


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (all false when `mask` is empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (the heart is one organ: islands elsewhere in
    the crop are errors a reviewer would otherwise have to erase, and they litter the RTSTRUCT)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def plausible_component(probability: np.ndarray, voxel_ml: float) -> tuple[np.ndarray | None, str]:
    """The localiser's heart component and how it was found (empty string: the usual way).

    The largest component above `THRESHOLD` when its volume is within `PLAUSIBLE_HEART_ML`;
    otherwise the first plausible one at `FALLBACK_THRESHOLDS` (too small or missing) or
    `SPLIT_THRESHOLDS` (too big); a too-big component nothing splits is kept (it holds the heart).
    ``None`` when no threshold gives a plausible component.
    """
    low, high = PLAUSIBLE_HEART_ML
    component = largest_component(probability > THRESHOLD)
    volume = float(component.sum()) * voxel_ml
    if low <= volume <= high:
        return component, ""
    retries = SPLIT_THRESHOLDS if volume > high else FALLBACK_THRESHOLDS
    for threshold in retries:
        candidate = largest_component(probability > threshold)
        candidate_ml = float(candidate.sum()) * voxel_ml
        if low <= candidate_ml <= high:
            return candidate, (f"component of {volume:.0f} ml at {THRESHOLD} is implausible; "
                               f"using {candidate_ml:.0f} ml at {threshold}")
    if volume > high:
        return component, f"component of {volume:.0f} ml is bigger than a heart; kept (no threshold splits it)"
    return None, ""


def coarse_box_on_ct(component: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> Box:
    """CT index box of a localiser-grid mask (coarse voxel c covers CT voxels c·f … c·f + f − 1:
    block averaging is exact in index space)."""
    where = np.nonzero(component)
    return tuple(  # type: ignore[return-value]
        (int(idx.min()) * f, min(n, (int(idx.max()) + 1) * f)) for idx, f, n in zip(where, factors, shape)
    )


def body_heart_centre(ct: Volume, coarse_hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray | None:
    """Fractional CT index ``(i, j, k)`` of the usual heart position: `HEART_OFFSET_FROM_BODY_MM`
    from the centre of mass of the body (largest component above `BODY_HU` on the coarse CT),
    mid-way along the body's extent in z. ``None`` when there is no body."""
    body = largest_component(coarse_hu > BODY_HU)
    if not body.any():
        return None
    k, j, i = (np.nonzero(body)[axis] for axis in range(3))
    coarse_centre = ((k.min() + k.max()) / 2.0, j.mean(), i.mean())
    centre_kji = np.array([(c + 0.5) * f - 0.5 for c, f in zip(coarse_centre, factors)])
    centre_mm = ct.voxel_to_patient(centre_kji[::-1]) + np.asarray(HEART_OFFSET_FROM_BODY_MM)
    return ct.patient_to_voxel(centre_mm)


def box_around(ct: Volume, centre_ijk: np.ndarray, size_mm: float) -> Box:
    """CT index box of a `size_mm` cube (axis-aligned in the patient) centred on `centre_ijk`,
    clipped to the CT."""
    centre_mm = ct.voxel_to_patient(np.asarray(centre_ijk, dtype=np.float64))
    half = size_mm / 2.0
    box = box_from_mm_clipped(ct, (centre_mm - half, centre_mm + half))
    return box


def box_from_mm_clipped(ct: Volume, box_mm: tuple[np.ndarray, np.ndarray]) -> Box:
    """`box_from_mm`, but a box that misses the CT shrinks to the nearest voxels instead of failing."""
    try:
        return box_from_mm(ct, box_mm)
    except ValueError:
        corners = np.array(list(itertools.product(*zip(box_mm[0], box_mm[1]))), dtype=np.float64)
        ijk = np.clip(np.rint(ct.patient_to_voxel(corners)), 0, np.array(ct.shape[::-1]) - 1).astype(int)
        lo, hi = ijk.min(axis=0), ijk.max(axis=0) + 1
        return tuple((int(lo[a]), int(hi[a])) for a in (2, 1, 0))  # type: ignore[return-value]


def run_network(
    model: UNet3D, hu: np.ndarray, device: torch.device, dtype: torch.dtype
) -> np.ndarray:
    """Heart probability (float32 numpy, same shape) of a HU array through `model` (eval mode)."""
    memory_format = preferred_memory_format(device, dtype, training=False)
    x = normalise_hu(hu)[None, None].to(device).contiguous(memory_format=memory_format)
    with torch.inference_mode(), autocast(device, dtype):
        logits = model(x)
    return torch.sigmoid(logits.float())[0, 0].cpu().numpy().astype(np.float32, copy=False)


class Predictor:
    """Two-stage heart prediction with one model version (see module docstring).

    Parameters
    ----------
    localiser, organ
        The two networks (moved to the settings' device and put in eval mode; the caller should
        not train them afterwards — `Predictor.from_state_dicts` makes independent copies).
    settings
        Grids, margin, device and precision.
    version
        Registry version recorded in every `Prediction`.
    """

    def __init__(self, localiser: UNet3D, organ: UNet3D, settings: ContouringSettings, version: str) -> None:
        if not version:
            raise ValueError("version is required: every prediction records the model that made it")
        self.settings = settings
        self.version = version
        self.device = resolve_device(settings.device)
        self.dtype = resolve_precision(settings.precision, self.device)
        memory_format = preferred_memory_format(self.device, self.dtype, training=False)
        self.localiser = localiser.to(self.device, memory_format=memory_format).eval()
        self.organ = organ.to(self.device, memory_format=memory_format).eval()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(
        cls, weights: Mapping[str, Mapping[str, torch.Tensor]], settings: ContouringSettings, version: str
    ) -> "Predictor":
        """Build both networks from ``{"localiser": state_dict, "organ": state_dict}``."""
        missing = {"localiser", "organ"} - set(weights)
        if missing:
            raise ValueError(f"weights lack {sorted(missing)}: expected keys \"localiser\" and \"organ\"")
        localiser = UNet3D.from_settings(settings)
        organ = UNet3D.from_settings(settings)
        localiser.load_state_dict(copy.deepcopy(dict(weights["localiser"])))
        organ.load_state_dict(copy.deepcopy(dict(weights["organ"])))
        return cls(localiser, organ, settings, version)

    @classmethod
    def load(
        cls, registry: ModelRegistry, version: str | None = None, runtime: ContouringSettings | None = None
    ) -> "Predictor":
        """The predictor of registry `version` (default: the current model).

        Network shape and grids come from the model's stored settings; device, precision and
        threads from `runtime` (this machine's settings). Raises `LookupError` at cold start
        (nothing promoted yet) — the service turns that into ``NO_MODEL``.
        """
        if version is None:
            current = registry.current()
            if current is None or current.version is None:
                raise LookupError("no model has been promoted yet (cold start)")
            version = current.version
        stored = registry.load(version)
        settings = settings_from_dict(
            {k: v for k, v in stored.meta.settings.items() if k in _MODEL_FIELDS}, runtime or ContouringSettings()
        )
        return cls.from_state_dicts(stored.weights, settings, version)

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"localiser": …, "organ": …}`` on the CPU, contiguous — what the registry stores."""
        return {
            name: {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
            for name, model in (("localiser", self.localiser), ("organ", self.organ))
        }

    # -- prediction ---------------------------------------------------------------------------
    def localise(self, ct: Volume) -> Box | None:
        """Stage 1: the heart's CT index box (margin included); never ``None`` for a CT with a body.

        The largest component above 0.5 is used when its volume is a plausible heart
        (`PLAUSIBLE_HEART_ML`). A miss or a too-small component (an under-confident localiser, e.g.
        early in training or on an unusual CT) tries `FALLBACK_THRESHOLDS`; a too-big one tries
        `SPLIT_THRESHOLDS` and is kept when none splits it. Then, still without a plausible
        component: a heart-sized box (`DEFAULT_HEART_BOX_MM`) around the most probable region, or,
        with no signal at all, around the usual heart position relative to the body outline —
        the organ network segments it and the reviewer corrects, which beats an empty contour.
        ``None`` only when the CT holds no body either.
        """
        factors = block_factors(ct, self.settings.localiser_voxel_mm)
        coarse = block_average(ct.array, factors)
        probability = run_network(self.localiser, coarse, self.device, self.dtype)
        spacing = (ct.slice_spacing, ct.pixel_spacing[0], ct.pixel_spacing[1])
        coarse_voxel_ml = float(np.prod([f * s for f, s in zip(factors, spacing)])) / 1000.0
        component, how = plausible_component(probability, coarse_voxel_ml)
        if component is not None:
            if how:
                log.warning("localiser (model %s): %s", self.version, how)
            return add_margin(ct, coarse_box_on_ct(component, factors, ct.shape), self.settings.margin_mm)
        if probability.max() > FALLBACK_THRESHOLDS[-1]:
            centre = np.unravel_index(int(np.argmax(probability)), probability.shape)
            centre_ijk = np.array([(c + 0.5) * f - 0.5 for c, f in zip(centre, factors)])[::-1]
            how = f"no plausible heart component (peak probability {probability.max():.2f}): default box at the peak"
        else:
            centre_ijk = body_heart_centre(ct, coarse, factors)
            if centre_ijk is None:
                return None
            how = "no heart signal: default box at the usual heart position in the body outline"
        log.warning("localiser (model %s): %s", self.version, how)
        box = box_around(ct, centre_ijk, DEFAULT_HEART_BOX_MM)
        return add_margin(ct, box, self.settings.margin_mm)

    def segment(self, ct: Volume, box: Box) -> np.ndarray:
        """Stage 2: float32 heart probability on the CT crop `box`."""
        crop = ct.array[_slices(box)]  # int16 until here
        grid = AxisGrid.for_crop(ct, box, self.settings.organ_voxel_mm)
        local = tuple(p - lo for p, (lo, _) in zip(grid.positions, box))
        organ_hu = resample_separable(crop, local)
        organ_probability = run_network(self.organ, organ_hu, self.device, self.dtype)
        back = grid.ct_positions_in_grid(ct, box)
        return resample_separable(organ_probability, back)

    def predict(self, ct: Volume, box_mm: tuple[Any, Any] | None = None, *, box: Box | None = None) -> Prediction:
        """Predict the heart on `ct` (an int16 HU `Volume`).

        Parameters
        ----------
        ct
            The planning CT.
        box_mm
            Optional ``(min corner, max corner)`` in patient mm from a reviewer; it replaces the
            localiser (no margin is added: the reviewer's box is what they meant).
        box
            Optional CT index box ``((k0, k1), (j0, j1), (i0, i1))`` (half-open) from a reviewer
            who drew it on the slices; it replaces the localiser like `box_mm`. Give at most one.

        Raises
        ------
        ValueError
            Both boxes given, or a box that is empty or not inside the CT.
        """
        empty = ct.with_array(np.zeros(ct.shape, dtype=bool))
        if box is not None and box_mm is not None:
            raise ValueError("give the reviewer's box in voxels (box) or in mm (box_mm), not both")
        if box is not None:
            box = check_box(box, ct.shape)
            source = "reviewer"
        elif box_mm is not None:
            box = box_from_mm(ct, box_mm)
            source = "reviewer"
        else:
            box = self.localise(ct)
            source = "localiser"
            if box is None:
                log.info("localiser (model %s) found no heart", self.version)
                return Prediction(mask=empty, probability=None, box=None, model_version=self.version,
                                  reason="the localiser found no heart in this CT")
        assert box is not None
        probability = self.segment(ct, box)
        mask = np.zeros(ct.shape, dtype=bool)
        mask[_slices(box)] = largest_component(probability > THRESHOLD)
        log.info("model %s predicted %d heart voxels in box %s (%s)", self.version, int(mask.sum()), box, source)
        return Prediction(
            mask=ct.with_array(mask),
            probability=crop_volume(ct, box, probability),
            box=box,
            model_version=self.version,
            box_source=source,
        )
