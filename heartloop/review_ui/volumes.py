"""Prepared case data for the viewer: CT bytes, packed prediction and dose, cached in memory.

The viewer's data requests must be answered about as fast as a static file server would answer
them, so each case is prepared once — the CT as little-endian int16 slabs of `SLAB` slices, the
prediction bit-packed and cropped to its bounding box, the dose scaled to uint8 slabs — and a slab
request hands a prebuilt ``bytes`` object to the server (no numpy work per request; ``bytes``, not
``memoryview``: waitress sends a 4 MB memoryview about 8× slower than the same bytes). The dose is
prepared in a background thread after the CT, so the first image never waits for it.

`VolumeCache` is an LRU bounded by bytes and by count; it is thread-safe and loads a case once
even when several requests for it arrive together (the others wait for the first load). The
prediction is prepared separately from the CT because it changes (re-prediction after a new model
or a bounding box) while the CT does not: it is reloaded when the case's ``updated_at`` changes.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from heartloop.core import Volume

log = logging.getLogger(__name__)

SLAB = 8  # slices per CT/dose slab request
DOSE_DELAY_S = 1.0  # the dose overlay is prepared this long after the CT
Box = tuple[int, int, int, int, int, int]  # k0, k1, j0, j1, i0, i1, half-open


def mask_box(mask: np.ndarray) -> Box | None:
    """Half-open bounding box ``(k0, k1, j0, j1, i0, i1)`` of the true voxels, or None if none."""
    if not mask.any():
        return None
    out: list[int] = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out += [int(idx[0]), int(idx[-1]) + 1]
    return tuple(out)  # type: ignore[return-value]


@dataclass(frozen=True)
class PreparedPrediction:
    """The latest prediction, bit-packed (``np.packbits``, big bit order) over its bounding box."""

    model_version: str
    box: Box
    packed: bytes
    voxels: int
    etag: str


@dataclass(frozen=True)
class PreparedDose:
    """Dose on the CT grid as uint8 (Gy = value × `scale`), one bytes object per slab."""

    slabs: tuple[bytes, ...]
    scale: float
    max_gy: float
    etag: str


@dataclass(frozen=True)
class PreparedCase:
    """Everything the viewer reads of one case, ready to be served by slicing."""

    case_id: int
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # (slice mean, row, column) = (dz, dy, dx)
    slice_offsets_mm: tuple[float, ...]
    ct_slabs: tuple[bytes, ...]  # int16 LE, C-order [k, j, i], SLAB slices each
    origin_mm: tuple[float, float, float]
    row_direction: tuple[float, float, float]  # patient direction of growing i
    column_direction: tuple[float, float, float]  # ... of growing j
    normal: tuple[float, float, float]  # ... of growing k
    hu_min: int
    hu_max: int
    etag: str
    nbytes: int
    loaded_in_s: float

    @property
    def slice_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * 2

    @property
    def n_slabs(self) -> int:
        return -(-self.shape[0] // SLAB)

    def slab_range(self, n: int) -> tuple[int, int]:
        """Slices ``[k0, k1)`` of slab `n` (IndexError when out of range)."""
        if n < 0 or n >= self.n_slabs:
            raise IndexError(f"slab {n} out of range 0..{self.n_slabs - 1}")
        return n * SLAB, min((n + 1) * SLAB, self.shape[0])

    def ct_slab(self, n: int) -> bytes:
        """Slab `n` (a prebuilt bytes object: waitress sends bytes far faster than memoryviews)."""
        self.slab_range(n)
        return self.ct_slabs[n]

    def ct_slice(self, k: int) -> bytes:
        if k < 0 or k >= self.shape[0]:
            raise IndexError(f"slice {k} out of range 0..{self.shape[0] - 1}")
        offset = (k % SLAB) * self.slice_bytes
        return memoryview(self.ct_slabs[k // SLAB])[offset:offset + self.slice_bytes].tobytes()


def dose_slab(prepared: PreparedCase, dose: PreparedDose, n: int) -> bytes:
    """Dose slab `n` of a case (IndexError when out of range)."""
    prepared.slab_range(n)
    return dose.slabs[n]


def _slabs(array: np.ndarray, dtype: str) -> tuple[bytes, ...]:
    return tuple(np.ascontiguousarray(array[k0:k0 + SLAB], dtype=dtype).tobytes()
                 for k0 in range(0, array.shape[0], SLAB))


def prepare_case(case_id: int, volume: Volume) -> PreparedCase:
    """Turn a CT `Volume` into a `PreparedCase` (int16 little-endian slabs)."""
    t0 = time.perf_counter()
    arr = volume.array
    if arr.dtype != np.int16:
        arr = np.clip(np.rint(arr), -32768, 32767)
    slabs = _slabs(arr, "<i2")
    hu_min, hu_max = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    etag = "".join(f"{zlib.adler32(b):08x}" for b in slabs[:: max(1, len(slabs) // 4)]) + f"{arr.size:x}"
    offsets = tuple(float(v) for v in volume.slice_offsets)
    spacing = (float(volume.slice_spacing), float(volume.pixel_spacing[0]), float(volume.pixel_spacing[1]))
    nbytes = sum(len(b) for b in slabs)
    return PreparedCase(case_id, volume.shape, spacing, offsets, slabs, tuple(volume.origin),
                        tuple(volume.row_direction), tuple(volume.column_direction),
                        tuple(float(v) for v in volume.normal), hu_min, hu_max, etag, nbytes,
                        time.perf_counter() - t0)


def prepare_dose(dose: Volume, shape: tuple[int, int, int]) -> PreparedDose:
    """Dose (Gy) on the CT grid as uint8 slabs scaled to its maximum."""
    if dose.shape != shape:
        raise ValueError(f"dose grid {dose.shape} is not the CT grid {shape}")
    gy = np.array(dose.array, dtype=np.float32)
    np.nan_to_num(gy, copy=False, nan=0.0)
    max_gy = float(max(gy.max(), 0.0)) if gy.size else 0.0
    scale = max_gy / 255.0 if max_gy > 0 else 1.0
    np.multiply(gy, 1.0 / scale, out=gy)
    np.rint(gy, out=gy)
    np.clip(gy, 0, 255, out=gy)
    slabs = _slabs(gy, "u1")
    return PreparedDose(slabs, scale, max_gy, "".join(f"{zlib.adler32(b):08x}" for b in slabs[:4]))


def prepare_prediction(mask: np.ndarray, model_version: str) -> PreparedPrediction:
    """Crop a bool mask to its bounding box and bit-pack it (an empty mask keeps an empty box)."""
    mask = np.asarray(mask, dtype=bool)
    box = mask_box(mask) or (0, 0, 0, 0, 0, 0)
    k0, k1, j0, j1, i0, i1 = box
    packed = np.packbits(mask[k0:k1, j0:j1, i0:i1], axis=None).tobytes()
    etag = f"{zlib.adler32(packed):08x}-{model_version}-{'-'.join(map(str, box))}"
    return PreparedPrediction(str(model_version), box, packed, int(mask.sum()), etag)


class _Slot:
    """One case's cache entry: filled once by the loading thread, awaited by the others."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.case: PreparedCase | None = None
        self.error: BaseException | None = None
        self.prediction: PreparedPrediction | None = None
        self.prediction_token: Any = object()  # the case's updated_at the prediction was read at
        self.prediction_lock = threading.Lock()
        self.dose_ready = threading.Event()
        self.dose: PreparedDose | None = None


class VolumeCache:
    """A thread-safe LRU of `PreparedCase` (plus each case's prepared prediction).

    Parameters
    ----------
    load_volume, load_dose, load_prediction
        The `UiServices` callables (``case_id -> Volume``, ``-> Volume | None``,
        ``-> (mask Volume, version) | None``), looked up at call time through `services`.
    services
        ``() -> UiServices`` (so a cache can be built before the services are known).
    max_bytes, max_cases
        Eviction bounds; the case being loaded is never evicted by its own load.
    """

    def __init__(self, services: Callable[[], Any], *, max_bytes: int = 1536 * 1024 * 1024,
                 max_cases: int = 6) -> None:
        self._services = services
        self.max_bytes = int(max_bytes)
        self.max_cases = int(max_cases)
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._prefetching: set[int] = set()
        self.loads = 0  # how many cases were prepared (tests: "loads once")

    # -- CT and dose ------------------------------------------------------------------------
    def get(self, case_id: int) -> PreparedCase:
        """The prepared case, loading it (once, whoever asks concurrently) when not cached.

        Raises whatever the loader raises (``KeyError`` for an unknown case, ``ValueError``...);
        a failed load is not cached.
        """
        with self._lock:
            slot = self._slots.get(case_id)
            owner = slot is None
            if owner:
                slot = _Slot()
                self._slots[case_id] = slot
            else:
                self._slots.move_to_end(case_id)
        assert slot is not None
        if owner:
            try:
                services = self._services()
                volume = services.load_volume(case_id)
                slot.case = prepare_case(case_id, volume)
                self.loads += 1
                log.info("case %d prepared for the viewer: %d slices, %.1f MB, %.2f s", case_id,
                         slot.case.shape[0], slot.case.nbytes / 1e6, slot.case.loaded_in_s)
            except BaseException as exc:  # noqa: BLE001 — handed to every waiter, then re-raised
                slot.error = exc
                with self._lock:
                    if self._slots.get(case_id) is slot:
                        del self._slots[case_id]
                raise
            finally:
                slot.ready.set()
            self._start_dose(case_id, slot, services)
            self._evict()
        else:
            slot.ready.wait()
            if slot.error is not None:
                raise slot.error
        assert slot.case is not None
        return slot.case

    def peek(self, case_id: int) -> PreparedCase | None:
        """The prepared case if it is already loaded, else None (never loads)."""
        with self._lock:
            slot = self._slots.get(case_id)
        if slot is None or not slot.ready.is_set():
            return None
        return slot.case

    def _evict(self) -> None:
        with self._lock:
            while len(self._slots) > 1:
                ready = [(cid, s) for cid, s in self._slots.items() if s.ready.is_set() and s.case is not None]
                total = sum(s.case.nbytes for _, s in ready)  # type: ignore[union-attr]
                if len(self._slots) <= self.max_cases and total <= self.max_bytes:
                    return
                if len(ready) <= 1:
                    return
                cid, _ = ready[0]  # least recently used of the loaded ones
                del self._slots[cid]
                log.debug("case %d evicted from the viewer cache", cid)

    def invalidate(self, case_id: int) -> None:
        """Forget a case (its CT changed, e.g. new slices arrived)."""
        with self._lock:
            self._slots.pop(case_id, None)

    def prefetch(self, case_id: int | None) -> threading.Thread | None:
        """Warm `case_id` in a background thread (no-op when cached or already being fetched)."""
        if case_id is None:
            return None
        with self._lock:
            if case_id in self._slots or case_id in self._prefetching:
                return None
            self._prefetching.add(case_id)

        def run() -> None:
            try:
                self.get(case_id)
            except Exception as exc:  # noqa: BLE001 — a failed warm-up is retried by the real request
                log.warning("prefetch of case %d failed: %s", case_id, type(exc).__name__)
            finally:
                with self._lock:
                    self._prefetching.discard(case_id)

        thread = threading.Thread(target=run, name=f"prefetch-case-{case_id}", daemon=True)
        thread.start()
        return thread

    # -- dose (prepared after the CT, in the background: the first image must not wait) -------
    def _start_dose(self, case_id: int, slot: _Slot, services: Any) -> None:
        def run() -> None:
            try:
                found = services.load_dose(case_id)
                if found is not None and slot.case is not None:
                    slot.dose = prepare_dose(found, slot.case.shape)
            except Exception as exc:  # noqa: BLE001 — the overlay is optional; the reason is logged
                log.warning("case %d: dose overlay unavailable (%s)", case_id, type(exc).__name__)
            finally:
                slot.dose_ready.set()

        # Started a moment later so the first image and the first slabs do not share the CPU with it.
        timer = threading.Timer(DOSE_DELAY_S, run)
        timer.name = f"dose-case-{case_id}"
        timer.daemon = True
        timer.start()

    def dose_state(self, case_id: int) -> tuple[str, PreparedDose | None]:
        """``("pending", None)`` while the dose is prepared, then ``("ready", dose)`` or ``("none", None)``."""
        with self._lock:
            slot = self._slots.get(case_id)
        if slot is None or not slot.dose_ready.is_set():
            return "pending", None
        return ("ready", slot.dose) if slot.dose is not None else ("none", None)

    def dose(self, case_id: int, timeout_s: float = 120.0) -> PreparedDose | None:
        """The prepared dose, waiting for its preparation (None when the case has none)."""
        self.get(case_id)
        with self._lock:
            slot = self._slots.get(case_id)
        if slot is None:
            return None
        slot.dose_ready.wait(timeout_s)
        return slot.dose

    # -- prediction -------------------------------------------------------------------------
    def prediction(self, case_id: int, token: Any) -> PreparedPrediction | None:
        """The case's latest prediction, re-read when `token` (the case's ``updated_at``) changed."""
        prepared = self.get(case_id)
        with self._lock:
            slot = self._slots.get(case_id)
        if slot is None:  # evicted between the two lines: load without caching
            return self._load_prediction(case_id, prepared)
        with slot.prediction_lock:
            if slot.prediction_token != token:
                slot.prediction = self._load_prediction(case_id, prepared)
                slot.prediction_token = token
            return slot.prediction

    def _load_prediction(self, case_id: int, prepared: PreparedCase) -> PreparedPrediction | None:
        found = self._services().load_prediction(case_id)
        if found is None:
            return None
        mask_volume, version = found
        mask = np.asarray(mask_volume.array if isinstance(mask_volume, Volume) else mask_volume)
        if mask.shape != prepared.shape:
            raise ValueError(f"prediction grid {mask.shape} is not the CT grid {prepared.shape}")
        return prepare_prediction(mask, version)
