"""Coded values of the case lifecycle."""

from __future__ import annotations

import enum


class CaseState(str, enum.Enum):
    """Where a case is in its lifecycle.

    ``RECEIVED`` → ``READY`` → (later issues: ``PREDICTED`` → ``AWAITING_REVIEW`` → ``CORRECTED`` → ``SENT``).
    ``INCOMPLETE`` and ``UNSUPPORTED`` are terminal until new instances arrive.
    """

    RECEIVED = "RECEIVED"
    READY = "READY"
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
