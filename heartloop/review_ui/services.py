"""What the review UI needs from the rest of HeartLoop, handed in by the composition root.

`review_ui` may import only core, store and config (DESIGN.md §2): reading a CT series, running
the correction pipeline or touching the model registry are done by `service/`, which builds a
`UiServices` and passes it to `create_app`. Tests pass their own (small, real) implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from heartloop.core import Volume


@dataclass(frozen=True)
class CorrectionRequest:
    """A reviewer's save: painted voxels on the case's CT grid, plus what the viewer measured.

    `foreground` / `background` are bool volumes of the CT's shape ``(slices, rows, columns)``.
    `kind` is ``"sparse"`` (painted corrections of a prediction) or ``"dense"`` (contoured from
    scratch at cold start: the painted foreground is the whole heart).
    """

    case_id: int
    foreground: np.ndarray
    background: np.ndarray
    username: str
    person_name: str  # DICOM PN of the reviewer ("Family^Given", or the username)
    kind: str = "sparse"
    active_seconds: float | None = None
    box: tuple[int, int, int, int, int, int] | None = None  # k0, k1, j0, j1, i0, i1 (half-open), if used


@dataclass(frozen=True)
class UiServices:
    """Callables the web app uses; each may raise ``KeyError`` (no such case/model) or ``ValueError``
    (a request that cannot be honoured, with a reason the user can read).

    Attributes
    ----------
    load_volume
        ``case_id -> Volume`` of the case's CT (HU, int16-compatible values).
    load_prediction
        ``case_id -> (mask Volume, model_version) | None`` — the latest prediction on the CT grid.
    load_dose
        ``case_id -> Volume | None`` — the plan dose resampled to the CT grid (Gy), or None.
    save_correction
        ``CorrectionRequest -> dict`` — store the correction, queue training, dose delta and the
        outputs to the TPS; returns at least ``{"correction_id": int, "state": str}``.
    request_prediction
        ``(case_id, box or None) -> None`` — queue a (re-)prediction, limited to `box` when given.
    list_models
        ``() -> list[dict]`` — registry versions, newest first, with ``version``, ``current``,
        ``parent``, ``val_dice``, ``train_cases``, ``val_cases``, ``created_at``.
    rollback_model
        ``version -> None`` — make `version` current again.
    trainer_status
        ``() -> dict`` — ``current_version``, ``best_val_dice``, ``epochs``,
        ``epochs_without_progress``, ``train_cases``, ``val_cases``, ``state``, ``updated_at``.
    """

    load_volume: Callable[[int], Volume]
    load_prediction: Callable[[int], "tuple[Volume, str] | None"]
    load_dose: Callable[[int], Volume | None]
    save_correction: Callable[[CorrectionRequest], dict[str, Any]]
    request_prediction: Callable[[int, "Sequence[int] | None"], None]
    list_models: Callable[[], list[dict[str, Any]]]
    rollback_model: Callable[[str], None]
    trainer_status: Callable[[], dict[str, Any]]
