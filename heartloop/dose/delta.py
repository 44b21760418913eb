"""Dose deltas between two contours of one case (predicted vs corrected, model A vs B)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from heartloop.dose.structure import V_LEVELS_GY, DoseStats

#: Metrics compared, with the label used in reasons; each is checked against one threshold.
_DOSE_METRICS = (("mean_gy", "mean heart dose"), ("max_gy", "max dose"), ("d2_gy", "D2%"), ("d98_gy", "D98%"))
_V_METRICS = tuple((f"v{level:g}_pct", f"V{level:g}Gy") for level in V_LEVELS_GY)


@dataclass(frozen=True)
class DoseThresholds:
    """How much a metric may move before the difference is flagged (|Δ| > threshold flags).

    Parameters
    ----------
    mean_gy, max_gy, d2_gy, d98_gy
        Absolute dose differences (Gy).
    v_pct
        Absolute difference of each V-metric, in percentage points of the structure's volume.
    volume_pct
        Volume change relative to the reference volume (%).
    """

    mean_gy: float = 0.5
    max_gy: float = 2.0
    d2_gy: float = 1.0
    d98_gy: float = 1.0
    v_pct: float = 5.0
    volume_pct: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"threshold {f.name} must be a non-negative number, got {value!r}")
            object.__setattr__(self, f.name, float(value))


@dataclass(frozen=True)
class DoseDelta:
    """Every metric's difference ``other − reference`` and whether any moved too far.

    Parameters
    ----------
    differences
        Metric name (as in `DoseStats.to_dict`, plus ``volume_pct`` — the relative volume change in
        %) → ``other − reference``.
    flagged
        True when at least one metric exceeds its threshold.
    reasons
        One human-readable sentence per exceeded threshold, e.g.
        ``"mean heart dose differs by 0.62 Gy (> 0.5 Gy)"``.
    """

    differences: dict[str, float]
    flagged: bool
    reasons: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.flagged != bool(self.reasons):
            raise ValueError("a delta is flagged exactly when it has reasons")
        if any(not math.isfinite(v) for v in self.differences.values()):
            raise ValueError("differences must be finite")

    @property
    def mean_gy(self) -> float:
        """Δ mean dose (Gy), the number dosimetrists ask for first."""
        return self.differences["mean_gy"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: ``differences`` (floats), ``flagged`` and ``reasons`` (list)."""
        return {"differences": dict(self.differences), "flagged": self.flagged, "reasons": list(self.reasons)}


def compare(reference: DoseStats, other: DoseStats, thresholds: DoseThresholds | None = None) -> DoseDelta:
    """Differences ``other − reference`` of every metric, flagged against `thresholds`.

    Parameters
    ----------
    reference
        E.g. the predicted contour's statistics.
    other
        E.g. the corrected contour's statistics (same dose).
    thresholds
        Defaults to `DoseThresholds()` (|Δ mean| > 0.5 Gy flags).

    Returns
    -------
    DoseDelta
    """
    thresholds = thresholds or DoseThresholds()
    ref, oth = reference.to_dict(), other.to_dict()
    differences = {name: oth[name] - ref[name] for name in ref}
    differences["volume_pct"] = 100.0 * (other.volume_cc - reference.volume_cc) / reference.volume_cc
    reasons: list[str] = []
    for name, label in _DOSE_METRICS:
        limit = getattr(thresholds, name)
        if abs(differences[name]) > limit:
            reasons.append(f"{label} differs by {abs(differences[name]):.2f} Gy (> {limit:g} Gy)")
    for name, label in _V_METRICS:
        if abs(differences[name]) > thresholds.v_pct:
            reasons.append(
                f"{label} differs by {abs(differences[name]):.1f} percentage points (> {thresholds.v_pct:g})"
            )
    if abs(differences["volume_pct"]) > thresholds.volume_pct:
        reasons.append(
            f"volume differs by {abs(differences['volume_pct']):.1f} % "
            f"({reference.volume_cc:.1f} → {other.volume_cc:.1f} cc; > {thresholds.volume_pct:g} %)"
        )
    return DoseDelta(differences=differences, flagged=bool(reasons), reasons=tuple(reasons))
