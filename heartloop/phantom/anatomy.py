"""One synthetic patient's anatomy, drawn from a random generator, in the body frame.

Nothing here knows about voxels: `draw_anatomy` returns numbers and analytic shapes, and
`heartloop.phantom.render` turns them into a label map on any CT grid. The body frame is DICOM
LPS shifted so that ``u = v = 0`` is the body centre at heart level and ``w = 0`` the heart
centre (``u`` towards the patient's left, ``v`` posterior, ``w`` superior; mm).

The layout is built from the front to the back so organs touch the way they do in a patient:
the heart rests against the anterior chest wall, the oesophagus and descending aorta lie behind
it in front of the spine, the liver dome rises under it, and the great vessels leave its base.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from heartloop.phantom.shapes import (
    Blob,
    Tube,
    ellipsoid,
    lumpy_blob,
    random_unit,
    spline,
    unit,
)
from heartloop.phantom.tissue import draw_hu_table
from heartloop.phantom.torso import CAVITY, OUTER, Diaphragm, Torso

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class Heart:
    """The heart as a lumpy egg plus its interior and the fat rim around it.

    ``rim_*`` describe the thickness (mm) of the pericardial fat rim as a function of direction:
    ``rim0 + rim_amp * mean(cos(freq * (n . dir) + phase))``; where it is ≤ 0 the heart touches
    whatever lies next to it.
    """

    blob: Blob
    rim0: float
    rim_amp: float
    rim_dirs: Array
    rim_freq: Array
    rim_phase: Array
    chambers: tuple[tuple[Array, Array], ...]  # (centre, semi) in normalised local coordinates
    calcium: tuple[tuple[Array, float], ...]  # (body-frame centre, radius mm)
    low: Array  # bounding box (body frame)
    high: Array

    @property
    def max_rim(self) -> float:
        return max(0.0, self.rim0 + self.rim_amp)


@dataclass(frozen=True, eq=False)
class Vertebra:
    w_lo: float
    w_hi: float
    rx: float
    ry: float
    level: str


@dataclass(frozen=True, eq=False)
class Spine:
    v_body: float
    v_canal: float
    r_canal: float
    cortex: float
    vertebrae: tuple[Vertebra, ...]
    posterior: tuple[Tube, ...]  # laminae, spinous and transverse processes (bone)


@dataclass(frozen=True, eq=False)
class Rib:
    bone: Tube
    cartilage: Tube | None


@dataclass(frozen=True, eq=False)
class Sternum:
    w_top: float
    w_joint: float  # manubrium / body
    w_bottom: float
    rx_manubrium: float
    rx_body: float
    ry: float

    def half_width(self, w: Array) -> Array:
        w = np.asarray(w, dtype=np.float64)
        rx = np.where(w > self.w_joint, self.rx_manubrium, self.rx_body)
        taper = np.clip((w - self.w_bottom) / 25.0, 0.35, 1.0)  # xiphoid narrows
        return np.where((w >= self.w_bottom) & (w <= self.w_top), rx * taper, 0.0)


@dataclass(frozen=True, eq=False)
class Breast:
    mound: Blob
    gland: Blob
    texture_dirs: Array
    texture_freq: Array
    texture_phase: Array
    texture_level: float


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Everything that makes one synthetic patient, before it meets a CT grid."""

    female: bool
    torso: Torso
    diaphragm: Diaphragm
    heart: Heart
    spine: Spine
    ribs: tuple[Rib, ...]
    sternum: Sternum
    clavicles: tuple[Tube, ...]
    vessels: tuple[tuple[str, Tube], ...]
    airway: tuple[Tube, ...]
    airway_wall: float
    esophagus: Tube
    lung_vessels: tuple[Tube, ...]
    stomach: Blob
    stomach_gas: bool
    spleen: Blob
    breasts: tuple[Breast, ...]
    tumour: Blob | None  # soft-tissue mass touching the heart
    nodule: Blob | None  # lung target away from the heart (lung plans without `tumour`)
    couch_top: float  # v of the couch surface
    hu: Array = field(repr=False)  # mean HU per `Tissue`
    noise_sd: float = 15.0

    @property
    def heart_w_range(self) -> tuple[float, float]:
        """Lowest and highest ``w`` (mm) the heart can reach (its whole rim included)."""
        rim = self.heart.max_rim + 1.0
        return float(self.heart.low[2] - rim), float(self.heart.high[2] + rim)

    @property
    def target(self) -> Blob | None:
        """The lung-plan target: the heart-adjacent tumour if present, else the nodule."""
        return self.tumour if self.tumour is not None else self.nodule


# ---------------------------------------------------------------------------------------------
def _heart(rng: np.random.Generator, female: bool) -> tuple[Blob, float]:
    """The heart blob centred at the origin, and its target volume (cc)."""
    volume_cc = rng.uniform(560.0, 880.0) * (0.92 if female else 1.0)
    r_small = rng.uniform(0.64, 0.74)
    r_large = rng.uniform(0.80, 0.90)
    taper = rng.uniform(0.12, 0.28)
    k = (volume_cc * 1000.0 / (4.0 / 3.0 * np.pi * r_small * r_large * (1.0 + taper**2 / 5.0))) ** (1.0 / 3.0)
    semi = np.array([k, k * r_small, k * r_large])
    # Long axis from the base (right, posterior, superior) to the apex (left, anterior, inferior).
    azimuth = np.radians(rng.uniform(35.0, 55.0))
    tilt = np.radians(rng.uniform(15.0, 32.0))
    e1 = np.array([np.cos(tilt) * np.sin(azimuth), -np.cos(tilt) * np.cos(azimuth), -np.sin(tilt)])
    post = np.array([0.0, 1.0, 0.0])
    e2 = unit(post - (post @ e1) * e1)
    e3 = np.cross(e1, e2)
    roll = np.radians(rng.uniform(-20.0, 20.0))
    e2, e3 = np.cos(roll) * e2 + np.sin(roll) * e3, -np.sin(roll) * e2 + np.cos(roll) * e3
    axes = np.vstack([e1, e2, e3])
    blob = lumpy_blob(rng, np.zeros(3), axes, semi, taper=taper, n_bumps=4, amp=0.045)
    return blob, volume_cc


def _moved(blob: Blob, centre: Array) -> Blob:
    return Blob(
        centre=np.asarray(centre, dtype=np.float64),
        axes=blob.axes,
        semi=blob.semi,
        taper=blob.taper,
        bump_dirs=blob.bump_dirs,
        bump_freq=blob.bump_freq,
        bump_phase=blob.bump_phase,
        bump_amp=blob.bump_amp,
    )


def _vertebrae(rng: np.random.Generator, w_t8: float, size: float) -> list[Vertebra]:
    """C4..L3 vertebral bodies, T8's middle at ``w_t8``."""
    names = [f"C{i}" for i in range(4, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 4)]
    heights, discs, rxs, rys = [], [], [], []
    for name in names:
        if name[0] == "C":
            h, d, rx, ry = 14.0, 4.5, 12.0, 8.5
        elif name[0] == "T":
            i = int(name[1:])
            h, d, rx, ry = 17.0 + 0.8 * i, 5.0 + 0.15 * i, 14.0 + 0.55 * i, 11.0 + 0.45 * i
        else:
            h, d, rx, ry = 26.0, 8.5, 22.0, 16.5
        heights.append(h * size * rng.uniform(0.97, 1.03))
        discs.append(d * size)
        rxs.append(rx * size)
        rys.append(ry * size)
    i8 = names.index("T8")
    # Walk up and down from T8 (index order is top to bottom, so w decreases with the index).
    w_hi = np.zeros(len(names))
    w_lo = np.zeros(len(names))
    w_hi[i8] = w_t8 + heights[i8] / 2.0
    w_lo[i8] = w_t8 - heights[i8] / 2.0
    for i in range(i8 - 1, -1, -1):
        w_lo[i] = w_hi[i + 1] + discs[i]
        w_hi[i] = w_lo[i] + heights[i]
    for i in range(i8 + 1, len(names)):
        w_hi[i] = w_lo[i - 1] - discs[i - 1]
        w_lo[i] = w_hi[i] - heights[i]
    return [Vertebra(float(w_lo[i]), float(w_hi[i]), rxs[i], rys[i], names[i]) for i in range(len(names))]


def _branches(
    rng: np.random.Generator, start: Array, direction: Array, length: float, radius: float, depth: int
) -> list[Tube]:
    """A random branching vessel tree (segments as two-point tubes)."""
    end = start + direction * length
    tubes = [Tube(points=np.vstack([start, end]), radii=np.array([radius, radius * 0.85]))]
    if depth > 0:
        for _ in range(2):
            turn = rng.normal(size=3)
            turn -= (turn @ direction) * direction
            new_dir = unit(direction + 0.7 * unit(turn) * rng.uniform(0.5, 1.0))
            tubes += _branches(rng, end, new_dir, length * rng.uniform(0.65, 0.85), radius * 0.7, depth - 1)
    return tubes


def draw_anatomy(rng: np.random.Generator, *, female: bool, tumour: bool, lung_target: bool) -> Anatomy:
    """Draw one patient's anatomy.

    Parameters
    ----------
    rng
        The anatomy's own random stream (the same stream gives the same patient).
    female
        Adds breasts and a little more subcutaneous fat.
    tumour
        Adds a soft-tissue mass touching the heart.
    lung_target
        Adds a lung nodule as the target of a lung plan when there is no heart-adjacent tumour.
    """
    size = rng.uniform(0.92, 1.1) * (0.95 if female else 1.0)
    skin = 1.5
    fat = (
        rng.uniform(8.0, 28.0) * (1.25 if female else 1.0),
        rng.uniform(5.0, 20.0),
        rng.uniform(6.0, 20.0),
    )
    muscle = (rng.uniform(11.0, 16.0), rng.uniform(14.0, 20.0), rng.uniform(26.0, 34.0))
    a_chest = 158.0 * size * rng.uniform(0.95, 1.06)
    b_ant = 112.0 * size * rng.uniform(0.93, 1.07)
    p = rng.uniform(2.1, 2.5)
    q_ant = rng.uniform(1.8, 2.1)
    q_post = rng.uniform(2.6, 3.2)
    vert = _vertebrae(rng, rng.uniform(-20.0, 10.0), size)
    lv = {v.level: v for v in vert}
    # Lung apices reach about the first thoracic vertebra, above the clavicles.
    w_apex = 0.5 * (lv["T1"].w_lo + lv["T1"].w_hi) + rng.uniform(-5.0, 10.0)
    provisional = Torso(
        a_chest=a_chest, a_abd=a_chest, a_neck=a_chest, b_ant_chest=b_ant, b_ant_abd=b_ant,
        b_ant_neck=b_ant, b_post=120.0, b_post_neck=120.0, v_neck=0.0, p=p, q_ant=q_ant,
        q_post=q_post, lean=0.0, w_neck0=900.0, w_neck1=901.0, w_abd0=-901.0, w_abd1=-900.0,
        skin=skin, fat=fat, muscle=muscle, w_apex=w_apex, apex_len=75.0,
    )

    # -- heart, against the anterior chest wall --------------------------------------------
    heart0, _ = _heart(rng, female)
    u_h = rng.uniform(10.0, 26.0) * size
    heart0 = _moved(heart0, np.array([u_h, 0.0, 0.0]))
    pts = heart0.surface_points()
    front = provisional.front(pts[:, 0], pts[:, 2], CAVITY)
    ok = np.isfinite(front)
    overlap = rng.uniform(2.0, 6.0)
    v_h = -overlap - float(np.min(pts[ok, 1] - front[ok]))
    heart_blob = _moved(heart0, np.array([u_h, v_h, 0.0]))
    low, high = heart_blob.extent()
    v_hp = float(high[1])  # posterior-most heart point
    w_top, w_bot = float(high[2]), float(low[2])

    # -- behind the heart: oesophagus, descending aorta, spine ------------------------------
    r_e = rng.uniform(7.0, 9.0)
    v_e = v_hp + r_e - 2.0
    r_da = rng.uniform(11.0, 13.5) * size
    v_vbf = v_e + r_e + 1.5  # front of the vertebral bodies at heart level
    ry_mid = next(v.ry for v in vert if v.level == "T8")
    rx_mid = next(v.rx for v in vert if v.level == "T8")
    v_vb = v_vbf + ry_mid
    r_can = rng.uniform(7.0, 8.5)
    v_can = v_vb + ry_mid + 3.0 + r_can
    v_cav_post = v_can + 2.0
    b_post = v_cav_post + muscle[2] + fat[2] + skin
    u_da = rx_mid * 0.7 + r_da * 0.85
    v_da = v_vbf + 0.25 * r_da

    torso = Torso(
        a_chest=a_chest,
        a_abd=a_chest * rng.uniform(0.95, 1.08),
        a_neck=62.0 * size,
        b_ant_chest=b_ant,
        b_ant_abd=b_ant * rng.uniform(0.95, 1.1),
        b_ant_neck=55.0 * size,
        b_post=b_post,
        b_post_neck=60.0 * size,
        v_neck=v_vb - 20.0,
        p=p,
        q_ant=q_ant,
        q_post=q_post,
        lean=rng.uniform(-0.02, 0.02),
        w_neck0=w_apex - 5.0,
        w_neck1=w_apex + 50.0,
        w_abd0=-210.0,
        w_abd1=-110.0,
        skin=skin,
        fat=fat,
        muscle=muscle,
        w_apex=w_apex,
        apex_len=75.0,
    )

    # -- diaphragm: the heart sinks a little into the dome ---------------------------------
    w_heart_floor = -heart_blob.surface_distance(np.array([0.0, 0.0, -1.0]))
    h_right = rng.uniform(15.0, 30.0)
    dia0 = Diaphragm(
        w_ref=0.0, u_right=-60.0 * size, u_left=55.0 * size, h_right=h_right,
        h_left=h_right - rng.uniform(10.0, 22.0), width=85.0 * size, drop=rng.uniform(70.0, 90.0),
        drop_post=rng.uniform(35.0, 55.0), v_post0=0.0, liver_u0=rng.uniform(5.0, 25.0),
        liver_slope=rng.uniform(0.35, 0.6), liver_curve=rng.uniform(0.002, 0.005),
    )
    sink = rng.uniform(4.0, 10.0)
    w_ref = w_heart_floor + sink - float(dia0.height(u_h, v_h))
    diaphragm = replace(dia0, w_ref=w_ref)
    w_dome_left = float(diaphragm.height(diaphragm.u_left, 0.0))

    # -- heart interior, rim, calcium -------------------------------------------------------
    chambers = (
        (np.array([0.25, 0.28, 0.05]), np.array([0.55, 0.42, 0.45])),  # left ventricle
        (np.array([0.05, -0.45, 0.10]), np.array([0.55, 0.30, 0.50])),  # right ventricle
        (np.array([-0.55, 0.20, 0.00]), np.array([0.35, 0.55, 0.65])),  # atria
    )
    calcium = []
    for _ in range(int(rng.choice([0, 0, 0, 1, 2, 3, 5]))):
        beta = rng.uniform(0.0, 2.0 * np.pi)
        local = np.array([-0.3, np.cos(beta), np.sin(beta)])
        direction = unit(heart_blob.axes.T @ (local * heart_blob.semi))
        dist = heart_blob.surface_distance(direction)
        calcium.append((heart_blob.centre + direction * (dist - 2.5), float(rng.uniform(1.2, 2.8))))
    n_rim = 3
    heart = Heart(
        blob=heart_blob,
        rim0=rng.uniform(0.8, 2.0),
        rim_amp=rng.uniform(1.5, 2.5),
        rim_dirs=random_unit(rng, n_rim),
        rim_freq=rng.uniform(2.5, 5.0, n_rim),
        rim_phase=rng.uniform(0.0, 2.0 * np.pi, n_rim),
        chambers=chambers,
        calcium=tuple(calcium),
        low=low,
        high=high,
    )

    # -- airway ----------------------------------------------------------------------------
    r_tr = rng.uniform(8.0, 10.0)
    wall = rng.uniform(1.5, 2.5)
    u_tr = rng.uniform(-3.0, 3.0)
    v_tr = v_e - r_e - r_tr - wall - 1.5
    w_car = w_top + rng.uniform(15.0, 30.0)
    trachea = spline(
        np.array([[u_tr, v_tr - 18.0, 420.0], [u_tr, v_tr - 12.0, w_apex + 30.0],
                  [u_tr, v_tr, w_car + 35.0], [u_tr, v_tr + 2.0, w_car]]),
        np.array([r_tr, r_tr, r_tr, r_tr * 0.9]) + wall,
    )
    bronchi = []
    for side in (-1.0, 1.0):
        bronchi.append(spline(
            np.array([[u_tr, v_tr + 2.0, w_car + 4.0], [u_tr + side * 20.0, v_tr + 6.0, w_car - 12.0],
                      [u_tr + side * 45.0, v_tr + 12.0, w_car - 32.0]]),
            np.array([r_tr * 0.75, 6.5, 5.0]) + wall,
        ))
    airway = (trachea, *bronchi)

    # -- oesophagus -------------------------------------------------------------------------
    u_e = rng.uniform(2.0, 9.0)
    esophagus = spline(
        np.array([[u_e - 4.0, v_vbf - r_e - 1.0, 420.0], [u_e - 2.0, v_vbf - r_e - 1.0, w_car],
                  [u_e, v_e, 0.0], [u_e + 10.0, v_e + 2.0, w_bot - 5.0],
                  [40.0 * size, v_vbf - 25.0, w_dome_left - 25.0]]),
        np.full(5, r_e),
    )

    # -- great vessels ---------------------------------------------------------------------
    u_r, u_l, v_a = float(low[0]), float(high[0]), float(low[1])
    r_aa = rng.uniform(13.0, 16.0) * size
    w_arch = w_top + rng.uniform(48.0, 65.0)
    aorta = spline(
        np.array([
            [u_h - 0.4 * (u_h - u_r), v_h - 6.0, w_top - 28.0],
            [0.2 * u_h - 8.0, v_h - 14.0, w_top + 8.0],
            [-6.0, v_h - 10.0, w_top + 38.0],
            [2.0, v_tr - r_tr - wall - r_aa - 1.5, w_arch],
            [u_tr + r_tr + wall + r_da + 2.0, v_tr + 3.0, w_arch - 10.0],
            [u_da, v_da, w_arch - 40.0],
            [u_da, v_da, w_bot - 20.0],
            [u_da * 0.5, v_da + 5.0, w_bot - 90.0],
            [3.0, v_da + 10.0, -420.0],
        ]),
        np.array([r_aa * 0.95, r_aa, r_aa, r_aa * 0.92, r_da * 1.05, r_da, r_da, r_da * 0.95, r_da * 0.9]),
    )
    r_pa = rng.uniform(12.0, 15.0) * size
    pa_bif = np.array([8.0, v_h - 2.0, w_top + 22.0])
    pa_trunk = spline(
        np.array([[u_h + 0.2 * (u_l - u_h), v_a + 24.0, w_top - 22.0],
                  [0.5 * u_h + 5.0, v_h - 16.0, w_top + 10.0], pa_bif]),
        np.array([r_pa, r_pa, r_pa * 0.95]),
    )
    hilum_w = w_car - 22.0
    lpa = spline(np.array([pa_bif, [30.0, v_h + 8.0, w_top + 30.0], [52.0 * size, v_tr + 12.0, hilum_w + 4.0]]),
                 np.array([r_pa * 0.75, 10.0, 8.5]))
    rpa = spline(np.array([pa_bif, [-10.0, v_tr - r_tr - wall - 11.0, w_top + 20.0],
                           [-35.0, v_tr + 4.0, hilum_w + 6.0], [-52.0 * size, v_tr + 12.0, hilum_w]]),
                 np.array([r_pa * 0.75, 10.0, 9.5, 8.5]))
    r_svc = rng.uniform(9.0, 11.0)
    svc = spline(
        np.array([[-26.0, v_h - 8.0, w_arch + 18.0], [-27.0, v_h - 3.0, w_top + 20.0],
                  [u_r + 0.3 * (u_h - u_r), v_h + 4.0, w_top - 25.0]]),
        np.array([r_svc, r_svc, r_svc]),
    )
    bcv_left = spline(np.array([[-26.0, v_h - 8.0, w_arch + 18.0], [25.0, v_h - 18.0, w_arch + 28.0],
                                [55.0 * size, v_h - 8.0, w_arch + 48.0]]), np.array([7.0, 7.0, 6.5]))
    jugular_right = spline(np.array([[-26.0, v_h - 8.0, w_arch + 18.0], [-38.0, v_tr - 10.0, w_arch + 60.0],
                                     [-32.0, v_tr + 2.0, 420.0]]), np.array([7.5, 7.0, 6.5]))
    jugular_left = spline(np.array([[55.0 * size, v_h - 8.0, w_arch + 48.0], [34.0, v_tr + 2.0, 420.0]]),
                          np.array([6.5, 6.5]))
    ivc = spline(
        np.array([[-15.0, v_h + 22.0, -420.0], [-18.0, v_h + 16.0, w_bot - 12.0],
                  [u_r + 0.35 * (u_h - u_r), v_h + 10.0, w_bot + 15.0]]),
        np.full(3, rng.uniform(10.0, 13.0)),
    )
    # Arch branches rise from the top of the arch.
    arch_idx = np.argsort(-aorta.points[:, 2])[:1][0]
    branches = []
    for frac, (u_end, r) in zip((-14.0, 0.0, 14.0), ((-24.0, 6.0), (22.0, 4.5), (38.0, 5.0)), strict=True):
        start = aorta.points[arch_idx] + np.array([frac * 0.8, frac * 0.3, r_aa * 0.6])
        branches.append(spline(np.array([start, [start[0] * 1.4, start[1] + 6.0, w_arch + 40.0],
                                         [u_end, v_tr + 4.0, 420.0]]), np.array([r, r, r * 0.9])))
    la = np.array([u_h - 5.0, v_hp - 18.0, 0.3 * w_top])
    pulmonary_veins = []
    for side in (-1.0, 1.0):
        for dw in (-12.0, 12.0):
            start = la + np.array([side * 12.0, 0.0, dw])
            end = np.array([side * 52.0 * size, v_tr + 16.0, la[2] + dw * 1.6])
            pulmonary_veins.append(spline(np.array([start, 0.5 * (start + end) + [0, 4.0, 0], end]),
                                          np.array([7.0, 6.5, 6.0])))
    vessels = (
        ("aorta", aorta), ("pulmonary_trunk", pa_trunk), ("lpa", lpa), ("rpa", rpa), ("svc", svc),
        ("bcv_left", bcv_left), ("jugular_right", jugular_right), ("jugular_left", jugular_left),
        ("ivc", ivc),
        *((f"arch_branch_{i}", b) for i, b in enumerate(branches)),
        *((f"pulmonary_vein_{i}", b) for i, b in enumerate(pulmonary_veins)),
    )

    # -- lung vessels from the hila ----------------------------------------------------------
    lung_vessels: list[Tube] = []
    for side in (-1.0, 1.0):
        for dw in (-25.0, 0.0, 20.0):
            hilum = np.array([side * 48.0 * size, v_tr + 12.0, hilum_w + dw])
            for heading in ((side, -0.4, 0.9), (side, 0.3, 0.1), (side, -0.8, -0.3), (side * 0.5, 0.6, -0.9)):
                d = unit(np.asarray(heading) + rng.normal(scale=0.25, size=3))
                lung_vessels += _branches(rng, hilum, d, rng.uniform(25.0, 35.0), 3.5, 3)

    # -- spine -------------------------------------------------------------------------------
    posterior = []
    for vb in vert:
        mid = 0.5 * (vb.w_lo + vb.w_hi)
        h = vb.w_hi - vb.w_lo
        scale = 0.7 if vb.level[0] == "C" else 1.0
        # Lamina ring as a short vertical tube of the canal radius + 4 mm (hollowed by the canal).
        posterior.append(Tube(points=np.array([[0.0, v_can, vb.w_lo + 0.15 * h], [0.0, v_can, vb.w_hi - 0.15 * h]]),
                              radii=np.full(2, r_can + 4.0)))
        tip = np.array([0.0, v_can + r_can + 28.0 * scale, mid - (16.0 if vb.level[0] == "T" else 6.0)])
        posterior.append(Tube(points=np.array([[0.0, v_can + r_can + 2.0, mid], tip]), radii=np.array([4.5, 3.5])))
        for side in (-1.0, 1.0):
            posterior.append(Tube(points=np.array([[side * (r_can + 2.0), v_can, mid + 2.0],
                                                   [side * 30.0 * scale * size, v_can + 6.0, mid + 2.0]]),
                                  radii=np.array([4.5, 4.0])))
    spine = Spine(v_body=v_vb, v_canal=v_can, r_canal=r_can, cortex=1.5, vertebrae=tuple(vert),
                  posterior=tuple(posterior))

    # -- sternum -----------------------------------------------------------------------------
    sternum = Sternum(
        w_top=lv["T2"].w_lo - 2.0,
        w_joint=lv["T4"].w_lo,
        w_bottom=lv["T9"].w_lo,
        rx_manubrium=rng.uniform(22.0, 28.0) * size,
        rx_body=rng.uniform(12.0, 16.0) * size,
        ry=rng.uniform(5.5, 7.0),
    )

    # -- ribs --------------------------------------------------------------------------------
    ribs = []
    attach = np.linspace(sternum.w_top - 12.0, sternum.w_bottom + 8.0, 7)
    for i in range(1, 13):
        vb = lv[f"T{i}"]
        w_i = 0.5 * (vb.w_lo + vb.w_hi)
        r_rib = (4.0 if i == 1 else 3.4) * size  # radial half thickness; twice that in height
        drop = min(28.0 + 10.0 * (i - 1), 100.0)
        phis = np.linspace(0.0, np.pi, 181)
        ring_u, _ = torso.ring_points(phis, np.full_like(phis, w_i), CAVITY, 0.0, 1.0)
        phi0 = float(phis[np.argmax(ring_u > 45.0)]) if np.any(ring_u > 45.0) else 0.4
        if i <= 7:
            phi_bone, phi_end = np.pi * rng.uniform(0.76, 0.82), np.pi
        elif i <= 10:
            phi_bone, phi_end = np.pi * 0.78, np.pi * 0.86
        else:
            phi_bone, phi_end = np.pi * (0.58 if i == 11 else 0.48), None
        bone_phi = np.linspace(phi0, phi_bone, 24)
        w_path = w_i - drop * ((bone_phi - phi0) / (np.pi - phi0)) ** 1.2
        for side in (-1.0, 1.0):
            head = np.array([side * (vb.rx + 2.0), v_vb + vb.ry * 0.6, w_i + 3.0])
            tubercle = np.array([side * 30.0 * size, v_can + 8.0, w_i])
            rib_u, rib_v = torso.ring_points(bone_phi, w_path, CAVITY, r_rib + 1.5, side)
            ring = np.stack([rib_u, rib_v, w_path], axis=1)
            control = np.vstack([head, tubercle, ring[::3], ring[-1:]])
            bone = spline(control, np.full(len(control), r_rib), step_mm=10.0)
            cartilage = None
            if phi_end is not None:
                cphi = np.linspace(phi_bone, phi_end, 25)
                w_end = attach[i - 1] if i <= 7 else w_path[-1] + 15.0
                cw = w_path[-1] + (w_end - w_path[-1]) * (cphi - phi_bone) / (phi_end - phi_bone)
                cu, cv = torso.ring_points(cphi, cw, CAVITY, r_rib + 1.5, side)
                keep = np.ones(len(cphi), dtype=bool)
                if i <= 7:  # stop at the edge of the sternum
                    at_sternum = np.abs(cu) < sternum.half_width(cw) + 2.0
                    if at_sternum.any():
                        keep[int(np.argmax(at_sternum)) + 1 :] = False
                pts = np.stack([cu, cv, cw], axis=1)[keep]
                if len(pts) >= 2:
                    cartilage = spline(np.vstack([pts[::4], pts[-1:]]), np.full(len(pts[::4]) + 1, r_rib * 0.95),
                                       step_mm=8.0)
            ribs.append(Rib(bone=bone, cartilage=cartilage))

    # -- clavicles ---------------------------------------------------------------------------
    clavicles = []
    w_notch = sternum.w_top
    v_st_top = float(torso.front(0.0, w_notch, CAVITY))
    if not np.isfinite(v_st_top):
        v_st_top = -b_ant * 0.6
    for side in (-1.0, 1.0):
        clavicles.append(spline(
            np.array([[side * (sternum.rx_manubrium - 4.0), v_st_top - 10.0, w_notch + 4.0],
                      [side * 70.0 * size, v_st_top - 8.0, w_notch + 14.0],
                      [side * 125.0 * size, v_st_top + 25.0, w_notch + 32.0]]),
            np.array([7.0, 6.5, 7.5]) * size,
        ))

    # -- abdomen -----------------------------------------------------------------------------
    stomach = lumpy_blob(rng, np.array([62.0 * size, -8.0, w_dome_left - 48.0]), np.eye(3),
                         np.array([45.0, 40.0, 50.0]) * size, n_bumps=3, amp=0.06)
    spleen = lumpy_blob(rng, np.array([95.0 * size, 55.0, w_dome_left - 60.0]), np.eye(3),
                        np.array([28.0, 42.0, 55.0]) * size, n_bumps=3, amp=0.05)

    # -- breasts -----------------------------------------------------------------------------
    breasts = []
    if female:
        w_b = rng.uniform(-45.0, 0.0)
        size_b = rng.uniform(0.7, 1.3)
        for side in (-1.0, 1.0):
            u_b = side * rng.uniform(80.0, 100.0) * size
            v_surface = float(torso.front(u_b, w_b, OUTER))
            # Supine breasts spread sideways and flatten against the chest wall.
            semi = np.array([rng.uniform(70.0, 90.0), rng.uniform(28.0, 45.0) * size_b, rng.uniform(55.0, 70.0)])
            sag = np.radians(side * rng.uniform(15.0, 30.0))
            axes = np.array([[np.cos(sag), np.sin(sag), 0.0], [-np.sin(sag), np.cos(sag), 0.0], [0.0, 0.0, 1.0]])
            centre = np.array([u_b + side * 10.0, v_surface + 0.35 * semi[1] + 8.0, w_b])
            mound = lumpy_blob(rng, centre, axes, semi, n_bumps=3, amp=0.03)
            gland = ellipsoid(centre + np.array([0.0, -0.3 * semi[1], 0.0]), semi * rng.uniform(0.55, 0.75), axes)
            breasts.append(Breast(
                mound=mound, gland=gland, texture_dirs=random_unit(rng, 5),
                texture_freq=rng.uniform(0.15, 0.35, 5), texture_phase=rng.uniform(0.0, 2.0 * np.pi, 5),
                texture_level=rng.uniform(-0.4, 0.6),
            ))

    # -- tumour next to the heart, or a lung nodule ----------------------------------------
    tumour_blob = None
    if tumour:
        choices = [np.radians(a) for a in (0.0, 35.0, 180.0)]  # left, left-posterior, right
        alpha = choices[int(rng.integers(len(choices)))] + rng.uniform(-0.2, 0.2)
        direction = unit(np.array([np.cos(alpha), np.sin(alpha), rng.uniform(-0.4, 0.3)]))
        dist = heart_blob.surface_distance(direction)
        r_t = rng.uniform(13.0, 24.0)
        centre = heart_blob.centre + direction * (dist + 0.6 * r_t)
        tumour_blob = lumpy_blob(rng, centre, np.eye(3), np.full(3, r_t) * rng.uniform(0.85, 1.15, 3),
                                 n_bumps=6, amp=0.08, freq=(2.0, 5.0))
    nodule_blob = None
    if lung_target and not tumour:
        r_n = rng.uniform(10.0, 18.0)
        side = 1.0 if rng.random() < 0.7 else -1.0
        spot: Array | None = None
        for _ in range(40):
            cand = np.array([side * rng.uniform(45.0, 80.0) * size, rng.uniform(-35.0, 40.0), rng.uniform(-30.0, 35.0)])
            far_from_heart = np.linalg.norm(cand - heart_blob.centre) > heart_blob.max_radius + r_n + 5.0
            if torso.contains(cand[0], cand[1], cand[2], CAVITY, margin=r_n + 12.0) and far_from_heart:
                spot = cand
                break
        if spot is None:
            spot = np.array([side * 75.0 * size, 20.0, 40.0])
        nodule_blob = lumpy_blob(rng, spot, np.eye(3), np.full(3, r_n), n_bumps=5, amp=0.1, freq=(2.0, 5.0))

    return Anatomy(
        female=female,
        torso=torso,
        diaphragm=diaphragm,
        heart=heart,
        spine=spine,
        ribs=tuple(ribs),
        sternum=sternum,
        clavicles=tuple(clavicles),
        vessels=vessels,
        airway=airway,
        airway_wall=wall,
        esophagus=esophagus,
        lung_vessels=tuple(lung_vessels),
        stomach=stomach,
        stomach_gas=bool(rng.random() < 0.6),
        spleen=spleen,
        breasts=tuple(breasts),
        tumour=tumour_blob,
        nodule=nodule_blob,
        couch_top=b_post + 0.5,
        hu=draw_hu_table(rng),
        noise_sd=float(rng.uniform(10.0, 20.0)),
    )
