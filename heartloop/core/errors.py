"""Errors shared across packages. Each carries a message a physicist can act on."""


class HeartLoopError(Exception):
    """Base class of all HeartLoop errors."""


class SeriesError(HeartLoopError):
    """A CT series cannot become a `Volume`.

    Parameters
    ----------
    state
        The case state this failure maps to (``INCOMPLETE`` or ``UNSUPPORTED``).
    reason
        A sentence a physicist can act on.
    """

    def __init__(self, state: "CaseState", reason: str) -> None:  # noqa: F821 - forward ref
        super().__init__(reason)
        self.state = state
        self.reason = reason


class DatasetRejected(HeartLoopError):
    """An incoming dataset is refused; `status` is the DIMSE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
