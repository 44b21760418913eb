"""DICOM datasets for phantoms: a CT Image Storage series and an RT Dose Storage object.

The builders take a `Volume` and identifiers, so tests can also wrap volumes of their own (a
series with a missing slice, a shifted dose grid ...). Every DS value is formatted to at most
16 characters; pixel data is little-endian, and datasets carry Explicit VR Little Endian file meta.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from heartloop.core.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RESCALE_INTERCEPT = -1024
MANUFACTURER = "HeartLoop"
MODEL_NAME = "Synthetic thorax phantom"
_UINT32_MAX = 2**32 - 1


def derived_uid(*parts: object) -> str:
    """A UID determined by ``parts`` (same parts, same UID), under pydicom's root."""
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["heartloop-phantom", *(str(p) for p in parts)])


def ds(value: float) -> str:
    """A DS string (≤ 16 characters) for ``value``."""
    value = float(value)
    if value == 0.0:
        return "0"
    text = format_number_as_ds(value)
    if len(text) > 16:  # pragma: no cover - format_number_as_ds guarantees this
        raise ValueError(f"cannot format {value} as DS")
    return text


def _ds_list(values: Iterable[float]) -> list[str]:
    return [ds(v) for v in values]


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HEARTLOOP_PH"
    return meta


def _patient_study(
    ds_: Dataset,
    *,
    patient_id: str,
    patient_name: str,
    patient_sex: str,
    patient_birth_date: str,
    study_uid: str,
    study_date: str,
    study_time: str,
    study_id: str,
    accession_number: str,
    study_description: str,
) -> None:
    ds_.PatientName = patient_name
    ds_.PatientID = patient_id
    ds_.PatientBirthDate = patient_birth_date
    ds_.PatientSex = patient_sex
    ds_.StudyInstanceUID = study_uid
    ds_.StudyDate = study_date
    ds_.StudyTime = study_time
    ds_.ReferringPhysicianName = ""
    ds_.StudyID = study_id
    ds_.AccessionNumber = accession_number
    ds_.StudyDescription = study_description


def _geometry(ds_: Dataset, volume: Volume, k: int) -> None:
    ds_.ImagePositionPatient = _ds_list(volume.slice_position(k))
    ds_.ImageOrientationPatient = _ds_list([*volume.row_direction, *volume.column_direction])
    ds_.PixelSpacing = _ds_list(volume.pixel_spacing)


def ct_datasets_from_volume(
    volume: Volume,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    patient_sex: str = "O",
    patient_birth_date: str = "",
    study_date: str = "20240101",
    study_time: str = "090000",
    study_id: str = "1",
    accession_number: str = "",
    study_description: str = "RT planning",
    series_number: int = 1,
    series_description: str = "Planning CT",
    sop_instance_uids: Sequence[str] | None = None,
    slice_thicknesses: Sequence[float] | np.ndarray | None = None,
    kvp: float = 120.0,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of a HU volume, ordered as the volume (k = 0 first).

    Parameters
    ----------
    volume
        Integer Hounsfield units. Stored as ``HU + 1024`` (RescaleIntercept -1024, slope 1):
        unsigned 12-bit when all values lie in [-1024, 3071], otherwise signed 16-bit.
    patient_id, patient_name, study_uid, series_uid
        Identity of the series.
    sop_instance_uids
        One per slice; derived from ``series_uid`` and the slice index when omitted.
    slice_thicknesses
        Nominal thickness per slice (mm); by default each slice's share of its two gaps.
    Other parameters
        Patient, study and series attributes written as given.

    Raises
    ------
    ValueError
        For a non-integer volume, values that cannot be stored, or a wrong number of UIDs.
    """
    hu = volume.array
    if not np.issubdtype(hu.dtype, np.integer):
        raise ValueError(f"CT volume must hold integer HU, got {hu.dtype}")
    lo, hi = int(hu.min()), int(hu.max())
    stored_dtype: np.dtype[Any]
    if lo >= RESCALE_INTERCEPT and hi <= RESCALE_INTERCEPT + 4095:
        stored_dtype, bits_stored, signed = np.dtype("<u2"), 12, False
    elif lo + 1024 >= -32768 and hi + 1024 <= 32767:
        stored_dtype, bits_stored, signed = np.dtype("<i2"), 16, True
    else:
        raise ValueError(f"HU range [{lo}, {hi}] cannot be stored as 16-bit pixels")
    n = hu.shape[0]
    if sop_instance_uids is None:
        sop_instance_uids = [derived_uid(series_uid, "ct", k) for k in range(n)]
    if len(sop_instance_uids) != n:
        raise ValueError(f"{len(sop_instance_uids)} SOP Instance UIDs for {n} slices")
    if slice_thicknesses is None:
        offsets = volume.slice_offsets
        if n == 1:
            slice_thicknesses = [1.0]
        else:
            gaps = np.diff(offsets)
            padded = np.concatenate([[gaps[0]], gaps, [gaps[-1]]])
            slice_thicknesses = list(0.5 * (padded[:-1] + padded[1:]))
    if len(slice_thicknesses) != n:
        raise ValueError(f"{len(slice_thicknesses)} slice thicknesses for {n} slices")
    frame_uid = volume.frame_of_reference_uid
    datasets = []
    for k in range(n):
        sop_uid = sop_instance_uids[k]
        d = Dataset()
        d.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid)
        d.SpecificCharacterSet = "ISO_IR 100"
        d.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        d.SOPClassUID = CT_IMAGE_STORAGE
        d.SOPInstanceUID = sop_uid
        d.StudyDate = study_date
        d.SeriesDate = study_date
        d.ContentDate = study_date
        d.StudyTime = study_time
        d.SeriesTime = study_time
        d.ContentTime = study_time
        d.Modality = "CT"
        d.Manufacturer = MANUFACTURER
        d.ManufacturerModelName = MODEL_NAME
        _patient_study(
            d, patient_id=patient_id, patient_name=patient_name, patient_sex=patient_sex,
            patient_birth_date=patient_birth_date, study_uid=study_uid, study_date=study_date,
            study_time=study_time, study_id=study_id, accession_number=accession_number,
            study_description=study_description,
        )
        d.SeriesDescription = series_description
        d.BodyPartExamined = "CHEST"
        d.SliceThickness = ds(slice_thicknesses[k])
        d.KVP = ds(kvp)
        d.PatientPosition = "HFS"
        d.SeriesInstanceUID = series_uid
        d.SeriesNumber = int(series_number)
        d.AcquisitionNumber = 1
        d.InstanceNumber = k + 1
        _geometry(d, volume, k)
        d.FrameOfReferenceUID = frame_uid
        d.PositionReferenceIndicator = ""
        d.SliceLocation = ds(float(volume.slice_position(k) @ volume.normal))
        d.SamplesPerPixel = 1
        d.PhotometricInterpretation = "MONOCHROME2"
        d.Rows = int(hu.shape[1])
        d.Columns = int(hu.shape[2])
        d.BitsAllocated = 16
        d.BitsStored = bits_stored
        d.HighBit = bits_stored - 1
        d.PixelRepresentation = 1 if signed else 0
        d.WindowCenter = "40"
        d.WindowWidth = "400"
        d.RescaleIntercept = str(RESCALE_INTERCEPT)
        d.RescaleSlope = "1"
        d.RescaleType = "HU"
        d.PixelData = (hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype(stored_dtype).tobytes()
        datasets.append(d)
    return datasets


def dose_grid_scaling_for(max_dose_gy: float) -> float:
    """A DoseGridScaling (Gy per stored unit) giving µGy resolution, coarser only for huge doses."""
    scaling = 1e-6
    while max_dose_gy / scaling > _UINT32_MAX:
        scaling *= 10.0
    return float(ds(scaling))


def rtdose_dataset(
    dose: Volume,
    ct_datasets: Sequence[Dataset],
    *,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    plan_uid: str | None = None,
    series_number: int = 900,
    series_description: str = "Plan dose",
    dose_grid_scaling: float | None = None,
    dose_summation_type: str = "PLAN",
) -> Dataset:
    """An RT Dose Storage dataset (GY, PHYSICAL) on the dose volume's own grid.

    Patient, study and frame of reference attributes are copied from ``ct_datasets``; the dose
    must share the CT's frame of reference. Pixel data are 32-bit unsigned integers scaled by
    ``dose_grid_scaling`` (default from `dose_grid_scaling_for`). UIDs default to values derived
    from the CT series, so the same CT gives the same RTDOSE UIDs.

    Raises
    ------
    ValueError
        On a frame of reference mismatch, negative doses or doses too large for the scaling.
    """
    if not ct_datasets:
        raise ValueError("need the CT datasets the dose belongs to")
    ct = ct_datasets[0]
    if dose.frame_of_reference_uid != ct.FrameOfReferenceUID:
        raise ValueError("the dose is not in the frame of reference of the CT")
    values = np.asarray(dose.array, dtype=np.float64)
    if values.min() < 0:
        raise ValueError("dose must be non-negative")
    scaling = dose_grid_scaling if dose_grid_scaling is not None else dose_grid_scaling_for(float(values.max()))
    stored = np.rint(values / scaling)
    if stored.max() > _UINT32_MAX:
        raise ValueError("dose too large for the given DoseGridScaling")
    base = str(ct.SeriesInstanceUID)
    series_uid = series_uid or derived_uid(base, "rtdose-series")
    sop_instance_uid = sop_instance_uid or derived_uid(base, "rtdose")
    plan_uid = plan_uid or derived_uid(base, "rtplan")

    d = Dataset()
    d.file_meta = _file_meta(RT_DOSE_STORAGE, sop_instance_uid)
    d.SpecificCharacterSet = "ISO_IR 100"
    d.SOPClassUID = RT_DOSE_STORAGE
    d.SOPInstanceUID = sop_instance_uid
    d.ContentDate = ct.StudyDate
    d.ContentTime = ct.StudyTime
    d.Modality = "RTDOSE"
    d.Manufacturer = MANUFACTURER
    d.ManufacturerModelName = MODEL_NAME
    _patient_study(
        d, patient_id=ct.PatientID, patient_name=ct.PatientName, patient_sex=ct.PatientSex,
        patient_birth_date=ct.PatientBirthDate, study_uid=ct.StudyInstanceUID, study_date=ct.StudyDate,
        study_time=ct.StudyTime, study_id=ct.StudyID, accession_number=ct.AccessionNumber,
        study_description=ct.get("StudyDescription", ""),
    )
    d.SeriesDescription = series_description
    d.OperatorsName = ""
    d.SeriesInstanceUID = series_uid
    d.SeriesNumber = int(series_number)
    d.InstanceNumber = 1
    d.FrameOfReferenceUID = ct.FrameOfReferenceUID
    d.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    _geometry(d, dose, 0)
    d.SliceThickness = ""
    d.SamplesPerPixel = 1
    d.PhotometricInterpretation = "MONOCHROME2"
    d.NumberOfFrames = int(values.shape[0])
    d.FrameIncrementPointer = (0x3004, 0x000C)
    d.Rows = int(values.shape[1])
    d.Columns = int(values.shape[2])
    d.BitsAllocated = 32
    d.BitsStored = 32
    d.HighBit = 31
    d.PixelRepresentation = 0
    d.DoseUnits = "GY"
    d.DoseType = "PHYSICAL"
    d.DoseSummationType = dose_summation_type
    d.GridFrameOffsetVector = _ds_list(dose.slice_offsets)
    d.DoseGridScaling = ds(scaling)
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
    ref.ReferencedSOPInstanceUID = plan_uid
    d.ReferencedRTPlanSequence = DicomSequence([ref])
    d.PixelData = stored.astype("<u4").tobytes()
    return d


def quantised_dose(dose_gy: np.ndarray, scaling: float) -> np.ndarray:
    """Dose as it reads back from an RTDOSE with the given scaling (float64, Gy)."""
    return np.rint(np.asarray(dose_gy, dtype=np.float64) / scaling) * scaling
