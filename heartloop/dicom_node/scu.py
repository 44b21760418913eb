"""Sending side: C-STORE stored files to a destination (our outbox, and `heartloop push`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from heartloop.config import Destination, Settings
from heartloop.dicom_node.scp import handle_conn_open
from heartloop.store import Store

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # DICOM limit of presentation contexts per association


@dataclass(frozen=True)
class SendResult:
    path: Path
    ok: bool
    status: int | None  # DIMSE status, None when the association failed before a response
    error: str = ""


class AssociationFailed(Exception):
    """The destination could not be reached, refused us, or dropped the association."""


def _meta(path: Path) -> tuple[str, str, str]:
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)


def send_files(dest: Destination, paths: Sequence[Path], *, calling_ae: str = "HEARTLOOP",
               max_pdu: int = 1048576, timeout_s: float = 30.0,
               progress: Callable[[int, int], None] | None = None) -> list[SendResult]:
    """C-STORE `paths` to `dest` over one association, each file sent as stored (not decoded).

    Raises `AssociationFailed` when no association could be made; per-file failures are
    reported in the results.
    """
    metas = []
    for p in paths:
        metas.append((Path(p), *_meta(Path(p))))
    contexts = sorted({(sop_class, ts) for _, sop_class, _, ts in metas})
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP class/transfer syntax pairs exceed one association's {MAX_CONTEXTS}")
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
        raise AssociationFailed(f"{dest.ae_title}@{dest.host}:{dest.port} {why}")
    results: list[SendResult] = []
    try:
        for n, (path, sop_class, _sop, _ts) in enumerate(metas):
            if not assoc.is_established:
                results.append(SendResult(path, False, None, "association lost"))
                continue
            try:
                rsp = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:
                results.append(SendResult(path, False, None, str(exc)))
                continue
            status = getattr(rsp, "Status", None)
            if status is None:
                results.append(SendResult(path, False, None, "no response (timeout or abort)"))
            elif status == 0x0000 or (status & 0xF000) == 0xB000:  # success or warning
                results.append(SendResult(path, True, int(status)))
            else:
                comment = str(getattr(rsp, "ErrorComment", "") or "")
                results.append(SendResult(path, False, int(status), f"status 0x{int(status):04X} {comment}".strip()))
            if progress:
                progress(n + 1, len(metas))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def echo(dest: Destination, *, calling_ae: str = "HEARTLOOP", timeout_s: float = 10.0) -> bool:
    """C-ECHO `dest`; True when it answered success."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return getattr(rsp, "Status", None) == 0x0000
    finally:
        assoc.release()


def drain_outbox(store: Store, settings: Settings, *, now: float | None = None) -> int:
    """Send every due outbox item, one association per destination; returns how many were sent.

    An item is marked SENT only after the destination answered success; a failure schedules a
    retry with exponential backoff. A crash between the destination's success and our commit is
    the one window in which an item can be sent twice; the destination sees the same SOP
    Instance UID again, which DICOM archives and TPSs treat as the same object.
    """
    due = store.due_outputs(now=now)
    if not due:
        return 0
    by_dest: dict[str, list] = {}
    for item in due:
        by_dest.setdefault(item.destination, []).append(item)
    sent = 0
    o = settings.outbox
    for dest_name, items in by_dest.items():
        try:
            dest = settings.destination(dest_name)
        except Exception as exc:
            for item in items:
                store.mark_output_failed(item.id, f"destination not configured: {exc}", backoff_initial_s=o.backoff_initial_s,
                                         backoff_max_s=o.backoff_max_s, max_attempts=o.max_attempts)
            continue
        paths = [store.files.abspath(item.path) for item in items]
        try:
            results = send_files(dest, paths, calling_ae=settings.node.ae_title, max_pdu=settings.node.max_pdu_bytes,
                                 timeout_s=settings.node.dimse_timeout_s)
        except Exception as exc:  # association failed, or a file unreadable: count an attempt for all
            log.warning("outbox: %d item(s) for %s not sent: %s", len(items), dest_name, exc)
            for item in items:
                state = store.mark_output_failed(item.id, str(exc), backoff_initial_s=o.backoff_initial_s,
                                                 backoff_max_s=o.backoff_max_s, max_attempts=o.max_attempts)
                if state == "FAILED":
                    log.error("outbox: gave up on item %d after %d attempts: %s", item.id, o.max_attempts, exc)
            continue
        for item, res in zip(items, results):
            if res.ok:
                store.mark_output_sent(item.id)
                sent += 1
            else:
                store.mark_output_failed(item.id, res.error, backoff_initial_s=o.backoff_initial_s,
                                         backoff_max_s=o.backoff_max_s, max_attempts=o.max_attempts)
                log.warning("outbox: item %d refused by %s: %s", item.id, dest_name, res.error)
    if sent:
        log.info("outbox: sent %d item(s)", sent)
    return sent


def iter_dicom_files(root: Path) -> Iterable[Path]:
    """Every file under `root` that has a DICOM preamble (sorted, for a reproducible push)."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            try:
                with open(p, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        yield p
            except OSError:
                continue


def parse_target(target: str) -> Destination:
    """``AE@host:port`` → `Destination` (clear error otherwise)."""
    try:
        ae, hostport = target.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return Destination(name="cli", ae_title=ae, host=host, port=int(port))
    except ValueError:
        raise ValueError(f"target {target!r} must look like AE@host:port, e.g. HEARTLOOP@127.0.0.1:11112") from None
