"""Model selection and restart bookkeeping (RootPainter3D's rules as pure functions)."""

from __future__ import annotations

import math

import pytest

from heartloop.contouring.promotion import (
    ProgressState,
    ValidationMetrics,
    dice_from_counts,
    should_promote,
    should_restart,
)

SET = "val-v3"


def m(dice, validation_set=SET):
    return ValidationMetrics(dice=dice, validation_set=validation_set)


@pytest.mark.parametrize(
    ("candidate", "current", "promote", "why"),
    [
        (m(0.10), None, True, "cold start: anything beats no model"),
        (m(None, ""), None, True, "cold start without validation data"),
        (m(None, ""), m(None, ""), True, "no validation data yet: RootPainter3D saves every epoch"),
        (m(0.91), m(0.90), True, "strictly better"),
        (m(0.90), m(0.90), False, "a tie keeps the current model"),
        (m(0.89), m(0.90), False, "worse"),
        (m(1.0), m(0.999), True, "better at the top end"),
        (m(math.nan), m(0.5), False, "a broken evaluation never wins"),
        (m(0.2), m(math.nan), True, "a real score beats a broken one"),
    ],
)
def test_promotion_rule(candidate, current, promote, why):
    assert should_promote(candidate, current) is promote, why


def test_scores_on_different_validation_sets_are_not_compared():
    with pytest.raises(ValueError, match="different validation sets"):
        should_promote(m(0.95, "val-v4"), m(0.90, "val-v3"))


def test_dice_out_of_range_is_refused():
    with pytest.raises(ValueError):
        ValidationMetrics(dice=1.2)


def test_pooled_dice_from_counts():
    assert dice_from_counts(40, 10, 10) == pytest.approx(0.8)
    assert dice_from_counts(0, 0, 0) == 1.0
    assert dice_from_counts(0, 5, 0) == 0.0


@pytest.mark.parametrize(
    ("start", "improved", "new_data", "expected"),
    [
        (0, False, False, 1),
        (7, False, False, 8),
        (7, True, False, 0),   # a new best
        (7, False, True, 0),   # new training or validation data
        (7, True, True, 0),
    ],
)
def test_epochs_without_progress_transitions(start, improved, new_data, expected):
    before = ProgressState(epochs_without_progress=start, epochs=20, restarts=1)
    after = before.after_epoch(improved=improved, new_data=new_data)
    assert after.epochs_without_progress == expected
    assert after.epochs == 21 and after.restarts == 1
    assert before.epochs_without_progress == start  # immutable


def test_restart_after_limit_epochs_without_progress():
    limit = 60
    state = ProgressState()
    restarts_at = []
    for epoch in range(1, 200):
        # a new best at epoch 30, new data at epoch 100
        state = state.after_epoch(improved=epoch == 30, new_data=epoch == 100)
        if should_restart(state, limit):
            restarts_at.append(epoch)
            state = state.after_restart()
    # 30 resets, then 60 idle epochs → restart at 90; new data at 100 resets; 60 more → 160
    assert restarts_at == [90, 160]
    assert state.restarts == 2 and state.epochs == 199
    assert state.epochs_without_progress == 199 - 160


def test_should_restart_boundary():
    assert not should_restart(ProgressState(epochs_without_progress=59), 60)
    assert should_restart(ProgressState(epochs_without_progress=60), 60)
    with pytest.raises(ValueError):
        should_restart(ProgressState(), 0)
    with pytest.raises(ValueError):
        ProgressState(epochs_without_progress=-1)
