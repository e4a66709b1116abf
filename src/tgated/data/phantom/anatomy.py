"""The patient's anatomy: each stage draws one system's random shapes from the case's generator,
returns what later stages place their structures by (frozen records: :class:`Torso`, :class:`Spine`,
:class:`GreatVessels`, :class:`Kidney`, :class:`Spleen`, :class:`Liver`, :class:`Gut`) and its
painting operations. :func:`draw_case` runs the stages in a fixed order (the order fixes the random
draws: changing it changes every phantom) and orders the operations anatomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from tgated.data.phantom.body import (
    Body,
    Diaphragm,
    RibShape,
    Scene,
    SpineShape,
    paint_body_wall,
    paint_ribs,
    paint_spine,
    paint_thorax,
)
from tgated.data.phantom.shapes import (
    Box,
    Ellipsoid,
    Region,
    Slab,
    Tube,
    Union,
    ZTube,
    bowel_walk,
    harmonics,
    jitter,
    rotation,
    smooth_max,
)
from tgated.data.phantom.tissues import KEEP, MUSCLE, SOFT, TISSUE, VISCERAL_FAT
from tgated.organs import ORGANS

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "LPI")
"""Axis codes the cases are stored in (chosen per case); readers must reorient."""
SLICE_SPACINGS_MM: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SLICE_SPACING_P = (0.12, 0.14, 0.2, 0.2, 0.14, 0.2)
MAX_SLICES = 100
"""Thin-slice cases cover less of the abdomen instead of exceeding this many slices."""

ORGAN_ID = {o.name: o.id for o in ORGANS}

Op = Callable[[Scene], None]
"""A painting operation: draws one structure into the scene."""


@dataclass(frozen=True)
class Torso:
    """The patient's frame, drawn first: body outline, diaphragm, breathing and the scanned range."""

    body: Body
    diaphragm: Diaphragm
    breath: float
    """Breathing shift (mm, + = inspiration lowers nothing, shifts the domes and upper organs up)."""
    z_bottom: float
    """Lowest z (mm) a structure needs: 40 mm below the scanned range."""
    z_top: float
    """Highest z (mm) a structure needs: 40 mm above the scanned range."""
    scan_top: float
    """Top of the scanned range (mm)."""
    front: float
    """Y (mm) of the anterior cavity boundary on the midline."""
    right: float
    """X (mm) of the right cavity boundary at Y = 0."""
    left: float
    """X (mm) of the left cavity boundary at Y = 0."""


@dataclass(frozen=True)
class Spine:
    """The vertebral column's place, which the retroperitoneal organs are placed against."""

    body_rx: float
    """Semi-axes (mm) of the vertebral bodies, left-right and antero-posterior."""
    body_ry: float
    back: float
    """Y (mm) of the posterior cavity boundary on the midline."""
    centre_y: float
    """Y (mm) of the vertebral bodies' centre."""
    front: float
    """Y (mm) of their anterior surface."""
    depth: float
    """Room in front of the spine (mm), to the anterior cavity boundary: anterior organs scale with it."""


@dataclass(frozen=True)
class GreatVessels:
    """Aorta and inferior vena cava: the landmarks most other structures are placed by."""

    aorta: ZTube
    ivc: ZTube
    aorta_radius: float
    aorta_x: float
    """X (mm) of the aorta low in the abdomen."""
    ivc_x: float
    ivc_top: float
    """Z (mm) where the IVC ends, in the right atrium."""
    hiatus: float
    """Z (mm) of the oesophageal hiatus."""

    def aorta_centre(self, z: float) -> np.ndarray:
        """(x, y) of the aorta's centre at height ``z``."""
        return np.array([np.interp(z, self.aorta.zk, self.aorta.cx), np.interp(z, self.aorta.zk, self.aorta.cy)])

    def ivc_centre(self, z: float) -> np.ndarray:
        """(x, y) of the IVC's centre at height ``z``."""
        return np.array([np.interp(z, self.ivc.zk, self.ivc.cx), np.interp(z, self.ivc.zk, self.ivc.cy)])


@dataclass(frozen=True)
class Kidney:
    centre: np.ndarray
    hilum: np.ndarray
    top: np.ndarray
    """The upper pole (the adrenal sits above it)."""


@dataclass(frozen=True)
class Spleen:
    centre: np.ndarray
    hilum: np.ndarray


@dataclass(frozen=True)
class Liver:
    hilum: np.ndarray
    """Porta hepatis: where the portal vein and the hepatic artery enter."""


@dataclass(frozen=True)
class Gut:
    """Pancreas and duodenum, which the bowel, stomach and mesenteric vessels are placed by."""

    pylorus: np.ndarray
    flexure: np.ndarray
    """The duodeno-jejunal flexure, where the jejunum starts."""
    pancreas_z: float
    """Height (mm) of the pancreatic neck and body."""
    aorta_front_y: float
    """Y (mm) just in front of the aorta, where the SMA / portal confluence run."""
    pancreas: Tube


@dataclass(frozen=True)
class CasePlan:
    """One patient: scan geometry and the ordered painting operations (independent of the grid)."""

    fov: float
    slice_spacing: float
    z_lo: float
    z_hi: float
    centre_offset: tuple[float, float]
    world_shift: tuple[float, float, float]
    orientation: str
    ops: tuple[Op, ...]
    body: Body
    diaphragm: Diaphragm
    kidney_phase: bool


def draw_case(seed: int, case: int) -> CasePlan:
    """Draw one patient from the anatomy stream of ``(seed, case)``.

    Each stage draws from the same generator in a fixed order and returns what later stages place
    their structures by (frozen records), plus its painting operations.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, 0x70616E]))
    body = Body(rng)
    breath = rng.uniform(-12.0, 12.0)
    diaphragm = Diaphragm(rng, breath, body)
    fov = max(rng.uniform(0.7, 1.0) * 512.0, 2 * body.bx + 40.0)
    slice_spacing = float(rng.choice(SLICE_SPACINGS_MM, p=SLICE_SPACING_P))
    coverage = min(rng.uniform(170.0, 220.0), (MAX_SLICES - 1) * slice_spacing)
    z_hi = min(diaphragm.zr + rng.uniform(-5.0, 18.0), -45.0 + coverage)
    z_lo = z_hi - coverage
    centre_offset = (rng.uniform(-12.0, 12.0), rng.uniform(-8.0, 18.0))
    world_shift = (rng.uniform(-30.0, 30.0), rng.uniform(-60.0, 60.0), rng.uniform(-1200.0, -200.0))
    orientation = str(ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))])
    kidney_phase = bool(rng.uniform() < 0.3)

    torso = Torso(
        body=body,
        diaphragm=diaphragm,
        breath=breath,
        z_bottom=z_lo - 40.0,
        z_top=z_hi + 40.0,
        scan_top=z_hi,
        front=body.cavity_edge_y(0.0, posterior=False),
        right=body.cavity_edge_x(0.0, left=False),
        left=body.cavity_edge_x(0.0, left=True),
    )
    spine, frame = draw_frame(rng, torso)
    vessels, vessel_ops = draw_great_vessels(rng, torso, spine)
    kidneys, kidney_ops = draw_kidneys(rng, torso, spine, vessels)
    spleen, spleen_ops = draw_spleen(rng, torso, spine, kidneys)
    liver, liver_ops = draw_liver(rng, torso, spine, vessels)
    adrenal_ops = draw_adrenals(rng, spine, vessels, kidneys)
    gut, pancreas_ops, duodenum_ops = draw_pancreas_duodenum(rng, torso, spine, vessels, spleen)
    bowel_ops = draw_bowel(rng, torso, spine, gut)
    stomach_ops = draw_stomach(rng, torso, spine, vessels, spleen, gut)
    gallbladder_ops = draw_gallbladder(rng, torso, liver)
    portal_ops = draw_visceral_vessels(rng, torso, vessels, liver, spleen, gut)
    ops = (
        frame + bowel_ops + liver_ops + stomach_ops + spleen_ops + kidney_ops + adrenal_ops + pancreas_ops
        + duodenum_ops + gallbladder_ops + portal_ops + vessel_ops
    )
    return CasePlan(
        fov=fov, slice_spacing=slice_spacing, z_lo=z_lo, z_hi=z_hi, centre_offset=centre_offset,
        world_shift=world_shift, orientation=orientation, ops=tuple(ops), body=body, diaphragm=diaphragm,
        kidney_phase=kidney_phase,
    )


def draw_frame(rng: np.random.Generator, torso: Torso) -> tuple[Spine, list[Op]]:
    """Body wall, thorax, ribs, spine and the retroperitoneal muscles (psoas, quadratus lumborum)."""
    body = torso.body
    body_rx, body_ry = rng.uniform(19.0, 24.0), rng.uniform(14.0, 17.0)
    back = body.cavity_edge_y(0.0, posterior=True)
    centre_y = back + body_ry - 3.0
    front = centre_y + body_ry
    spine = Spine(body_rx, body_ry, back, centre_y, front, depth=torso.front - front)
    z_l1, pitch = rng.uniform(2.0, 18.0), rng.uniform(31.0, 36.0)
    spine_shape = SpineShape(
        centre_y=centre_y, rx=body_rx, ry=body_ry, z_l1=z_l1, pitch=pitch,
        process_length=rng.uniform(22.0, 32.0), canal_y=centre_y - body_ry - 9.0,
        spinous_tip=-body.by_post + body.fat(np.array(-math.pi / 2)) + 6.0,
    )
    ribs = RibShape(
        first_z=z_l1 + pitch + rng.uniform(-4.0, 4.0), pitch=pitch * rng.uniform(0.9, 1.0),
        max_drop=rng.uniform(100.0, 135.0), lowest_angle=rng.uniform(0.58, 0.7) * math.pi,
        front_drop=rng.uniform(15.0, 40.0), half_width=rng.uniform(4.5, 6.0),
    )
    ops: list[Op] = [paint_body_wall, paint_thorax, lambda scene: paint_ribs(scene, ribs)]
    for side in (1.0, -1.0):
        zk = np.array([torso.z_bottom, -90.0, -40.0, 0.0, 12.0])
        r = np.array([22.0, 20.0, 15.0, 7.0, 2.0]) * rng.uniform(0.85, 1.15)
        psoas = ZTube(zk, side * (spine.body_rx + 4.0 + r * 0.9), spine.centre_y + 2.0, r, r * 0.85, torso.z_bottom, 14.0)
        ql_x = side * (spine.body_rx + rng.uniform(40.0, 50.0))
        ql_y = body.cavity_edge_y(ql_x, posterior=True) + rng.uniform(1.0, 5.0)
        ql = ZTube([torso.z_bottom, -40.0, 20.0], ql_x, ql_y, [16.0, 13.0, 5.0], [8.0, 7.0, 3.0], torso.z_bottom, 25.0)
        ops.append(lambda scene, sh=psoas: scene.fill(sh, [(0.0, MUSCLE, 0)], clip=-20.0))
        ops.append(lambda scene, sh=ql: scene.fill(sh, [(0.0, MUSCLE, 0)], clip=-30.0))
    ops.append(lambda scene: paint_spine(scene, spine_shape))
    return spine, ops


def draw_great_vessels(rng: np.random.Generator, torso: Torso, spine: Spine) -> tuple[GreatVessels, list[Op]]:
    """Aorta (left-anterior of the spine, with calcified plaques), IVC (right-anterior), crura.

    The shapes are drawn here (other structures are placed relative to them); their painting
    operations, returned, come last.
    """
    aorta_r = rng.uniform(10.0, 13.0)
    hiatus = torso.diaphragm.zc - rng.uniform(2.0, 10.0)
    vertebra_rx, spine_front, spine_y = spine.body_rx, spine.front, spine.centre_y
    aorta_x = -(vertebra_rx * 0.45 + rng.uniform(0.0, 6.0))
    grow = np.array([0.85, 0.9, 1.0, 1.0, 1.05, 1.1]) * aorta_r
    aorta = ZTube(
        [torso.z_bottom, -60.0, 0.0, hiatus, hiatus + 40.0, torso.z_top],
        [aorta_x, aorta_x - 1.0, aorta_x - 2.0, -vertebra_rx * 0.7, -(vertebra_rx * 0.55 + aorta_r * 0.7), -(vertebra_rx * 0.55 + aorta_r * 0.8)],
        [spine_front + aorta_r * 0.85, spine_front + aorta_r + 1.0, spine_front + aorta_r + 1.0, spine_front + aorta_r * 0.7, spine_y + 0.6 * spine.body_ry + aorta_r * 0.5,
         spine_y + 0.6 * spine.body_ry + aorta_r * 0.4],
        grow, grow, torso.z_bottom, torso.z_top,
    )
    ivc_x = vertebra_rx * 0.8 + rng.uniform(4.0, 10.0)
    ivc_top = torso.diaphragm.zc + rng.uniform(5.0, 15.0)
    irx, iry = rng.uniform(11.0, 14.0), rng.uniform(7.5, 10.0)
    ivc = ZTube(
        [torso.z_bottom, -30.0, 10.0, 45.0, ivc_top],
        [ivc_x - 4.0, ivc_x, ivc_x + 2.0, ivc_x + 2.0, ivc_x - 4.0],
        [spine_front + iry + 2.0, spine_front + iry + 4.0, spine_front + iry + 10.0, spine_front + iry + 24.0, spine_front + iry + 34.0],
        [irx * 0.9, irx, irx, irx * 1.05, irx * 1.2],
        [iry * 0.9, iry, iry, iry * 1.1, iry * 1.3],
        torso.z_bottom, ivc_top,
    )
    vessels = GreatVessels(aorta, ivc, aorta_r, aorta_x, ivc_x, ivc_top, hiatus)
    # the heart on the central tendon, anterior to the aorta and the oesophagus
    d = torso.diaphragm
    heart_e = Ellipsoid([rng.uniform(-35.0, -15.0), torso.front - rng.uniform(45.0, 60.0), d.zc + rng.uniform(45.0, 60.0)],
                         [rng.uniform(55.0, 68.0), rng.uniform(42.0, 50.0), 55.0],
                         rotation(0.0, 0.25, rng.uniform(-0.6, -0.3)))
    y_behind = spine_front + 2 * aorta_r + 14.0
    heart = Region(*heart_e.bounds(), lambda scene, box, X, Y, Z: smooth_max(heart_e.sdf(scene, box, 0.0), y_behind - Y, 8.0))
    ops: list[Op] = [lambda scene: scene.fill(heart, [(6.0, VISCERAL_FAT, 0), (0.0, TISSUE["myocardium"], 0),
                                               (-9.0, TISSUE["heart_blood"], 0)], clip=0.0, region="thorax")]
    for side in (1.0, -1.0):  # diaphragmatic crura around the aorta
        crus = Tube([[side * vertebra_rx * 0.6, spine_front + 2.0, -40.0 + torso.breath * 0.3],
                      [aorta_x + side * (aorta_r + 6.0), spine_front + aorta_r * 0.9, 0.0],
                      [aorta_x + side * (aorta_r + 5.0), spine_front + aorta_r * 2.0 + 4.0, hiatus - 15.0],
                      [aorta_x * 0.5 + side * 8.0, spine_front + aorta_r * 2.0 + 12.0, hiatus]],
                     rng.uniform(3.0, 5.0) * (1.2 if side > 0 else 1.0))
        ops.append(lambda scene, sh=crus: scene.fill(sh, [(0.0, MUSCLE, 0)], only=[VISCERAL_FAT, TISSUE["liver"], TISSUE["bowel_wall"]]))
    ops.append(lambda scene: scene.fill(
        aorta, [(2.0, VISCERAL_FAT, 0), (0.0, TISSUE["artery"], ORGAN_ID["aorta"])], clip=-15.0,
        only=[VISCERAL_FAT, MUSCLE, TISSUE["liver"], TISSUE["lung"], TISSUE["bowel_wall"], TISSUE["bowel_fluid"], TISSUE["pancreas"],
              TISSUE["portal_vein"], TISSUE["vein"], TISSUE["esophagus"], TISSUE["fat_strand"]]))
    for _ in range(int(rng.poisson(3.0))):
        cz = rng.uniform(torso.z_bottom, torso.scan_top)
        ang = rng.uniform(0.0, 2 * math.pi)
        rr = float(np.interp(cz, aorta.zk, aorta.rx))
        c = vessels.aorta_centre(cz)
        calc = Ellipsoid([c[0] + rr * math.cos(ang), c[1] + rr * math.sin(ang), cz], [1.6, 1.6, rng.uniform(2.0, 5.0)])
        ops.append(lambda scene, sh=calc: scene.fill(sh, [(0.0, TISSUE["calcification"], ORGAN_ID["aorta"])], onlylabel=ORGAN_ID["aorta"]))
    ops.append(lambda scene: scene.fill(
        ivc, [(0.0, TISSUE["vein"], ORGAN_ID["inferior_vena_cava"])], clip=-15.0,
        only=[VISCERAL_FAT, MUSCLE, TISSUE["liver"], TISSUE["hepatic_vessel"], TISSUE["bowel_wall"], TISSUE["bowel_fluid"],
              TISSUE["pancreas"], TISSUE["vein"], TISSUE["adrenal"], TISSUE["portal_vein"], TISSUE["fat_strand"]]))
    return vessels, ops


def draw_spleen(
    rng: np.random.Generator, torso: Torso, spine: Spine, kidneys: Mapping[str, Kidney]
) -> tuple[Spleen, list[Op]]:
    """Spleen: against the posterolateral left wall under the left dome, shaped by its neighbours."""
    thick, length, height = rng.uniform(18.0, 26.0), rng.uniform(45.0, 65.0), rng.uniform(40.0, 55.0)
    y = spine.back * rng.uniform(0.3, 0.7)  # in the posterolateral gutter, against the ribs
    xy = np.array([torso.body.cavity_edge_x(y, left=True) + thick + 4.0, y])
    th = math.atan2(y - 10.0, xy[0])
    top = float(torso.diaphragm.height(np.array(xy[0]), np.array(xy[1])))
    kidney_top = kidneys["left_kidney"].top[2]
    centre = np.array([xy[0], xy[1], max(top - 6.0 - 0.8 * height, kidney_top + 0.2 * height)])
    shape = Ellipsoid(centre, [thick, length, height],
                      rotation(rng.uniform(-0.5, -0.2), rng.uniform(-0.2, 0.2), th), harmonics(rng, 0.06))
    hilum = centre + np.array([-thick * math.cos(th), -thick * math.sin(th), -5.0]) * 0.9
    ops: list[Op] = [lambda scene: scene.fill(shape, [(0.0, TISSUE["spleen"], ORGAN_ID["spleen"])], clip=2.0, region="abdomen")]
    return Spleen(centre, hilum), ops


def draw_liver(
    rng: np.random.Generator, torso: Torso, spine: Spine, vessels: GreatVessels
) -> tuple[Liver, list[Op]]:
    """Liver: the right upper cavity under the diaphragm, bounded below by an oblique inferior
    surface and on the left by a boundary that recedes to the right in lower slices; hepatic and
    portal vein branches inside (labelled liver)."""
    breath, spine_front, diaphragm = torso.breath, spine.front, torso.diaphragm
    tip_x = torso.right - rng.uniform(8.0, 25.0)
    tip_z = rng.uniform(-85.0, -40.0) + breath
    slope = rng.uniform(0.45, 0.7)
    xl0, xl_k = rng.uniform(10.0, 30.0), rng.uniform(1.0, 1.4)
    xl_z, xl_ref = rng.uniform(0.9, 1.4), diaphragm.zl - rng.uniform(20.0, 35.0)
    xl_c, depth = rng.uniform(0.3, 0.7), spine.depth  # curvature of the medial boundary around the stomach
    lh, lf, lp = (v.tolist() for v in (rng.normal(0.0, 5.0, 4), rng.uniform(0.02, 0.05, 4),
                                       rng.uniform(0.0, 2 * math.pi, 4)))
    ivc_x = vessels.ivc_x

    def liver_sdf(scene: Scene, box: Box, X, Y, Z):
        z_inf = tip_z + slope * np.maximum(tip_x - X, 0.0) - 0.12 * (Y - spine_front - 60.0)
        z_inf = z_inf + lh[0] * np.sin(lf[0] * Y + lp[0]) + lh[1] * np.sin(lf[1] * X + lp[1])
        yy = np.maximum(Y - spine_front, 0.0)
        x_left = xl0 - xl_k * yy * (1.0 - xl_c + xl_c * yy / depth) + xl_z * np.maximum(xl_ref - Z, 0.0)
        x_left = x_left + lh[2] * np.sin(lf[2] * Z + lf[3] * Y + lp[2]) + lh[3] * np.sin(lf[3] * Y + lp[3])
        d = smooth_max(1.5 - scene.cavity(box), -scene.below_diaphragm(box), 6.0)
        d = smooth_max(d, z_inf - Z, 10.0)
        d = smooth_max(d, x_left - X, 10.0)
        # behind the IVC, nothing left of the right crus
        return smooth_max(d, np.where(spine_front + 20.0 > Y, ivc_x - 8.0 - X, -1e3), 6.0)

    shape = Region([-150.0, -160.0, tip_z - 5.0], [250.0, 200.0, diaphragm.zr + 5.0], liver_sdf)
    ops: list[Op] = [lambda scene: scene.fill(shape, [(0.0, TISSUE["liver"], ORGAN_ID["liver"])], only=(*SOFT, MUSCLE),
                                       region="abdomen")]
    hilum = np.array([ivc_x + rng.uniform(15.0, 30.0), spine_front + rng.uniform(55.0, 70.0),
                      rng.uniform(15.0, 30.0) + breath])
    hv_root = np.array([*vessels.ivc_centre(vessels.ivc_top - 15.0), vessels.ivc_top - 15.0])
    hv_targets = [[tip_x - 15.0, spine_front + 20.0, 15.0 + breath], [ivc_x + 15.0, torso.front - 20.0, 10.0 + breath],
                  [xl0 - 60.0, torso.front - 25.0, 45.0 + breath]]
    pv_targets = [[tip_x - 10.0, spine_front + 40.0, 20.0 + breath], [xl0 - 50.0, torso.front - 30.0, 35.0 + breath],
                  [tip_x - 20.0, spine_front + 60.0, -10.0 + breath]]
    branches = []
    for root, targets in ((hv_root, hv_targets), (hilum, pv_targets)):
        for tgt in targets:
            tgt = jitter(rng, tgt, 6.0)
            mid = (root + tgt) / 2.0 + rng.normal(0.0, 5.0, 3)
            branches.append(Tube([root, mid, tgt], [6.0, 4.0, 1.8]))
            for _ in range(3):  # second-generation branches
                start = root + (tgt - root) * rng.uniform(0.3, 0.8)
                step = rng.normal(0.0, 1.0, 3) * rng.uniform(8.0, 14.0)
                end = start + 2.0 * step + rng.normal(0.0, 4.0, 3)
                branches.append(Tube([start, start + step + rng.normal(0.0, 3.0, 3), end], [2.6, 2.0, 1.0]))
    hepatic = Union(*branches)
    ops.append(lambda scene: scene.fill(hepatic, [(0.0, TISSUE["hepatic_vessel"], KEEP)], onlylabel=ORGAN_ID["liver"]))
    return Liver(hilum), ops


def draw_kidneys(
    rng: np.random.Generator, torso: Torso, spine: Spine, vessels: GreatVessels
) -> tuple[dict[str, Kidney], list[Op]]:
    """Kidneys in the paravertebral gutters (right lower than left), perirenal fat, sinus fat,
    pelvis, medulla; renal veins into the IVC (the left one between aorta and SMA), renal arteries."""
    ops: list[Op] = []
    kidneys: dict[str, Kidney] = {}
    kz_right = rng.uniform(-45.0, -25.0) + torso.breath * 0.7
    kz_left = kz_right + rng.uniform(8.0, 25.0)  # the right kidney sits lower (under the liver)
    for name, side, kz in (("right_kidney", 1.0, kz_right), ("left_kidney", -1.0, kz_left)):
        kx = side * (spine.body_rx + rng.uniform(38.0, 50.0))
        radii = np.array([rng.uniform(24.0, 30.0), rng.uniform(18.0, 23.0), rng.uniform(48.0, 60.0)])
        ky = max(torso.body.cavity_edge_y(kx, posterior=True) + radii[1] + rng.uniform(4.0, 12.0), spine.centre_y - 25.0)
        rot = rotation(rng.uniform(-0.35, -0.15), side * rng.uniform(0.1, 0.3), side * rng.uniform(0.35, 0.7))
        centre = np.array([kx, ky, kz])
        kidney = Ellipsoid(centre, radii, rot, harmonics(rng, 0.04))
        medial = rot @ np.array([-side, 0.0, 0.0])
        sinus_c = centre + medial * radii[0] * 0.75
        sinus = Ellipsoid(sinus_c, radii * np.array([0.55, 0.45, 0.5]), rot)
        pelvis = Ellipsoid(sinus_c + medial * 3.0, radii * np.array([0.28, 0.22, 0.25]), rot)
        medulla = Ellipsoid(centre, radii * 0.72, rot, kidney.harm)
        halo, lab = rng.uniform(4.0, 12.0), ORGAN_ID[name]
        ops.append(lambda scene, k=kidney, h=halo, lb=lab: scene.fill(k, [(h, VISCERAL_FAT, 0), (0.0, TISSUE["kidney_cortex"], lb)]))
        ops.append(lambda scene, m=medulla, lb=lab: scene.fill(m, [(0.0, TISSUE["kidney_medulla"], lb)], onlylabel=lb))
        ops.append(lambda scene, si=sinus, lb=lab: scene.fill(si, [(0.0, VISCERAL_FAT, 0)], onlylabel=lb))
        ops.append(lambda scene, pe=pelvis, lb=lab: scene.fill(pe, [(0.0, TISSUE["urine"], lb)], only=[VISCERAL_FAT]))
        kidneys[name] = Kidney(
            centre=centre, hilum=sinus_c + medial * radii[0] * 0.4, top=centre + rot @ np.array([0.0, 0.0, radii[2]])
        )
    aorta_r = vessels.aorta_radius
    for name in ("right_kidney", "left_kidney"):
        h = kidneys[name].hilum
        vz = h[2] + rng.uniform(-4.0, 4.0)
        ic = vessels.ivc_centre(vz)
        if name == "left_kidney":
            ac = vessels.aorta_centre(vz)
            pts = [h, [ac[0] - aorta_r - 8.0, ac[1] + aorta_r * 0.6, vz], [ac[0], ac[1] + aorta_r + 5.0, vz], [ic[0], ic[1], vz]]
        else:
            pts = [h, [(h[0] + ic[0]) / 2, (h[1] + ic[1]) / 2 + 3.0, vz], [ic[0], ic[1], vz]]
        vein = Tube(pts, rng.uniform(4.0, 5.5))
        ops.append(lambda scene, sh=vein: scene.fill(sh, [(0.0, TISSUE["vein"], 0)],
                                             only=(*SOFT, TISSUE["kidney_cortex"], TISSUE["urine"], MUSCLE)))
        az = h[2] + rng.uniform(4.0, 10.0)
        ac = vessels.aorta_centre(az)
        artery = Tube([[ac[0], ac[1], az], [(ac[0] + h[0]) / 2, ac[1] - 4.0, az - 2.0], h + np.array([0.0, -3.0, 4.0])],
                       rng.uniform(2.2, 3.2))
        ops.append(lambda scene, sh=artery: scene.fill(sh, [(0.0, TISSUE["artery"], 0)],
                                               only=(*SOFT, TISSUE["kidney_cortex"], TISSUE["urine"])))
    return kidneys, ops


def draw_adrenals(
    rng: np.random.Generator, spine: Spine, vessels: GreatVessels, kidneys: Mapping[str, Kidney]
) -> list[Op]:
    """Adrenal glands: thin (3-5 mm) inverted-V / Y plates in fat, superomedial to the kidneys;
    the right one behind the IVC, the left one lateral to the aorta / left crus."""
    ops: list[Op] = []
    for name, side in (("right_adrenal_gland", 1.0), ("left_adrenal_gland", -1.0)):
        top = kidneys[name.replace("adrenal_gland", "kidney")].top
        if side > 0:
            apex = np.array([vessels.ivc_x + rng.uniform(-2.0, 4.0), spine.front + rng.uniform(-2.0, 6.0)])
            z0 = top[2] + rng.uniform(4.0, 10.0)
            z1 = z0 + rng.uniform(28.0, 42.0)
        else:
            apex = np.array([vessels.aorta_x - vessels.aorta_radius - rng.uniform(8.0, 14.0), spine.front + rng.uniform(0.0, 8.0)])
            z1 = top[2] + rng.uniform(5.0, 15.0)
            z0 = z1 - rng.uniform(30.0, 42.0)
        limb = rng.uniform(1.6, 2.4)
        med = apex + np.array([side * rng.uniform(-4.0, 2.0), -rng.uniform(16.0, 24.0)])
        lat = apex + np.array([side * rng.uniform(10.0, 18.0), -rng.uniform(12.0, 20.0)])
        lean = rng.normal(0.0, 3.0, 2)
        gland = Union(
            Slab(apex, med, apex + lean, med + lean * 1.5, z0, z1 - rng.uniform(0.0, 8.0), limb),
            Slab(apex, lat, apex + lean, lat + lean * 1.5, z0 + rng.uniform(0.0, 8.0), z1, limb),
            Slab(apex, apex + np.array([0.0, 5.0]), apex + lean, apex + lean + np.array([0.0, 5.0]),
                  z0 + 4.0, z1 - 6.0, limb * 1.3),
        )
        lab = ORGAN_ID[name]
        ops.append(lambda scene, sh=gland, lb=lab: scene.fill(sh, [(2.5, VISCERAL_FAT, 0), (0.0, TISSUE["adrenal"], lb)], clip=0.0))
    return ops


def draw_pancreas_duodenum(
    rng: np.random.Generator, torso: Torso, spine: Spine, vessels: GreatVessels, spleen: Spleen
) -> tuple[Gut, list[Op], list[Op]]:
    """Pancreas (head in the duodenal C-loop, neck in front of the portal confluence, body across
    the aorta, tail to the splenic hilum) and the duodenum (bulb, descending, horizontal between
    aorta and SMA, ascending to the duodeno-jejunal flexure), partly collapsed."""
    breath_shift = torso.breath * 0.6
    spine_front, ivc_x, aorta_x, aorta_r = spine.front, vessels.ivc_x, vessels.aorta_x, vessels.aorta_radius
    pylorus = np.array([rng.uniform(10.0, 30.0), spine_front + rng.uniform(0.6, 0.78) * spine.depth,
                                rng.uniform(0.0, 15.0) + breath_shift])
    d_lat = ivc_x + rng.uniform(28.0, 40.0)
    d3_z = rng.uniform(-60.0, -40.0) + breath_shift
    pts = np.array([
        pylorus,
        [pylorus[0] + 18.0, pylorus[1] - 8.0, pylorus[2] + 6.0],
        [d_lat, spine_front + 48.0, pylorus[2] + 2.0],
        [d_lat + 4.0, spine_front + 40.0, (pylorus[2] + d3_z) / 2.0],
        [d_lat, spine_front + 36.0, d3_z + 10.0],
        [d_lat - 18.0, spine_front + 34.0, d3_z],
        [ivc_x - 10.0, spine_front + 38.0, d3_z - 2.0],
        [aorta_x - 12.0, spine_front + 40.0, d3_z + 2.0],
        [aorta_x - 26.0, spine_front + 44.0, d3_z + 18.0],
        [aorta_x - 28.0, spine_front + 52.0, d3_z + 35.0],
    ])
    pts[1:] = jitter(rng, pts[1:], 3.0)
    flexure = pts[-1]
    radii = np.array([9.0, 13.0, 12.0, 12.0, 11.5, 11.0, 10.0, 10.0, 10.0, 9.0]) * rng.uniform(0.85, 1.15)
    duo = Tube(pts, radii, step=4.0)
    collapse = np.interp(np.linspace(0, 1, len(duo.p)), np.linspace(0, 1, len(pts)), rng.uniform(0.0, 1.0, len(pts)))
    lumen = Tube(duo.p, np.maximum(duo.r - 2.5 - collapse * 8.0, 0.0), smooth=False)
    gas = max(pylorus[1] - rng.uniform(0.0, 8.0), spine_front + 58.0)  # a little gas in the bulb at most
    duo_ops: list[Op] = [
        lambda scene: scene.fill(duo, [(0.0, TISSUE["bowel_wall"], ORGAN_ID["duodenum"])], clip=2.0),
        lambda scene: scene.fill(lumen, [(0.0, TISSUE["bowel_fluid"], ORGAN_ID["duodenum"])], onlylabel=ORGAN_ID["duodenum"],
                         gas_above=gas),
    ]
    pancreas_z = rng.uniform(-12.0, 2.0) + breath_shift
    aorta_front_y = spine_front + 2 * aorta_r
    spleen_hilum = spleen.hilum
    pan_pts = np.array([
        [d_lat - 22.0, spine_front + 40.0, d3_z + 18.0],  # uncinate process / lower head
        [d_lat - 22.0, spine_front + 46.0, pancreas_z - 8.0],  # head
        [ivc_x - 10.0, aorta_front_y + 22.0, pancreas_z + 2.0],  # neck, anterior to the portal confluence
        [aorta_x - 15.0, aorta_front_y + 18.0, pancreas_z + 8.0],  # body, anterior to aorta and SMA
        [aorta_x - 50.0, aorta_front_y + 2.0, pancreas_z + 15.0],
        [spleen_hilum[0] + 15.0, spleen_hilum[1] + 20.0, spleen_hilum[2] - 10.0],  # tail towards the splenic hilum
    ])
    pan_pts = jitter(rng, pan_pts, 3.5)
    pan_r = np.array([11.0, 15.0, 8.5, 11.0, 10.0, 7.0]) * rng.uniform(0.8, 1.15) * rng.uniform(0.9, 1.1, 6)
    pancreas = Tube(pan_pts, pan_r, step=4.0)
    pan_ops: list[Op] = [lambda scene: scene.fill(pancreas, [(1.5, VISCERAL_FAT, 0), (0.0, TISSUE["pancreas"], ORGAN_ID["pancreas"])],
                                           clip=2.0, region="abdomen")]
    return Gut(pylorus, flexure, pancreas_z, aorta_front_y, pancreas), pan_ops, duo_ops


def draw_bowel(rng: np.random.Generator, torso: Torso, spine: Spine, gut: Gut) -> list[Op]:
    """Colon (haustra, stool with gas, gas anteriorly) and packed small-bowel loops (jejunum from the
    duodeno-jejunal flexure in the left abdomen, ileum lower right): fluid-filled, collapsed or with
    gas; unlabelled, of the same attenuation as the duodenum."""
    ops: list[Op] = []
    rc = rng.uniform(20.0, 27.0)
    sag = rng.uniform(-95.0, -35.0)
    flex_r = rng.uniform(-40.0, -20.0) + torso.breath * 0.5
    flex_l = rng.uniform(-5.0, 25.0) + torso.breath * 0.7
    xr, xl, front, zb = torso.right, torso.left, torso.front, torso.z_bottom
    pts = np.array([
        [xr - rc - 6.0, -5.0, zb - 10.0],
        [xr - rc - 5.0, -2.0, -70.0],
        [xr - rc - 8.0, 5.0, flex_r - 10.0],
        [xr - rc - 22.0, 30.0, flex_r],
        [xr * 0.45, front - rc - 8.0, (flex_r + sag) / 2.0],
        [0.0, front - rc - 5.0, sag],
        [xl * 0.45, front - rc - 10.0, (flex_l + sag) / 2.0],
        [xl + rc + 20.0, 20.0, flex_l],
        [xl + rc + 6.0, -8.0, flex_l - 15.0],
        [xl + rc + 6.0, -12.0, -60.0],
        [xl + rc + 8.0, -10.0, zb - 10.0],
    ])
    pts = jitter(rng, pts, 5.0)
    period, phase = rng.uniform(28.0, 40.0), rng.uniform(0.0, 2 * math.pi)
    colon = Tube(pts, rc * rng.uniform(0.85, 1.1, len(pts)), step=6.0,
                  modulation=lambda arc: 1.0 + 0.13 * np.sin(2 * math.pi * arc / period + phase))
    lumen = Tube(colon.p, np.maximum(colon.r - 2.5, 0.0), smooth=False)
    gas = rng.uniform(front - 60.0, front - 10.0)
    ops.append(lambda scene: scene.fill(colon, [(3.0, VISCERAL_FAT, 0), (0.0, TISSUE["bowel_wall"], 0)]))
    ops.append(lambda scene: scene.fill(lumen, [(0.0, TISSUE["stool"], 0)], gas_above=gas))

    sb_r = rng.uniform(10.0, 13.0)
    k_front = spine.centre_y + 18.0
    dj = gut.flexure
    jej = bowel_walk(rng, dj, [-0.6, 0.5, -0.4], [xl + 30.0, k_front + 12.0, zb], [10.0, front - 18.0, dj[2] + 10.0],
                      rng.uniform(900.0, 1400.0), 7.0, [])
    ile = bowel_walk(rng, [xr * 0.4, front - 40.0, -70.0], [0.3, -0.2, -0.6],
                      [-15.0, k_front + 20.0, zb], [xr - 45.0, front - 15.0, -45.0 + torso.breath * 0.6],
                      rng.uniform(500.0, 900.0), 7.0, [jej])
    loop_only = [VISCERAL_FAT, TISSUE["bowel_wall"], TISSUE["fat_strand"]]
    for path, rad in ((jej, sb_r), (ile, sb_r * 0.9)):
        start = 0
        while start < len(path) - 2:
            n = int(rng.integers(10, 22))
            piece = path[start : start + n + 1]
            start += n
            mode = int(rng.choice(3, p=[0.55, 0.3, 0.15]))  # fluid-filled, collapsed, with gas
            r_out = rad * (0.65 if mode == 1 else rng.uniform(0.85, 1.15))
            wall = 2.2 if mode != 1 else r_out * rng.uniform(0.55, 0.8)
            outer = Tube(piece, r_out, smooth=False)
            inner = Tube(piece, max(r_out - wall, 0.0), smooth=False)
            level = float(piece[:, 1].max() - rng.uniform(1.0, 6.0)) if mode == 2 else None
            ops.append(lambda scene, o=outer: scene.fill(o, [(0.0, TISSUE["bowel_wall"], 0)], only=loop_only))
            if inner.r.max() > 0:
                ops.append(lambda scene, i=inner, lv=level: scene.fill(i, [(0.0, TISSUE["bowel_fluid"], 0)],
                                                               only=[TISSUE["bowel_wall"]], gas_above=lv))
    return ops


def draw_stomach(
    rng: np.random.Generator, torso: Torso, spine: Spine, vessels: GreatVessels, spleen: Spleen, gut: Gut
) -> list[Op]:
    """Oesophagus (anterior to the aorta, through the hiatus to the cardia) and stomach (fundus
    under the left dome, body along the left anterior wall, antrum across to the pylorus), with a
    gas-fluid level."""
    aorta_r, spine_front, hiatus = vessels.aorta_radius, spine.front, vessels.hiatus
    gej = np.array([vessels.aorta_x - rng.uniform(22.0, 35.0), spine_front + rng.uniform(35.0, 50.0), hiatus - rng.uniform(8.0, 16.0)])
    ex, ey = vessels.aorta_centre(hiatus + 40.0)
    pts = np.array([
        [ex + aorta_r + 4.0, ey + aorta_r + 6.0, torso.z_top],
        [ex + aorta_r + 2.0, ey + aorta_r + 8.0, hiatus + 35.0],
        [gej[0] * 0.4, spine_front + aorta_r * 2 + 12.0, hiatus],
        [gej[0] + 4.0, gej[1] - 3.0, gej[2] + 3.0],
    ])
    pts[1:3] = jitter(rng, pts[1:3], 2.5)
    eso = Tube(pts, rng.uniform(7.0, 9.5))
    ops: list[Op] = [lambda scene: scene.fill(eso, [(1.5, VISCERAL_FAT, 0), (0.0, TISSUE["esophagus"], ORGAN_ID["esophagus"])], clip=None)]
    if rng.uniform() < 0.5:
        air = Tube(eso.p, np.full(len(eso.p), 2.0) * (eso.p[:, 2] > hiatus), smooth=False)
        ops.append(lambda scene: scene.fill(air, [(0.0, TISSUE["gas"], ORGAN_ID["esophagus"])], onlylabel=ORGAN_ID["esophagus"]))

    dist = rng.uniform(0.7, 1.2)
    pylorus, front = gut.pylorus, torso.front
    fundus = jitter(rng, [(torso.diaphragm.xl + spleen.centre[0]) * 0.5 + 20.0, spine.centre_y + 0.5 * (torso.front - spine.centre_y), torso.diaphragm.zl - 30.0], 4.0)
    pts = np.array([
        gej + np.array([-8.0, 2.0, -4.0]),
        fundus + np.array([0.0, 12.0, -20.0]),
        [fundus[0] - 5.0, front - 45.0, fundus[2] - 50.0],
        [fundus[0] + 25.0, front - 30.0, min(pylorus[2] - 10.0, fundus[2] - 70.0)],
        [pylorus[0] - 30.0, pylorus[1] + 5.0, pylorus[2] - 6.0],
        pylorus,
    ])
    pts[1:5] = jitter(rng, pts[1:5], 4.0)
    stomach = Union(
        Ellipsoid(fundus, np.array([30.0, 32.0, 30.0]) * dist, rotation(0, 0, rng.uniform(-0.4, 0.4)),
                   harmonics(rng, 0.05)),
        Tube(pts, np.array([18.0, 32.0, 34.0, 26.0, 17.0, 9.0]) * dist),
    )
    wall = rng.uniform(3.0, 5.0) if dist > 0.85 else rng.uniform(5.0, 8.0)
    gas = rng.uniform(front - 45.0, front - 5.0)
    lab = ORGAN_ID["stomach"]
    ops.append(lambda scene: scene.fill(stomach, [(2.0, VISCERAL_FAT, 0), (0.0, TISSUE["stomach_wall"], lab),
                                          (-wall, TISSUE["stomach_content"], lab)],
                                clip=2.0, region="abdomen", gas_above=gas))
    return ops


def draw_gallbladder(rng: np.random.Generator, torso: Torso, liver: Liver) -> list[Op]:
    """Gallbladder: a pear under the liver, fundus anterior-inferior, sometimes with a stone."""
    c = np.array([liver.hilum[0] + rng.uniform(0.0, 20.0), torso.front - rng.uniform(30.0, 45.0),
                  rng.uniform(-15.0, 5.0) + torso.breath])
    size = rng.uniform(0.7, 1.2)
    rot = rotation(rng.uniform(0.5, 0.9), rng.uniform(-0.3, 0.1), rng.uniform(-0.3, 0.3))
    gb = Ellipsoid(c, np.array([14.0, 13.0, 33.0]) * size, rot, harmonics(rng, 0.05))
    lab = ORGAN_ID["gallbladder"]
    ops: list[Op] = [lambda scene: scene.fill(gb, [(0.0, TISSUE["gallbladder_wall"], lab), (-2.0, TISSUE["bile"], lab)], clip=2.0)]
    if rng.uniform() < 0.15:
        stone = Ellipsoid(c + rot @ np.array([0.0, -4.0, -14.0 * size]), [5.0, 5.0, 5.0])
        ops.append(lambda scene: scene.fill(stone, [(0.0, TISSUE["gallstone"], lab)], onlylabel=lab))
    return ops


def draw_visceral_vessels(
    rng: np.random.Generator, torso: Torso, vessels: GreatVessels, liver: Liver, spleen: Spleen, gut: Gut
) -> list[Op]:
    """Portal venous system (SMV, portal and splenic veins: BTCV's "portal and splenic vein"),
    SMA with its fat collar, celiac trunk with hepatic and splenic arteries, small mesenteric
    vessels."""
    aorta_front_y, pancreas_z, aorta_r = gut.aorta_front_y, gut.pancreas_z, vessels.aorta_radius
    conf = np.array([vessels.ivc_x - 14.0, aorta_front_y + 8.0, pancreas_z + 2.0]) + rng.normal(0.0, 2.0, 3)
    smv = Tube([[conf[0] + 6.0, aorta_front_y + 14.0, torso.z_bottom], [conf[0] + 4.0, aorta_front_y + 12.0, pancreas_z - 40.0], conf],
                rng.uniform(4.5, 6.0))
    portal = Tube([conf, (conf + liver.hilum) / 2 + rng.normal(0.0, 3.0, 3), liver.hilum], rng.uniform(5.5, 7.0))
    pp = gut.pancreas.p
    tail = pp[pp[:, 0] < conf[0] - 5.0][::3] + np.array([0.0, -9.0, 2.0])
    splenic = Tube(np.vstack([conf, tail, spleen.hilum]), rng.uniform(3.8, 5.0))
    vein_only = (*SOFT, TISSUE["pancreas"], TISSUE["liver"], MUSCLE)
    ops: list[Op] = [lambda scene, sh=sh: scene.fill(sh, [(0.0, TISSUE["portal_vein"], 0)], only=vein_only)
                      for sh in (smv, portal, splenic)]
    sma_z = pancreas_z + rng.uniform(4.0, 12.0)
    ac = vessels.aorta_centre(sma_z)
    sma = Tube([[ac[0], ac[1], sma_z], [ac[0] + 3.0, ac[1] + aorta_r + 12.0, sma_z - 10.0],
                 [conf[0] - 10.0, aorta_front_y + 12.0, sma_z - 40.0], [conf[0] - 8.0, aorta_front_y + 22.0, torso.z_bottom]],
                rng.uniform(3.2, 4.2))
    ops.append(lambda scene: scene.fill(sma, [(3.5, VISCERAL_FAT, 0), (0.0, TISSUE["artery"], 0)], only=vein_only))
    cel_z = sma_z + rng.uniform(10.0, 18.0)
    ac = vessels.aorta_centre(cel_z)
    c0 = np.array([ac[0] + 2.0, ac[1] + aorta_r + 10.0, cel_z + 3.0])
    celiac = Union(
        Tube([[ac[0], ac[1], cel_z], c0], 3.5),
        Tube([c0, [c0[0] + 20.0, c0[1] + 6.0, c0[2] + 3.0], liver.hilum], 2.6),
        Tube(np.vstack([c0, jitter(rng, tail + np.array([0.0, 2.0, 16.0]), 4.0)]), 2.6),
    )
    ops.append(lambda scene: scene.fill(celiac, [(0.0, TISSUE["artery"], 0)], only=SOFT))
    for _ in range(int(rng.integers(10, 20))):
        p0 = np.array([conf[0] + rng.uniform(-15.0, 5.0), aorta_front_y + rng.uniform(10.0, 25.0),
                       rng.uniform(torso.z_bottom + 40.0, pancreas_z - 10.0)])
        p1 = p0 + rng.normal(0.0, 1.0, 3) * np.array([45.0, 25.0, 25.0])
        small = Tube([p0, (p0 + p1) / 2 + rng.normal(0.0, 6.0, 3), p1], rng.uniform(1.2, 2.2))
        tis = TISSUE["vein"] if rng.uniform() < 0.5 else TISSUE["artery"]
        ops.append(lambda scene, sh=small, ti=tis: scene.fill(sh, [(0.0, ti, 0)], only=[VISCERAL_FAT]))
    return ops


