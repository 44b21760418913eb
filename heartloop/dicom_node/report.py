"""The dose report sent back to the TPS: a DICOM Comprehensive SR built with highdicom.

Content tree (relationship, value type, concept name; codes in the table below)::

    CONTAINER  Heart dose report                                   (99HEARTLOOP HL0001)
      HAS CONCEPT MOD  CODE  Finding Site = Heart                   (SCT 363698007 = SCT 80891009)
      CONTAINS  TEXT  Algorithm Name = "HeartLoop heart contouring"  (DCM 111001)
      CONTAINS  TEXT  Algorithm Version = model version              (DCM 111003)
      CONTAINS  PNAME Contour corrected by = person                  (99HEARTLOOP HL0030)
      CONTAINS  CONTAINER  Predicted heart contour                   (99HEARTLOOP HL0010)
        CONTAINS  TEXT  ROI name                                     (99HEARTLOOP HL0042)
        CONTAINS  NUM   Mean Absorbed Radiation Dose [Gy]            (DCM 128533, UCUM Gy)
        CONTAINS  NUM   Volume [cm3]   (when known)                  (SCT 118565006, UCUM cm3)
        CONTAINS  COMPOSITE  Source of Measurement → RTSTRUCT        (DCM 121112; when known)
      CONTAINS  CONTAINER  Corrected heart contour                   (99HEARTLOOP HL0011)
        (same children; the RTSTRUCT reference is always present)
      CONTAINS  NUM   Mean heart dose difference, corrected minus predicted [Gy]  (99HEARTLOOP HL0020)
      CONTAINS  TEXT  Dose difference assessment (when given)        (99HEARTLOOP HL0050)
      CONTAINS  COMPOSITE  Dose distribution used → RTDOSE (one per instance)     (99HEARTLOOP HL0040)

Private codes (coding scheme designator ``99HEARTLOOP``, declared in the
CodingSchemeIdentificationSequence of every report):

======  =========================================================
HL0001  Heart dose report
HL0010  Predicted heart contour
HL0011  Corrected heart contour
HL0020  Mean heart dose difference, corrected minus predicted
HL0030  Contour corrected by
HL0040  Dose distribution used
HL0042  ROI name
HL0050  Dose difference assessment
======  =========================================================

Standard codes are used where DICOM has one (DCM 128533 "Mean Absorbed Radiation Dose", DCM 111001
/ 111003 "Algorithm Name / Version", DCM 121112 "Source of Measurement", SCT "Finding Site" /
"Heart" / "Volume"). Doses are in Gy (UCUM ``Gy``), rounded to 0.1 mGy.

The SR is a new series (new Series and SOP Instance UIDs) in the CT's patient and study; every
referenced RTSTRUCT and RTDOSE is listed as evidence (CurrentRequestedProcedureEvidenceSequence,
or PertinentOtherEvidenceSequence when in another study). It is COMPLETE, UNVERIFIED and
PRELIMINARY: a person has corrected the contour but nobody has signed the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

log = logging.getLogger(__name__)

PRIVATE_SCHEME = "99HEARTLOOP"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
MANUFACTURER = "HeartLoop"
MANUFACTURER_MODEL_NAME = "HeartLoop heart contouring"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


class Codes:
    """Concept names of the report (see the module docstring for the tree)."""

    REPORT = _private("HL0001", "Heart dose report")
    PREDICTED_CONTOUR = _private("HL0010", "Predicted heart contour")
    CORRECTED_CONTOUR = _private("HL0011", "Corrected heart contour")
    MEAN_DOSE_DIFFERENCE = _private("HL0020", "Mean heart dose difference, corrected minus predicted")
    CORRECTED_BY = _private("HL0030", "Contour corrected by")
    DOSE_USED = _private("HL0040", "Dose distribution used")
    ROI_NAME = _private("HL0042", "ROI name")
    ASSESSMENT = _private("HL0050", "Dose difference assessment")
    MEAN_ABSORBED_DOSE = CodedConcept("128533", "DCM", "Mean Absorbed Radiation Dose")
    ALGORITHM_NAME = CodedConcept("111001", "DCM", "Algorithm Name")
    ALGORITHM_VERSION = CodedConcept("111003", "DCM", "Algorithm Version")
    SOURCE_OF_MEASUREMENT = CodedConcept("121112", "DCM", "Source of Measurement")
    FINDING_SITE = CodedConcept("363698007", "SCT", "Finding Site")
    HEART = CodedConcept("80891009", "SCT", "Heart")
    VOLUME = CodedConcept("118565006", "SCT", "Volume")
    GY = CodedConcept("Gy", "UCUM", "Gy")
    CM3 = CodedConcept("cm3", "UCUM", "cm3")


@dataclass(frozen=True)
class InstanceRef:
    """Identity of a referenced DICOM instance (what an SR needs to point at it)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid"):
            if not getattr(self, name):
                raise ValueError(f"InstanceRef.{name} is required")

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "InstanceRef":
        """From a dataset (its header is enough)."""
        return cls(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID))


@dataclass(frozen=True)
class ContourDose:
    """The dose of one heart contour as the report states it.

    Parameters
    ----------
    mean_gy
        Mean dose (Gy) of the structure.
    roi_name
        ROI name of the contour (1-64 characters).
    rtstruct
        The RTSTRUCT holding the contour, when there is one.
    volume_cc
        Structure volume (cm³), optional.
    """

    mean_gy: float
    roi_name: str
    rtstruct: InstanceRef | None = None
    volume_cc: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean_gy) or self.mean_gy < 0:
            raise ValueError(f"mean dose must be a finite non-negative number of Gy, got {self.mean_gy!r}")
        if not 1 <= len(self.roi_name) <= 64:
            raise ValueError(f"ROI name must be 1-64 characters, got {self.roi_name!r}")
        if self.volume_cc is not None and (not math.isfinite(self.volume_cc) or self.volume_cc < 0):
            raise ValueError(f"volume must be a finite non-negative number of cm3, got {self.volume_cc!r}")


def _gy(value: float) -> float:
    return round(float(value), 4)


def _contour_container(name: CodedConcept, contour: ContourDose) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=name, relationship_type="CONTAINS")
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(Codes.ROI_NAME, contour.roi_name, relationship_type="CONTAINS"),
        hd.sr.NumContentItem(Codes.MEAN_ABSORBED_DOSE, _gy(contour.mean_gy), Codes.GY, relationship_type="CONTAINS"),
    ]
    if contour.volume_cc is not None:
        items.append(hd.sr.NumContentItem(Codes.VOLUME, round(float(contour.volume_cc), 3), Codes.CM3,
                                          relationship_type="CONTAINS"))
    if contour.rtstruct is not None:
        items.append(hd.sr.CompositeContentItem(
            Codes.SOURCE_OF_MEASUREMENT, contour.rtstruct.sop_class_uid, contour.rtstruct.sop_instance_uid,
            relationship_type="CONTAINS",
        ))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


_PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def _evidence(ref: InstanceRef, ct: Dataset | None = None) -> Dataset:
    ds = Dataset()
    if ct is not None:  # highdicom takes patient and study from the first evidence item
        for keyword in _PATIENT_STUDY_KEYWORDS:
            if keyword == "SpecificCharacterSet" and keyword not in ct:
                continue
            setattr(ds, keyword, ct.get(keyword, ""))
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.StudyInstanceUID = ref.study_instance_uid
    return ds


def _package_version() -> str:
    try:
        return metadata.version("heartloop")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_dose_report(
    ct: Dataset,
    *,
    predicted: ContourDose | None,
    corrected: ContourDose,
    rtdoses: Sequence[InstanceRef],
    model_version: str,
    corrected_by: str,
    assessment: str | None = None,
    series_number: int = 902,
) -> Dataset:
    """Build the Comprehensive SR reporting the mean heart dose of a predicted and a corrected contour.

    Parameters
    ----------
    ct
        One CT dataset (header) of the case: the report's patient and study are copied from it.
    predicted, corrected
        Mean dose, ROI name and RTSTRUCT of each contour. The corrected contour's RTSTRUCT is
        required and must be in the CT's study (it is the structure sent back with the report).
        `predicted` is None when there was no prediction to compare with (cold start: the heart
        was drawn by hand, or the model predicted nothing): the report then gives the corrected
        heart's dose alone, without a difference.
    rtdoses
        The RTDOSE instance(s) the doses were computed from (several when BEAM doses were summed).
    model_version
        Registry version of the model that predicted the contour (1-64 characters).
    corrected_by
        Person who corrected the contour, as a DICOM person name (``"Family^Given"``).
    assessment
        Optional sentence on the difference (e.g. why it was flagged).
    series_number
        Series Number of the new SR series.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR (a `highdicom.sr.ComprehensiveSR`) with file meta for Explicit VR Little Endian;
        write it with ``dcmwrite(path, ds, enforce_file_format=True)``.

    Raises
    ------
    ValueError
        On a missing corrected RTSTRUCT, an RTSTRUCT from another study, no RTDOSE, or an empty
        person name or model version.
    """
    model_version = str(model_version)
    if not 1 <= len(model_version) <= 64:
        raise ValueError(f"model_version must be 1-64 characters, got {model_version!r}")
    if not corrected_by or not str(corrected_by).strip():
        raise ValueError("corrected_by must name the person who corrected the contour")
    if corrected.rtstruct is None:
        raise ValueError("the corrected contour's RTSTRUCT is required: the report references what is sent back")
    study_uid = str(ct.StudyInstanceUID)
    if corrected.rtstruct.study_instance_uid != study_uid:
        raise ValueError("the corrected RTSTRUCT is not in the CT's study; build it from the case's CT")
    if not rtdoses:
        raise ValueError("no RTDOSE reference: a dose report must name the dose it was computed from")

    root = hd.sr.ContainerContentItem(name=Codes.REPORT)
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(Codes.FINDING_SITE, Codes.HEART, relationship_type="HAS CONCEPT MOD"),
        hd.sr.TextContentItem(Codes.ALGORITHM_NAME, MANUFACTURER_MODEL_NAME, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(Codes.ALGORITHM_VERSION, model_version, relationship_type="CONTAINS"),
        hd.sr.PnameContentItem(Codes.CORRECTED_BY, str(corrected_by).strip(), relationship_type="CONTAINS"),
    ]
    difference: float | None = None
    if predicted is not None:
        difference = _gy(corrected.mean_gy) - _gy(predicted.mean_gy)
        items.append(_contour_container(Codes.PREDICTED_CONTOUR, predicted))
    items.append(_contour_container(Codes.CORRECTED_CONTOUR, corrected))
    if difference is not None:
        items.append(hd.sr.NumContentItem(Codes.MEAN_DOSE_DIFFERENCE, round(difference, 4), Codes.GY,
                                          relationship_type="CONTAINS"))
    if assessment:
        items.append(hd.sr.TextContentItem(Codes.ASSESSMENT, assessment, relationship_type="CONTAINS"))
    for ref in rtdoses:
        items.append(hd.sr.CompositeContentItem(Codes.DOSE_USED, ref.sop_class_uid, ref.sop_instance_uid,
                                                relationship_type="CONTAINS"))
    root.ContentSequence = hd.sr.ContentSequence(items)

    refs = ([corrected.rtstruct] + ([predicted.rtstruct] if predicted is not None and predicted.rtstruct is not None
                                     else []) + list(rtdoses))
    evidence = [_evidence(refs[0], ct)] + [_evidence(r) for r in refs[1:]]
    scheme = CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="HeartLoop concepts", responsible_organization="HeartLoop",
    )
    texts = [str(corrected_by), predicted.roi_name if predicted is not None else "", corrected.roi_name, model_version,
             assessment or ""]
    charset = ct.get("SpecificCharacterSet")
    if not all(t.isascii() for t in texts):
        charset = "ISO_IR 192"  # UTF-8 holds our text and whatever the CT's names were decoded from
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"HeartLoop heart dose report (model {model_version})"[:64],
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=f"heartloop {_package_version()}",
        coding_schemes=[scheme],
        specific_character_set=charset,
    )
    sr.copy_patient_and_study_information(ct)
    if predicted is not None and difference is not None:
        log.info("dose report %s: predicted %.2f Gy, corrected %.2f Gy, difference %+.2f Gy (model %s)",
                 sr.SOPInstanceUID, predicted.mean_gy, corrected.mean_gy, difference, model_version)
    else:
        log.info("dose report %s: corrected %.2f Gy, no prediction to compare (model %s)",
                 sr.SOPInstanceUID, corrected.mean_gy, model_version)
    return sr


__all__ = ["Codes", "ContourDose", "InstanceRef", "PRIVATE_SCHEME", "build_dose_report"]
