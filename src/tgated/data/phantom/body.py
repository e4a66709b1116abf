"""The patient's frame and the scene being painted: body outline and wall, diaphragm, the tissue and
label maps with their painting rule (:meth:`Scene.fill`), and the structures drawn from the body frame
itself (body wall, thorax, ribs, spine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tgated.data.phantom.shapes import Box, Grid, Shape
from tgated.data.phantom.tissues import FAT, KEEP, MUSCLE, PROTECTED, TISSUE, VISCERAL_FAT


class Body:
    """Skin outline, subcutaneous fat, muscle wall and paraspinal muscles around the cavity.

    The cavity (inside the muscle wall) is drawn first; the wall and the fat wrap around it. The
    back is flat (the patient lies on the table); the two paraspinal muscle masses and the
    posterior arch of the spine between them bulge into the cavity from behind, leaving deep
    paravertebral gutters for the kidneys. ``delta(Z)`` widens or narrows the outline by a few mm
    along z, anteriorly and laterally only.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.cx = rng.uniform(118.0, 142.0)  # cavity half-width
        self.cy_ant = rng.uniform(72.0, 95.0)  # centre -> anterior cavity boundary
        self.cy_post = rng.uniform(72.0, 92.0)  # centre -> posterior wall, lateral to the paraspinals
        self.p_ant = rng.uniform(2.0, 2.4)
        self.p_post = rng.uniform(2.5, 3.2)
        self.fat0 = 4.0 + 34.0 * rng.uniform() ** 1.6
        self.fat_harm = rng.normal(0.0, 0.07, 4)
        self.wall_lat = rng.uniform(9.0, 14.0)
        self.wall_rect = rng.uniform(9.0, 13.0)
        self.ps_a, self.ps_b = rng.uniform(28.0, 38.0), rng.uniform(21.0, 29.0)  # paraspinal semi-axes
        self.ps_gap = rng.uniform(3.0, 6.0)
        self.arch = rng.uniform(12.0, 18.0)  # depth of the laminae and canal in front of the paraspinals
        self.delta_a = rng.uniform(-3.0, 6.0)
        self.delta_b = rng.uniform(0.0, 3.0)
        self.delta_phase = rng.uniform(0.0, 2 * math.pi)
        self.bx = self.cx + self.wall_lat + float(self.fat(np.array(0.0)))
        self.by_ant = self.cy_ant + self.wall_rect + float(self.fat(np.array(math.pi / 2)))
        back_fat = float(self.fat(np.array(-math.pi / 2)))
        self.by_post = self.cy_post + self.wall_lat + back_fat
        self.ps_y = -self.by_post + back_fat + self.ps_b * 0.95
        self.ps_x = self.ps_gap + self.ps_a

    def fat(self, th: np.ndarray) -> np.ndarray:
        """Subcutaneous fat thickness (mm) at angle θ (0: patient's right, π/2: anterior)."""
        h = self.fat_harm
        f = 1.0 + 0.3 * np.sin(th) + 0.15 * np.cos(2 * th) + h[0] * np.cos(th) + h[1] * np.sin(3 * th)
        f = f + h[2] * np.cos(3 * th) + h[3] * np.sin(2 * th)
        return np.maximum(self.fat0 * f, 2.5)

    def skin_radius(self, th: np.ndarray) -> np.ndarray:
        c, s = np.abs(np.cos(th)), np.sin(th)
        by = np.where(s >= 0, self.by_ant, self.by_post)
        p = np.where(s >= 0, self.p_ant, self.p_post)
        return 1.0 / ((c / self.bx) ** p + (np.abs(s) / by) ** p) ** (1.0 / p)

    def paraspinal(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Signed distance (mm, < 0 inside) to the paraspinal muscles and the spinal arch between them."""
        u = (np.abs(X) - self.ps_x) / self.ps_a
        v = (Y - self.ps_y) / self.ps_b
        d = (np.sqrt(u * u + v * v) - 1.0) * self.ps_b
        mid = np.maximum(np.abs(X) - 16.0, Y - (self.ps_y + self.ps_b + self.arch))
        return np.minimum(d, mid)

    def profiles(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(depth below the skin, fat thickness, cavity depth, z-scaling weight) in mm at (X, Y)."""
        th = np.arctan2(Y, X)
        r = np.hypot(X, Y)
        depth = self.skin_radius(th) - r
        phi = np.arccos(np.clip(-Y / np.maximum(r, 1e-6), -1.0, 1.0))  # 0 at the back, π at the front
        wall = self.wall_lat + (self.wall_rect - self.wall_lat) * np.exp(-(((math.pi - phi) / 0.5) ** 2))
        wall = wall * (1.0 - 0.85 * np.exp(-((X / 4.0) ** 2)) * (Y > 0))  # linea alba
        fat = self.fat(th)
        cavity = np.minimum(depth - fat - wall, self.paraspinal(X, Y))
        return depth, fat, cavity, 0.5 * (1.0 + np.sin(th))

    def cavity_depth(self, X, Y) -> np.ndarray:
        return self.profiles(np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64))[2]

    def delta(self, z: np.ndarray) -> np.ndarray:
        return self.delta_a * z / 100.0 + self.delta_b * np.sin(z / 60.0 + self.delta_phase)

    def _edge(self, start: np.ndarray, direction: np.ndarray) -> np.ndarray:
        t = np.arange(0.0, 260.0, 0.5)
        pts = start[None, :] + t[:, None] * direction[None, :]
        d = self.cavity_depth(pts[:, 0], pts[:, 1])
        out = np.nonzero(d < 0)[0]
        return pts[out[0] if out.size else -1]

    def cavity_edge_y(self, x: float, posterior: bool) -> float:
        """Y of the cavity boundary on the vertical line X = x (posterior or anterior side)."""
        return float(self._edge(np.array([x, 0.0]), np.array([0.0, -1.0 if posterior else 1.0]))[1])

    def cavity_edge_x(self, y: float, left: bool) -> float:
        """X of the cavity boundary on the horizontal line Y = y (patient's left or right side)."""
        return float(self._edge(np.array([0.0, y]), np.array([-1.0 if left else 1.0, 0.0]))[0])

    def cavity_point(self, theta: float, inset: float) -> np.ndarray:
        """The point ``inset`` mm inside the cavity boundary on the ray at angle θ from the centre."""
        u = np.array([math.cos(theta), math.sin(theta)])
        edge = self._edge(np.zeros(2), u)
        return edge - inset * u


class Diaphragm:
    """Diaphragm: ``height(X, Y)`` is the z (mm) of its upper surface.

    Two gentle domes (the right one higher) over the middle of the cavity; near the cavity wall
    the surface plunges into the costophrenic recesses, deepest at the back, so the lung bases
    appear as crescents around the liver and spleen over several centimetres.
    """

    def __init__(self, rng: np.random.Generator, breath: float, body: Body) -> None:
        self.body = body
        self.zr = rng.uniform(78.0, 92.0) + breath
        self.zl = self.zr - rng.uniform(5.0, 15.0)
        self.xr, self.xl = rng.uniform(45.0, 65.0), -rng.uniform(45.0, 65.0)
        self.y0 = rng.uniform(0.0, 15.0)
        self.ax, self.ay = rng.uniform(70.0, 85.0), rng.uniform(70.0, 85.0)
        self.h = rng.uniform(18.0, 28.0)
        self.zc = min(self.zr, self.zl) - rng.uniform(8.0, 15.0)
        self.rec_back = rng.uniform(0.0, 22.0) + breath
        self.rec_front = rng.uniform(40.0, 60.0) + breath
        self.rec_width = rng.uniform(6.0, 10.0)

    def height(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        ey = ((Y - self.y0) / self.ay) ** 2
        right = self.zr - self.h * (((X - self.xr) / self.ax) ** 2 + ey)
        left = self.zl - self.h * (((X - self.xl) / self.ax) ** 2 + ey)
        centre = self.zc - self.h * 0.6 * ((X / 60.0) ** 2 + ey)
        dome = np.maximum(np.maximum(right, left), centre)
        phi = np.arccos(np.clip(-Y / np.maximum(np.hypot(X, Y), 1e-6), -1.0, 1.0))
        recess = self.rec_back + (self.rec_front - self.rec_back) * 0.5 * (1.0 - np.cos(phi))
        near = np.exp(-np.maximum(self.body.cavity_depth(X, Y), 0.0) / self.rec_width)
        return dome - near * np.maximum(dome - recess, 0.0)


# ---------------------------------------------------------------------------------------------
# scene: the tissue and label maps being painted
# ---------------------------------------------------------------------------------------------


class Scene:
    def __init__(self, grid: Grid, body: Body, diaphragm: Diaphragm) -> None:
        self.grid = grid
        self.body = body
        self.diaphragm = diaphragm
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        X2, Y2 = np.meshgrid(grid.x.astype(np.float64), grid.y.astype(np.float64), indexing="ij")
        depth, fat, cavity, omega = body.profiles(X2, Y2)
        self.depth2 = depth.astype(np.float32)
        self.fat2 = fat.astype(np.float32)
        self.cav2 = cavity.astype(np.float32)
        self.omega2 = omega.astype(np.float32)
        self.delta = body.delta(grid.z.astype(np.float64)).astype(np.float32)
        self.zd2 = diaphragm.height(X2, Y2).astype(np.float32)

    def grow(self, box: Box) -> np.ndarray:
        """Outline growth (mm) along z over ``box``: zero at the back, full in front."""
        return self.omega2[box[0], box[1], None] * self.delta[None, None, box[2]]

    def cavity(self, box: Box) -> np.ndarray:
        """Depth inside the abdominal / thoracic cavity (mm, > 0 inside) over ``box``."""
        return self.cav2[box[0], box[1], None] + self.grow(box)

    def below_diaphragm(self, box: Box) -> np.ndarray:
        """Signed height below the diaphragm's lower surface (mm, > 0 in the abdomen)."""
        return self.zd2[box[0], box[1], None] - 4.0 - self.grid.z[None, None, box[2]]

    def allowed(
        self, box: Box, *, clip: float | None, only: Sequence[int] | None, onlylabel: int | None, region: str | None
    ) -> np.ndarray:
        t = self.tissue[box]
        ok = ~PROTECTED[t]
        if only is not None:
            ok &= np.isin(t, np.asarray(only, dtype=np.uint8))
        if onlylabel is not None:
            ok &= self.label[box] == onlylabel
        if clip is not None:
            ok &= self.cavity(box) > clip
        if region == "abdomen":
            ok &= self.below_diaphragm(box) > 0
        elif region == "thorax":
            ok &= self.below_diaphragm(box) < -6.0
        return ok

    def fill(
        self,
        shape: Shape,
        layers: Sequence[tuple[float, int, int]],
        *,
        clip: float | None = 1.0,
        only: Sequence[int] | None = None,
        onlylabel: int | None = None,
        region: str | None = None,
        gas_above: float | None = None,
    ) -> None:
        """Paint ``layers`` = [(sdf threshold mm, tissue, label), ...] in order (sdf < threshold).

        A positive threshold paints a halo (e.g. a fat plane) around the shape, a negative one an
        inner part (e.g. a lumen inside a wall); ``label`` ``KEEP`` leaves labels unchanged.
        ``clip``: paint only this deep (mm) inside the cavity (None: anywhere); ``only`` /
        ``onlylabel``: only over these tissues / that label; ``region``: "abdomen" (below the
        diaphragm) or "thorax". ``gas_above``: inside the last layer, voxels with Y above this level
        become gas (non-dependent gas in a supine patient). Bone, air, table and subcutaneous fat
        are never painted over.
        """
        halo = max(0.0, max(layer[0] for layer in layers))
        lo, hi = shape.bounds()
        box = self.grid.box(lo - halo - 1.0, hi + halo + 1.0)
        if box is None:
            return
        d = shape.sdf(self, box, halo + 1.0)
        ok = self.allowed(box, clip=clip, only=only, onlylabel=onlylabel, region=region)
        t, lab = self.tissue[box], self.label[box]
        for thr, tissue, label in layers:
            m = (d < thr) & ok
            t[m] = tissue
            if label != KEEP:
                lab[m] = label
        if gas_above is not None:
            m = (d < layers[-1][0]) & ok & (self.grid.coords(box)[1] > gas_above)
            t[m] = TISSUE["gas"]




@dataclass(frozen=True)
class SpineShape:
    """The vertebral column as :func:`paint_spine` draws it (mm)."""

    centre_y: float
    """Y of the vertebral bodies' centre."""
    rx: float
    ry: float
    """Semi-axes of the vertebral bodies."""
    z_l1: float
    """Z of the L1 vertebral body's centre."""
    pitch: float
    """Height of one vertebra (body + disc)."""
    process_length: float
    """Length of the transverse processes."""
    canal_y: float
    """Y of the spinal canal's centre."""
    spinous_tip: float
    """Y of the spinous processes' tips."""


@dataclass(frozen=True)
class RibShape:
    """The ribs as :func:`paint_ribs` draws them (mm, radians)."""

    first_z: float
    """Z of the first rib at the back."""
    pitch: float
    max_drop: float
    """How far a rib descends from the back to its lowest point."""
    lowest_angle: float
    """Angle (from the back) of a rib's lowest point."""
    front_drop: float
    """Descent left at the front, where the cartilages climb to the sternum."""
    half_width: float
    """Half the rib's height."""


def paint_body_wall(scene: Scene) -> None:
    """Subcutaneous fat, muscle wall, the cavity filled with visceral fat; the CT table."""
    depth = scene.depth2[:, :, None] + scene.omega2[:, :, None] * scene.delta[None, None, :]
    cav = scene.cav2[:, :, None] + scene.omega2[:, :, None] * scene.delta[None, None, :]
    t = scene.tissue
    t[depth >= 0] = FAT
    t[(depth >= scene.fat2[:, :, None]) & (cav < 0)] = MUSCLE
    t[cav >= 0] = VISCERAL_FAT
    # the table: a curved shell under the flat back (MR renders it as air)
    X = scene.grid.x[:, None].astype(np.float64)
    Y = scene.grid.y[None, :].astype(np.float64)
    top = -scene.body.by_post - 1.5 + 0.0005 * X**2
    shell = ((top > Y) & (top - 9.0 < Y)) | ((top - 32.0 > Y) & (top - 41.0 < Y))
    t[shell & (np.abs(X) < 230.0)] = TISSUE["table"]


def paint_thorax(scene: Scene) -> None:
    """Lung bases above the diaphragm, diaphragm muscle and mediastinal fat."""
    grid = scene.grid
    box = grid.box([grid.x[0], grid.y[0], float(scene.zd2.min()) - 6.0], [grid.x[-1], grid.y[-1], grid.z[-1]])
    if box is None:
        return
    X, Y, Z = grid.coords(box)
    inside = scene.cavity(box) > 0
    zd = scene.zd2[box[0], box[1], None]
    t = scene.tissue[box]
    t[inside & (zd - 4.0 < Z)] = MUSCLE
    t[inside & (zd < Z)] = TISSUE["lung"]
    y_back = scene.body.cavity_edge_y(0.0, posterior=True)
    t[inside & (zd < Z) & (np.abs(X + 8.0) < 22.0 + 0.12 * (Y - y_back)) & (y_back - 5.0 < Y)] = VISCERAL_FAT


def paint_ribs(scene: Scene, p: RibShape) -> None:
    """Ribs and costal cartilages in the inner part of the wall, oblique: each rib runs down from
    the back to its lowest point anterolaterally, the cartilages climb to the sternum."""
    grid = scene.grid
    reach = float(np.abs(scene.delta).max())
    ring = (scene.cav2 > -14.0 - reach) & (scene.cav2 < 4.0 + reach)
    ring &= np.abs(grid.x)[:, None] > scene.body.ps_x + 0.3 * scene.body.ps_a  # not in front of the paraspinals
    ii, jj = np.nonzero(ring)
    if ii.size == 0:
        return
    X = grid.x[ii].astype(np.float64)
    Y = grid.y[jj].astype(np.float64)
    phi = np.arccos(np.clip(-Y / np.maximum(np.hypot(X, Y), 1e-6), -1.0, 1.0))
    low = p.lowest_angle
    rise = np.clip((phi - low) / (math.pi - low), 0.0, 1.0)
    drop = np.where(phi <= low, p.max_drop * (phi / low) * (1.15 - 0.15 * phi / low),
                    p.max_drop - (p.max_drop - p.front_drop) * rise**1.3)
    cav = scene.cav2[ii, jj][:, None] + scene.omega2[ii, jj][:, None] * scene.delta[None, :]  # (pixels, z)
    u = (grid.z[None, :] + drop[:, None] - p.first_z) / p.pitch
    n = np.rint(u)
    dz = (u - n) * p.pitch
    phi_max = np.where(n <= 0, 0.42 * math.pi, np.where(n == 1, 0.56 * math.pi, 0.93 * math.pi))
    rib = (((cav + 6.0) / 4.0) ** 2 + (dz / p.half_width) ** 2 < 1.0) & (n >= 0)
    rib &= (phi[:, None] < phi_max) & (phi[:, None] > 0.16 * math.pi)
    cart = rib & (phi[:, None] > 0.62 * math.pi) & (n >= 2)
    pix, kz = np.nonzero(rib)
    scene.tissue[ii[pix], jj[pix], kz] = np.where(cart[pix, kz], TISSUE["cartilage"], TISSUE["bone"]).astype(np.uint8)
    scene.label[ii[pix], jj[pix], kz] = 0


def paint_spine(scene: Scene, p: SpineShape) -> None:
    """Vertebral bodies (cortex, cancellous bone), discs, canal, arches, spinous/transverse processes."""
    grid = scene.grid
    ys, rx, ry = p.centre_y, p.rx, p.ry
    box = grid.box([-rx - p.process_length - 20.0, p.spinous_tip - 6.0, grid.z[0]], [rx + p.process_length + 20.0, ys + ry + 3.0, grid.z[-1]])
    if box is None:
        return
    X, Y, Z = grid.coords(box)
    phase = ((Z - p.z_l1) / p.pitch + 0.5) % 1.0  # 0 / 1 at the discs, 0.5 mid-body
    disc = (phase < 0.11) | (phase > 0.89)
    bulge = 1.0 + 0.06 * np.cos(2 * math.pi * phase)
    d_vb = (np.sqrt((X / (rx * bulge)) ** 2 + ((Y - ys) / (ry * bulge)) ** 2) - 1.0) * ry
    t, lab = scene.tissue[box], scene.label[box]

    def put(mask: np.ndarray, tissue: int) -> None:
        mask = np.broadcast_to(mask, t.shape)
        t[mask] = tissue
        lab[mask] = 0

    put((d_vb < 0) & ~disc, TISSUE["cortical_bone"])
    put((d_vb < -2.2) & ~disc, TISSUE["cancellous_bone"])
    put((d_vb < 0.5) & disc, TISSUE["disc"])
    cy = p.canal_y
    arch = (np.sqrt((X / 17.0) ** 2 + ((Y - cy + 1.0) / 13.5) ** 2) < 1.0) & (ys - ry + 3.0 > Y)
    put(arch & (phase > 0.16) & (phase < 0.9), TISSUE["bone"])
    sp_phase = phase + (cy - Y) / (p.pitch * 2.2)
    put((np.abs(X) < 3.5) & (cy - 6.0 > Y) & (p.spinous_tip < Y) & (sp_phase > 0.3) & (sp_phase < 0.95), TISSUE["bone"])
    ax = np.abs(X)
    tp = (np.abs(Y - (cy + 3.0) + 0.25 * (ax - 10.0)) < 2.6 - 0.04 * ax) & (ax > 10.0) & (ax < 12.0 + p.process_length)
    put(tp & (phase > 0.38) & (phase < 0.62), TISSUE["bone"])
    put(np.sqrt((X / 10.0) ** 2 + ((Y - cy) / 7.5) ** 2) < 1.0, TISSUE["csf"])


