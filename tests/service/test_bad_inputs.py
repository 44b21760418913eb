"""A corpus of bad inputs: each gets a specific status or case state with a readable reason, and
the node answers the next good push normally."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from heartloop.core import CaseState
from heartloop.phantom import make_patient, write_patient
from tests.helpers.dcmtk import storescu
from tests.helpers.procs import free_port, wait_for
from tests.helpers.service import ASSEMBLED, running_service

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def service(make_settings):
    settings = make_settings(
        node={"port": free_port()},
        series={"stable_age_s": 0.5, "poll_interval_s": 0.2, "min_slices": 5},
        limits={"min_free_disk_bytes": 1048576},
    )
    with running_service(settings) as svc:
        yield svc


def _write(datasets, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        p = out / f"CT_{n:04d}.dcm"
        pydicom.dcmwrite(p, ds, enforce_file_format=True)
        paths.append(p)
    return paths


def _new_series(datasets):
    """Deep copies with a fresh study/series/frame and SOP UIDs (so each case is its own)."""
    series, frame = generate_uid(), generate_uid()
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _case_of(service, series_uid):
    return wait_for(
        lambda: next((c for c in service.store.list_cases()
                      if c.ct_series_uid == series_uid and c.state not in ("RECEIVED",)), None),
        15, what="case assembled")


def _send_raw(port: int, path: Path) -> int | None:
    """Send a file's bytes as they are (pynetdicom chunked send: no decoding on our side)."""
    ae = AE(ae_title="TPS")
    ae.add_requested_context(CT_STORAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="HEARTLOOP")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return getattr(rsp, "Status", None)


@pytest.fixture(scope="module")
def base():
    return make_patient(11, rows=96, n_slices=24)


def _meta_only_file(path: Path, body: bytes) -> Path:
    """A file with a valid preamble + file meta for a CT, followed by `body` as the dataset."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + body)
    return path


def test_non_dicom_bytes_refused_and_quarantined(service, tmp_path):
    path = _meta_only_file(tmp_path / "garbage.dcm", b"this is not a DICOM data set, it is a text file\n" * 20)
    status = _send_raw(service.scp.port, path)
    assert status is not None and status != 0x0000
    assert (status & 0xF000) in (0xA000, 0xC000)
    q = service.store.quarantined()
    assert len(q) == 1 and q[0].status == status and q[0].reason
    assert service.store.counts()["instances"] == 0


def test_truncated_dataset_refused(service, tmp_path, base):
    good = _write(_new_series(base.ct_datasets[:1]), tmp_path / "one")[0]
    data = good.read_bytes()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(data[: len(data) // 2])
    status = _send_raw(service.scp.port, cut)
    assert status is not None and status != 0x0000
    row = service.store.quarantined()[-1]
    assert "truncat" in row.reason.lower() or "pixel" in row.reason.lower() or "end" in row.reason.lower(), row.reason
    assert service.store.counts()["instances"] == 0


def test_unsupported_sop_class_refused(service, tmp_path, base):
    ds = _new_series(base.ct_datasets[:1])[0]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "MR"
    path = _write([ds], tmp_path / "mr")[0]
    res = storescu([path], service.scp.port)
    assert res.sent_ok == []
    assert "presentation context" in res.output.lower() or "no acceptable" in res.output.lower(), res.output[-800:]
    assert service.store.counts()["instances"] == 0


@pytest.mark.parametrize("defect, state, words", [
    ("no_position", CaseState.UNSUPPORTED, ["ImagePositionPatient"]),
    ("mixed_orientation", CaseState.UNSUPPORTED, ["orientation"]),
    ("duplicate_slice", CaseState.UNSUPPORTED, ["z ="]),
    ("missing_slice", CaseState.INCOMPLETE, ["missing", "z ="]),
])
def test_bad_series_gets_state_and_reason(service, tmp_path, base, defect, state, words):
    ds_list = _new_series(base.ct_datasets)
    if defect == "no_position":
        del ds_list[7].ImagePositionPatient
    elif defect == "mixed_orientation":
        for ds in ds_list[:5]:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    elif defect == "duplicate_slice":
        dup = copy.deepcopy(ds_list[10])
        dup.SOPInstanceUID = generate_uid()
        dup.file_meta.MediaStorageSOPInstanceUID = dup.SOPInstanceUID
        ds_list.append(dup)
    elif defect == "missing_slice":
        del ds_list[12]
    paths = _write(ds_list, tmp_path / defect)
    res = storescu(paths, service.scp.port)
    assert len(res.sent_ok) == len(paths), res.output[-1000:]
    case = _case_of(service, ds_list[0].SeriesInstanceUID)
    assert case.state == state.value
    for w in words:
        assert w.lower() in case.reason.lower(), case.reason
    assert "PHANTOM" not in case.reason and str(base.patient_id) not in case.reason


def test_rtdose_with_unknown_frame_of_reference(service, tmp_path, base):
    rd = copy.deepcopy(base.rtdose)
    rd.FrameOfReferenceUID = generate_uid()
    rd.SeriesInstanceUID = generate_uid()
    rd.SOPInstanceUID = generate_uid()
    rd.file_meta.MediaStorageSOPInstanceUID = rd.SOPInstanceUID
    path = tmp_path / "RD.dcm"
    pydicom.dcmwrite(path, rd, enforce_file_format=True)
    res = storescu([path], service.scp.port)
    assert len(res.sent_ok) == 1
    series = wait_for(lambda: (s := service.store.get_series(rd.SeriesInstanceUID)) and s.state != "OPEN" and s,
                      15, what="RTDOSE series examined")
    assert series.state == "UNLINKED"
    assert "frame of reference" in series.reason and "push the planning CT" in series.reason


def test_node_answers_next_good_push_after_bad_ones(service, tmp_path, base):
    _send_raw(service.scp.port, _meta_only_file(tmp_path / "junk.dcm", b"\xff" * 1000))
    good = _write(_new_series(base.ct_datasets), tmp_path / "good")
    res = storescu(good, service.scp.port)
    assert len(res.sent_ok) == len(good)
    case = _case_of(service, pydicom.dcmread(good[0]).SeriesInstanceUID)
    assert case.state in ASSEMBLED
