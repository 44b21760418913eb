"""Synthetic thorax patients (planning CT, RTDOSE, true heart) for demos, tests and benchmarks.

``make_patient(seed=7)`` returns a `Patient`; the same arguments always give the same pixels and
UIDs. Imports nothing of ours but `heartloop.core`.
"""

from heartloop.phantom.dicom import ct_datasets_from_volume, rtdose_dataset
from heartloop.phantom.metrics import best_threshold_window, mean_heart_dose_gy, threshold_only_dice
from heartloop.phantom.patient import Patient, make_patient, nifti_affine, write_cohort, write_patient

__all__ = [
    "Patient",
    "best_threshold_window",
    "ct_datasets_from_volume",
    "make_patient",
    "mean_heart_dose_gy",
    "nifti_affine",
    "rtdose_dataset",
    "threshold_only_dice",
    "write_cohort",
    "write_patient",
]
