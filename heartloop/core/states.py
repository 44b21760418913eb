"""Coded values of the case lifecycle."""

from __future__ import annotations

import enum


class CaseState(str, enum.Enum):
    """Where a case is in its lifecycle.

    ``RECEIVED`` → ``READY`` → ``PREDICTED`` (or ``NO_MODEL`` at cold start: contoured by hand) →
    (review UI: ``AWAITING_REVIEW`` →) ``CORRECTED`` → ``SENT``.
    ``INCOMPLETE`` and ``UNSUPPORTED`` are terminal until new instances arrive; any assembled case
    goes back to ``RECEIVED`` when new slices arrive.
    """

    RECEIVED = "RECEIVED"
    READY = "READY"
    PREDICTED = "PREDICTED"
    NO_MODEL = "NO_MODEL"
    CORRECTED = "CORRECTED"
    SENT = "SENT"
    INCOMPLETE = "INCOMPLETE"
    UNSUPPORTED = "UNSUPPORTED"
    FAILED = "FAILED"


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class OutboxState(str, enum.Enum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"  # gave up after the configured number of attempts


class Modality(str, enum.Enum):
    CT = "CT"
    RTDOSE = "RTDOSE"
    RTPLAN = "RTPLAN"
    RTSTRUCT = "RTSTRUCT"
