"""A phantom CT pushed with storescu reaches PREDICTED with a mask on the CT grid and a valid
Heart_AI RTSTRUCT, from a model the test trains itself; rollback changes the next prediction."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from heartloop.contouring.registry import ModelRegistry
from heartloop.contouring.settings import ContouringSettings
from heartloop.contouring.training import Correction, Learner, TrainerState, TrainingData, step_trainer
from heartloop.phantom import make_patient, write_patient
from heartloop.service.cli import main
from heartloop.service.contouring import enqueue_repredictions, mask_from_npz, models_dir
from heartloop.service.lifecycle import load_case_volume
from tests.helpers.dcmtk import storescu
from tests.helpers.procs import free_port, wait_for
from tests.helpers.service import running_service

TINY = ContouringSettings(width=8, depth=2, groupnorm_groups=4, localiser_voxel_mm=(8.0, 8.0, 8.0),
                          organ_voxel_mm=(4.0, 4.0, 4.0), localiser_patch_size=(16, 32, 32),
                          organ_patch_size=(16, 32, 32), margin_mm=10.0, learning_rate=3e-3, device="cpu")


def _correction(seed: int) -> Correction:
    patient = make_patient(seed, rows=96, n_slices=32)
    truth = patient.heart_mask
    prediction = np.roll(truth, (0, 4, -3), axis=(0, 1, 2))
    strokes = np.zeros_like(truth)
    strokes[::2] = True
    ring = ndimage.binary_dilation(truth, iterations=4) & ~ndimage.binary_dilation(truth, iterations=2)
    return Correction(f"case-{seed}", patient.volume, prediction, truth & ~prediction & strokes,
                      ((prediction & ~truth) | ring) & strokes)


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    """A registry with two promoted versions trained here on four phantoms (tiny settings)."""
    root = tmp_path_factory.mktemp("registry")
    registry = ModelRegistry(root / "models")
    data = TrainingData(TINY, seed=0)
    for seed in range(4):
        data.add(_correction(seed))
    learner = Learner.fresh(TINY, seed=0)
    state = TrainerState()
    for _ in range(2):
        state, _report = step_trainer(learner, data, state, registry, TINY)
    assert registry.current() is not None
    if len(registry.list()) < 2:  # one more version, so a rollback has somewhere to go
        from heartloop.contouring.registry import ModelMeta

        first = registry.list()[0]
        version = registry.register(registry.load(first.version).weights,
                                    ModelMeta(kind=first.kind, parent=first.version, settings=dict(first.settings)))
        registry.promote(version, "test")
    return root / "models"


def test_pushed_ct_is_predicted_with_valid_rtstruct_and_rollback(make_settings, tmp_path, trained_models):
    settings = make_settings(node={"port": free_port()},
                             series={"stable_age_s": 0.5, "poll_interval_s": 0.2, "min_slices": 5},
                             limits={"min_free_disk_bytes": 1048576}, compute={"device": "cpu"})
    shutil.copytree(trained_models, models_dir(settings))
    registry = ModelRegistry(models_dir(settings))
    versions = [m.version for m in registry.list()]
    current = registry.current().version
    patient = make_patient(50, rows=96, n_slices=32)
    pdir = write_patient(patient, tmp_path / "tps")
    cts = sorted(pdir.glob("CT_*.dcm"))
    with running_service(settings) as service:
        assert len(storescu(cts + [pdir / "RD.dcm"], service.scp.port).sent_ok) == len(cts) + 1
        case = wait_for(lambda: next(iter(service.store.list_cases(["PREDICTED"])), None), 60, what="PREDICTED")
        prediction = service.store.latest_prediction(case.id)
        assert prediction.model_version == current
        ct = load_case_volume(service.store, case.id, settings)
        mask = mask_from_npz(service.store.files.abspath(prediction.mask_path))
        assert mask.shape == ct.shape == patient.heart_mask.shape  # on the CT grid
        assert mask.any()
        dice = 2 * (mask & patient.heart_mask).sum() / (mask.sum() + patient.heart_mask.sum())
        print(f"Dice of the tiny test-trained model on an unseen phantom: {dice:.3f}")
        rs_path = service.store.files.abspath(prediction.rtstruct_path)
        rs = pydicom.dcmread(rs_path)
        assert rs.StructureSetROISequence[0].ROIName == "Heart_AI"
        assert rs.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"
        assert current in rs.SeriesDescription and rs.ApprovalStatus == "UNAPPROVED"
        assert rs.FrameOfReferenceUID == ct.frame_of_reference_uid
        if shutil.which("dciodvfy"):
            out = subprocess.run(["dciodvfy", str(rs_path)], capture_output=True, text=True, timeout=60)
            assert not [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]
        assert service.store.outputs() == []  # a prediction is for review: nothing goes to the TPS yet
        # The case has an RTDOSE: the prediction's mean heart dose is on record, with its model.
        from heartloop.dose import dose_on_mask

        doses = service.store.dose_results(case.id)
        assert [(d.label, d.model_version) for d in doses] == [("predicted", current)]
        expected = dose_on_mask(ct.with_array(mask), patient.dose.with_array(patient.dose.array.astype(np.float32)),
                                supersample=settings.dose.supersample)
        assert doses[0].mean_gy == pytest.approx(expected.mean_gy, rel=1e-3)

        # Roll back: the next prediction of this (unreviewed) case uses the older version.
        older = next(v for v in versions if v != current)
        assert main(["model", "rollback", older, "--data-dir", str(settings.storage_root)]) == 0
        wait_for(lambda: service.store.latest_prediction(case.id).model_version == older, 60,
                 what="re-prediction with the rolled-back model")
        assert len(service.store.predictions(case.id)) == 2  # the first prediction is kept
        assert enqueue_repredictions(service.store) >= 0
