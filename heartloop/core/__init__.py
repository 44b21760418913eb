"""Shared value types: `Volume`, case states, errors. Imports nothing else of ours."""

from heartloop.core.errors import DatasetRejected, HeartLoopError, SeriesError
from heartloop.core.states import CaseState, JobState, Modality, OutboxState
from heartloop.core.volume import Volume

__all__ = [
    "CaseState",
    "DatasetRejected",
    "HeartLoopError",
    "JobState",
    "Modality",
    "OutboxState",
    "SeriesError",
    "Volume",
]
