"""RootPainter3D's training/validation split and epoch length, as pure functions.

The rule, from the RootPainter3D paper (seed 001, "Validation"): *"The first image is assigned to
the training dataset, then the second image is assigned to the validation dataset. From then on
images are only assigned to the validation dataset if the training dataset is at least 5 times as
large as the validation dataset."*

So, for a newly annotated case, with ``n_train`` / ``n_val`` the cases already assigned:

1. ``n_train == 0`` → training (the first case);
2. else ``n_val == 0`` → validation (the second case);
3. else validation if ``n_train >= 5 * n_val``, otherwise training.

A case keeps its assignment forever once made (RootPainter overwrites a re-saved annotation in
place): moving a case between sets would let validation data leak into training.

Note that RootPainter's code (``get_new_annot_target_dir``) differs from its paper for the very
first case: with ``0 >= 5 * 0`` it sends the first annotation to *validation* and the second to
training. We follow the paper and the issue (first to training), which matters most at cold start:
the first model is trained on the first correction instead of waiting for the second.

Epoch length (same section): *"If no validation images have been saved then the epoch length is
128. Otherwise the length is max(64, 2v) where v is the number of patches containing annotation in
the validation set."*
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

#: Validation grows only while training holds at least this many times as many cases.
TRAIN_PER_VALIDATION = 5
#: Samples per epoch while there is no validation data.
EPOCH_LENGTH_WITHOUT_VALIDATION = 128
#: Fewest samples per epoch once there is validation data.
MIN_EPOCH_LENGTH = 64


class Split(str, enum.Enum):
    """Which dataset an annotated case belongs to."""

    TRAIN = "train"
    VALIDATION = "validation"


def assign_split(case_id: str, assignments: Mapping[str, Split]) -> Split:
    """The split of `case_id`: its existing assignment, or the rule above for a new case.

    Parameters
    ----------
    case_id
        The newly annotated (or re-annotated) case.
    assignments
        The cases assigned so far and their split.
    """
    if case_id in assignments:
        return Split(assignments[case_id])
    n_train = sum(1 for s in assignments.values() if Split(s) is Split.TRAIN)
    n_val = len(assignments) - n_train
    if n_train == 0:
        return Split.TRAIN
    if n_val == 0:
        return Split.VALIDATION
    if n_train >= TRAIN_PER_VALIDATION * n_val:
        return Split.VALIDATION
    return Split.TRAIN


def assign_splits(case_ids: Iterable[str], assignments: Mapping[str, Split] | None = None) -> dict[str, Split]:
    """Apply `assign_split` to cases in annotation order; returns all assignments (old and new)."""
    result: dict[str, Split] = dict(assignments or {})
    for case_id in case_ids:
        result[case_id] = assign_split(case_id, result)
    return result


def epoch_length(n_val_patches: int, has_val: bool, *, without_validation: int = EPOCH_LENGTH_WITHOUT_VALIDATION,
                 minimum: int = MIN_EPOCH_LENGTH) -> int:
    """Training samples per epoch: ``max(64, 2 × validation patches)``, or 128 without validation.

    Tying the epoch to the validation size keeps validation (run after every epoch) from
    dominating the trainer's time as validation grows. `without_validation` and `minimum`
    replace 128 and 64 (tiny models in tests and demos).
    """
    if n_val_patches < 0:
        raise ValueError(f"n_val_patches = {n_val_patches} must be zero or positive")
    if not has_val:
        return without_validation
    return max(minimum, 2 * n_val_patches)
