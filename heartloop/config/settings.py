"""One typed, validated settings object: TOML file + ``HEARTLOOP_*`` environment overrides.

Environment overrides name the section and key with a double underscore, e.g.
``HEARTLOOP_NODE__PORT=11112`` or ``HEARTLOOP_STORAGE__ROOT=/srv/heartloop``. List-valued keys
(``node.allowed_callers``, ``destinations``) take JSON in the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


ENV_PREFIX = "HEARTLOOP_"
#: ``HEARTLOOP_*`` variables that are not settings: the settings file, the first administrator's
#: password (read once by the service on its first start), run.sh's data directory.
NOT_SETTINGS = frozenset({"config", "admin_password", "data"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the key and the fix.

    Defined here, not in `heartloop.core`: config imports nothing of ours (DESIGN.md §2).
    """
_AE_RE = re.compile(r"^[\x21-\x5B\x5D-\x7E][\x20-\x5B\x5D-\x7E]{0,15}$")  # printable, no backslash


def _check_ae(key: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 16 or not _AE_RE.match(value) or value != value.strip():
        raise ConfigError(
            f"{key} = {value!r} is not a valid AE title: use 1-16 printable ASCII characters, "
            "no backslash, no leading/trailing spaces (e.g. \"HEARTLOOP\")"
        )
    return value


def _check_port(key: str, value: int, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not ((0 if allow_zero else 1) <= value <= 65535):
        raise ConfigError(f"{key} = {value!r} is not a valid TCP port: use an integer from 1 to 65535")
    return value


def _check_positive(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key} = {value!r} must be a positive number")
    return value


@dataclass(frozen=True)
class AllowedCaller:
    """A remote AE allowed to associate with us; `hosts` empty means any host."""

    ae_title: str
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Destination:
    """A DICOM node we send results to (the TPS, an archive)."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "HEARTLOOP"
    host: str = "127.0.0.1"
    port: int = 11112
    #: AEs allowed to associate. Empty = accept any calling AE (only sensible on a closed demo box).
    allowed_callers: tuple[AllowedCaller, ...] = ()
    #: Largest P-DATA PDU we accept and send (bytes). Bigger PDUs mean fewer round trips.
    max_pdu_bytes: int = 1048576
    #: Receiving processes sharing the DICOM port (SO_REUSEPORT): the service process plus N-1
    #: children, one thread per association in each. Since SQLite writers queue on one file lock
    #: (not SQLite's sleeping busy handler) two beat one on 2 cores: 4 associations, median of 4
    #: runs, 650 vs 508 slices/s (`python -m bench.ingest --processes N`). One association always
    #: lands in one process. More pays off with PostgreSQL and more cores.
    receive_processes: int = 2
    #: "lean": HeartLoop's streaming storage receiver (fast); "pynetdicom": pynetdicom's acceptor.
    engine: str = "lean"
    max_associations: int = 16
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0


@dataclass(frozen=True)
class StorageSettings:
    #: Where instance files, quarantine and (by default) the SQLite database live.
    root: str = "heartloop-data"
    #: SQLAlchemy URL; empty = SQLite file ``<root>/heartloop.db``.
    database_url: str = ""


@dataclass(frozen=True)
class SeriesSettings:
    #: A series is complete when no instance arrived for this many seconds.
    stable_age_s: float = 10.0
    #: How often the assembler looks for stable series.
    poll_interval_s: float = 1.0
    min_slices: int = 10
    max_slices: int = 2000
    #: A gap larger than this factor times the smallest slice gap is a missing slice.
    max_gap_ratio: float = 1.6


@dataclass(frozen=True)
class OutboxSettings:
    max_attempts: int = 20
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    poll_interval_s: float = 1.0


@dataclass(frozen=True)
class RtstructSettings:
    roi_name: str = "Heart_AI"
    roi_color: tuple[int, int, int] = (255, 0, 0)
    structure_set_label: str = "HeartLoop"
    #: ROI names in an incoming RTSTRUCT that mean "the heart" (clinical contours).
    heart_roi_names: tuple[str, ...] = ("Heart", "HEART", "Heart_Whole", "heart", "Coeur")
    #: ROI name of the structure sent back after a dosimetrist corrected it (TG-263 "Heart").
    corrected_roi_name: str = "Heart"
    #: Approval status of the corrected RTSTRUCT sent back: "UNAPPROVED" (default: the TPS user
    #: approves) or "APPROVED" (the reviewer's save counts as approval — a department's decision).
    corrected_approval_status: str = "UNAPPROVED"


@dataclass(frozen=True)
class LimitSettings:
    #: Largest single dataset we accept (bytes).
    max_instance_bytes: int = 512 * 1024 * 1024
    #: Stop accepting data when the storage volume has less free space than this (bytes).
    min_free_disk_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class HttpSettings:
    """The review UI's web server (served inside `heartloop serve`)."""

    #: Serve the review UI (off: a headless DICOM node).
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    #: Worker threads of the WSGI server.
    threads: int = 8
    #: Log a reviewer out after this many minutes without a request.
    idle_timeout_min: float = 30.0
    #: Mark session cookies ``Secure`` (browsers still send them to http://localhost and 127.0.0.1;
    #: put the UI behind TLS on any other address).
    secure_cookies: bool = True


@dataclass(frozen=True)
class TrainerSettings:
    #: Run the continual trainer process beside the service (off: a node that only contours).
    enabled: bool = True


@dataclass(frozen=True)
class ContouringConfig:
    """``[contouring]``: the network and its training (mapped onto the engine's
    `heartloop.contouring.settings.ContouringSettings`, which validates the values and documents
    each one; device and threads come from ``[compute]``). The defaults are the engine's: a
    narrow 3D U-Net that trains on a 2-core CPU. Tests and demos on tiny CTs shrink it."""

    width: int = 16
    depth: int = 3
    groupnorm_groups: int = 8
    localiser_voxel_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    organ_voxel_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    localiser_patch_size: tuple[int, int, int] = (48, 64, 64)
    organ_patch_size: tuple[int, int, int] = (48, 64, 64)
    margin_mm: float = 20.0
    learning_rate: float = 1e-3
    batch_size: int = 2
    epochs_without_progress_restart: int = 60
    #: Epochs in a row without a promotion after which training continues from the best model (0: off).
    resume_best_after: int = 4
    accepted_voxel_weight: float = 0.25
    #: How corrections train: "dense" (the whole corrected contour, painted voxels weight 1,
    #: accepted ones `accepted_voxel_weight`; seed 004 eq. 9/12) or "masked" (painted voxels only,
    #: as RootPainter3D).
    correction_loss: str = "dense"
    #: "auto" (bfloat16 where the CPU/GPU has it natively), "fp32" or "bf16".
    precision: str = "auto"
    #: Torch threads of the background trainer; 0 = all cores.
    training_threads: int = 0
    #: Training samples per epoch while there is no validation case (RootPainter3D: 128).
    epoch_length_without_validation: int = 128
    #: Fewest training samples per epoch once there is validation data (RootPainter3D: 64).
    min_epoch_length: int = 64


@dataclass(frozen=True)
class ComputeSettings:
    #: torch device: "cpu", "cuda", "cuda:1", or "auto" (a GPU when present).
    device: str = "auto"
    threads: int = 0  # 0 = torch default


@dataclass(frozen=True)
class DoseSettings:
    """Dose on structures and the thresholds that flag a difference between two contours.

    A delta between two contours of one case (``other − reference``, e.g. corrected − predicted)
    is flagged when ``|Δ mean|`` exceeds `delta_mean_gy`, or any other metric moves by more than
    its own threshold.
    """

    #: Sub-voxels per axis for boundary voxels of a mask (1 = voxel centres only).
    supersample: int = 3
    #: Sub-pixels per axis when RTSTRUCT polygons are voxelised on the dose grid's own nodes.
    contour_supersample: int = 6
    #: Bin width (Gy) of the cumulative DVH stored with each result and plotted (the scalar metrics
    #: do not depend on it).
    dvh_bin_gy: float = 0.1
    delta_mean_gy: float = 0.5
    delta_max_gy: float = 2.0
    delta_d2_gy: float = 1.0
    delta_d98_gy: float = 1.0
    #: V5/V10/V20/V30 Gy, in percentage points of the structure's volume.
    delta_v_pct: float = 5.0
    #: Volume change relative to the reference structure (%).
    delta_volume_pct: float = 10.0


@dataclass(frozen=True)
class Settings:
    """Everything HeartLoop can be told. Build with `load_settings`; passed explicitly, never global."""

    node: NodeSettings = field(default_factory=NodeSettings)
    destinations: tuple[Destination, ...] = ()
    storage: StorageSettings = field(default_factory=StorageSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    rtstruct: RtstructSettings = field(default_factory=RtstructSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    dose: DoseSettings = field(default_factory=DoseSettings)
    contouring: ContouringConfig = field(default_factory=ContouringConfig)

    # -- derived --------------------------------------------------------------------------------
    @property
    def storage_root(self) -> Path:
        return Path(self.storage.root).expanduser().resolve()

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{self.storage_root / 'heartloop.db'}"

    def destination(self, name: str | None = None) -> Destination:
        """The destination called `name` (default: the first configured)."""
        if not self.destinations:
            raise ConfigError("no destinations configured: add a [[destinations]] table (name, ae_title, host, port)")
        if name is None:
            return self.destinations[0]
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"destination {name!r} is not configured; known: {[d.name for d in self.destinations]}")


# ------------------------------------------------------------------------------------------------
# Building from plain data, with messages that name the key.


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{key}[{n}]", args[0], v) for n, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_convert(f"{key}[{n}]", a, v) for n, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp}")  # pragma: no cover - programming error


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(
                f"unknown setting {where!r}; known keys here: {', '.join(sorted(names))} — fix the spelling or remove it"
            )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(f"{prefix}.{name}" if prefix else name, hints[name], data[name])
    return cls(**kwargs)


def _coerce_env(raw: str) -> Any:
    """An environment value: JSON when it parses (numbers, lists, booleans), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if len(path) == 1 and path[0] in NOT_SETTINGS:
            continue  # e.g. HEARTLOOP_CONFIG names the file; not a setting
        value = _coerce_env(raw)
        if path[0] in {"storage"} or (len(path) == 2 and path[1] in {"ae_title", "host", "root", "database_url", "roi_name", "device", "name", "structure_set_label", "corrected_roi_name", "corrected_approval_status", "precision", "correction_loss"}):
            value = raw  # strings stay strings even if they look like JSON
        target = data
        for part in path[:-1]:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} addresses {'.'.join(path)}, which is not a table")
            target = node
        target[path[-1]] = value


def _validate(s: Settings) -> None:
    _check_ae("node.ae_title", s.node.ae_title)
    _check_port("node.port", s.node.port, allow_zero=True)
    _check_port("http.port", s.http.port, allow_zero=True)
    if not (1 <= s.http.threads <= 256):
        raise ConfigError("http.threads must be between 1 and 256")
    if not (s.http.idle_timeout_min > 0):
        raise ConfigError("http.idle_timeout_min must be > 0 (minutes)")
    if s.rtstruct.corrected_approval_status not in ("UNAPPROVED", "APPROVED"):
        raise ConfigError(f"rtstruct.corrected_approval_status = {s.rtstruct.corrected_approval_status!r}: "
                          "use \"UNAPPROVED\" or \"APPROVED\"")
    for n, caller in enumerate(s.node.allowed_callers):
        _check_ae(f"node.allowed_callers[{n}].ae_title", caller.ae_title)
    seen = set()
    for n, dest in enumerate(s.destinations):
        _check_ae(f"destinations[{n}].ae_title", dest.ae_title)
        _check_port(f"destinations[{n}].port", dest.port)
        if not dest.host:
            raise ConfigError(f"destinations[{n}].host is empty: give the TPS's host name or IP address")
        if dest.name in seen:
            raise ConfigError(f"destinations[{n}].name {dest.name!r} is used twice: names must be unique")
        seen.add(dest.name)
    if not (1024 <= s.node.max_pdu_bytes <= 64 * 1024 * 1024):
        raise ConfigError("node.max_pdu_bytes must be between 1024 and 67108864")
    if s.node.engine not in ("lean", "pynetdicom"):
        raise ConfigError(f"node.engine = {s.node.engine!r}: use \"lean\" (default) or \"pynetdicom\"")
    if not (1 <= s.node.receive_processes <= 64):
        raise ConfigError("node.receive_processes must be between 1 and 64")
    for key, value in [
        ("series.stable_age_s", s.series.stable_age_s),
        ("series.poll_interval_s", s.series.poll_interval_s),
        ("outbox.backoff_initial_s", s.outbox.backoff_initial_s),
        ("outbox.backoff_max_s", s.outbox.backoff_max_s),
        ("outbox.poll_interval_s", s.outbox.poll_interval_s),
        ("node.acse_timeout_s", s.node.acse_timeout_s),
        ("node.dimse_timeout_s", s.node.dimse_timeout_s),
        ("node.network_timeout_s", s.node.network_timeout_s),
        ("outbox.max_attempts", s.outbox.max_attempts),
        ("limits.max_instance_bytes", s.limits.max_instance_bytes),
        ("series.max_slices", s.series.max_slices),
        ("series.min_slices", s.series.min_slices),
    ]:
        _check_positive(key, value)
    if not (1.0 < s.series.max_gap_ratio < 10.0):
        raise ConfigError("series.max_gap_ratio must be between 1 and 10 (1.6 flags a single missing slice)")
    if not s.rtstruct.roi_name or len(s.rtstruct.roi_name) > 16:
        raise ConfigError("rtstruct.roi_name must be 1-16 characters (TG-263 style, e.g. \"Heart_AI\")")
    if not s.rtstruct.corrected_roi_name or len(s.rtstruct.corrected_roi_name) > 16:
        raise ConfigError("rtstruct.corrected_roi_name must be 1-16 characters (TG-263 style, e.g. \"Heart\")")
    _validate_dose(s.dose)
    if s.contouring.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"contouring.precision = {s.contouring.precision!r}: use \"auto\", \"fp32\" or \"bf16\"")
    if s.contouring.epoch_length_without_validation < 1 or s.contouring.min_epoch_length < 1:
        raise ConfigError("contouring.epoch_length_without_validation and contouring.min_epoch_length must be >= 1")
    if any(not (0 <= c <= 255) for c in s.rtstruct.roi_color):
        raise ConfigError("rtstruct.roi_color must be three integers 0-255, e.g. [255, 0, 0]")
    if s.compute.device != "auto" and not re.match(r"^(cpu|cuda(:\d+)?|mps)$", s.compute.device):
        raise ConfigError("compute.device must be \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"mps\"")
    _check_storage_root(s.storage_root)


def _validate_dose(d: DoseSettings) -> None:
    if not (1 <= d.contour_supersample <= 16):
        raise ConfigError(f"dose.contour_supersample = {d.contour_supersample} must be an integer from 1 to 16 "
                          "(6 is the default)")
    if not (1 <= d.supersample <= 10):
        raise ConfigError(f"dose.supersample = {d.supersample} must be an integer from 1 to 10 (3 is the default)")
    _check_positive("dose.dvh_bin_gy", d.dvh_bin_gy)
    if d.dvh_bin_gy > 5.0:
        raise ConfigError(f"dose.dvh_bin_gy = {d.dvh_bin_gy} Gy is too coarse for a DVH: use at most 5 Gy (0.1 is usual)")
    for f in dataclasses.fields(d):
        if f.name.startswith("delta_") and getattr(d, f.name) < 0:
            raise ConfigError(f"dose.{f.name} = {getattr(d, f.name)} must be zero or positive (|Δ| above it flags)")


def _check_storage_root(root: Path) -> None:
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"storage.root = {str(root)!r}: {probe} exists and is not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"storage.root = {str(root)!r} is not writable by this user ({probe} refuses writes): "
            "choose a writable directory or fix its permissions"
        )


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings from an optional TOML file, then ``HEARTLOOP_*`` environment, then `overrides`.

    `overrides` is a nested dict as in TOML (command-line flags use it). Raises `ConfigError` with
    the offending key and the fix.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is None and environ.get("HEARTLOOP_CONFIG"):
        path = environ["HEARTLOOP_CONFIG"]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {str(p)!r} is not valid TOML: {exc}") from exc
    _apply_env(data, environ)
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    settings = _build(Settings, data, "")
    _validate(settings)
    return settings


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Plain-data view of the settings (recorded with outputs and shown by `heartloop config`)."""
    return dataclasses.asdict(settings)
