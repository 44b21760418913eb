"""Corrections: submitted masks are stored voxel-exact with their row and the case becomes CORRECTED;
wrong grids are refused naming both shapes; the CLI and the clinical-RTSTRUCT import work."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from heartloop.core import CaseState
from heartloop.dicom_node.rtstruct import RoiSpec, build_rtstruct
from heartloop.phantom import make_patient, write_patient
from heartloop.phantom.patient import nifti_affine
from heartloop.service.cli import main
from heartloop.service.contouring import mask_to_npz
from heartloop.service.corrections import load_correction_arrays, submit_correction
from heartloop.service.lifecycle import assemble_series, recover_index
from heartloop.service.outputs import case_ct_datasets
from heartloop.store import Store


def ingest(store: Store, settings, files: list[Path]) -> None:
    """Put DICOM files where the node would have stored them and assemble their series (no network)."""
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        dest = store.files.abspath(store.files.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                                ds.SOPInstanceUID))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    recover_index(store)
    for series in sorted(store.stable_series(0.0, now=time.time() + 10), key=lambda s: s.modality != "CT"):
        assemble_series(store, settings, series.series_uid)


def add_case(store: Store, settings, patient, tmp_path: Path, *, prediction: np.ndarray | None = None) -> int:
    """A case of `patient`: PREDICTED with `prediction` (version 000001), else NO_MODEL."""
    directory = write_patient(patient, tmp_path / "tps")
    ingest(store, settings, sorted(directory.glob("CT_*.dcm")))
    case = next(c for c in store.list_cases() if c.frame_of_reference_uid == patient.volume.frame_of_reference_uid)
    if prediction is None:
        store.set_case_state(case.id, CaseState.NO_MODEL, "no model")
        return case.id
    rel = f"predictions/case{case.id:06d}/000001.npz"
    store.files.write_bytes(rel, mask_to_npz(prediction))
    store.record_prediction(case.id, model_version="000001", mask_path=rel, voxels=int(prediction.sum()),
                            volume_cc=1.0, seconds=0.1)
    store.set_case_state(case.id, CaseState.PREDICTED)
    return case.id


@pytest.fixture
def service_store(make_settings):
    settings = make_settings(series={"min_slices": 5}, compute={"device": "cpu"})
    store = Store.from_settings(settings)
    yield settings, store
    store.dispose()


def _strokes(truth: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fg = truth & ~prediction
    fg[1::2] = False
    bg = prediction & ~truth
    return fg, bg


def test_submit_on_predicted_and_no_model_cases(service_store, tmp_path):
    settings, store = service_store
    patient = make_patient(3, rows=64, n_slices=16)
    truth = patient.heart_mask
    predicted = np.roll(truth, 3, axis=2)
    case_id = add_case(store, settings, patient, tmp_path, prediction=predicted)
    fg, bg = _strokes(truth, predicted)

    correction_id = submit_correction(store, settings, case_id, foreground=fg, background=bg, corrected_by="Curie^M")

    (row,) = store.corrections()
    assert row.id == correction_id and row.case_id == case_id and row.kind == "sparse"
    assert (row.fg_voxels, row.bg_voxels) == (int(fg.sum()), int(bg.sum()))
    assert row.prediction_id == store.latest_prediction(case_id).id and row.split is None
    arrays = load_correction_arrays(store, row.path)
    np.testing.assert_array_equal(arrays.foreground, fg)
    np.testing.assert_array_equal(arrays.background, bg)
    np.testing.assert_array_equal(arrays.prediction, predicted)
    assert store.get_case(case_id).state == CaseState.CORRECTED.value
    assert not list(store.files.root.rglob("*.part"))  # written atomically, nothing left behind

    # Cold start: no prediction; the stored prediction is all false.
    other = make_patient(4, rows=64, n_slices=16)
    cold = add_case(store, settings, other, tmp_path)
    submit_correction(store, settings, cold, foreground=other.heart_mask, background=~other.heart_mask,
                      corrected_by="Curie^M", kind="dense")
    arrays = load_correction_arrays(store, store.corrections()[-1].path)
    assert not arrays.prediction.any() and store.corrections()[-1].prediction_id is None
    np.testing.assert_array_equal(arrays.foreground, other.heart_mask)
    assert store.get_case(cold).state == CaseState.CORRECTED.value


def test_submit_refuses_wrong_shape_overlap_and_empty(service_store, tmp_path):
    settings, store = service_store
    patient = make_patient(5, rows=64, n_slices=16)
    case_id = add_case(store, settings, patient, tmp_path, prediction=patient.heart_mask)
    wrong = np.zeros((16, 64, 63), dtype=bool)
    right = np.zeros(patient.heart_mask.shape, dtype=bool)
    with pytest.raises(ValueError) as err:
        submit_correction(store, settings, case_id, foreground=wrong, background=right, corrected_by="x")
    assert "(16, 64, 63)" in str(err.value) and str(patient.heart_mask.shape) in str(err.value)
    both = right.copy()
    both[8, 30, 30] = True
    with pytest.raises(ValueError, match="both foreground and background"):
        submit_correction(store, settings, case_id, foreground=both, background=both, corrected_by="x")
    with pytest.raises(ValueError, match="painted"):
        submit_correction(store, settings, case_id, foreground=right, background=right, corrected_by="x")
    assert store.corrections() == [] and store.get_case(case_id).state == CaseState.PREDICTED.value


def _write_nifti(mask: np.ndarray, volume, path: Path) -> Path:
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.uint8), nifti_affine(volume)), str(path))
    return path


def test_cli_correct(service_store, tmp_path, capsys):
    settings, store = service_store
    patient = make_patient(6, rows=64, n_slices=16)
    truth = patient.heart_mask
    predicted = np.roll(truth, -2, axis=1)
    case_id = add_case(store, settings, patient, tmp_path, prediction=predicted)
    fg, bg = _strokes(truth, predicted)
    fg_path = _write_nifti(fg, patient.volume, tmp_path / "fg.nii.gz")
    bg_path = _write_nifti(bg, patient.volume, tmp_path / "bg.nii.gz")
    root = str(settings.storage_root)

    assert main(["correct", "--case", str(case_id), "--foreground", str(fg_path), "--background", str(bg_path),
                 "--by", "Curie^M", "--data-dir", root]) == 0
    assert "CORRECTED" in capsys.readouterr().out
    (row,) = store.corrections()
    # The running service will send it, as after a save in the review UI.
    assert [(j.kind, j.payload_json) for j in store.jobs("PENDING")] == [
        ("finalise", f'{{"case_id": {case_id}, "correction_id": {row.id}}}')]
    arrays = load_correction_arrays(store, row.path)
    np.testing.assert_array_equal(arrays.foreground, fg)
    np.testing.assert_array_equal(arrays.background, bg)
    assert store.get_case(case_id).state == CaseState.CORRECTED.value

    small = _write_nifti(np.zeros((8, 32, 32), dtype=bool), make_patient(7, rows=32, n_slices=8).volume,
                         tmp_path / "small.nii.gz")
    assert main(["correct", "--case", str(case_id), "--foreground", str(small), "--background", str(bg_path),
                 "--by", "x", "--data-dir", root]) == 2
    assert "differs from the CT" in capsys.readouterr().err
    assert main(["correct", "--case", "999", "--from-rtstruct", "--data-dir", root]) == 2


def test_clinical_rtstruct_imported_as_dense_correction(service_store, tmp_path, capsys):
    settings, store = service_store
    patient = make_patient(8, rows=64, n_slices=16)
    case_id = add_case(store, settings, patient, tmp_path)
    assert main(["correct", "--case", str(case_id), "--from-rtstruct", "--data-dir",
                 str(settings.storage_root)]) == 2  # nothing linked yet
    ds = build_rtstruct(patient.volume.with_array(patient.heart_mask), case_ct_datasets(store, case_id, settings),
                        roi=RoiSpec(name="HEART", color=(255, 0, 0), algorithm="MANUAL"), model_version="clinical")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    (tmp_path / "RS.dcm").write_bytes(buf.getvalue())
    ingest(store, settings, [tmp_path / "RS.dcm"])
    assert store.linked_series(case_id, "RTSTRUCT")

    assert main(["correct", "--case", str(case_id), "--from-rtstruct", "--data-dir",
                 str(settings.storage_root)]) == 0
    (row,) = store.corrections()
    assert row.kind == "dense" and row.corrected_by == "TPS"
    arrays = load_correction_arrays(store, row.path)
    overlap = (arrays.foreground & patient.heart_mask).sum()
    assert 2 * overlap / (arrays.foreground.sum() + patient.heart_mask.sum()) > 0.9  # contour round trip
    np.testing.assert_array_equal(arrays.background, ~arrays.foreground)
    assert store.get_case(case_id).state == CaseState.CORRECTED.value
