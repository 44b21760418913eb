"""A plausible radiotherapy dose distribution for a phantom: left-breast tangents or a lung plan.

This is not a dose engine. Each beam is a parallel beam with an exponential depth-dose (with a
build-up region), error-function field edges and an exponential out-of-field tail; the beams lie
in axial planes, so every beam's dose is a product of an in-plane map and a profile along ``z``.
The result is smooth, zero outside the body, normalised so the target median equals the
prescription, and gives the heart the low-to-moderate dose seen clinically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
from scipy.special import erf

from heartloop.phantom.anatomy import Anatomy
from heartloop.phantom.grid import CtGrid, Placement, ds_value
from heartloop.phantom.shapes import Blob, unit
from heartloop.phantom.torso import CAVITY, OUTER

Array = np.ndarray

MU_PER_MM = 0.0045  # 6 MV-like attenuation
PENUMBRA_SIGMA_MM = 3.5
#: Out-of-field dose (head scatter, leakage, patient scatter): two exponential tails.
TAILS = ((0.045, 30.0), (0.02, 100.0))
BUILDUP_MM = 6.0
MIN_BEAMS = 4
MAX_BEAM_SHARE = 0.3


class PlanKind(StrEnum):
    """Which treatment the phantom's RTDOSE represents."""

    BREAST = "breast"
    LUNG = "lung"


@dataclass(frozen=True, eq=False)
class DoseGrid:
    """A uniform dose grid (axial, LPS, mm)."""

    origin: tuple[float, float, float]
    spacing: float
    shape: tuple[int, int, int]  # frames, rows, columns

    @property
    def x(self) -> Array:
        return self.origin[0] + np.arange(self.shape[2]) * self.spacing

    @property
    def y(self) -> Array:
        return self.origin[1] + np.arange(self.shape[1]) * self.spacing

    @property
    def offsets(self) -> Array:
        return np.arange(self.shape[0]) * self.spacing

    @property
    def z(self) -> Array:
        return self.origin[2] + self.offsets


@dataclass(frozen=True, eq=False)
class Beam:
    """A parallel beam travelling along ``direction`` (axial plane), entering the body at ``entry``.

    The field is ``across_lo <= s <= across_hi`` in the in-plane coordinate ``s`` along
    ``across`` and ``w_lo <= w <= w_hi`` along ``z`` (body frame, mm).
    """

    direction: Array
    entry: Array
    across: Array
    origin: Array
    across_lo: float
    across_hi: float
    w_lo: float
    w_hi: float
    weight: float = 1.0


@dataclass(frozen=True, eq=False)
class Plan:
    kind: PlanKind
    prescription_gy: float
    beams: tuple[Beam, ...]
    target: Blob


def _edge(x: Array) -> Array:
    """Field-edge profile: 0 → 1 across ``x = 0`` (mm), with penumbra and a scatter tail."""
    x = np.asarray(x, dtype=np.float64)
    core = 0.5 * (1.0 + erf(x / (math.sqrt(2.0) * PENUMBRA_SIGMA_MM)))
    out = (1.0 - sum(f for f, _ in TAILS)) * core
    for fraction, length in TAILS:
        below = 0.5 * np.exp(np.minimum(x, 0.0) / length)
        tail = np.where(x < 0, below, 1.0 - 0.5 * np.exp(-np.maximum(x, 0.0) / length))
        out = out + fraction * tail
    return out


def _window(x: Array, lo: float, hi: float) -> Array:
    return _edge(x - lo) - _edge(x - hi)


def _depth_dose(depth: Array) -> Array:
    d = np.maximum(depth, 0.0)
    return (1.0 - 0.55 * np.exp(-d / BUILDUP_MM)) * np.exp(-MU_PER_MM * d)


def _beam_factors(beam: Beam, u: Array, v: Array, w: Array) -> tuple[Array, Array]:
    """In-plane factor (depth dose × lateral profile) at ``(u, v)`` and axial profile at ``w``."""
    depth = (u - beam.entry[0]) * beam.direction[0] + (v - beam.entry[1]) * beam.direction[1]
    s = (u - beam.origin[0]) * beam.across[0] + (v - beam.origin[1]) * beam.across[1]
    return _depth_dose(depth) * _window(s, beam.across_lo, beam.across_hi), _window(w, beam.w_lo, beam.w_hi)


def beam_dose(beam: Beam, u: Array, v: Array, w: Array) -> Array:
    """Relative dose ``(len(w), len(v), len(u))`` of one beam on a body-frame grid."""
    plane, along = _beam_factors(beam, u[None, :], v[:, None], w)
    return (along[:, None, None] * plane[None, :, :]).astype(np.float32)


def beam_dose_at(beam: Beam, points: Array) -> Array:
    """Relative dose of one beam at ``(n, 3)`` body-frame points."""
    plane, along = _beam_factors(beam, points[:, 0], points[:, 1], points[:, 2])
    return plane * along


def _entry(body: Array, ct_u: Array, ct_v: Array, point: Array, direction: Array) -> Array:
    """Where a ray arriving along ``direction`` at ``point`` first meets the body (2D slice mask)."""
    t = np.arange(0.0, 500.0, 1.0)
    pts = point[None, :2] - t[:, None] * direction[None, :2]
    i = np.clip(np.rint((pts[:, 0] - ct_u[0]) / (ct_u[1] - ct_u[0])).astype(int), 0, len(ct_u) - 1)
    j = np.clip(np.rint((pts[:, 1] - ct_v[0]) / (ct_v[1] - ct_v[0])).astype(int), 0, len(ct_v) - 1)
    inside = body[j, i]
    if not inside.any():
        return point.copy()
    far = t[np.nonzero(inside)[0].max()]
    return point - far * direction


def _slice_mask(body_mask: Array, ct_w: Array, w: float) -> Array:
    k = int(np.clip(np.searchsorted(ct_w, w), 0, len(ct_w) - 1))
    return body_mask[k]


def breast_plan(
    rng: np.random.Generator, anatomy: Anatomy, body_mask: Array, ct_u: Array, ct_v: Array, ct_w: Array
) -> Plan:
    """Two opposed tangential beams over the left breast (medial and lateral)."""
    left = [b for b in anatomy.breasts if b.mound.centre[0] > 0]
    if not left:
        raise ValueError("a breast plan needs a phantom with breasts")
    mound = left[0].mound
    torso = anatomy.torso
    w_b = float(mound.centre[2])
    u_m = float(rng.uniform(0.0, 12.0))
    medial = np.array([u_m, float(torso.front(u_m, w_b, OUTER)), w_b])
    ul, vl = torso.ring_points(np.array([np.pi * rng.uniform(0.47, 0.56)]), np.array([w_b]), OUTER, 0.0, 1.0)
    lateral = np.array([float(ul[0]), float(vl[0]), w_b])
    direction = unit(lateral - medial)
    direction[2] = 0.0
    across = np.array([direction[1], -direction[0], 0.0])
    if across[1] > 0:
        across = -across  # point anteriorly
    # The posterior field edge leaves a 1–2.5 cm strip of lung in the field (central lung distance).
    phis = np.linspace(np.pi * 0.45, np.pi, 60)
    cu, cv = torso.ring_points(phis, np.full_like(phis, w_b), CAVITY, 0.0, 1.0)
    s_wall = (cu - medial[0]) * across[0] + (cv - medial[1]) * across[1]
    edge = float(np.max(s_wall)) - float(rng.uniform(10.0, 22.0))
    half_len = float(mound.semi[2]) + float(rng.uniform(10.0, 20.0))
    body = _slice_mask(body_mask, ct_w, w_b)
    beams = []
    for d in (direction, -direction):
        start = medial if d is direction else lateral
        beams.append(Beam(
            direction=d, entry=_entry(body, ct_u, ct_v, start + 5.0 * d, d), across=across, origin=medial,
            across_lo=edge, across_hi=edge + 400.0, w_lo=w_b - half_len, w_hi=w_b + half_len,
        ))
    rx = float(rng.choice([40.05, 42.56, 50.0]))
    return Plan(kind=PlanKind.BREAST, prescription_gy=rx, beams=tuple(beams), target=mound)


def lung_plan(
    rng: np.random.Generator,
    anatomy: Anatomy,
    body_mask: Array,
    ct_u: Array,
    ct_v: Array,
    ct_w: Array,
    heart_points: Array,
) -> Plan:
    """Coplanar beams (four to nine) converging on the lung target, steered away from the heart."""
    target = anatomy.target
    if target is None:
        raise ValueError("a lung plan needs a target")
    iso = target.centre.copy()
    radius = float(np.mean(target.semi)) * 1.1 + 7.0  # PTV: GTV + 7 mm
    side = 1.0 if iso[0] > 0 else -1.0
    # Beams through the heart cost more when the target touches it (then they would dose it most).
    heart_cost = 4.0 if anatomy.tumour is not None else 1.0
    body = _slice_mask(body_mask, ct_w, float(iso[2]))
    candidates = []
    for gantry in np.radians(np.arange(0.0, 360.0, 10.0)):
        d = np.array([-np.sin(gantry), np.cos(gantry), 0.0])  # IEC 61217, head-first supine
        source_side = -d[0]
        if source_side * side < -0.5:
            continue  # never through the contralateral lung
        entry = _entry(body, ct_u, ct_v, iso, d)
        depth = float(np.linalg.norm(iso - entry))
        rel = heart_points - iso
        along = rel @ d
        perp = np.sqrt(np.maximum(np.sum(rel * rel, axis=1) - along**2, 0.0))
        hit = float(np.mean((perp < radius + 5.0) & (np.linalg.norm(rel, axis=1) > radius)))
        candidates.append((depth / 100.0 + heart_cost * hit + rng.uniform(0.0, 0.3), gantry, d, entry))
    candidates.sort(key=lambda c: c[0])
    n_beams = int(rng.integers(7, 10))
    chosen: list[tuple[float, float, Array, Array]] = []
    for cand in candidates:
        gap = min((abs((cand[1] - c[1] + np.pi) % (2 * np.pi) - np.pi) for c in chosen), default=np.pi)
        if gap >= np.radians(20.0):
            chosen.append(cand)
        if len(chosen) == n_beams:
            break
    beams = []
    for _, _, d, entry in chosen:
        across = np.array([-d[1], d[0], 0.0])
        beams.append(Beam(
            direction=d, entry=entry, across=across, origin=iso, across_lo=-radius, across_hi=radius,
            w_lo=float(iso[2]) - radius, w_hi=float(iso[2]) + radius,
        ))
    rx = float(rng.choice([55.0, 60.0, 66.0]))
    ptv = Blob(centre=iso, axes=np.eye(3), semi=np.full(3, radius))
    weights = _spare_heart(beams, ptv, heart_points, rx, float(rng.uniform(5.0, 9.0)))
    beams = [replace(b, weight=float(wt)) for b, wt in zip(beams, weights, strict=True)]
    return Plan(kind=PlanKind.LUNG, prescription_gy=rx, beams=tuple(beams), target=ptv)


def _spare_heart(beams: list[Beam], target: Blob, heart_points: Array, rx: float, limit_gy: float) -> Array:
    """Beam weights that keep the mean heart dose under ``limit_gy`` where the geometry allows.

    Like a planner lowering the weight of the beams that cross the heart: the beam with the
    worst heart-to-target dose ratio gives up 30 % of its weight, repeatedly, and is dropped
    when its weight becomes negligible (at least `MIN_BEAMS` stay, none above `MAX_BEAM_SHARE`).
    """
    inside = fibonacci_ball(target, 400)
    heart = np.array([beam_dose_at(b, heart_points).mean() for b in beams])
    tgt = np.array([beam_dose_at(b, inside).mean() for b in beams])
    weights = np.ones(len(beams)) / len(beams)
    ratio = heart / np.maximum(tgt, 1e-9)
    for _ in range(60):
        mhd = rx * float(weights @ heart) / float(weights @ tgt)
        if mhd <= limit_gy:
            break
        open_beams = np.nonzero(weights > 0)[0]
        worst = int(open_beams[np.argmax(ratio[open_beams])])
        if len(open_beams) <= MIN_BEAMS and weights[worst] < 0.2 / len(beams):
            break
        if weights[worst] < 0.1 / len(beams) and len(open_beams) > MIN_BEAMS:
            weights[worst] = 0.0
        else:
            weights[worst] *= 0.7
        # No beam carries much more than its share: entrance doses stay below the target dose.
        weights = np.minimum(weights / weights.sum(), MAX_BEAM_SHARE)
    return weights / weights.sum()


def fibonacci_ball(blob: Blob, n: int) -> Array:
    """``n`` points spread through a blob's ellipsoid (body frame)."""
    from heartloop.phantom.shapes import fibonacci_sphere

    dirs = fibonacci_sphere(n)
    radii = np.cbrt((np.arange(n) + 0.5) / n)
    local = dirs * radii[:, None] * blob.semi[None, :]
    return blob.centre + local @ blob.axes


def dose_grid(rng: np.random.Generator, ct: CtGrid, body_box: tuple[float, float, float, float]) -> DoseGrid:
    """A dose grid 2.5–3 mm (never finer than 1.25 CT pixels) over the body and the CT's z range."""
    spacing = float(rng.choice([2.5, 3.0]))
    spacing = max(spacing, math.ceil(2.5 * ct.pixel_spacing) / 2.0)
    x_lo, x_hi, y_lo, y_hi = body_box
    x0 = math.floor((x_lo - 5.0) * 2.0) / 2.0
    y0 = math.floor((y_lo - 5.0) * 2.0) / 2.0
    cols = int(math.ceil((x_hi + 5.0 - x0) / spacing)) + 1
    rows = int(math.ceil((y_hi + 5.0 - y0) / spacing)) + 1
    span = float(ct.slice_offsets[-1])
    frames = int(math.floor(span / spacing)) + 1
    z0 = ct.origin[2] + math.floor((span - (frames - 1) * spacing) / 2.0 * 4.0) / 4.0
    return DoseGrid(origin=(ds_value(x0), ds_value(y0), ds_value(z0)), spacing=spacing, shape=(frames, rows, cols))


def compute_dose(plan: Plan, grid: DoseGrid, placement: Placement, body_on_dose_grid: Array) -> Array:
    """Dose (Gy, float64) on the dose grid, zero outside the body, target median = prescription."""
    u = grid.x - placement.body_x
    v = grid.y - placement.body_y
    w = grid.z - placement.heart_z
    dose = np.zeros(grid.shape, dtype=np.float32)
    for beam in plan.beams:
        dose += np.float32(beam.weight) * beam_dose(beam, u, v, w)
    dose *= body_on_dose_grid
    # Normalise on points spread through the target (independent of the grid resolution).
    points = fibonacci_ball(plan.target, 800)
    reference = float(np.median(sum(b.weight * beam_dose_at(b, points) for b in plan.beams)))
    return dose.astype(np.float64) * (plan.prescription_gy / max(reference, 1e-6))
