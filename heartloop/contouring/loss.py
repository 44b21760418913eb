"""Losses for learning from corrections, as pure functions of tensors.

A correction is two sparse masks painted by a reviewer on top of the model's prediction:
**foreground** (heart the model missed) and **background** (non-heart it included). Two ways to
learn from it:

`masked_loss` — RootPainter3D: cross-entropy + soft Dice over the *annotated* voxels only. A voxel
painted foreground has target 1, background target 0, an unpainted voxel is ignored: it contributes
nothing to the loss value and receives zero gradient. (RootPainter3D zeroes the logits of
unannotated voxels instead, which leaves a constant ``softmax(0) = 0.5`` per unannotated voxel in
its Dice denominator; here unannotated voxels are excluded exactly, so the loss value does not
depend on how much was left unpainted.)

`dense_loss` — seed 004, eq. 9 with the confidence map of eq. 12: the whole corrected contour
(`corrected_label`: prediction ∪ foreground − background) is the target, painted voxels weigh 1 and
the voxels the reviewer looked at and left alone (implicitly accepted) weigh ``accepted_weight``
(< 1: the reviewer's silence is weaker evidence than their brush). Eq. 12 writes the map as
``W = ω·1[x ∈ Γ] + 1``; normalised so painted voxels weigh 1 this is
``accepted_weight = 1 / (1 + ω)``.

Both reduce to `weighted_ce_dice_loss`: ``Dice + ce_weight · CE`` (RootPainter3D's combination,
``ce_weight = 0.3``), both terms weighted per voxel and pooled over the batch. When no voxel with
positive weight is foreground, the Dice term is undefined and only cross-entropy is used (as
RootPainter3D does).

Shapes: ``logits`` is ``(N, 1, D, H, W)`` (one logit per voxel, see `heartloop.contouring.network`);
masks are ``(N, D, H, W)`` booleans on the same grid.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: Weight of cross-entropy relative to Dice (RootPainter3D's `combined_loss`).
CE_WEIGHT = 0.3
_EPS = 1e-6


def corrected_label(prediction: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The corrected contour: ``prediction ∪ foreground − background`` as a bool array.

    Background paint wins where both were painted: removing a wrongly included region is the
    reviewer's explicit last word on that voxel.
    """
    prediction, foreground, background = (np.asarray(a, dtype=bool) for a in (prediction, foreground, background))
    if not (prediction.shape == foreground.shape == background.shape):
        raise ValueError(
            f"prediction {prediction.shape}, foreground {foreground.shape} and background {background.shape} "
            "must be on the same grid"
        )
    return (prediction | foreground) & ~background


def _check_shapes(logits: torch.Tensor, *masks: torch.Tensor) -> None:
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(f"logits must be (N, 1, D, H, W), got {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    for mask in masks:
        if tuple(mask.shape) != tuple(expected):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")


def weighted_ce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, ce_weight: float = CE_WEIGHT
) -> torch.Tensor:
    """``soft Dice + ce_weight · binary cross-entropy`` with a per-voxel weight.

    Voxels of weight 0 are excluded exactly (they change neither the value nor any gradient).

    Parameters
    ----------
    logits
        ``(N, 1, D, H, W)`` network output.
    target
        ``(N, D, H, W)`` 0/1 target (bool or float).
    weight
        ``(N, D, H, W)`` non-negative voxel weights.
    ce_weight
        Weight of the cross-entropy term.

    Returns
    -------
    torch.Tensor
        A scalar; 0 (attached to the graph, so ``backward`` works) when every weight is 0.
    """
    _check_shapes(logits, target, weight)
    logit = logits[:, 0].float()  # losses in float32 even when the network ran in bfloat16
    target = target.to(logit.dtype)
    weight = weight.to(logit.dtype)
    if torch.any(weight < 0):
        raise ValueError("voxel weights must be non-negative")
    counted = weight > 0
    total_weight = weight.sum()
    if total_weight <= 0:
        return logit.sum() * 0.0
    # torch.where, not a product: an unannotated voxel must not leak even a NaN/inf logit.
    bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    ce = torch.where(counted, bce * weight, torch.zeros_like(bce)).sum() / total_weight
    fg_weight = (weight * target).sum()
    if fg_weight <= 0:
        return ce_weight * ce
    prob = torch.where(counted, torch.sigmoid(logit), torch.zeros_like(logit))
    intersection = (weight * prob * target).sum()
    denominator = (weight * prob).sum() + fg_weight
    dice = 1.0 - 2.0 * intersection / (denominator + _EPS)
    return dice + ce_weight * ce


def masked_loss(
    logits: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, ce_weight: float = CE_WEIGHT
) -> torch.Tensor:
    """RootPainter3D's loss: Dice + CE over painted voxels only (foreground → 1, background → 0).

    A voxel painted both ways counts as background (as in `corrected_label`).
    """
    _check_shapes(logits, foreground, background)
    foreground = foreground.bool()
    background = background.bool()
    annotated = foreground | background
    target = foreground & ~background
    return weighted_ce_dice_loss(logits, target, annotated.to(torch.float32), ce_weight)


def dense_loss(
    logits: torch.Tensor,
    prediction: torch.Tensor,
    foreground: torch.Tensor,
    background: torch.Tensor,
    accepted_weight: float,
    region: torch.Tensor | None = None,
    ce_weight: float = CE_WEIGHT,
) -> torch.Tensor:
    """Confidence-weighted dense loss (seed 004 eq. 9/12) on the corrected contour.

    Parameters
    ----------
    prediction
        ``(N, D, H, W)`` the binary prediction the reviewer corrected.
    foreground, background
        ``(N, D, H, W)`` painted masks.
    accepted_weight
        Weight in [0, 1] of unpainted voxels (implicitly accepted); painted voxels weigh 1.
        0 gives exactly `masked_loss`.
    region
        Optional ``(N, D, H, W)`` mask of the voxels the reviewer could see and correct (the
        heart's box); outside it nothing is implied and the weight is 0. Default: everywhere.
    """
    if not (0.0 <= accepted_weight <= 1.0):
        raise ValueError(f"accepted_weight = {accepted_weight} must be in [0, 1]")
    _check_shapes(logits, prediction, foreground, background)
    foreground = foreground.bool()
    background = background.bool()
    target = (prediction.bool() | foreground) & ~background
    painted = foreground | background
    weight = torch.where(
        painted,
        torch.ones(target.shape, dtype=torch.float32, device=logits.device),
        torch.full(target.shape, float(accepted_weight), dtype=torch.float32, device=logits.device),
    )
    if region is not None:
        _check_shapes(logits, region)
        weight = torch.where(region.bool() | painted, weight, torch.zeros_like(weight))
    return weighted_ce_dice_loss(logits, target, weight, ce_weight)


def dice_score(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
               counted: np.ndarray | torch.Tensor | None = None) -> float:
    """Hard Dice of two binary masks, optionally over `counted` voxels only (validation Dice on
    sparse annotations). Two empty masks agree perfectly: 1.0."""
    pred = np.asarray(prediction.cpu() if isinstance(prediction, torch.Tensor) else prediction, dtype=bool)
    true = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target, dtype=bool)
    if counted is not None:
        keep = np.asarray(counted.cpu() if isinstance(counted, torch.Tensor) else counted, dtype=bool)
        pred, true = pred[keep], true[keep]
    denominator = int(pred.sum()) + int(true.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, true).sum()) / denominator
