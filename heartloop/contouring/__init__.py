"""The contouring engine: network, losses, continual-learning rules and the model registry.

Pure numpy/torch: knows nothing of DICOM, Flask or the database (DESIGN.md §2). Imports only
`heartloop.core` and `heartloop.config` of ours.
"""

from heartloop.contouring.loss import corrected_label, dense_loss, dice_score, masked_loss, weighted_ce_dice_loss
from heartloop.contouring.network import (
    UNet3D,
    configure_runtime,
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
)
from heartloop.contouring.registry import ModelMeta, ModelRegistry, RegistryEvent, StoredModel
from heartloop.contouring.sampling import ReplayCase, ReplayParams, replay_weight, sample_replay_batch
from heartloop.contouring.settings import ContouringSettings
from heartloop.contouring.split import Split, assign_split, assign_splits, epoch_length

__all__ = [
    "ContouringSettings",
    "ModelMeta",
    "ModelRegistry",
    "ProgressState",
    "RegistryEvent",
    "ReplayCase",
    "ReplayParams",
    "Split",
    "StoredModel",
    "UNet3D",
    "ValidationMetrics",
    "assign_split",
    "assign_splits",
    "configure_runtime",
    "corrected_label",
    "dense_loss",
    "dice_from_counts",
    "dice_score",
    "epoch_length",
    "masked_loss",
    "normalise_hu",
    "preferred_memory_format",
    "replay_weight",
    "resolve_device",
    "resolve_precision",
    "sample_replay_batch",
    "should_promote",
    "should_restart",
    "weighted_ce_dice_loss",
]
