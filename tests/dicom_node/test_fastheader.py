"""The receive fast path agrees with `read_header` wherever it answers, and declines the rest."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from heartloop.core.errors import DatasetRejected
from heartloop.dicom_node.fastheader import fast_ct_header
from heartloop.dicom_node.headers import read_header


def _ct(rows=16, cols=12, **extra) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "ID-1", "Doe^J"
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [-120.5, -99.25, 33.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = np.arange(rows * cols, dtype=np.uint16).tobytes()
    return ds


def _write(ds: Dataset, path: Path, syntax=ExplicitVRLittleEndian) -> int:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    raw = path.read_bytes()
    (group_len,) = struct.unpack_from("<L", raw, 132 + 8)
    return 132 + 12 + group_len


def _with_sequences() -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = generate_uid()
    nested = Dataset()
    nested.CodeValue, nested.CodingSchemeDesignator, nested.CodeMeaning = "T-D3000", "SRT", "Chest"
    item.PurposeOfReferenceCodeSequence = Sequence([nested])
    ds = _ct(ReferencedImageSequence=Sequence([item, item]))
    ds.AnatomicRegionSequence = Sequence([nested])
    return ds


@pytest.mark.parametrize("make", [_ct, _with_sequences], ids=["plain", "sequences"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_agrees_with_read_header(tmp_path, make, syntax):
    ds = make()
    path = tmp_path / "ct.dcm"
    offset = _write(ds, path, syntax)
    fast = fast_ct_header(path, str(syntax), offset)
    assert fast is not None
    assert fast == read_header(path)
    assert fast.patient_id == "ID-1"  # kept for matching, never logged (repr hides it)
    assert "ID-1" not in repr(fast)


def test_undefined_length_sequences_are_walked(tmp_path):
    ds = _with_sequences()
    path = tmp_path / "ct.dcm"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    raw = path.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in raw  # really written with sequence delimiters
    offset = 132 + 12 + struct.unpack_from("<L", raw, 140)[0]
    fast = fast_ct_header(path, str(ExplicitVRLittleEndian), offset)
    assert fast is not None and fast == read_header(path)


def test_truncated_pixels_refused(tmp_path):
    path = tmp_path / "ct.dcm"
    offset = _write(_ct(), path)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DatasetRejected, match="truncated"):
        fast_ct_header(path, str(ExplicitVRLittleEndian), offset)
    with pytest.raises(DatasetRejected):
        read_header(path)


def test_declines_what_it_does_not_handle(tmp_path):
    path = tmp_path / "ct.dcm"
    offset = _write(_ct(), path)
    assert fast_ct_header(path, "1.2.840.10008.1.2.2", offset) is None  # big endian: not ours
    bad = _ct()
    bad.ImagePositionPatient = [1, 2]
    offset = _write(bad, tmp_path / "bad.dcm")
    assert fast_ct_header(tmp_path / "bad.dcm", str(ExplicitVRLittleEndian), offset) is None
    nopos = _ct()
    del nopos.ImagePositionPatient
    offset = _write(nopos, tmp_path / "nopos.dcm")
    assert fast_ct_header(tmp_path / "nopos.dcm", str(ExplicitVRLittleEndian), offset) is None
    big = _ct()
    big.add_new(0x00091010, "OB", b"\x00" * 100_000)  # a private block bigger than the chunk
    offset = _write(big, tmp_path / "big.dcm")
    assert fast_ct_header(tmp_path / "big.dcm", str(ExplicitVRLittleEndian), offset) is None
    mr = _ct()
    mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    offset = _write(mr, tmp_path / "mr.dcm")
    assert fast_ct_header(tmp_path / "mr.dcm", str(ExplicitVRLittleEndian), offset) is None


def test_absurdly_nested_sequences_leave_the_fast_path_instead_of_raising():
    from heartloop.dicom_node.fastheader import parse_head

    # 5000 nested undefined-length sequences (explicit VR LE), deeper than Python's recursion limit.
    nested = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff") * 5000
    assert parse_head(nested, str(ExplicitVRLittleEndian), 0) is None
