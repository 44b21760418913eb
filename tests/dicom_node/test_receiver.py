"""The lean storage receiver speaks the DICOM upper layer correctly and survives misbehaving peers."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from heartloop.dicom_node.receiver import decode_command, encode_command, file_meta_bytes
from heartloop.dicom_node.scp import make_node
from heartloop.store import Store
from tests.helpers.dcmtk import echoscu
from tests.helpers.procs import free_port, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(params=["lean", "pynetdicom"])
def node(request, make_settings):
    settings = make_settings(node={"port": free_port(), "engine": request.param, "max_associations": 3,
                                   "network_timeout_s": 5.0, "acse_timeout_s": 5.0,
                                   "allowed_callers": [{"ae_title": "TPS", "hosts": ["127.0.0.1"]},
                                                       {"ae_title": "REMOTE_ONLY", "hosts": ["10.9.9.9"]}]},
                             limits={"min_free_disk_bytes": 1048576})
    store = Store.from_settings(settings)
    scp = make_node(settings, store)
    scp.start()
    yield scp, store
    scp.stop()
    store.dispose()


def _echo_ok(port: int, calling: str = "TPS") -> bool:
    return echoscu(port, calling=calling).returncode == 0


def test_echo_and_caller_rules(node):
    scp, _ = node
    assert _echo_ok(scp.port)
    assert not _echo_ok(scp.port, "STRANGER")  # unknown AE title
    assert not _echo_ok(scp.port, "REMOTE_ONLY")  # known title, wrong host


def test_pynetdicom_requestor_interoperates(node):
    scp, _ = node
    ae = AE("TPS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="HEARTLOOP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released


def test_garbage_and_silent_connections_do_not_hurt(node):
    scp, _ = node
    with socket.create_connection(("127.0.0.1", scp.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            s.recv(100)
        except OSError:
            pass
    socket.create_connection(("127.0.0.1", scp.port)).close()
    assert _echo_ok(scp.port)


def test_peer_vanishing_mid_dataset_keeps_nothing_partial(node):
    scp, store = node
    ae = AE("TPS")
    ae.add_requested_context(CT, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="HEARTLOOP")
    assert assoc.is_established
    cid = assoc.accepted_contexts[0].context_id
    command = encode_command([(0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x0100, struct.pack("<H", 1)),
                              (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
                              (0x0800, struct.pack("<H", 0)), (0x1000, b"1.2.3.4.5.6\x00")])
    pdv = struct.pack(">LBB", len(command) + 2, cid, 0x03) + command
    data = struct.pack(">LBB", 1002, cid, 0x00) + b"\x08\x00" * 500  # not the last fragment
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 4, 0, len(pdv)) + pdv + struct.pack(">BBL", 4, 0, len(data)) + data)
    time.sleep(0.2)
    raw.shutdown(socket.SHUT_RDWR)
    raw.close()
    assoc.kill() if hasattr(assoc, "kill") else None
    wait_for(lambda: _echo_ok(scp.port), 10, what="node still answering")
    assert store.counts()["instances"] == 0 and store.counts()["quarantined"] == 0
    if scp.settings.node.engine == "lean":
        wait_for(lambda: list(store.files.incoming_dir.iterdir()) == [], 10, what="partial temp file removed")
    else:
        # pynetdicom leaves its temp file behind on an abort; the service's janitor removes
        # incoming files untouched for longer than the network timeout (here: at once).
        time.sleep(0.3)
        assert store.files.clean_incoming(older_than_s=0.1) >= 1
        assert list(store.files.incoming_dir.iterdir()) == []


def test_association_limit(node):
    scp, _ = node
    held = []
    for _ in range(3):
        ae = AE("TPS")
        ae.add_requested_context(Verification)
        a = ae.associate("127.0.0.1", scp.port, ae_title="HEARTLOOP")
        assert a.is_established
        held.append(a)
    try:
        assert not _echo_ok(scp.port)  # the 4th is refused while 3 are open
    finally:
        for a in held:
            a.release()
    wait_for(lambda: _echo_ok(scp.port), 10, what="a free association slot")


def test_command_codec_round_trip():
    elems = [(0x0100, struct.pack("<H", 0x8001)), (0x0002, b"1.2.3\x00"), (0x0900, struct.pack("<H", 0))]
    decoded = decode_command(encode_command(elems))
    assert decoded[0x0100] == struct.pack("<H", 0x8001) and decoded[0x0002] == b"1.2.3\x00"
    assert struct.unpack("<L", decoded[0x0000])[0] == sum(8 + len(v) for _, v in elems)


def test_file_meta_is_valid_dicom(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "Nobody"
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    path = tmp_path / "x.dcm"
    path.write_bytes(file_meta_bytes(CT, "1.2.3.4", "1.2.840.10008.1.2.1", "TPS") + buf.getvalue())
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.file_meta.SourceApplicationEntityTitle == "TPS" and back.SOPInstanceUID == "1.2.3.4"


def test_pynetdicom_engine_restores_tempdir(make_settings):
    import tempfile

    before = tempfile.tempdir
    settings = make_settings(node={"port": free_port(), "engine": "pynetdicom"})
    store = Store.from_settings(settings)
    scp = make_node(settings, store)
    scp.start()
    assert tempfile.tempdir == str(store.files.incoming_dir)
    scp.stop()
    store.dispose()
    assert tempfile.tempdir == before


def test_stored_files_are_exactly_what_was_sent_whatever_the_size_order(make_settings, tmp_path):
    """The lean receiver reserves each next file at the last data set's size and parses CT headers
    while data still arrive: a smaller data set after a larger one must be trimmed, a larger one
    grow, a small one (header not complete early) be parsed at the end — all byte for byte."""
    import pydicom

    from heartloop.phantom import make_patient, write_patient
    from tests.helpers.dcmtk import storescu

    big = sorted(write_patient(make_patient(3, rows=256, n_slices=40), tmp_path / "big").glob("CT_*.dcm"))
    small = sorted(write_patient(make_patient(4, rows=64, n_slices=40), tmp_path / "small").glob("CT_*.dcm"))
    order = [big[0], small[0], big[1], small[1], big[2]]
    settings = make_settings(node={"port": free_port(), "engine": "lean"}, limits={"min_free_disk_bytes": 1048576})
    store = Store.from_settings(settings)
    scp = make_node(settings, store)
    scp.start()
    try:
        result = storescu(order, scp.port)
        assert result.returncode == 0 and len(result.sent_ok) == len(order), result.output[-2000:]
        for sent in order:
            original = pydicom.dcmread(sent)
            row = store.get_instance(original.SOPInstanceUID)
            assert row is not None
            stored_path = store.files.abspath(row.path)
            stored = pydicom.dcmread(stored_path)
            assert stored.PixelData == original.PixelData
            assert stored.ImagePositionPatient == original.ImagePositionPatient
            # Nothing after the last element: the reserved rest was trimmed.
            assert stored_path.read_bytes().endswith(original.PixelData)
            assert row.size_bytes == stored_path.stat().st_size
    finally:
        scp.stop()
        store.dispose()
