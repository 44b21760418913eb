"""Outputs for the TPS: an RTSTRUCT built from a heart mask on a case's CT, queued in the outbox."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom

from heartloop.config import Settings
from heartloop.core import Volume
from heartloop.dicom_node.rtstruct import RoiSpec, build_rtstruct
from heartloop.service.lifecycle import case_series_uid, ordered_series
from heartloop.store import Store

log = logging.getLogger(__name__)


def case_ct_datasets(store: Store, case_id: int, settings: Settings) -> list[pydicom.Dataset]:
    """The CT headers of a case (no pixel data), in slice order."""
    _geometry, paths = ordered_series(store, settings, case_series_uid(store, case_id))
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


def queue_structure(store: Store, settings: Settings, case_id: int, mask: Volume, *, model_version: str,
                    algorithm: str = "AUTOMATIC", roi_name: str | None = None, operator: str | None = None,
                    destination: str | None = None, approval_status: str = "UNAPPROVED") -> int | None:
    """Build the RTSTRUCT of `mask` for the case, store it atomically, queue it to the destination.

    `approval_status`: ``"UNAPPROVED"`` or ``"APPROVED"`` (then `operator` is the reviewer).
    Returns the outbox item id (None when that very instance was already queued).
    """
    cts = case_ct_datasets(store, case_id, settings)
    roi = RoiSpec(name=roi_name or settings.rtstruct.roi_name, color=settings.rtstruct.roi_color, algorithm=algorithm)
    ds = build_rtstruct(mask, cts, roi=roi, model_version=model_version, label=settings.rtstruct.structure_set_label,
                        operator=operator, approval_status=approval_status)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    rel = store.files.output_relpath(case_id, ds.SOPInstanceUID)
    store.files.write_bytes(rel, buf.getvalue())
    dest = settings.destination(destination)
    item = store.queue_output(dest.name, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                              relpath=rel, case_id=case_id,
                              description=f"RTSTRUCT {roi.name} (model {model_version})")
    log.info("case %d: RTSTRUCT %s queued for %s", case_id, roi.name, dest.name)
    return item


def mask_from_nifti(path: Path, ct: Volume) -> Volume:
    """A NIfTI mask (as `heartloop phantom` writes it) on the CT grid; refuses a different grid."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path} is not a 3D mask")
    # NIfTI stores data[i, j, k]; our arrays are [k, j, i].
    arr = np.transpose(data, (2, 1, 0)) > 0
    if arr.shape != ct.shape:
        raise ValueError(f"mask shape {arr.shape} (slices, rows, columns) differs from the CT's {ct.shape}")
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected = lps_to_ras @ ct.affine
    if not np.allclose(img.affine, expected, atol=1e-2):
        raise ValueError(f"{path}: its voxel-to-patient affine does not match the CT's geometry")
    return ct.with_array(arr)
