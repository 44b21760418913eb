"""Replay sampling (seed 004 Algorithm 1, stateless form): new favoured, old never forgotten."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from heartloop.contouring.sampling import ReplayCase, ReplayParams, replay_weight, sample_replay_batch

PARAMS = ReplayParams(aux_buffer_size=20, min_weight=0.2, fresh_visits=8, fresh_slots=1)


def _cases(n: int, times_sampled: int = 100) -> list[ReplayCase]:
    # case-0 is the oldest; case-(n-1) the newest (age 0)
    return [ReplayCase(f"case-{i}", age=n - 1 - i, times_sampled=times_sampled) for i in range(n)]


def test_weight_decays_like_algorithm_1_survival_and_has_a_floor():
    retention = 20 / 21
    assert replay_weight(0, PARAMS) == 1.0
    assert replay_weight(10, PARAMS) == pytest.approx(retention**10)
    assert replay_weight(1000, PARAMS) == 0.2
    weights = [replay_weight(a, PARAMS) for a in range(100)]
    assert weights == sorted(weights, reverse=True)


def test_same_seed_same_batch():
    cases = _cases(30)
    assert sample_replay_batch(cases, 4, PARAMS, seed=42) == sample_replay_batch(cases, 4, PARAMS, seed=42)
    batches = {sample_replay_batch(cases, 4, PARAMS, seed=s) for s in range(20)}
    assert len(batches) > 1


def test_a_generator_can_drive_a_sequence_of_batches():
    cases = _cases(30)
    first = np.random.default_rng(5)
    second = np.random.default_rng(5)
    run_a = [sample_replay_batch(cases, 2, PARAMS, first) for _ in range(10)]
    run_b = [sample_replay_batch(cases, 2, PARAMS, second) for _ in range(10)]
    assert run_a == run_b


def test_a_fresh_case_is_in_every_batch_until_it_has_been_seen_enough():
    cases = _cases(40)
    new = ReplayCase("just-saved", age=0, times_sampled=0)
    older = [ReplayCase(c.case_id, c.age + 1, c.times_sampled) for c in cases]
    for seed in range(50):
        assert "just-saved" in sample_replay_batch([*older, new], 2, PARAMS, seed)
    seen_enough = ReplayCase("just-saved", age=0, times_sampled=PARAMS.fresh_visits)
    hits = sum("just-saved" in sample_replay_batch([*older, seen_enough], 2, PARAMS, s) for s in range(200))
    assert 0 < hits < 200  # now an ordinary (if favoured) member of the pool


def test_new_cases_favoured_and_old_cases_still_sampled_over_many_draws():
    cases = _cases(60)  # all seen often: pure weighted replay
    counts: Counter[str] = Counter()
    rng = np.random.default_rng(0)
    draws = 4000
    for _ in range(draws):
        counts.update(sample_replay_batch(cases, 2, PARAMS, rng))
    newest_ten = sum(counts[f"case-{i}"] for i in range(50, 60))
    oldest_ten = sum(counts[f"case-{i}"] for i in range(10))
    assert newest_ten > 2.5 * oldest_ten  # recency bias
    assert all(counts[f"case-{i}"] > 0 for i in range(60))  # nobody forgotten
    # the oldest keep roughly their floor share: expected ≈ draws·2·0.2/Σw
    total_weight = sum(replay_weight(c.age, PARAMS) for c in cases)
    expected_oldest = draws * 2 * 0.2 / total_weight
    assert counts["case-0"] > 0.5 * expected_oldest


def test_min_weight_one_is_uniform_rootpainter_sampling():
    uniform = ReplayParams(aux_buffer_size=20, min_weight=1.0, fresh_visits=0)
    cases = _cases(10)
    counts: Counter[str] = Counter()
    rng = np.random.default_rng(1)
    for _ in range(3000):
        counts.update(sample_replay_batch(cases, 2, uniform, rng))
    shares = np.array([counts[c.case_id] for c in cases]) / 6000
    assert np.all(np.abs(shares - 0.1) < 0.02)


def test_no_duplicates_in_a_batch_unless_too_few_cases():
    cases = _cases(5)
    for seed in range(30):
        batch = sample_replay_batch(cases, 4, PARAMS, seed)
        assert len(batch) == 4 and len(set(batch)) == 4
    single = [ReplayCase("only", age=0, times_sampled=0)]
    assert sample_replay_batch(single, 3, PARAMS, 0) == ("only", "only", "only")
    two = _cases(2, times_sampled=0)
    batch = sample_replay_batch(two, 4, PARAMS, 3)
    assert len(batch) == 4 and set(batch) == {"case-0", "case-1"}


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        sample_replay_batch([], 2, PARAMS, 0)
    with pytest.raises(ValueError):
        sample_replay_batch([ReplayCase("a", 0), ReplayCase("a", 1)], 2, PARAMS, 0)
    with pytest.raises(ValueError):
        ReplayParams(min_weight=0.0)
    with pytest.raises(ValueError):
        ReplayCase("a", age=-1)
