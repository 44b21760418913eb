"""Model selection and restarts, RootPainter3D's rules as pure functions (seed 001, "Validation").

Promotion: *"If the model-in-training's dice score is higher than the most recently saved model so
far then it will be saved"* — and RootPainter3D's trainer computes both scores on the **current**
validation set each epoch (the saved model is re-evaluated on validation cases added since), so the
two numbers are always comparable. `ValidationMetrics` therefore names the validation set it was
measured on, and `should_promote` refuses to compare scores from different sets. Until any
validation data exists, RootPainter3D saves the model after every epoch ("assuming we will get
better than random weights"); we do the same.

Progress: *"epochs_without_progress will get set to 0 in two cases. Firstly, when new data is added
to the training or validation datasets. Secondly, when a new model is found which obtains a new
high score on the validation set."* After 60 epochs without progress training *"would start
training the network from scratch"*, the best model staying saved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)


def dice_from_counts(true_positives: int, false_positives: int, false_negatives: int) -> float:
    """Pooled Dice ``2TP / (2TP + FP + FN)`` over all validation voxels (as RootPainter3D pools
    counts over validation patches rather than averaging per-case Dice). 1.0 when nothing is
    foreground in either prediction or annotation."""
    if min(true_positives, false_positives, false_negatives) < 0:
        raise ValueError("voxel counts must be non-negative")
    denominator = 2 * true_positives + false_positives + false_negatives
    return 1.0 if denominator == 0 else 2.0 * true_positives / denominator


@dataclass(frozen=True)
class ValidationMetrics:
    """A model's score on one validation set.

    Parameters
    ----------
    dice
        Validation Dice in [0, 1]; ``None`` while there is no validation data.
    validation_set
        Fingerprint of the validation data the score was computed on (e.g. a hash of the validation
        case ids and their annotation revisions). Scores are comparable only on the same set.
    """

    dice: float | None
    validation_set: str = ""

    def __post_init__(self) -> None:
        if self.dice is not None and not (math.isnan(self.dice) or 0.0 <= self.dice <= 1.0):
            raise ValueError(f"dice = {self.dice} must be in [0, 1]")


def should_promote(candidate_metrics: ValidationMetrics, current_metrics: ValidationMetrics | None) -> bool:
    """Whether the candidate model should replace the current one.

    - no current model (cold start) → promote;
    - no validation data yet (both Dice ``None``) → promote (RootPainter3D saves every epoch then);
    - otherwise promote only if the candidate's validation Dice is strictly higher. A NaN Dice
      (a broken evaluation) never wins.

    Raises `ValueError` when the two scores come from different validation sets: re-evaluate the
    current model on the candidate's validation set first.
    """
    if current_metrics is None:
        return True
    if candidate_metrics.validation_set != current_metrics.validation_set:
        raise ValueError(
            "candidate and current model were scored on different validation sets "
            f"({candidate_metrics.validation_set!r} vs {current_metrics.validation_set!r}); "
            "re-evaluate the current model on the candidate's validation set"
        )
    if candidate_metrics.dice is None and current_metrics.dice is None:
        return True
    if candidate_metrics.dice is None or current_metrics.dice is None:
        raise ValueError("one score has a Dice and the other none on the same validation set")
    if math.isnan(candidate_metrics.dice):
        return False
    if math.isnan(current_metrics.dice):
        return True
    return candidate_metrics.dice > current_metrics.dice


@dataclass(frozen=True)
class ProgressState:
    """The trainer's restart bookkeeping (immutable; transitions return a new state).

    Parameters
    ----------
    epochs_without_progress
        Epochs since new data arrived or a new best model was found.
    epochs
        Epochs trained in total (across restarts).
    restarts
        Times training restarted from fresh weights.
    """

    epochs_without_progress: int = 0
    epochs: int = 0
    restarts: int = 0
    #: Epochs in a row whose candidate was not promoted (new data does not reset it).
    epochs_since_promotion: int = 0

    def __post_init__(self) -> None:
        if min(self.epochs_without_progress, self.epochs, self.restarts, self.epochs_since_promotion) < 0:
            raise ValueError("progress counters must be non-negative")

    def after_epoch(self, improved: bool, new_data: bool) -> "ProgressState":
        """State after one epoch: the counter resets on a new best (`improved`, i.e. the epoch's
        model was promoted) or on new training/validation data, and grows by one otherwise."""
        without = 0 if (improved or new_data) else self.epochs_without_progress + 1
        since = 0 if improved else self.epochs_since_promotion + 1
        return replace(self, epochs_without_progress=without, epochs=self.epochs + 1, epochs_since_promotion=since)

    def after_restart(self) -> "ProgressState":
        """State once training restarted from fresh weights (the best model stays promoted)."""
        return replace(self, epochs_without_progress=0, restarts=self.restarts + 1)


def should_resume_best(state: ProgressState, limit: int) -> bool:
    """True after `limit` epochs in a row without a promotion (0: never): continue from the best model."""
    return limit > 0 and state.epochs_since_promotion >= limit


def should_restart(state: ProgressState, limit: int) -> bool:
    """True after `limit` epochs without progress (RootPainter3D: 60): restart from fresh weights."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return state.epochs_without_progress >= limit
