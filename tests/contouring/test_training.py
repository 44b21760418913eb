"""Continual training: learning from simulated corrections, promotion, checkpoint/resume, restart,
loss choice. Tiny networks (width 8, depth 2) and coarse grids keep this well under a minute."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from heartloop.contouring.inference import Predictor
from heartloop.contouring.registry import ModelRegistry
from heartloop.contouring.settings import ContouringSettings
from heartloop.contouring.split import Split
from heartloop.contouring.training import (
    Correction,
    Learner,
    PatchBatch,
    TrainerState,
    TrainingData,
    batch_loss,
    localiser_arrays,
    step_trainer,
    train_epoch,
    validate,
)
from heartloop.phantom import make_patient

SETTINGS = ContouringSettings(
    width=8,
    depth=2,
    groupnorm_groups=4,
    localiser_voxel_mm=(8.0, 8.0, 8.0),
    organ_voxel_mm=(4.0, 4.0, 4.0),
    localiser_patch_size=(16, 32, 32),
    organ_patch_size=(16, 32, 32),
    margin_mm=10.0,
    learning_rate=3e-3,
    device="cpu",
)


def simulated_correction(seed: int) -> Correction:
    """A reviewer's correction of a shifted contour: missed heart painted foreground, wrongly
    included tissue and a ring around the heart painted background, on every other slice (strokes)."""
    patient = make_patient(seed, rows=96, n_slices=32)
    truth = patient.heart_mask
    prediction = np.roll(truth, (0, 4, -3), axis=(0, 1, 2))
    strokes = np.zeros_like(truth)
    strokes[::2] = True
    ring = ndimage.binary_dilation(truth, iterations=4) & ~ndimage.binary_dilation(truth, iterations=2)
    foreground = truth & ~prediction & strokes
    background = ((prediction & ~truth) | ring) & strokes
    return Correction(f"case-{seed}", patient.volume, prediction, foreground, background)


@pytest.fixture(scope="module")
def corrections() -> list[Correction]:
    return [simulated_correction(seed) for seed in range(4)]


def _data(corrections: list[Correction], n: int = 4) -> TrainingData:
    data = TrainingData(SETTINGS, seed=0)
    for correction in corrections[:n]:
        data.add(correction)
    return data


def test_training_improves_validation_dice_and_promotes(tmp_path, corrections) -> None:
    data = _data(corrections)
    assert [data.assignments[c.case_id] for c in corrections] == [Split.TRAIN, Split.VALIDATION, Split.TRAIN,
                                                                   Split.TRAIN]
    learner = Learner.fresh(SETTINGS, seed=0)
    initial = validate(learner.predictor(SETTINGS), data)
    registry = ModelRegistry(tmp_path / "models")
    state = TrainerState()
    best = None
    for _ in range(2):
        state, report = step_trainer(learner, data, state, registry, SETTINGS)
        assert report.epoch.completed and report.epoch.samples == 64  # max(64, 2 × validation patches)
        best = report.candidate.dice if best is None else max(best, report.candidate.dice)
    assert state.epoch == 2
    assert best is not None and initial.dice is not None
    assert best > initial.dice + 0.1, (initial, best)
    versions = registry.list()
    assert versions, "a model should have been registered"
    current = registry.current()
    assert current is not None and current.version == state.current_version
    assert current.val_dice == pytest.approx(state.best_val_dice)
    assert (current.n_train_cases, current.n_val_cases) == (3, 1)
    assert current.settings["width"] == 8 and current.kind == "localiser+organ"
    if len(versions) == 2:
        assert versions[1].parent == versions[0].version  # the lineage of continued training
    # The promoted model predicts through the normal loading path with its recorded version.
    predictor = Predictor.load(registry, runtime=SETTINGS)
    prediction = predictor.predict(corrections[1].ct)
    assert prediction.model_version == current.version


def test_checkpoint_resume_continues(tmp_path, corrections) -> None:
    data = _data(corrections, n=2)
    learner = Learner.fresh(SETTINGS, seed=1)
    registry = ModelRegistry(tmp_path / "models")
    state, _ = step_trainer(learner, data, TrainerState(), registry, SETTINGS, time_budget_s=1.0)
    path = tmp_path / "trainer" / "state.pt"
    state.checkpoint(path)
    assert not list(path.parent.glob(".*.tmp")), "no temp file left behind"

    resumed = TrainerState.resume(path)
    assert resumed.epoch == state.epoch == 1
    assert resumed.current_version == state.current_version
    assert resumed.current_metrics == state.current_metrics
    assert dict(resumed.assignments) == {"case-0": "train", "case-1": "validation"}
    other = Learner.fresh(SETTINGS, seed=99)
    resumed.restore(other)
    for stage in ("localiser", "organ"):
        for key, value in learner.networks[stage].state_dict().items():
            assert torch.equal(value, other.networks[stage].state_dict()[key]), key
    restored_data = TrainingData(SETTINGS, assignments=resumed.assignments, times_sampled=resumed.times_sampled)
    for correction in corrections[:2]:
        restored_data.add(correction)
    assert restored_data.assignments == data.assignments
    state2, _ = step_trainer(other, restored_data, resumed, registry, SETTINGS, time_budget_s=0.5)
    assert state2.epoch == 2
    assert TrainerState.resume(tmp_path / "missing.pt").epoch == 0


def test_restart_after_epochs_without_progress(tmp_path, corrections) -> None:
    settings = dataclasses.replace(SETTINGS, epochs_without_progress_restart=1)
    data = _data(corrections, n=2)
    learner = Learner.fresh(settings, seed=2)
    registry = ModelRegistry(tmp_path / "models")
    state, first = step_trainer(learner, data, TrainerState(), registry, settings, time_budget_s=1.0)
    assert first.promoted_version is not None and not first.restarted  # cold start promotes
    assert state.progress.epochs_without_progress == 0
    before = {k: v.clone() for k, v in learner.networks["organ"].state_dict().items()}
    # No time to train: no candidate can be promoted and no new data arrived → no progress.
    state, second = step_trainer(learner, data, state, registry, settings, time_budget_s=0.0, restart_seed=3)
    assert second.promoted_version is None and second.restarted
    assert state.progress.restarts == 1 and state.progress.epochs_without_progress == 0
    assert state.lineage_parent is None
    after = learner.networks["organ"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights should be fresh"
    assert registry.current().version == first.promoted_version  # the best model is kept


def test_new_data_counts_as_progress(tmp_path, corrections) -> None:
    settings = dataclasses.replace(SETTINGS, epochs_without_progress_restart=1)
    data = _data(corrections, n=2)
    learner = Learner.fresh(settings, seed=2)
    registry = ModelRegistry(tmp_path / "models")
    state, _ = step_trainer(learner, data, TrainerState(), registry, settings, time_budget_s=1.0)
    data.add(corrections[2])
    state, report = step_trainer(learner, data, state, registry, settings, time_budget_s=0.0)
    assert not report.restarted and state.progress.epochs_without_progress == 0


def _batch(prediction: np.ndarray, fg: np.ndarray, bg: np.ndarray, dense: bool) -> PatchBatch:
    hu = np.zeros((1, *fg.shape), dtype=np.float32)
    return PatchBatch(hu=hu, foreground=fg[None], background=bg[None], prediction=prediction[None], dense=(dense,))


def test_sparse_corrections_use_the_masked_loss_and_dense_labels_the_dense_loss() -> None:
    rng = np.random.default_rng(0)
    shape = (8, 8, 8)
    logits = torch.randn(1, 1, *shape)
    fg = np.zeros(shape, dtype=bool)
    bg = np.zeros(shape, dtype=bool)
    fg[2:4, 2:4, 2:4] = True
    bg[6:, 6:, 6:] = True
    prediction_a = rng.random(shape) > 0.5
    prediction_b = rng.random(shape) > 0.5
    # Sparse: unannotated voxels (and so the prediction there) change nothing.
    sparse_a = batch_loss(logits, _batch(prediction_a, fg, bg, dense=False))
    sparse_b = batch_loss(logits, _batch(prediction_b, fg, bg, dense=False))
    assert torch.equal(sparse_a, sparse_b)
    # Dense: the whole label counts.
    dense_a = batch_loss(logits, _batch(prediction_a, prediction_a, ~prediction_a, dense=True))
    dense_b = batch_loss(logits, _batch(prediction_b, prediction_b, ~prediction_b, dense=True))
    assert not torch.isclose(dense_a, dense_b)


def test_localiser_labels_any_painted_fine_voxel(corrections) -> None:
    correction = corrections[0]
    fg = np.zeros(correction.ct.shape, dtype=bool)
    bg = np.zeros(correction.ct.shape, dtype=bool)
    fg[10, 40, 40] = True  # one painted voxel
    bg[10, 40, 40] = True  # background in the same coarse voxel: foreground wins there
    bg[20, 10, 10] = True
    sparse = Correction("x", correction.ct, np.zeros_like(fg), fg, bg)
    arrays = localiser_arrays(sparse, SETTINGS)
    assert arrays.foreground.sum() == 1 and arrays.background.sum() == 1
    assert not (arrays.foreground & arrays.background).any()


def test_training_yields_to_inference(corrections) -> None:
    data = _data(corrections, n=1)
    learner = Learner.fresh(SETTINGS, seed=4)
    asks = iter([True, True])
    result = train_epoch(learner.networks, learner.optimisers, data, SETTINGS,
                         yield_check=lambda: next(asks, False), time_budget_s=0.5)
    assert result.yielded_s == pytest.approx(1.0)
    assert result.steps >= 1 and not result.completed


def test_correction_is_validated(corrections) -> None:
    ct = corrections[0].ct
    empty = np.zeros(ct.shape, dtype=bool)
    with pytest.raises(ValueError):
        Correction("a", ct, empty, empty, empty)  # sparse without paint
    with pytest.raises(ValueError):
        Correction("a", ct, empty[:-1], empty[:-1], empty[:-1])
    dense = Correction.from_label("a", ct, corrections[0].prediction)
    assert dense.dense and dense.annotated.all()


def test_dense_correction_loss_learns_the_accepted_contour_but_never_the_padding() -> None:
    rng = np.random.default_rng(1)
    shape = (8, 8, 8)
    logits = torch.randn(1, 1, *shape)
    fg = np.zeros(shape, dtype=bool)
    bg = np.zeros(shape, dtype=bool)
    fg[2:4, 2:4, 2:4] = True
    bg[5:7, 5:7, 5:7] = True
    region = np.ones(shape, dtype=bool)
    region[:, :, 6:] = False  # padding beyond the CT's edge
    prediction_a = rng.random(shape) > 0.5
    prediction_b = prediction_a.copy()
    prediction_b[:, :, 6:] = ~prediction_b[:, :, 6:]  # differs only in the padding

    def loss(prediction: np.ndarray) -> torch.Tensor:
        hu = np.zeros((1, *shape), dtype=np.float32)
        batch = PatchBatch(hu=hu, foreground=fg[None], background=bg[None], prediction=prediction[None],
                           dense=(False,), region=region[None])
        return batch_loss(logits, batch, accepted_weight=0.25)

    assert torch.equal(loss(prediction_a), loss(prediction_b))
    assert not torch.isclose(loss(prediction_a), loss(rng.random(shape) > 0.5))
    # Weight 0 is exactly RootPainter3D's masked loss.
    batch = _batch(prediction_a, fg, bg, dense=False)
    assert torch.equal(batch_loss(logits, batch, accepted_weight=0.0), batch_loss(logits, batch))


def test_correction_loss_setting_chooses_the_accepted_weight() -> None:
    from heartloop.contouring.training import correction_accepted_weight

    assert correction_accepted_weight(dataclasses.replace(SETTINGS, correction_loss="masked")) == 0.0
    dense = dataclasses.replace(SETTINGS, correction_loss="dense", accepted_voxel_weight=0.3)
    assert correction_accepted_weight(dense) == 0.3
    with pytest.raises(ValueError):
        dataclasses.replace(SETTINGS, correction_loss="proxy")


def test_localiser_background_never_covers_accepted_heart(corrections) -> None:
    correction = corrections[0]
    prediction = np.zeros(correction.ct.shape, dtype=bool)
    prediction[10:12, 40:44, 40:44] = True  # accepted heart
    bg = np.zeros_like(prediction)
    bg[10:12, 40:44, 44:46] = True  # a false-positive rim painted away, in the same coarse voxels
    arrays = localiser_arrays(Correction("x", correction.ct, prediction | bg, np.zeros_like(bg), bg), SETTINGS)
    assert arrays.prediction.any() and not (arrays.background & arrays.prediction).any()


def test_training_continues_from_the_best_model_after_epochs_without_a_promotion(tmp_path, corrections) -> None:
    """New corrections reset RootPainter3D's without-progress counter, so a learner that keeps
    losing to the promoted model would drift for ever; `resume_best_after` brings it back."""
    settings = dataclasses.replace(SETTINGS, resume_best_after=2)
    data = _data(corrections, n=2)
    learner = Learner.fresh(settings, seed=2)
    registry = ModelRegistry(tmp_path / "models")
    state, first = step_trainer(learner, data, TrainerState(), registry, settings, time_budget_s=1.0)
    assert first.promoted_version is not None and state.progress.epochs_since_promotion == 0
    best = registry.load(first.promoted_version).weights
    for network in learner.networks.values():  # the learner drifts away from the best model
        with torch.no_grad():
            for p in network.parameters():
                p.add_(0.5)
    data.add(corrections[2])  # new data: RootPainter3D's counter resets, ours does not
    state, second = step_trainer(learner, data, state, registry, settings, time_budget_s=0.0)
    assert second.promoted_version is None and state.progress.epochs_without_progress == 0
    assert state.progress.epochs_since_promotion == 1
    assert any(not torch.equal(v.cpu(), best["organ"][k].cpu())
               for k, v in learner.networks["organ"].state_dict().items())  # still drifted
    state, third = step_trainer(learner, data, state, registry, settings, time_budget_s=0.0)
    assert third.promoted_version is None and not third.restarted
    for stage, network in learner.networks.items():  # back on the best model's weights
        for key, value in network.state_dict().items():
            assert torch.equal(value.cpu(), best[stage][key].cpu()), (stage, key)
    assert state.progress.epochs_since_promotion == 0 and state.lineage_parent == first.promoted_version
    assert registry.current().version == first.promoted_version


def test_resume_best_default_and_validation() -> None:
    from heartloop.config import load_settings
    from heartloop.contouring.settings import ContouringSettings
    from heartloop.service.contouring import contouring_settings

    assert ContouringSettings().resume_best_after == 4  # the [contouring] default maps onto it
    assert contouring_settings(load_settings(environ={}, overrides={})).resume_best_after == 4
    with pytest.raises(ValueError, match="resume_best_after"):
        dataclasses.replace(SETTINGS, resume_best_after=-1)
