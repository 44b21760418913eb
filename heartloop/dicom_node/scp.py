"""The DICOM node's receiving side (pynetdicom SCP): C-ECHO and C-STORE to durable storage.

Handlers are plain functions with their dependencies bound (pynetdicom ``evt_handlers``). A
C-STORE is answered success only after the file is fsynced in place and its row committed.
Nothing slow runs here: assembly, contouring and sending happen in the service's workers.
"""

from __future__ import annotations


import dataclasses
from dataclasses import dataclass
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from heartloop.config import Settings
from heartloop.core.errors import DatasetRejected
from heartloop.dicom_node.headers import (
    CT_IMAGE_STORAGE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    RT_DOSE_STORAGE,
    RT_ION_PLAN_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    InstanceHeader,
    read_header,
)
from heartloop.store import NewInstance, Store

# (imported late in the module graph: fastheader imports headers only)
from heartloop.dicom_node.fastheader import ParsedHead, header_from_parsed  # noqa: E402

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: Failure: processing failure (an unexpected error while storing; the dataset is kept).
PROCESSING_FAILURE = 0x0110

STORAGE_SOP_CLASSES = (CT_IMAGE_STORAGE, RT_DOSE_STORAGE, RT_PLAN_STORAGE, RT_ION_PLAN_STORAGE, RT_STRUCTURE_SET_STORAGE)

# Receive datasets straight to a file, never whole in memory (pynetdicom writes P-DATA
# fragments to a temp file as they arrive; the handler then only renames it into place).
_config.STORE_RECV_CHUNKED_DATASET = True
# Our SCU sends stored files without decoding them.
_config.STORE_SEND_CHUNKED_DATASET = True
# pynetdicom logs identifiers (AE titles, UIDs) at INFO; patient data never, but keep it quiet.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


_HEADER_FIELDS = tuple(f.name for f in dataclasses.fields(InstanceHeader) if f.name != "patient_id")


def header_to_new_instance(header: InstanceHeader) -> NewInstance:
    # A flat copy of the (immutable, flat) header: dataclasses.asdict deep-copies and costs more.
    # patient_id is kept in its own column, not in the header blob.
    data = {name: getattr(header, name) for name in _HEADER_FIELDS}
    return NewInstance(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        modality=header.modality or "",
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        frame_of_reference_uid=header.frame_of_reference_uid,
        patient_id=header.patient_id or "",
        header=data,
    )


# -- handlers -------------------------------------------------------------------------------------

def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_conn_open(event: evt.Event) -> None:
    """Disable Nagle on every connection: small DIMSE responses must not wait ~40 ms."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # pragma: no cover - socket already gone
        pass


def caller_allowed(settings: Settings, calling_ae: str, host: str) -> bool:
    """Whether (calling AE title, host) may associate. No configured callers = anyone."""
    callers = settings.node.allowed_callers
    if not callers:
        return True
    calling_ae = calling_ae.strip()
    for caller in callers:
        if caller.ae_title == calling_ae and (not caller.hosts or host in caller.hosts):
            return True
    return False


def handle_requested(event: evt.Event, settings: Settings) -> None:
    """Reject unknown calling AE titles (or known titles from unknown hosts) at association."""
    assoc = event.assoc
    calling = str(assoc.requestor.primitive.calling_ae_title).strip()
    host = assoc.requestor.address
    if not caller_allowed(settings, calling, host):
        log.warning("rejected association from AE %r at %s: not in node.allowed_callers", calling, host)
        # A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
        assoc.acse.send_reject(0x01, 0x01, 0x03)


_free_cache: dict[Path, tuple[float, int]] = {}


def _free_bytes(path: Path, max_age_s: float = 1.0) -> int:
    """Free bytes on `path`'s filesystem, re-read at most once a second (statvfs per slice adds up)."""
    now = time.monotonic()
    cached = _free_cache.get(path)
    if cached is not None and now - cached[0] < max_age_s:
        return cached[1]
    try:
        free = shutil.disk_usage(path).free
    except OSError:  # pragma: no cover
        free = 0
    _free_cache[path] = (now, free)
    return free


@dataclass(frozen=True)
class ReceivedFile:
    """What the lean receiver still holds of a file it just wrote: its open descriptor (fsynced
    through it, no reopen), its size, and for a CT slice what `parse_head` found in its first
    bytes while the rest was arriving (None: not for the fast path, read the header from the file).
    """

    fd: int
    size: int
    parsed: ParsedHead | None = None


def accept_instance(store: Store, settings: Settings, temp: Path, *, calling_ae: str, context_sop_class: str,
                    command_sop_instance: str, received: ReceivedFile | None = None) -> tuple[int, str | None]:
    """Check and durably store one received dataset file; the DIMSE status to answer and why.

    Shared by both receive engines. Success (0x0000) is returned only after the file is fsynced
    in place and its row committed; a refused dataset is quarantined with the reason.
    """
    if received is not None:
        size = received.size
    else:
        try:
            size = temp.stat().st_size
        except OSError:
            size = 0
    try:
        if size > settings.limits.max_instance_bytes:
            raise DatasetRejected(OUT_OF_RESOURCES, f"dataset of {size} bytes exceeds limits.max_instance_bytes")
        if _free_bytes(store.files.root) < settings.limits.min_free_disk_bytes:
            # Refuse before we are full: what we acknowledged must stay writable. Nothing kept.
            log.error("refusing C-STORE: free disk below limits.min_free_disk_bytes")
            _unlink_quietly(temp)
            return OUT_OF_RESOURCES, "storage full on the receiving node"
        header = header_from_parsed(received.parsed, size) if received is not None else None
        if header is None:
            header = read_header(temp)
        if header.sop_class_uid != context_sop_class:
            raise DatasetRejected(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Class {header.sop_class_uid} does not match the presentation context {context_sop_class}",
            )
        if header.sop_instance_uid != command_sop_instance:
            raise DatasetRejected(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Instance UID {header.sop_instance_uid} differs from the C-STORE request's",
            )
    except OSError as exc:  # our disk, not their data: nothing acknowledged, nothing kept
        log.error("cannot read a received file: %s", exc)
        _unlink_quietly(temp)
        return OUT_OF_RESOURCES, "the receiving node cannot read its storage"
    except DatasetRejected as exc:
        try:
            store.quarantine(temp, status=exc.status, reason=exc.reason, calling_ae=calling_ae,
                             sop_instance_uid=command_sop_instance or None)
        except Exception:  # pragma: no cover - quarantine must never take the node down
            log.exception("could not quarantine a refused dataset")
        log.warning("refused C-STORE from %s: 0x%04X %s", calling_ae, exc.status, exc.reason)
        return exc.status, exc.reason
    try:
        result = store.store_instance(header_to_new_instance(header), temp, calling_ae, size,
                                      fd=received.fd if received is not None else None)
    except Exception as exc:
        log.exception("could not store a received %s instance", header.modality or "DICOM")
        try:
            if temp.exists():
                store.quarantine(temp, status=PROCESSING_FAILURE, reason=f"storage error: {exc}",
                                 calling_ae=calling_ae, sop_instance_uid=header.sop_instance_uid)
        except Exception:  # pragma: no cover
            log.exception("could not quarantine after a storage error")
        return OUT_OF_RESOURCES, "storage error on the receiving node"
    if not result.created:
        log.info("duplicate %s instance ignored (stored once)", header.modality)
    return SUCCESS, None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def handle_store(event: evt.Event, store: Store, settings: Settings) -> int | tuple[int, Any]:
    """pynetdicom C-STORE handler: the dataset is already a file (chunked receive)."""
    status, reason = accept_instance(
        store, settings, Path(event.dataset_path),
        calling_ae=str(event.assoc.requestor.ae_title).strip(),
        context_sop_class=str(event.context.abstract_syntax),
        command_sop_instance=str(getattr(event.request, "AffectedSOPInstanceUID", "") or ""),
    )
    if status != SUCCESS and reason:
        return status, _error_comment(reason)
    return status


def _error_comment(reason: str) -> Any:
    """A status dataset carrying ErrorComment (LO, ≤ 64 chars) so the sender sees why."""
    from pydicom.dataset import Dataset

    status = Dataset()
    status.ErrorComment = reason[:64]
    return status


# -- the server -----------------------------------------------------------------------------------

class ReusePortAssociationServer(ThreadedAssociationServer):
    """An association server whose socket may be shared by several receiving processes."""

    allow_reuse_port = True

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu_bytes
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.network_timeout = settings.node.network_timeout_s
    ae.maximum_associations = settings.node.max_associations
    ae.add_supported_context(Verification)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def event_handlers(store: Store, settings: Settings) -> list:
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store, settings]),
        (evt.EVT_REQUESTED, handle_requested, [settings]),
        (evt.EVT_CONN_OPEN, handle_conn_open),
    ]


class ServedNode:
    """What both receive engines share: a socketserver in a daemon thread; `port`, `stop()`."""

    server: Any = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def _serve(self, server: Any, name: str, settings: Settings, **serve_kwargs: Any) -> None:
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs=serve_kwargs, name=name, daemon=True)
        self._thread.start()
        log.info("DICOM node %s listening on %s:%d", settings.node.ae_title, settings.node.host, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class StorageSCP(ServedNode):
    """Our C-ECHO/C-STORE node on pynetdicom's acceptor. `start()` returns once it listens."""

    def __init__(self, settings: Settings, store: Store, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.reuse_port = reuse_port
        self.ae = build_ae(settings)

    def start(self) -> None:
        # pynetdicom writes received fragments with NamedTemporaryFile() and no directory: point
        # the process-wide default at <root>/incoming (same filesystem as their final place, so
        # storing is a rename) while we run, and put it back on stop().
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.store.files.incoming_dir)
        server = self.ae.make_server(
            (self.settings.node.host, self.settings.node.port),
            ae_title=self.settings.node.ae_title,
            evt_handlers=event_handlers(self.store, self.settings),
            server_class=ReusePortAssociationServer if self.reuse_port else ThreadedAssociationServer,
        )
        self.ae._servers.append(server)  # so AE.shutdown() and server.shutdown() agree
        self._serve(server, "dicom-scp", self.settings)

    def stop(self) -> None:
        super().stop()
        if hasattr(self, "_previous_tempdir"):
            tempfile.tempdir = self._previous_tempdir
            del self._previous_tempdir


def run_receiver_process(settings: Settings) -> None:  # pragma: no cover - runs in a child process
    """Entry point of an extra receiving process sharing the DICOM port (SO_REUSEPORT)."""
    import signal

    store = Store.from_settings(settings, migrate_schema=False)
    scp = make_node(settings, store, reuse_port=True)
    scp.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    scp.stop()
    store.dispose()
    os._exit(0)


def make_node(settings: Settings, store: Store, *, reuse_port: bool = False):  # type: ignore[no-untyped-def]
    """The receiving engine chosen by ``node.engine`` (both: ``start()``, ``port``, ``stop()``)."""
    if settings.node.engine == "pynetdicom":
        return StorageSCP(settings, store, reuse_port=reuse_port)
    from heartloop.dicom_node.receiver import StorageReceiver

    return StorageReceiver(settings, store, reuse_port=reuse_port)
