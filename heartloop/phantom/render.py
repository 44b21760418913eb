"""Turn an `Anatomy` into a tissue label map on a CT grid, then into Hounsfield units.

Shapes are evaluated only inside their bounding boxes; the torso layers, which fill the whole
volume, are one broadcast comparison per layer (each layer is an interval of ``u`` per row).
Later tissues are painted over earlier ones where an ``allowed`` look-up table permits, so the
final label map is the single source of truth for both the CT and the heart mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from heartloop.phantom.anatomy import Anatomy
from heartloop.phantom.grid import CtGrid, Placement
from heartloop.phantom.shapes import Blob, Tube, segment_distance
from heartloop.phantom.tissue import (
    BONE_TISSUES,
    HEART_TISSUES,
    OUTSIDE_TISSUES,
    Tissue,
    all_but,
    lut,
)
from heartloop.phantom.torso import CAVITY, OUTER, UNDER_FAT, UNDER_SKIN

log = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]

_SOFT_ANYWHERE = all_but(OUTSIDE_TISSUES | BONE_TISSUES | HEART_TISSUES | {Tissue.AIRWAY, Tissue.AIRWAY_WALL,
                                                                          Tissue.SKIN})
_LUNGLIKE = lut({Tissue.LUNG, Tissue.MEDIASTINAL_FAT, Tissue.LUNG_VESSEL})
_ONLY_LUNG = lut({Tissue.LUNG})
_INSIDE_BODY = all_but(OUTSIDE_TISSUES)
_HEART_MAY_COVER = lut({Tissue.LUNG, Tissue.MEDIASTINAL_FAT, Tissue.LUNG_VESSEL, Tissue.MUSCLE, Tissue.ABDOMEN,
                        Tissue.LIVER, Tissue.STOMACH_WALL, Tissue.STOMACH_CONTENT, Tissue.GAS, Tissue.TUMOUR})
_HEART_LUT = lut(HEART_TISSUES)
_BODY_LUT = all_but(OUTSIDE_TISSUES)
_NOT_MARROW = all_but({Tissue.MARROW})
_NOT_LUMEN = all_but({Tissue.AIRWAY})
#: Blur of the reconstruction (mm, Gaussian sigma) — the partial-volume edge and noise texture.
PSF_SIGMA_MM = 0.7
_SLAB = 8


class _Painter:
    """Paints tissues into a label volume inside bounding boxes given in body-frame mm."""

    def __init__(self, labels: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> None:
        self.labels = labels
        self.u, self.v, self.w = u, v, w

    def box(self, low: np.ndarray, high: np.ndarray) -> Box | None:
        """Index slices of the voxels whose centres lie in ``[low, high]`` (u, v, w), or None."""
        i0, i1 = np.searchsorted(self.u, low[0], "left"), np.searchsorted(self.u, high[0], "right")
        j0, j1 = np.searchsorted(self.v, low[1], "left"), np.searchsorted(self.v, high[1], "right")
        k0, k1 = np.searchsorted(self.w, low[2], "left"), np.searchsorted(self.w, high[2], "right")
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return None
        return slice(k0, k1), slice(j0, j1), slice(i0, i1)

    def offsets(self, box: Box, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable ``(du, dv, dw)`` of the box voxels from ``centre``."""
        sk, sj, si = box
        du = (self.u[si] - np.float32(centre[0]))[None, None, :]
        dv = (self.v[sj] - np.float32(centre[1]))[None, :, None]
        dw = (self.w[sk] - np.float32(centre[2]))[:, None, None]
        return du, dv, dw

    def paint(self, box: Box, mask: np.ndarray, tissue: Tissue, allowed: np.ndarray | None) -> None:
        sub = self.labels[box]
        if allowed is not None:
            mask = mask & allowed[sub]
        sub[mask] = int(tissue)

    # -- primitives --------------------------------------------------------------------------
    def blob(self, blob: Blob, tissue: Tissue, allowed: np.ndarray | None, grow_mm: float = 0.0) -> None:
        r = blob.half_extents() + grow_mm + 1.0
        box = self.box(blob.centre - r, blob.centre + r)
        if box is None:
            return
        rho, rs, _, radius = blob.evaluate(*self.offsets(box, blob.centre))
        limit = rs + np.float32(grow_mm) / radius if grow_mm else rs
        self.paint(box, rho < limit, tissue, allowed)

    def tube(
        self,
        tube: Tube,
        tissue: Tissue,
        allowed: np.ndarray | None,
        *,
        grow_mm: float = 0.0,
        inner: tuple[Tissue, float] | None = None,
        height_ratio: float = 1.0,
    ) -> None:
        """Paint a tube; with ``inner=(tissue, wall_mm)`` the tube is a shell around that tissue.

        Shell segments never overwrite the inner tissue of their neighbours, so joints stay
        hollow (bone marrow, airway lumen). ``height_ratio`` stretches the cross-section along
        ``w`` (a rib is about twice as tall as it is thick).
        """
        pts = tube.points
        radii = tube.radii + grow_mm
        p0, p1 = pts[:-1], pts[1:]
        r = np.maximum(radii[:-1], radii[1:])
        reach = np.stack([r, r, r * height_ratio], axis=1)
        lo = np.minimum(p0, p1) - reach
        hi = np.maximum(p0, p1) + reach
        i0, i1 = np.searchsorted(self.u, lo[:, 0], "left"), np.searchsorted(self.u, hi[:, 0], "right")
        j0, j1 = np.searchsorted(self.v, lo[:, 1], "left"), np.searchsorted(self.v, hi[:, 1], "right")
        k0, k1 = np.searchsorted(self.w, lo[:, 2], "left"), np.searchsorted(self.w, hi[:, 2], "right")
        todo = np.nonzero((i0 < i1) & (j0 < j1) & (k0 < k1))[0]
        if len(todo) == 0:
            return
        outer_allowed = allowed
        if inner is not None:
            keep = _NOT_MARROW if inner[0] == Tissue.MARROW else _NOT_LUMEN
            outer_allowed = keep if allowed is None else (allowed & keep)
        squash = np.float32(1.0 / height_ratio)
        for s in todo:
            box = (slice(k0[s], k1[s]), slice(j0[s], j1[s]), slice(i0[s], i1[s]))
            du, dv, dw = self.offsets(box, p0[s])
            d = p1[s] - p0[s]
            if height_ratio != 1.0:
                dw = dw * squash
                d = d * np.array([1.0, 1.0, 1.0 / height_ratio])
            dist, t = segment_distance(du, dv, dw, d)
            rad = np.float32(radii[s]) + t * np.float32(radii[s + 1] - radii[s])
            self.paint(box, dist < rad, tissue, outer_allowed)
            if inner is not None:
                self.paint(box, dist < rad - np.float32(inner[1]), inner[0], allowed)


# ---------------------------------------------------------------------------------------------
def _torso(painter: _Painter, anatomy: Anatomy) -> None:
    """Skin, fat, muscle and cavity by counting the nested layers that contain each voxel."""
    labels, u, v, w = painter.labels, painter.u, painter.v, painter.w
    torso = anatomy.torso
    hw0, uc0 = torso.half_width(w, v, OUTER)
    rows = np.nonzero((hw0 > 0).any(axis=0))[0]
    if len(rows) == 0:
        return
    j0, j1 = int(rows[0]), int(rows[-1]) + 1
    reach = float(hw0.max())
    i0 = int(np.searchsorted(u, float(uc0.min()) - reach, "left"))
    i1 = int(np.searchsorted(u, float(uc0.max()) + reach, "right"))
    body = labels[:, j0:j1, i0:i1]
    for layer in (OUTER, UNDER_SKIN, UNDER_FAT, CAVITY):
        hw, uc = (hw0, uc0) if layer == OUTER else torso.half_width(w, v, layer)
        abs_u = np.abs(u[None, None, i0:i1] - uc.astype(np.float32)[:, None, None])
        body += abs_u < hw[:, j0:j1, None]
    # Below the diaphragm the cavity is abdomen: liver on the right, the rest on the left.
    dome = anatomy.diaphragm.height(u[None, i0:i1], v[j0:j1, None]).astype(np.float32)
    k1 = int(np.searchsorted(w, float(dome.max()), "right"))
    if k1 > 0:
        sub = body[:k1]
        below = (sub == Tissue.LUNG) & (w[:k1, None, None] < dome[None])
        sub[below] = int(Tissue.ABDOMEN)
        liver = anatomy.diaphragm.liver_side(u[None, i0:i1], v[j0:j1, None])
        sub[(sub == Tissue.ABDOMEN) & liver[None]] = int(Tissue.LIVER)


def _abdomen(painter: _Painter, anatomy: Anatomy) -> None:
    only_abd = lut({Tissue.ABDOMEN})
    painter.blob(anatomy.spleen, Tissue.SPLEEN, only_abd)
    stomach = anatomy.stomach
    r = stomach.half_extents() + 1.0
    box = painter.box(stomach.centre - r, stomach.centre + r)
    if box is None:
        return
    du, dv, dw = painter.offsets(box, stomach.centre)
    rho, rs, _, radius = stomach.evaluate(du, dv, dw)
    inside = rho < rs
    painter.paint(box, inside, Tissue.STOMACH_WALL, only_abd)
    content = rho < rs - np.float32(4.0) / radius
    painter.paint(box, content, Tissue.STOMACH_CONTENT, lut({Tissue.STOMACH_WALL}))
    if anatomy.stomach_gas:
        level = np.float32(0.35 * stomach.semi[2])
        painter.paint(box, content & (dw > level), Tissue.GAS, lut({Tissue.STOMACH_CONTENT}))


def _breasts(painter: _Painter, anatomy: Anatomy) -> None:
    for breast in anatomy.breasts:
        mound = breast.mound
        r = mound.half_extents() + 1.0
        box = painter.box(mound.centre - r, mound.centre + r)
        if box is None:
            continue
        du, dv, dw = painter.offsets(box, mound.centre)
        rho, rs, _, radius = mound.evaluate(du, dv, dw)
        painter.paint(box, rho < rs, Tissue.SKIN, lut({Tissue.AIR}))
        painter.paint(box, rho < rs - np.float32(2.0) / radius, Tissue.FAT, lut({Tissue.AIR, Tissue.SKIN}))
        g = breast.gland
        gd = (du + np.float32(mound.centre[0] - g.centre[0]), dv + np.float32(mound.centre[1] - g.centre[1]),
              dw + np.float32(mound.centre[2] - g.centre[2]))
        grho, grs, _, _ = g.evaluate(*gd)
        texture = np.zeros(np.broadcast_shapes(du.shape, dv.shape, dw.shape), dtype=np.float32)
        for d, f, ph in zip(breast.texture_dirs, breast.texture_freq, breast.texture_phase, strict=True):
            texture += np.cos(np.float32(f) * (du * np.float32(d[0]) + dv * np.float32(d[1]) + dw * np.float32(d[2]))
                              + np.float32(ph))
        texture /= np.float32(len(breast.texture_freq))
        # Denser towards the middle of the gland, patchy towards its edge.
        density = texture + np.float32(0.5) * (np.float32(1.0) - grho)
        gland = (grho < grs) & (density > np.float32(breast.texture_level * 0.5))
        painter.paint(box, gland, Tissue.BREAST_GLAND, lut({Tissue.FAT}))


def _mediastinum(painter: _Painter, anatomy: Anatomy) -> None:
    """Fat between the lungs and around the structures that run through the mediastinum."""
    spine = anatomy.spine
    # Paravertebral muscles and the prevertebral space: the lungs only wrap the spine's sides.
    rx = max(vb.rx for vb in spine.vertebrae if vb.level.startswith("T"))
    ry = max(vb.ry for vb in spine.vertebrae if vb.level.startswith("T"))
    soft = lut({Tissue.LUNG, Tissue.ABDOMEN, Tissue.LIVER, Tissue.MEDIASTINAL_FAT})
    for centre, semi in (
        (np.array([0.0, spine.v_body, 0.0]), (rx + 4.0, ry + 4.0)),
        (np.array([0.0, spine.v_canal + 12.0, 0.0]), (42.0, 30.0)),
    ):
        reach = np.array([semi[0], semi[1], 1e4])
        box = painter.box(centre - reach, centre + reach)
        if box is not None:
            du, dv, _ = painter.offsets(box, centre)
            region = (du / np.float32(semi[0])) ** 2 + (dv / np.float32(semi[1])) ** 2 < 1.0
            painter.paint(box, np.broadcast_to(region, painter.labels[box].shape), Tissue.MUSCLE, soft)
    # A midline band of fat from the sternum to the spine.
    band = 9.0
    box = painter.box(np.array([-band - 30.0, -400.0, -1e4]), np.array([band + 30.0, spine.v_body, 1e4]))
    if box is not None:
        du, _, dw = painter.offsets(box, np.zeros(3))
        centre = np.float32(anatomy.torso.lean) * dw + np.float32(3.0)
        painter.paint(box, np.abs(du - centre) < np.float32(band), Tissue.MEDIASTINAL_FAT, _ONLY_LUNG)
    # Fat pads around the vessels, airway and oesophagus.
    for _, tube in anatomy.vessels:
        painter.tube(tube, Tissue.MEDIASTINAL_FAT, _ONLY_LUNG, grow_mm=4.0)
    for tube in anatomy.airway:
        painter.tube(tube, Tissue.MEDIASTINAL_FAT, _ONLY_LUNG, grow_mm=3.0)
    painter.tube(anatomy.esophagus, Tissue.MEDIASTINAL_FAT, _ONLY_LUNG, grow_mm=4.0)


def _heart(painter: _Painter, anatomy: Anatomy) -> None:
    """The pericardial fat rim (with gaps), any tumour beside the heart, then the heart itself."""
    heart = anatomy.heart
    blob = heart.blob
    pad = heart.max_rim + 2.0
    box = painter.box(heart.low - pad, heart.high + pad)
    if box is None:
        return
    rho, rs, (q1, q2, q3), radius = blob.evaluate(*painter.offsets(box, blob.centre))
    inv = np.float32(1.0) / np.maximum(rho, np.float32(1e-6))
    rim = np.zeros_like(rho)
    for d, f, ph in zip(heart.rim_dirs, heart.rim_freq, heart.rim_phase, strict=True):
        rim += np.cos(np.float32(f) * (q1 * inv * np.float32(d[0]) + q2 * inv * np.float32(d[1])
                                       + q3 * inv * np.float32(d[2])) + np.float32(ph))
    rim *= np.float32(heart.rim_amp / len(heart.rim_freq))
    rim += np.float32(heart.rim0)
    np.maximum(rim, np.float32(0.0), out=rim)
    painter.paint(box, rho < rs + rim / radius, Tissue.MEDIASTINAL_FAT, _LUNGLIKE)
    for blob_t in (anatomy.tumour, anatomy.nodule):
        if blob_t is not None:
            painter.blob(blob_t, Tissue.TUMOUR, _LUNGLIKE)
    inside = rho < rs
    painter.paint(box, inside, Tissue.HEART_MUSCLE, _HEART_MAY_COVER)
    is_heart_muscle = lut({Tissue.HEART_MUSCLE})
    for centre, semi in heart.chambers:
        c = centre.astype(np.float32)
        s = semi.astype(np.float32)
        chamber = ((q1 - c[0]) / s[0]) ** 2 + ((q2 - c[1]) / s[1]) ** 2 + ((q3 - c[2]) / s[2]) ** 2 < 1.0
        painter.paint(box, chamber & inside, Tissue.HEART_BLOOD, is_heart_muscle)
    outer = rho > np.float32(0.9) * rs
    grooves = (np.abs(q1 + np.float32(0.3)) < np.float32(0.06)) | (
        (np.abs(q2 + np.float32(0.15)) < np.float32(0.05)) & (q1 > np.float32(-0.25))
    )
    painter.paint(box, inside & outer & grooves, Tissue.HEART_FAT, lut({Tissue.HEART_MUSCLE, Tissue.HEART_BLOOD}))
    for centre, r in heart.calcium:
        painter.blob(Blob(centre=centre, axes=np.eye(3), semi=np.full(3, r)), Tissue.CORONARY_CALCIUM,
                     lut({Tissue.HEART_MUSCLE, Tissue.HEART_FAT, Tissue.HEART_BLOOD}))


def _tubes(painter: _Painter, anatomy: Anatomy) -> None:
    airway_ok = all_but(OUTSIDE_TISSUES | BONE_TISSUES | HEART_TISSUES | {Tissue.SKIN})
    for tube in anatomy.airway:
        painter.tube(tube, Tissue.AIRWAY_WALL, airway_ok, inner=(Tissue.AIRWAY, anatomy.airway_wall))
    painter.tube(anatomy.esophagus, Tissue.ESOPHAGUS, _SOFT_ANYWHERE)
    for _, tube in anatomy.vessels:
        painter.tube(tube, Tissue.VESSEL, _SOFT_ANYWHERE & all_but({Tissue.ESOPHAGUS}))
    for tube in anatomy.lung_vessels:
        painter.tube(tube, Tissue.LUNG_VESSEL, _ONLY_LUNG)


def _bones(painter: _Painter, anatomy: Anatomy) -> None:
    spine = anatomy.spine
    bone_ok = _INSIDE_BODY & all_but(HEART_TISSUES)
    for i, vb in enumerate(spine.vertebrae):
        below = spine.vertebrae[i + 1].w_hi if i + 1 < len(spine.vertebrae) else vb.w_lo
        box = painter.box(np.array([-vb.rx, spine.v_body - vb.ry, below]),
                          np.array([vb.rx, spine.v_body + vb.ry, vb.w_hi]))
        if box is None:
            continue
        du, dv, dw = painter.offsets(box, np.array([0.0, spine.v_body, 0.0]))
        rho = np.sqrt((du / np.float32(vb.rx)) ** 2 + (dv / np.float32(vb.ry)) ** 2)
        body = (rho < 1.0) & (dw >= np.float32(vb.w_lo))
        painter.paint(box, body, Tissue.CORTICAL_BONE, bone_ok)
        core = (rho < 1.0 - spine.cortex / vb.rx) & (dw >= np.float32(vb.w_lo + spine.cortex)) & (
            dw <= np.float32(vb.w_hi - spine.cortex))
        painter.paint(box, core, Tissue.MARROW, bone_ok)
        painter.paint(box, (rho < 0.97) & (dw < np.float32(vb.w_lo)), Tissue.DISC, bone_ok)
    for tube in spine.posterior:
        painter.tube(tube, Tissue.CORTICAL_BONE, bone_ok, inner=(Tissue.MARROW, spine.cortex))
    canal = Tube(points=np.array([[0.0, spine.v_canal, -1e4], [0.0, spine.v_canal, 1e4]]),
                 radii=np.full(2, spine.r_canal))
    painter.tube(canal, Tissue.SPINAL_CANAL, bone_ok)
    for rib in anatomy.ribs:
        painter.tube(rib.bone, Tissue.CORTICAL_BONE, bone_ok, inner=(Tissue.MARROW, 1.2), height_ratio=2.0)
        if rib.cartilage is not None:
            painter.tube(rib.cartilage, Tissue.CARTILAGE, bone_ok & all_but({Tissue.CORTICAL_BONE, Tissue.MARROW}),
                         height_ratio=2.0)
    for tube in anatomy.clavicles:
        painter.tube(tube, Tissue.CORTICAL_BONE, bone_ok, inner=(Tissue.MARROW, 2.0))
    _sternum(painter, anatomy, bone_ok)


def _sternum(painter: _Painter, anatomy: Anatomy, bone_ok: np.ndarray) -> None:
    st = anatomy.sternum
    w = painter.w.astype(np.float64)
    hw = st.half_width(w)
    ks = np.nonzero(hw > 0)[0]
    if len(ks) == 0:
        return
    uc, vc, _, b_ant, _ = anatomy.torso.semi_axes(w, CAVITY)
    front = vc - b_ant  # cavity front at the midline
    k0, k1 = int(ks[0]), int(ks[-1]) + 1
    box = painter.box(np.array([-st.rx_manubrium - 2.0, float(np.min(front[k0:k1])) - 2 * st.ry - 4.0, w[k0] - 0.1]),
                      np.array([st.rx_manubrium + 2.0, float(np.max(front[k0:k1])) + 2.0, w[k1 - 1] + 0.1]))
    if box is None:
        return
    sk, sj, si = box
    du = painter.u[si][None, None, :] - uc[sk].astype(np.float32)[:, None, None]
    v_centre = (front[sk] - st.ry - 0.5).astype(np.float32)[:, None, None]
    dv = painter.v[sj][None, :, None] - v_centre
    rx = np.maximum(hw[sk], 1e-3).astype(np.float32)[:, None, None]
    ry = np.float32(st.ry)
    rho2 = (du / rx) ** 2 + (dv / ry) ** 2
    present = (hw[sk] > 0)[:, None, None]
    painter.paint(box, (rho2 < 1.0) & present, Tissue.CORTICAL_BONE, bone_ok)
    inner = (du / np.maximum(rx - 1.2, 0.5)) ** 2 + (dv / (ry - 1.2)) ** 2 < 1.0
    painter.paint(box, inner & present, Tissue.MARROW, bone_ok)


def _couch(painter: _Painter, anatomy: Anatomy, centre_u: float) -> None:
    top = anatomy.couch_top
    box = painter.box(np.array([centre_u - 260.0, top, -1e4]), np.array([centre_u + 260.0, top + 48.0, 1e4]))
    if box is None:
        return
    _, dv, _ = painter.offsets(box, np.array([0.0, top, 0.0]))
    shell = (dv < 2.5) | (dv > 45.5)
    sub = painter.labels[box]
    air = sub == Tissue.AIR
    sub[air & shell] = int(Tissue.COUCH_SHELL)
    sub[air & ~shell] = int(Tissue.COUCH_FOAM)


def render_labels(anatomy: Anatomy, grid: CtGrid, placement: Placement) -> np.ndarray:
    """The tissue label map ``(slices, rows, columns)`` as uint8 `Tissue` values."""
    u, v, w = placement.to_body(grid)
    labels = np.zeros((grid.n_slices, grid.rows, grid.rows), dtype=np.uint8)
    painter = _Painter(labels, u, v, w)
    _torso(painter, anatomy)
    _abdomen(painter, anatomy)
    _breasts(painter, anatomy)
    _mediastinum(painter, anatomy)
    _heart(painter, anatomy)
    _tubes(painter, anatomy)
    _bones(painter, anatomy)
    _couch(painter, anatomy, placement.image_centre_x - placement.body_x)
    return labels


def heart_mask(labels: np.ndarray, anatomy: Anatomy, grid: CtGrid, placement: Placement) -> np.ndarray:
    """True heart (everything inside the pericardium) from a label map."""
    u, v, w = placement.to_body(grid)
    painter = _Painter(labels, u, v, w)
    pad = anatomy.heart.max_rim + 3.0
    mask = np.zeros(labels.shape, dtype=bool)
    box = painter.box(anatomy.heart.low - pad, anatomy.heart.high + pad)
    if box is not None:
        mask[box] = _HEART_LUT[labels[box]]
    return mask


def body_mask(labels: np.ndarray, anatomy: Anatomy, grid: CtGrid, placement: Placement) -> np.ndarray:
    """The patient (not air, not couch) from a label map."""
    body = labels != Tissue.AIR
    _, v, _ = placement.to_body(grid)
    j0 = int(np.searchsorted(v, anatomy.couch_top - 1.0, "left"))
    j1 = int(np.searchsorted(v, anatomy.couch_top + 50.0, "right"))
    if j0 < j1:
        body[:, j0:j1] &= _BODY_LUT[labels[:, j0:j1]]
    return body


def _smooth3(a: np.ndarray, tmp: np.ndarray, scratch: np.ndarray, weight: float) -> None:
    """In-place 3-tap blur ``[w, 1-2w, w]`` along rows and columns (edges replicated)."""
    if weight <= 0:
        return
    c = np.float32(1.0 - 2.0 * weight)
    wt = np.float32(weight)
    for src, dst, axis in ((a, tmp, 2), (tmp, a, 1)):
        np.multiply(src, wt, out=scratch)
        np.multiply(src, c, out=dst)
        if axis == 2:
            dst[:, :, 1:] += scratch[:, :, :-1]
            dst[:, :, :-1] += scratch[:, :, 1:]
            dst[:, :, 0] += scratch[:, :, 0]
            dst[:, :, -1] += scratch[:, :, -1]
        else:
            dst[:, 1:] += scratch[:, :-1]
            dst[:, :-1] += scratch[:, 1:]
            dst[:, 0] += scratch[:, 0]
            dst[:, -1] += scratch[:, -1]


def labels_to_hu(
    labels: np.ndarray, anatomy: Anatomy, grid: CtGrid, placement: Placement, seed: Sequence[int]
) -> np.ndarray:
    """CT numbers (int16 HU, clipped to [-1024, 3071]) from a label map.

    Each tissue gets its mean HU, the lungs a gravity gradient (denser posteriorly), then white
    Gaussian noise and a small in-plane blur are applied together — the blur is the partial-volume
    edge of a real reconstruction and gives the noise its grain. The noise is scaled so that its
    standard deviation after the blur is ``anatomy.noise_sd``. Slabs of slices are processed on
    two threads; each slab draws its noise from its own stream (``seed + [slab]``), so the result
    does not depend on scheduling.
    """
    k_total, rows, cols = labels.shape
    _, v, _ = placement.to_body(grid)
    weight = min(0.25, 0.5 * (PSF_SIGMA_MM / grid.pixel_spacing) ** 2)
    var_factor = ((1.0 - 2.0 * weight) ** 2 + 2.0 * weight**2) ** 2
    noise_scale = np.float32(anatomy.noise_sd / np.sqrt(var_factor))
    lung_gradient = (np.clip((v + 100.0) / 200.0, 0.0, 1.0) * 70.0 - 20.0).astype(np.float32)[None, :, None]
    table = anatomy.hu
    out = np.empty(labels.shape, dtype=np.int16)
    slabs = list(range(0, k_total, _SLAB))

    def work(first: int, last: int) -> None:
        shape = (_SLAB, rows, cols)
        buf, noise, tmp, scratch = (np.empty(shape, dtype=np.float32) for _ in range(4))
        is_lung = np.empty(shape, dtype=bool)
        for index in range(first, last):
            k0 = slabs[index]
            k1 = min(k_total, k0 + _SLAB)
            n = k1 - k0
            lab = labels[k0:k1]
            b, nz, tm, sc, lung = buf[:n], noise[:n], tmp[:n], scratch[:n], is_lung[:n]
            np.take(table, lab, out=b)
            np.equal(lab, int(Tissue.LUNG), out=lung)
            np.add(b, lung_gradient, out=b, where=lung)
            rng = np.random.default_rng(np.random.SeedSequence([*seed, index]))
            rng.standard_normal(out=nz, dtype=np.float32)
            nz *= noise_scale
            b += nz
            _smooth3(b, tm, sc, weight)
            np.rint(b, out=b)
            np.clip(b, -1024.0, 3071.0, out=b)
            out[k0:k1] = b

    half = (len(slabs) + 1) // 2
    if len(slabs) < 4:
        work(0, len(slabs))
    else:
        with ThreadPoolExecutor(max_workers=2) as pool:
            jobs = [pool.submit(work, 0, half), pool.submit(work, half, len(slabs))]
            for job in jobs:
                job.result()
    return out
