"""Replay sampling: new corrections get a high chance without forgetting old ones (seed 004 §2.2).

Seed 004's Algorithm 1 keeps an auxiliary buffer ``B*`` of ``b*`` past samples; at each step the
new sample overwrites a random slot (``j = randint(0, b*)``, kept if ``j < b*``), the training
buffer ``B`` is a random ``b`` of ``B*``, and each update trains on the new sample plus ``m``
samples drawn from ``B`` (eq. 1). The effect: a sample that arrived ``a`` steps ago is still in
``B*`` with probability ``r**a`` where ``r = b* / (b* + 1)`` — a slowly decaying chance of being
revisited, and the newest sample in every update.

We keep that behaviour but make it a pure, stateless function of per-case bookkeeping the trainer
already has (how old each training case is, how often it was sampled):

1. **Fresh cases in every batch** (eq. 1's "combine with the new sample"): a case sampled fewer
   than ``fresh_visits`` times is *fresh*; up to ``fresh_slots`` of each batch go to fresh cases
   (the newest preferred). A correction saved a moment ago is trained on in the very next steps.
2. **Decaying replay for the rest** (Algorithm 1 in expectation): the other slots are drawn
   without replacement with weight ``max(min_weight, r**age)``. Using the survival probability as
   a weight instead of really evicting samples makes the function stateless — the trainer keeps no
   buffer that a restart could lose — and the floor ``min_weight`` is the "without forgetting": a
   correction is never dropped (RootPainter3D keeps every annotation; with ``min_weight = 1`` this
   *is* RootPainter3D's uniform sampling).

Parameters (`ReplayParams`, from `ContouringSettings`):

``aux_buffer_size`` (``b*``)
    Sets the decay: the weight halves about every ``0.69 · b*`` newer cases.
``min_weight``
    Floor of the weight in (0, 1]: the oldest corrections keep at least this share relative to
    the newest.
``fresh_visits``
    Batches in which a new case is guaranteed a slot before it joins the weighted pool.
``fresh_slots``
    Batch slots reserved for fresh cases (eq. 1 uses one new sample per update).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from heartloop.contouring.settings import ContouringSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayCase:
    """What the sampler needs to know about one training case.

    Parameters
    ----------
    case_id
        Opaque identifier (no patient data).
    age
        Training cases added after this one (0 = the newest).
    times_sampled
        Batches this case has been in so far.
    """

    case_id: str
    age: int
    times_sampled: int = 0

    def __post_init__(self) -> None:
        if self.age < 0 or self.times_sampled < 0:
            raise ValueError("age and times_sampled must be zero or positive")


@dataclass(frozen=True)
class ReplayParams:
    """Replay sampling parameters; see the module docstring."""

    aux_buffer_size: int = 20
    min_weight: float = 0.2
    fresh_visits: int = 8
    fresh_slots: int = 1

    def __post_init__(self) -> None:
        if self.aux_buffer_size < 1:
            raise ValueError("aux_buffer_size must be at least 1")
        if not (0.0 < self.min_weight <= 1.0):
            raise ValueError("min_weight must be in (0, 1]: 0 would let old corrections be forgotten")
        if self.fresh_visits < 0 or self.fresh_slots < 0:
            raise ValueError("fresh_visits and fresh_slots must be zero or positive")

    @classmethod
    def from_settings(cls, settings: ContouringSettings) -> "ReplayParams":
        return cls(
            aux_buffer_size=settings.replay_aux_buffer_size,
            min_weight=settings.replay_min_weight,
            fresh_visits=settings.replay_fresh_visits,
        )


def replay_weight(age: int, params: ReplayParams) -> float:
    """Relative chance of a case `age` cases old: ``max(min_weight, (b*/(b*+1))**age)``."""
    retention = params.aux_buffer_size / (params.aux_buffer_size + 1.0)
    return max(params.min_weight, retention**age)


def _weighted_without_replacement(
    rng: np.random.Generator, cases: Sequence[ReplayCase], count: int, params: ReplayParams
) -> list[ReplayCase]:
    if count <= 0 or not cases:
        return []
    weights = np.array([replay_weight(c.age, params) for c in cases], dtype=np.float64)
    picked = rng.choice(len(cases), size=min(count, len(cases)), replace=False, p=weights / weights.sum())
    return [cases[int(i)] for i in picked]


def sample_replay_batch(
    cases: Sequence[ReplayCase], batch_size: int, params: ReplayParams, seed: int | np.random.Generator
) -> tuple[str, ...]:
    """The case ids of the next training batch.

    Deterministic for a given `seed` (an int, or a `numpy.random.Generator` the caller advances).
    A case appears at most once per batch unless there are fewer cases than `batch_size`; then
    every case appears and the remaining slots are weighted draws with replacement.

    Raises `ValueError` when `cases` is empty or has duplicate ids.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not cases:
        raise ValueError("no training cases to sample from")
    if len({c.case_id for c in cases}) != len(cases):
        raise ValueError("case ids must be unique")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    fresh = [c for c in cases if c.times_sampled < params.fresh_visits]
    chosen = _weighted_without_replacement(rng, fresh, min(params.fresh_slots, batch_size), params)
    chosen_ids = {c.case_id for c in chosen}
    rest = [c for c in cases if c.case_id not in chosen_ids]
    chosen += _weighted_without_replacement(rng, rest, batch_size - len(chosen), params)
    if len(chosen) < batch_size:
        # Fewer cases than slots (the first corrections): repeat cases, still favouring new ones.
        weights = np.array([replay_weight(c.age, params) for c in cases], dtype=np.float64)
        extra = rng.choice(len(cases), size=batch_size - len(chosen), replace=True, p=weights / weights.sum())
        chosen += [cases[int(i)] for i in extra]
    return tuple(c.case_id for c in chosen)
