"""Case lifecycle: stable series → validated `Volume` → case READY (or INCOMPLETE/UNSUPPORTED).

RT objects (RTDOSE, RTPLAN, RTSTRUCT) are linked to their planning CT by frame of reference.
Assembly runs as durable jobs, never on the association thread.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from heartloop.config import Settings
from heartloop.core import CaseState, SeriesError, Volume
from heartloop.dicom_node.headers import InstanceHeader
from heartloop.dicom_node.series import SeriesGeometry, load_ct_volume, validate_ct_series
from heartloop.store import Store
from heartloop.store.models import Instance

log = logging.getLogger(__name__)

JOB_ASSEMBLE = "assemble_series"


def header_from_row(row: Instance) -> InstanceHeader:
    data = json.loads(row.header_json)
    fields = {}
    for key, value in data.items():
        fields[key] = tuple(value) if isinstance(value, list) else value
    fields["patient_id"] = ""
    return InstanceHeader(**fields)


def enqueue_stable_series(store: Store, settings: Settings) -> int:
    """Queue an assembly job for every series that has been quiet for the stable age."""
    n = 0
    for series in store.stable_series(settings.series.stable_age_s):
        job = store.enqueue(JOB_ASSEMBLE, {"series_uid": series.series_uid},
                            dedupe_key=f"{JOB_ASSEMBLE}:{series.series_uid}:{series.instance_count}")
        n += job is not None
    return n


@dataclass(frozen=True)
class AssemblyResult:
    series_uid: str
    case_id: int | None
    state: str
    reason: str | None = None


def ordered_series(store: Store, settings: Settings, series_uid: str) -> tuple[SeriesGeometry, list[Path]]:
    """Validate a stored CT series with the configured rules; its geometry and files in slice order.

    Raises `SeriesError` (INCOMPLETE / UNSUPPORTED with a reason) like `validate_ct_series`.
    """
    rows = store.series_instances(series_uid)
    geometry = validate_ct_series([header_from_row(r) for r in rows], max_gap_ratio=settings.series.max_gap_ratio,
                                  min_slices=settings.series.min_slices, max_slices=settings.series.max_slices)
    by_uid = {r.sop_instance_uid: store.files.abspath(r.path) for r in rows}
    return geometry, [by_uid[u] for u in geometry.sop_instance_uids]


def case_series_uid(store: Store, case_id: int) -> str:
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(f"no case {case_id}")
    return case.ct_series_uid


def load_case_volume(store: Store, case_id: int, settings: Settings) -> Volume:
    """The CT `Volume` of a case from its stored instances (validated again: files are the truth)."""
    geometry, paths = ordered_series(store, settings, case_series_uid(store, case_id))
    return load_ct_volume(paths, geometry)


def assemble_series(store: Store, settings: Settings, series_uid: str,
                    on_ready: Callable[[int, Volume], None] | None = None) -> AssemblyResult:
    """Validate a stable series. CT: the case becomes READY with its `Volume`, or INCOMPLETE /
    UNSUPPORTED with a reason. RT objects: linked to the CT case of the same frame of reference."""
    series = store.get_series(series_uid)
    if series is None:
        return AssemblyResult(series_uid, None, "MISSING")
    if series.modality != "CT":
        return _link_rt(store, series)
    seen = series.instance_count
    case = store.case_for_series(series_uid)
    try:
        geometry, paths = ordered_series(store, settings, series_uid)
        volume = load_ct_volume(paths, geometry)
    except SeriesError as exc:
        state = exc.state.value
        if store.finish_assembly(series_uid, seen, series_state=state, case_state=exc.state, reason=exc.reason):
            log.warning("case %s: %s — %s", case.id if case else "?", state, exc.reason)
        return AssemblyResult(series_uid, case.id if case else None, state, exc.reason)
    if not store.finish_assembly(series_uid, seen, series_state="ASSEMBLED", case_state=CaseState.READY,
                                 n_slices=volume.shape[0], frame_of_reference_uid=volume.frame_of_reference_uid):
        return AssemblyResult(series_uid, case.id if case else None, "REOPENED", "more instances arrived")
    assert case is not None
    linked = store.link_rt_series(volume.frame_of_reference_uid, case.id)
    log.info("case %d READY: %d slices, %d linked RT series", case.id, volume.shape[0], len(linked))
    if on_ready is not None:
        on_ready(case.id, volume)
    return AssemblyResult(series_uid, case.id, CaseState.READY.value)


def _link_rt(store: Store, series) -> AssemblyResult:  # type: ignore[no-untyped-def]
    frame = series.frame_of_reference_uid
    if not frame:
        # RTSTRUCT carries its frame in ReferencedFrameOfReferenceSequence.
        rows = store.series_instances(series.series_uid)
        for r in rows:
            refs = json.loads(r.header_json).get("referenced_frame_of_reference_uids") or []
            if refs:
                frame = refs[0]
                break
    ready = [c for c in store.cases_by_frame(frame)] if frame else []
    ready = [c for c in ready if c.state not in (CaseState.UNSUPPORTED.value,)]
    if not ready:
        reason = (f"{series.modality} frame of reference {frame} matches no CT series received; push the planning "
                  "CT it belongs to (it will be linked when the CT arrives)") if frame else \
                 f"{series.modality} has no frame of reference; it cannot be linked to a planning CT"
        store.close_series(series.series_uid, "UNLINKED", reason, seen_count=series.instance_count)
        log.warning("%s series not linked: %s", series.modality, reason)
        return AssemblyResult(series.series_uid, None, "UNLINKED", reason)
    case = ready[-1]
    store.close_series(series.series_uid, "LINKED", None, case_id=case.id, seen_count=series.instance_count)
    return AssemblyResult(series.series_uid, case.id, "LINKED")


def recover_index(store: Store) -> int:
    """Index every stored instance file that has no database row; returns how many.

    Run after an unclean stop: a file is fsynced before its C-STORE success, its row may have been
    lost with the last unflushed commits of a power cut. Files that do not parse go to quarantine.
    """
    from heartloop.core.errors import DatasetRejected
    from heartloop.dicom_node.headers import read_header
    from heartloop.dicom_node.scp import header_to_new_instance

    known = store.indexed_paths()
    n = 0
    for path in sorted(store.files.instances_dir.rglob("*.dcm")):
        rel = store.files.relpath(path)
        if rel in known:
            continue
        try:
            header = read_header(path)
        except DatasetRejected as exc:
            tmp = store.files.new_temp()
            path.replace(tmp)
            store.quarantine(tmp, status=exc.status, reason=f"found unindexed after an unclean stop: {exc.reason}",
                             calling_ae="")
            continue
        if store.files.instance_relpath(header.study_uid, header.series_uid, header.sop_instance_uid) != rel:
            continue  # not where we would have put it: not ours to index
        stat = path.stat()
        if store.index_existing(header_to_new_instance(header), rel, "", stat.st_size, stat.st_mtime):
            n += 1
    if n:
        log.warning("re-indexed %d stored instance(s) whose database rows were lost in an unclean stop", n)
    return n
