"""The torso envelope: body outline, skin/fat/muscle layers, thoracic cavity and diaphragm.

Cross-sections are super-ellipses whose semi-axes change smoothly with height, so every layer
is, for each image row, one interval of ``u`` — that keeps rendering a broadcast comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heartloop.phantom.shapes import smoothstep

Array = np.ndarray

#: Layer indices for `Torso.half_width`: outer skin surface, under the skin, under the
#: subcutaneous fat, and the thoracic/abdominal cavity wall.
OUTER, UNDER_SKIN, UNDER_FAT, CAVITY = 0, 1, 2, 3


@dataclass(frozen=True)
class Torso:
    """Body outline and wall layers as functions of height ``w`` (body frame, mm).

    The chest section blends into a narrower neck above ``w_neck0..w_neck1`` and into the
    abdomen below ``w_abd1..w_abd0``. The back stays on the couch (``v = b_post``) except in the
    neck. The cavity (the inside of the muscle wall) shrinks to nothing at the lung apex.
    """

    a_chest: float
    a_abd: float
    a_neck: float
    b_ant_chest: float
    b_ant_abd: float
    b_ant_neck: float
    b_post: float
    b_post_neck: float
    v_neck: float
    p: float
    q_ant: float
    q_post: float
    lean: float
    w_neck0: float
    w_neck1: float
    w_abd0: float
    w_abd1: float
    skin: float
    fat: tuple[float, float, float]
    muscle: tuple[float, float, float]
    w_apex: float
    apex_len: float

    # -- profile ----------------------------------------------------------------------------
    def outline(self, w: Array) -> tuple[Array, Array, Array, Array, Array, Array]:
        """``(u_centre, v_centre, a, b_ant, b_post, neck_fraction)`` at heights ``w``."""
        w = np.asarray(w, dtype=np.float64)
        tn = smoothstep(w, self.w_neck0, self.w_neck1)
        ta = 1.0 - smoothstep(w, self.w_abd0, self.w_abd1)
        a_body = self.a_chest + (self.a_abd - self.a_chest) * ta
        b_ant_body = self.b_ant_chest + (self.b_ant_abd - self.b_ant_chest) * ta
        a = a_body + (self.a_neck - a_body) * tn
        b_ant = b_ant_body + (self.b_ant_neck - b_ant_body) * tn
        vc = self.v_neck * tn
        # Keep the back on the couch below the neck: v_centre + b_post == self.b_post.
        b_post = self.b_post + (self.b_post_neck - self.b_post) * tn - vc * (1.0 - tn)
        uc = self.lean * w
        return uc, vc, a, b_ant, b_post, tn

    def apex_factor(self, w: Array) -> tuple[Array, Array]:
        """Cavity scale factor (1 below the apex region, 0 above the apex) and its progress."""
        t = np.clip((np.asarray(w, dtype=np.float64) - (self.w_apex - self.apex_len)) / self.apex_len, 0.0, 1.0)
        return np.sqrt(np.maximum(0.0, 1.0 - t * t)), t

    def semi_axes(self, w: Array, layer: int) -> tuple[Array, Array, Array, Array, Array]:
        """``(u_centre, v_centre, a, b_ant, b_post)`` of one layer's super-ellipse at ``w``."""
        uc, vc, a, b_ant, b_post, tn = self.outline(w)
        if layer == OUTER:
            return uc, vc, a, b_ant, b_post
        scale = 1.0 - 0.6 * tn  # thinner fat and muscle in the neck
        lat = np.full_like(scale, self.skin)
        ant = np.full_like(scale, self.skin)
        post = np.full_like(scale, self.skin)
        if layer >= UNDER_FAT:
            lat += self.fat[0] * scale
            ant += self.fat[1] * scale
            post += self.fat[2] * scale
        if layer >= CAVITY:
            lat += self.muscle[0] * scale
            ant += self.muscle[1] * scale
            post += self.muscle[2] * scale
        a, b_ant, b_post = a - lat, b_ant - ant, b_post - post
        if layer == CAVITY:
            f, _ = self.apex_factor(w)
            f = f * (1.0 - tn)
            # The apices sit posteriorly: move the shrinking cavity backwards.
            shift = 0.35 * (1.0 - f) * b_ant
            vc = vc + shift
            a, b_ant, b_post = a * f, b_ant * f, b_post * f
        return uc, vc, np.maximum(a, 0.0), np.maximum(b_ant, 0.0), np.maximum(b_post, 0.0)

    def half_width(self, w: Array, v: Array, layer: int) -> tuple[Array, Array]:
        """Half width (mm) of a layer for every ``(w, v)`` pair, and the centre ``u`` per ``w``.

        Returns ``(half_width (len(w), len(v)) float32, u_centre (len(w),))``; the half width is
        negative where the row does not cut the layer.
        """
        uc, vc, a, b_ant, b_post = self.semi_axes(np.asarray(w), layer)
        v = np.asarray(v, dtype=np.float64)[None, :]
        dv = v - vc[:, None]
        front = dv < 0
        b = np.where(front, b_ant[:, None], b_post[:, None])
        q = np.where(front, self.q_ant, self.q_post)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = 1.0 - np.abs(dv / np.where(b > 0, b, 1.0)) ** q
            hw = a[:, None] * np.maximum(r, 0.0) ** (1.0 / self.p)
        hw = np.where((r > 0) & (b > 0) & (a[:, None] > 0), hw, -1.0)
        return hw.astype(np.float32), uc

    def contains(self, u: float, v: float, w: float, layer: int, margin: float = 0.0) -> bool:
        """Whether a point lies at least ``margin`` mm inside a layer (row-wise test)."""
        hw, uc = self.half_width(np.array([w]), np.array([v]), layer)
        return bool(abs(u - uc[0]) + margin < hw[0, 0])

    def front(self, u: Array | float, w: Array | float, layer: int) -> Array:
        """``v`` of a layer's anterior boundary at ``(u, w)`` (mm; NaN where ``u`` misses it)."""
        u = np.asarray(u, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        uc, vc, a, b_ant, _ = self.semi_axes(w.reshape(-1), layer)
        shape = np.broadcast_shapes(u.shape, w.shape)
        uc, vc, a, b_ant = (np.broadcast_to(x.reshape(w.shape), shape) for x in (uc, vc, a, b_ant))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = 1.0 - np.abs((u - uc) / a) ** self.p
            v = vc - b_ant * np.maximum(r, 0.0) ** (1.0 / self.q_ant)
        return np.where((a > 0) & (r > 0), v, np.nan)

    def ring_points(self, phi: Array, w: Array, layer: int, offset: float, side: float) -> tuple[Array, Array]:
        """Points ``(u, v)`` on a layer's super-ellipse grown by ``offset`` mm.

        ``phi = 0`` is the back (posterior midline), ``phi = pi`` the front, at heights ``w``
        (same shape as ``phi``); ``side`` is +1 for the patient's left and -1 for the right.
        """
        phi = np.asarray(phi, dtype=np.float64)
        heights = np.broadcast_to(np.asarray(w, dtype=np.float64), phi.shape).reshape(-1)
        uc, vc, a, b_ant, b_post = self.semi_axes(heights, layer)
        phi = phi.reshape(-1)
        s, c = np.abs(np.sin(phi)), np.cos(phi)
        u = uc + side * (a + offset) * s ** (2.0 / self.p)
        v_post = vc + (b_post + offset) * np.abs(c) ** (2.0 / self.q_post)
        v_ant = vc - (b_ant + offset) * np.abs(c) ** (2.0 / self.q_ant)
        return u, np.where(c >= 0, v_post, v_ant)


@dataclass(frozen=True)
class Diaphragm:
    """Two domes (right higher) that separate the lungs from the liver and the upper abdomen."""

    w_ref: float
    u_right: float
    u_left: float
    h_right: float
    h_left: float
    width: float
    drop: float
    drop_post: float
    v_post0: float
    liver_u0: float
    liver_slope: float
    liver_curve: float

    def height(self, u: Array | float, v: Array | float) -> Array:
        """Height ``w`` of the diaphragm over body-frame ``(u, v)`` (broadcast)."""
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        right = self.h_right - self.drop * ((u - self.u_right) / self.width) ** 2
        left = self.h_left - self.drop * ((u - self.u_left) / self.width) ** 2
        post = self.drop_post * (np.maximum(v - self.v_post0, 0.0) / 90.0) ** 2
        return self.w_ref + np.maximum(right, left) - post

    def liver_side(self, u: Array | float, v: Array | float) -> Array:
        """True where the upper abdomen is liver rather than stomach/spleen/bowel."""
        v = np.asarray(v, dtype=np.float64)
        return np.asarray(u) < self.liver_u0 + self.liver_slope * (-v) - self.liver_curve * v * v
