"""Losses for learning from corrections: masked (RootPainter3D) and dense (seed 004 eq. 9/12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heartloop.contouring.loss import (
    CE_WEIGHT,
    corrected_label,
    dense_loss,
    dice_score,
    masked_loss,
    weighted_ce_dice_loss,
)

SHAPE = (2, 6, 7, 8)  # (N, D, H, W), odd sizes on purpose


def _sparse_annotation(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    draw = rng.random(SHAPE)
    foreground = torch.from_numpy(draw < 0.15)
    background = torch.from_numpy((draw >= 0.15) & (draw < 0.35))
    return foreground, background


def _logits(seed: int = 1, requires_grad: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((SHAPE[0], 1, *SHAPE[1:]), generator=generator).requires_grad_(requires_grad)


def test_masked_loss_ignores_unannotated_logits_exactly():
    foreground, background = _sparse_annotation()
    unannotated = ~(foreground | background)
    logits = _logits(requires_grad=False)
    changed = logits.clone()
    changed[:, 0][unannotated] = torch.randn(int(unannotated.sum())) * 50.0
    n, d, h, w = unannotated.nonzero()[0].tolist()
    changed[n, 0, d, h, w] = float("inf")  # even a diverged voxel changes nothing
    assert torch.equal(masked_loss(logits, foreground, background), masked_loss(changed, foreground, background))


def test_masked_loss_gradient_is_zero_where_unannotated():
    foreground, background = _sparse_annotation()
    unannotated = ~(foreground | background)
    logits = _logits()
    masked_loss(logits, foreground, background).backward()
    gradient = logits.grad[:, 0]
    assert torch.all(gradient[unannotated] == 0)
    assert torch.all(gradient[foreground] < 0)  # raising a foreground logit lowers the loss
    assert torch.all(gradient[background] > 0)


def test_masked_loss_value_does_not_depend_on_how_much_is_unpainted():
    # The same painted voxels inside a bigger, mostly unpainted volume: same loss.
    foreground, background = _sparse_annotation()
    logits = _logits(requires_grad=False)
    big_fg = torch.zeros((2, 12, 14, 16), dtype=torch.bool)
    big_bg = torch.zeros_like(big_fg)
    big_logits = torch.zeros((2, 1, 12, 14, 16))
    big_fg[:, :6, :7, :8] = foreground
    big_bg[:, :6, :7, :8] = background
    big_logits[:, :, :6, :7, :8] = logits
    assert masked_loss(big_logits, big_fg, big_bg).item() == pytest.approx(masked_loss(logits, foreground, background).item())


def test_masked_loss_matches_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0]).reshape(1, 1, 1, 1, 4)
    foreground = torch.tensor([True, False, False, False]).reshape(1, 1, 1, 4)
    background = torch.tensor([False, True, False, False]).reshape(1, 1, 1, 4)
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    ce = -(torch.log(p[0]) + torch.log(1 - p[1])) / 2
    dice = 1 - 2 * p[0] / (p[0] + p[1] + 1)
    expected = dice + CE_WEIGHT * ce
    assert masked_loss(logits, foreground, background).item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_foreground_only_cross_entropy_counts():
    logits = torch.tensor([-2.0, 1.0]).reshape(1, 1, 1, 1, 2)
    background = torch.tensor([True, True]).reshape(1, 1, 1, 2)
    foreground = torch.zeros_like(background)
    p = torch.sigmoid(torch.tensor([-2.0, 1.0]))
    expected = CE_WEIGHT * -(torch.log(1 - p)).mean()
    assert masked_loss(logits, foreground, background).item() == pytest.approx(expected.item(), rel=1e-5)


def test_nothing_painted_gives_zero_loss_that_still_backpropagates():
    logits = _logits()
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    loss = masked_loss(logits, empty, empty)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_background_paint_wins_over_foreground_paint():
    logits = _logits(requires_grad=False)
    both = torch.zeros(SHAPE, dtype=torch.bool)
    both[0, 0, 0, 0] = True
    only_bg = masked_loss(logits, torch.zeros_like(both), both)
    assert masked_loss(logits, both, both).item() == pytest.approx(only_bg.item())


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        masked_loss(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 3, dtype=torch.bool), torch.zeros(1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        masked_loss(torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, 2, dtype=torch.bool))


def test_corrected_label_is_prediction_plus_foreground_minus_background():
    prediction = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    foreground = np.array([0, 0, 0, 1, 0, 1], dtype=bool)
    background = np.array([1, 0, 0, 0, 0, 1], dtype=bool)
    np.testing.assert_array_equal(corrected_label(prediction, foreground, background), [0, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError):
        corrected_label(prediction, foreground[:3], background)


def test_dense_loss_weights_painted_voxels_one_and_accepted_voxels_less():
    prediction = torch.zeros(SHAPE, dtype=torch.bool)
    prediction[:, 1:5, 1:6, 2:7] = True
    foreground, background = _sparse_annotation(3)
    logits = _logits(5)
    accepted_weight = 0.25
    loss = dense_loss(logits, prediction, foreground, background, accepted_weight)
    target = torch.from_numpy(corrected_label(prediction.numpy(), foreground.numpy(), background.numpy()))
    painted = foreground | background
    weight = torch.where(painted, 1.0, accepted_weight)
    assert loss.item() == pytest.approx(weighted_ce_dice_loss(logits, target, weight).item())
    loss.backward()
    gradient = logits.grad[:, 0].abs()
    # with the same logits and target, a painted voxel gets 4× the gradient of an accepted one
    probe_logits = torch.zeros((1, 1, 1, 1, 2), requires_grad=True)
    pred = torch.tensor([True, True]).reshape(1, 1, 1, 2)
    fg = torch.tensor([True, False]).reshape(1, 1, 1, 2)
    dense_loss(probe_logits, pred, fg, torch.zeros_like(fg), accepted_weight).backward()
    g = probe_logits.grad.flatten()
    assert g[0].item() == pytest.approx(g[1].item() / accepted_weight)
    assert torch.all(gradient > 0)  # dense: every voxel teaches something


def test_dense_loss_with_zero_accepted_weight_is_the_masked_loss():
    prediction = torch.from_numpy(np.random.default_rng(7).random(SHAPE) < 0.5)
    foreground, background = _sparse_annotation(4)
    logits = _logits(6, requires_grad=False)
    assert dense_loss(logits, prediction, foreground, background, 0.0).item() == pytest.approx(
        masked_loss(logits, foreground, background).item()
    )


def test_dense_loss_region_excludes_what_the_reviewer_could_not_see():
    prediction = torch.ones(SHAPE, dtype=torch.bool)
    foreground, background = _sparse_annotation(8)
    region = torch.zeros(SHAPE, dtype=torch.bool)
    region[:, :3] = True
    logits = _logits(9)
    dense_loss(logits, prediction, foreground, background, 0.5, region=region).backward()
    outside = ~region & ~(foreground | background)
    assert torch.all(logits.grad[:, 0][outside] == 0)
    assert torch.all(logits.grad[:, 0][region] != 0)


def test_dense_loss_rejects_weights_outside_unit_interval():
    empty = torch.zeros(SHAPE, dtype=torch.bool)
    with pytest.raises(ValueError):
        dense_loss(_logits(), empty, empty, empty, 1.5)


def test_dice_score():
    a = np.array([1, 1, 0, 0], dtype=bool)
    b = np.array([1, 0, 1, 0], dtype=bool)
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(a, b, counted=np.array([1, 1, 0, 1], dtype=bool)) == pytest.approx(2 / 3)
    assert dice_score(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
