"""Dose on structures: mean/max/DVH of a mask or of planar contours on a dose grid, and deltas.

Pure numpy/scipy; knows nothing of DICOM (DESIGN.md §2): `dicom_node` reads RTDOSE into a dose
`Volume` and RTSTRUCT into `PlanarContours`, and `service` wires them to the functions here.
"""

from heartloop.dose.delta import DoseDelta, DoseThresholds, compare
from heartloop.dose.resample import dose_on_grid
from heartloop.dose.structure import V_LEVELS_GY, DoseStats, dose_on_contours, dose_on_mask

__all__ = [
    "V_LEVELS_GY",
    "DoseDelta",
    "DoseStats",
    "DoseThresholds",
    "compare",
    "dose_on_contours",
    "dose_on_grid",
    "dose_on_mask",
]
