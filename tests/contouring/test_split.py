"""RootPainter3D's validation split and epoch length (seed 001, "Validation")."""

from __future__ import annotations

import pytest

from heartloop.contouring.split import Split, assign_split, assign_splits, epoch_length

T, V = Split.TRAIN, Split.VALIDATION

# The first 20 annotated cases, worked by hand from the rule
#   first case → train; second → validation; then validation iff n_train >= 5 × n_val,
# with (n_train, n_val) counted *before* the case is assigned:
#
#   case  rule                        split   counts after
#     1   first case                  T       (1, 0)
#     2   second case                 V       (1, 1)
#     3   1 >= 5?  no                 T       (2, 1)
#     4   2 >= 5?  no                 T       (3, 1)
#     5   3 >= 5?  no                 T       (4, 1)
#     6   4 >= 5?  no                 T       (5, 1)
#     7   5 >= 5?  yes                V       (5, 2)
#     8   5 >= 10? no                 T       (6, 2)
#     9   6 >= 10? no                 T       (7, 2)
#    10   7 >= 10? no                 T       (8, 2)
#    11   8 >= 10? no                 T       (9, 2)
#    12   9 >= 10? no                 T       (10, 2)
#    13   10 >= 10? yes               V       (10, 3)
#    14   10 >= 15? no                T       (11, 3)
#    15   11 >= 15? no                T       (12, 3)
#    16   12 >= 15? no                T       (13, 3)
#    17   13 >= 15? no                T       (14, 3)
#    18   14 >= 15? no                T       (15, 3)
#    19   15 >= 15? yes               V       (15, 4)
#    20   15 >= 20? no                T       (16, 4)
#
# Validation gets cases 2, 7, 13, 19: after the start, one case in six.
EXPECTED_FIRST_20 = [T, V, T, T, T, T, V, T, T, T, T, T, V, T, T, T, T, T, V, T]


def test_first_twenty_cases_follow_the_rule():
    case_ids = [f"case-{n:02d}" for n in range(1, 21)]
    assignments = assign_splits(case_ids)
    assert [assignments[c] for c in case_ids] == EXPECTED_FIRST_20
    assert [c for c in case_ids if assignments[c] is V] == ["case-02", "case-07", "case-13", "case-19"]


def test_incremental_assignment_matches_batch_assignment():
    assignments: dict[str, Split] = {}
    for n in range(1, 21):
        case_id = f"case-{n:02d}"
        assignments[case_id] = assign_split(case_id, assignments)
    assert list(assignments.values()) == EXPECTED_FIRST_20


def test_validation_stays_near_one_in_six():
    running: dict[str, Split] = {}
    for n in range(300):
        running[f"c{n}"] = assign_split(f"c{n}", running)
        n_train = sum(1 for s in running.values() if s is T)
        n_val = len(running) - n_train
        if len(running) >= 2:
            # validation only grows while train >= 5 × val, so it can overshoot by one case at most
            assert 5 * (n_val - 1) <= n_train < 5 * n_val + 5


def test_a_case_keeps_its_split_when_re_annotated():
    assignments = assign_splits(["a", "b", "c"])
    assert assignments == {"a": T, "b": V, "c": T}
    # "b" corrected again later: still validation, and no new case is created.
    assert assign_split("b", assignments) is V
    assert assign_splits(["b", "a"], assignments) == assignments


def test_existing_assignments_are_respected_even_if_unusual():
    # A registry imported from elsewhere may start with validation only: the next case trains.
    assert assign_split("new", {"old": V}) is T


@pytest.mark.parametrize(
    ("n_val_patches", "has_val", "expected"),
    [(0, False, 128), (500, False, 128), (0, True, 64), (10, True, 64), (32, True, 64), (33, True, 66), (200, True, 400)],
)
def test_epoch_length(n_val_patches, has_val, expected):
    assert epoch_length(n_val_patches, has_val) == expected


def test_epoch_length_rejects_negative_counts():
    with pytest.raises(ValueError):
        epoch_length(-1, True)
