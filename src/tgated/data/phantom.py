"""Synthetic abdominal CT / MR phantoms with organ labels, written in the real datasets' layouts.

The real datasets (FLARE22, BTCV, AMOS) cannot be downloaded in every environment, so training,
the demo and the tests run on phantoms: smooth, randomly deformed abdomens with all 13 canonical
organs (:data:`tgated.organs.ORGANS`), their neighbours (ribs, spine, muscles, fat, lung bases,
heart, bowel loops, colon, mesenteric and portal vessels) and plausible intensities.

Frames and units
----------------
* Patient frame (mm): ``X`` towards the patient's right, ``Y`` anterior, ``Z`` superior (RAS), with
  ``X = 0`` on the midline, ``Y = 0`` at the centre of the body outline and ``Z = 0`` near the
  L1/L2 level (renal hila). Anatomy is drawn in this frame, independently of the voxel grid, so the
  same case at another ``size`` is the same patient.
* Arrays are canonical RAS ``(x, y, z)``: the index increases towards the right, anterior and
  superior; axial slices lie along the last axis, inferior to superior. The 4×4 ``affine`` maps
  voxel indices to RAS world millimetres (the world origin is a random "table position").
* CT images are Hounsfield units (portal-venous phase); MR images are T1-weighted-like arbitrary
  units (fat bright, liver > spleen, fluid dark, smooth bias field, Rician noise): integers from 0
  to about 1300, fat ≈ 800-900.

How it is made
--------------
Every structure is a signed distance function (mm, negative inside) evaluated only inside its
bounding box: rotated ellipsoids with low-order harmonic deformations, tubes along smooth
centre-lines with varying radius (vessels, oesophagus, duodenum, bowel, colon, pancreas), per-slice
ellipses (aorta, IVC, psoas), and region functions built from the body outline and the diaphragm
domes (liver, lungs, spleen). Structures are painted in anatomical order into a tissue map and a
label map; later structures carve earlier ones, with fat planes ("halos") where real organs have
them. The tissue map becomes intensities through a per-case table (mean ± texture); thick slices
(≥ 2.5 mm) are sampled three times across their thickness and averaged (partial volume along z),
then a blur of about one voxel and noise follow. Nothing blanks or corrupts slices: single slices are
ambiguous where real CT is (pancreas vs. duodenum vs. unlabelled jejunum of the same attenuation;
the gallbladder, adrenals, kidney poles and pancreatic tail appear and vanish between slices), so
neighbouring slices help the way they do in real scans.

Everything is deterministic: case ``case`` of ``seed`` depends only on ``(seed, case, modality,
size)``; the anatomy itself only on ``(seed, case)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from tgated.data.layouts import NIFTI, TOTALSEG_IMAGES, TOTALSEG_MASKS, Layout, get_layout
from tgated.organs import ORGAN_BY_NAME, ORGANS, TOTALSEG_STRUCTURES

logger = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("ct", "mr")
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "LPI")
"""Axis codes the cases are stored in (chosen per case); readers must reorient."""
MIN_SIZE = 32
SLICE_SPACINGS_MM: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
_SLICE_SPACING_P = (0.12, 0.14, 0.2, 0.2, 0.14, 0.2)
MAX_SLICES = 100
"""Thin-slice cases cover less of the abdomen instead of exceeding this many slices."""

_ID = {o.name: o.id for o in ORGANS}

# ---------------------------------------------------------------------------------------------
# tissues: (name, CT HU low, CT HU high, CT texture SD, MR mean, MR texture SD)
# Each case draws its CT mean uniformly in [low, high]; MR means are jittered by ±10 %.
# ---------------------------------------------------------------------------------------------
_TISSUE_TABLE: tuple[tuple[str, float, float, float, float, float], ...] = (
    ("air", -1000, -1000, 0, 0, 0),
    ("table", 100, 250, 20, 0, 0),
    ("subcutaneous_fat", -115, -90, 8, 860, 25),
    ("muscle", 40, 60, 8, 280, 20),
    ("visceral_fat", -110, -85, 10, 800, 30),
    ("lung", -880, -820, 20, 30, 8),
    ("lung_vessel", -150, 0, 20, 60, 10),
    ("heart_blood", 140, 180, 5, 150, 20),
    ("myocardium", 90, 120, 8, 300, 20),
    ("cortical_bone", 800, 1100, 60, 25, 8),
    ("cancellous_bone", 180, 280, 40, 600, 50),
    ("bone", 450, 650, 60, 350, 40),
    ("disc", 70, 100, 8, 220, 20),
    ("csf", 5, 25, 5, 90, 10),
    ("cartilage", 110, 170, 20, 200, 20),
    ("liver", 75, 100, 5, 520, 20),
    ("hepatic_vessel", 150, 190, 5, 180, 20),
    ("spleen", 105, 125, 5, 340, 15),
    ("kidney_cortex", 160, 200, 8, 420, 20),
    ("kidney_medulla", 140, 180, 8, 300, 20),
    ("urine", 0, 20, 5, 80, 10),
    ("adrenal", 40, 60, 6, 360, 20),
    ("pancreas", 75, 100, 10, 560, 30),
    ("pancreas_fat", -70, -30, 10, 740, 30),
    ("bile", 0, 15, 4, 90, 10),
    ("gallbladder_wall", 50, 80, 6, 300, 20),
    ("gallstone", 300, 600, 40, 20, 5),
    ("stomach_wall", 70, 100, 8, 320, 20),
    ("stomach_content", 10, 40, 15, 160, 40),
    ("bowel_wall", 70, 95, 8, 320, 25),
    ("bowel_fluid", 15, 40, 8, 100, 15),
    ("stool", -60, 20, 40, 350, 80),
    ("gas", -1000, -950, 10, 5, 3),
    ("artery", 170, 230, 6, 160, 20),
    ("vein", 140, 180, 6, 200, 20),
    ("portal_vein", 160, 200, 6, 190, 20),
    ("esophagus", 35, 55, 6, 300, 20),
    ("calcification", 500, 900, 50, 20, 5),
    ("fat_strand", -20, 30, 10, 420, 30),
)
TISSUES: tuple[str, ...] = tuple(row[0] for row in _TISSUE_TABLE)
"""Tissue class names; :attr:`Phantom.tissue` holds indices into this tuple."""
_T = {name: i for i, name in enumerate(TISSUES)}
_PROTECTED = np.zeros(len(TISSUES), dtype=bool)
for _name in ("air", "table", "subcutaneous_fat", "cortical_bone", "cancellous_bone", "bone", "disc", "csf"):
    _PROTECTED[_T[_name]] = True
_KEEP = -1
"""Label value meaning "leave the label as it is" (vessels inside the liver stay liver)."""


@dataclass
class Phantom:
    """One synthetic case in the canonical RAS frame.

    ``image`` is float32 ``(x, y, z)`` holding integer values (HU for CT, 0..~1300 for MR), so
    writing it as int16 is lossless; ``labels`` are canonical organ ids (uint8); ``affine`` maps
    voxel indices to RAS world mm. ``tissue`` indexes :data:`TISSUES`. ``orientation`` is the axis
    code the case is stored in by :func:`write_dataset`.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    modality: str
    tissue: np.ndarray = field(repr=False)
    orientation: str = "RAS"
    seed: int = 0
    case: int = 0

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along x, y, z."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def other_labels(self) -> dict[str, np.ndarray]:
        """Masks of labelled structures outside the canonical organs (BTCV's portal/splenic vein)."""
        return {"portal_and_splenic_vein": (self.tissue == _T["portal_vein"]) & (self.labels == 0)}


# ---------------------------------------------------------------------------------------------
# grid, scene and shapes
# ---------------------------------------------------------------------------------------------

Box = tuple[slice, slice, slice]


class _Grid:
    """Voxel centres in the patient frame (mm): 1-D coordinate vectors along x, y, z."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.x, self.y, self.z = (np.asarray(c, dtype=np.float32) for c in (x, y, z))
        self.shape = (len(self.x), len(self.y), len(self.z))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        """Index box of the voxels whose centres lie in [lo, hi]; None when empty."""
        out = []
        for c, a, b in zip((self.x, self.y, self.z), lo, hi, strict=True):
            i0 = int(np.searchsorted(c, a, side="left"))
            i1 = int(np.searchsorted(c, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.x[box[0]][:, None, None],
            self.y[box[1]][None, :, None],
            self.z[box[2]][None, None, :],
        )


def _box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(s.stop - s.start for s in box)  # type: ignore[return-value]


def _sub(outer: Box, inner: Box | None) -> tuple[Box, Box] | None:
    """Intersection of two boxes: (absolute box, box relative to ``outer``)."""
    if inner is None:
        return None
    absolute, relative = [], []
    for o, i in zip(outer, inner, strict=True):
        a, b = max(o.start, i.start), min(o.stop, i.stop)
        if b <= a:
            return None
        absolute.append(slice(a, b))
        relative.append(slice(a - o.start, b - o.start))
    return tuple(absolute), tuple(relative)  # type: ignore[return-value]


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (intersection of SDFs) with blending width ``k`` mm."""
    h = np.clip(0.5 - 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


class _Shape:
    """A signed distance function (mm, < 0 inside) with a bounding box in the patient frame."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sdf(self, scene: _Scene, box: Box, margin: float) -> np.ndarray:
        raise NotImplementedError


class _Ellipsoid(_Shape):
    """Rotated ellipsoid whose radius is modulated by low-order harmonics of the direction."""

    def __init__(self, centre, radii, rot: np.ndarray | None = None, harm: Sequence[float] = ()) -> None:
        self.c = np.asarray(centre, dtype=np.float64)
        self.r = np.asarray(radii, dtype=np.float64)
        self.rot = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
        self.harm = np.asarray(harm, dtype=np.float64)

    def bounds(self):
        half = np.sqrt(((self.rot * self.r[None, :]) ** 2).sum(axis=1)) * (1.0 + np.abs(self.harm).sum())
        return self.c - half, self.c + half

    def sdf(self, scene, box, margin):
        X, Y, Z = scene.g.coords(box)
        # Python floats keep the arithmetic in float32 (NumPy scalars would promote to float64)
        c, rot, r = self.c.tolist(), (self.rot / self.r[None, :]).tolist(), self.r.tolist()
        d = (X - c[0], Y - c[1], Z - c[2])
        q = [rot[0][k] * d[0] + rot[1][k] * d[1] + rot[2][k] * d[2] for k in range(3)]
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        if self.harm.size:
            inv = 1.0 / np.maximum(rho, 1e-6)
            u0, u1, u2 = q[0] * inv, q[1] * inv, q[2] * inv
            basis = (u0, u1, u2, u0 * u1, u1 * u2, u0 * u2, u0 * u0 - u1 * u1, 3.0 * u2 * u2 - 1.0)
            mod = 1.0 + sum(a * f for a, f in zip(self.harm.tolist(), basis, strict=False))
            rho = rho / np.maximum(mod, 0.3)
        return ((rho - 1.0) * min(r)).astype(np.float32, copy=False)


class _Tube(_Shape):
    """Tube along a smooth centre-line through control points, radius interpolated between them.

    The centre-line is a chord-length cubic spline resampled every ``step`` mm; the SDF is the
    union of capsules with linearly varying radius, each evaluated in its own small box.
    """

    def __init__(
        self,
        points,
        radii,
        *,
        step: float = 5.0,
        smooth: bool = True,
        modulation: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        p = np.asarray(points, dtype=np.float64)
        r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(p),)).copy()
        seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
        keep = np.concatenate([[True], seg > 1e-6])
        p, r = p[keep], r[keep]
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        if smooth and len(p) >= 3:
            n = max(2, math.ceil(s[-1] / step) + 1)
            t = np.linspace(0.0, s[-1], n)
            p = CubicSpline(s, p, axis=0, bc_type="natural")(t)
            r = np.interp(t, s, r)
            s = t
        if modulation is not None:
            r = r * modulation(s)
        self.p = p
        self.r = np.maximum(r, 0.0)

    def bounds(self):
        return (self.p - self.r[:, None]).min(axis=0), (self.p + self.r[:, None]).max(axis=0)

    def sdf(self, scene, box, margin):
        out = np.full(_box_shape(box), np.inf, dtype=np.float32)
        g = scene.g
        for a, b, ra, rb in zip(self.p[:-1], self.p[1:], self.r[:-1].tolist(), self.r[1:].tolist(), strict=True):
            if ra <= 0 and rb <= 0:
                continue
            reach = max(ra, rb) + margin
            hit = _sub(box, g.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach))
            if hit is None:
                continue
            absolute, rel = hit
            X, Y, Z = g.coords(absolute)
            ab = (b - a).tolist()
            inv = 1.0 / (ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2)
            px, py, pz = X - float(a[0]), Y - float(a[1]), Z - float(a[2])
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) * inv, 0.0, 1.0)
            dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
            d = np.sqrt(dx * dx + dy * dy + dz * dz) - (ra + t * (rb - ra))
            np.minimum(out[rel], d, out=out[rel])
        return out


class _ZTube(_Shape):
    """Per-slice ellipses along z: centre and semi-axes interpolated from knots, rounded z ends."""

    def __init__(self, zk, cx, cy, rx, ry, z0: float, z1: float) -> None:
        self.zk = np.asarray(zk, dtype=np.float64)
        order = np.argsort(self.zk)
        self.zk = self.zk[order]
        self.cx, self.cy, self.rx, self.ry = (
            np.broadcast_to(np.asarray(v, dtype=np.float64), self.zk.shape)[order] for v in (cx, cy, rx, ry)
        )
        self.z0, self.z1 = float(z0), float(z1)

    def bounds(self):
        lo = np.array([(self.cx - self.rx).min(), (self.cy - self.ry).min(), self.z0])
        hi = np.array([(self.cx + self.rx).max(), (self.cy + self.ry).max(), self.z1])
        return lo, hi

    def sdf(self, scene, box, margin):
        X, Y, Z = scene.g.coords(box)
        zz = Z.ravel().astype(np.float64)
        cx, cy, rx, ry = (np.interp(zz, self.zk, v).astype(np.float32)[None, None, :] for v in
                          (self.cx, self.cy, self.rx, self.ry))
        u, v = (X - cx) / rx, (Y - cy) / ry
        d = (np.sqrt(u * u + v * v) - 1.0) * np.minimum(rx, ry)
        return np.maximum(d, np.maximum(self.z0 - Z, Z - self.z1)).astype(np.float32, copy=False)


class _Slab(_Shape):
    """A thin plate: a 2-D segment (x, y) swept along z between z0 and z1, endpoints moving linearly."""

    def __init__(self, a0, b0, a1, b1, z0: float, z1: float, radius: float) -> None:
        self.a0, self.b0, self.a1, self.b1 = (np.asarray(v, dtype=np.float64) for v in (a0, b0, a1, b1))
        self.z0, self.z1, self.radius = float(z0), float(z1), float(radius)

    def bounds(self):
        pts = np.stack([self.a0, self.b0, self.a1, self.b1])
        lo = np.concatenate([pts.min(axis=0) - self.radius, [self.z0 - self.radius]])
        hi = np.concatenate([pts.max(axis=0) + self.radius, [self.z1 + self.radius]])
        return lo, hi

    def sdf(self, scene, box, margin):
        X, Y, Z = scene.g.coords(box)
        w = np.clip((Z - self.z0) / max(self.z1 - self.z0, 1e-6), 0.0, 1.0)
        a0, b0, a1, b1 = (v.tolist() for v in (self.a0, self.b0, self.a1, self.b1))
        ax, ay = a0[0] + w * (a1[0] - a0[0]), a0[1] + w * (a1[1] - a0[1])
        bx, by = b0[0] + w * (b1[0] - b0[0]), b0[1] + w * (b1[1] - b0[1])
        ex, ey = bx - ax, by - ay
        px, py = X - ax, Y - ay
        t = np.clip((px * ex + py * ey) / np.maximum(ex * ex + ey * ey, 1e-6), 0.0, 1.0)
        dx, dy = px - t * ex, py - t * ey
        d2 = np.sqrt(dx * dx + dy * dy) - self.radius
        zc, hz = 0.5 * (self.z0 + self.z1), 0.5 * (self.z1 - self.z0)
        dz = np.abs(Z - zc) - hz
        return np.maximum(d2, dz).astype(np.float32, copy=False)


class _Union(_Shape):
    def __init__(self, *shapes: _Shape) -> None:
        self.shapes = shapes

    def bounds(self):
        b = [s.bounds() for s in self.shapes]
        return np.min([x[0] for x in b], axis=0), np.max([x[1] for x in b], axis=0)

    def sdf(self, scene, box, margin):
        out = None
        for s in self.shapes:
            d = s.sdf(scene, box, margin)
            out = d if out is None else np.minimum(out, d)
        return out


class _Region(_Shape):
    """A shape given by a function ``f(scene, X, Y, Z) -> sdf`` over fixed bounds."""

    def __init__(self, lo, hi, fn: Callable[..., np.ndarray]) -> None:
        self.lo, self.hi, self.fn = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), fn

    def bounds(self):
        return self.lo, self.hi

    def sdf(self, scene, box, margin):
        X, Y, Z = scene.g.coords(box)
        return np.broadcast_to(self.fn(scene, box, X, Y, Z), _box_shape(box)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# body outline (radial profiles around the body centre) and diaphragm
# ---------------------------------------------------------------------------------------------


class _Body:
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


class _Diaphragm:
    """Diaphragm: ``height(X, Y)`` is the z (mm) of its upper surface.

    Two gentle domes (the right one higher) over the middle of the cavity; near the cavity wall
    the surface plunges into the costophrenic recesses, deepest at the back, so the lung bases
    appear as crescents around the liver and spleen over several centimetres.
    """

    def __init__(self, rng: np.random.Generator, breath: float, body: _Body) -> None:
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


class _Scene:
    def __init__(self, grid: _Grid, body: _Body, diaphragm: _Diaphragm) -> None:
        self.g = grid
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
        return self.zd2[box[0], box[1], None] - 4.0 - self.g.z[None, None, box[2]]

    def allowed(
        self, box: Box, *, clip: float | None, only: Sequence[int] | None, onlylabel: int | None, region: str | None
    ) -> np.ndarray:
        t = self.tissue[box]
        ok = ~_PROTECTED[t]
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
        shape: _Shape,
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
        inner part (e.g. a lumen inside a wall); ``label`` ``_KEEP`` leaves labels unchanged.
        ``clip``: paint only this deep (mm) inside the cavity (None: anywhere); ``only`` /
        ``onlylabel``: only over these tissues / that label; ``region``: "abdomen" (below the
        diaphragm) or "thorax". ``gas_above``: inside the last layer, voxels with Y above this level
        become gas (non-dependent gas in a supine patient). Bone, air, table and subcutaneous fat
        are never painted over.
        """
        halo = max(0.0, max(layer[0] for layer in layers))
        lo, hi = shape.bounds()
        box = self.g.box(lo - halo - 1.0, hi + halo + 1.0)
        if box is None:
            return
        d = shape.sdf(self, box, halo + 1.0)
        ok = self.allowed(box, clip=clip, only=only, onlylabel=onlylabel, region=region)
        t, lab = self.tissue[box], self.label[box]
        for thr, tissue, label in layers:
            m = (d < thr) & ok
            t[m] = tissue
            if label != _KEEP:
                lab[m] = label
        if gas_above is not None:
            m = (d < layers[-1][0]) & ok & (self.g.coords(box)[1] > gas_above)
            t[m] = _T["gas"]


# ---------------------------------------------------------------------------------------------
# anatomy: each function draws a system's random shapes and returns its painting operations
# ---------------------------------------------------------------------------------------------

_Op = Callable[[_Scene], None]
_FAT, _VFAT, _MUSCLE = _T["subcutaneous_fat"], _T["visceral_fat"], _T["muscle"]
_SOFT = (_VFAT, _T["bowel_wall"], _T["bowel_fluid"], _T["stool"], _T["gas"], _T["fat_strand"])


def _jitter(rng: np.random.Generator, pts, sd: float) -> np.ndarray:
    p = np.asarray(pts, dtype=np.float64)
    return p + rng.normal(0.0, sd, p.shape)


def _harm(rng: np.random.Generator, amp: float) -> np.ndarray:
    return rng.normal(0.0, amp, 8) * np.array([1, 1, 1, 0.7, 0.7, 0.7, 0.5, 0.5])


def _bowel_walk(
    rng: np.random.Generator, start, direction, lo, hi, length: float, step: float, avoid: Sequence[np.ndarray]
) -> np.ndarray:
    """A smooth random walk that prefers unvisited space inside a box: packed small bowel (mm)."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    p = np.asarray(start, dtype=np.float64)
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    pts = [p]
    cell = 20.0
    occupied: dict[tuple[int, ...], int] = {}

    def key(x: np.ndarray) -> tuple[int, ...]:
        return tuple(int(v) for v in np.floor(x / cell))

    for q in avoid:
        for x in q:
            occupied[key(x)] = occupied.get(key(x), 0) + 3
    for _ in range(int(length / step)):
        cand = d[None, :] + rng.normal(0.0, 0.55, (6, 3))
        cand /= np.linalg.norm(cand, axis=1, keepdims=True)
        nxt = p[None, :] + step * cand
        cost = np.array([occupied.get(key(x), 0) for x in nxt], dtype=np.float64)
        outside = np.maximum(lo - nxt, 0).sum(axis=1) + np.maximum(nxt - hi, 0).sum(axis=1)
        cost = cost + outside * 2.0 - (cand @ d) * 0.8 + rng.uniform(0.0, 0.3, 6)
        k = int(np.argmin(cost))
        d, p = cand[k], nxt[k]
        pts.append(p)
        occupied[key(p)] = occupied.get(key(p), 0) + 1
    return np.asarray(pts)


@dataclass
class _Case:
    """One patient: scan geometry and the ordered painting operations (independent of the grid)."""

    fov: float
    slice_spacing: float
    z_lo: float
    z_hi: float
    centre_offset: tuple[float, float]
    world_shift: tuple[float, float, float]
    orientation: str
    ops: list[_Op]
    body: _Body
    diaphragm: _Diaphragm
    kidney_phase: bool


def _draw_case(seed: int, case: int) -> _Case:
    """Draw one patient from the anatomy stream of ``(seed, case)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, 0x70616E]))
    body = _Body(rng)
    breath = rng.uniform(-12.0, 12.0)
    dia = _Diaphragm(rng, breath, body)
    fov = max(rng.uniform(0.7, 1.0) * 512.0, 2 * body.bx + 40.0)
    sz = float(rng.choice(SLICE_SPACINGS_MM, p=_SLICE_SPACING_P))
    coverage = min(rng.uniform(170.0, 220.0), (MAX_SLICES - 1) * sz)
    z_hi = min(dia.zr + rng.uniform(-5.0, 18.0), -45.0 + coverage)
    z_lo = z_hi - coverage
    centre_offset = (rng.uniform(-12.0, 12.0), rng.uniform(-8.0, 18.0))
    world_shift = (rng.uniform(-30.0, 30.0), rng.uniform(-60.0, 60.0), rng.uniform(-1200.0, -200.0))
    orientation = str(ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))])
    kidney_phase = bool(rng.uniform() < 0.3)

    a = SimpleNamespace(body=body, dia=dia, breath=breath, zb_lo=z_lo - 40.0, zb_hi=z_hi + 40.0, z_hi=z_hi)
    a.y_front = body.cavity_edge_y(0.0, posterior=False)  # anterior cavity boundary on the midline
    a.x_right = body.cavity_edge_x(0.0, left=False)
    a.x_left = body.cavity_edge_x(0.0, left=True)
    frame = _draw_frame(rng, a)
    vessels = _draw_great_vessels(rng, a)
    kidneys = _draw_kidneys(rng, a)
    spleen = _draw_spleen(rng, a)
    liver = _draw_liver(rng, a)
    adrenals = _draw_adrenals(rng, a)
    pancreas, duodenum = _draw_pancreas_duodenum(rng, a)
    bowel = _draw_bowel(rng, a)
    stomach = _draw_stomach(rng, a)
    gallbladder = _draw_gallbladder(rng, a)
    portal = _draw_visceral_vessels(rng, a)
    ops = (
        frame + bowel + liver + stomach + spleen + kidneys + adrenals + pancreas + duodenum + gallbladder
        + portal + vessels
    )
    return _Case(
        fov=fov, slice_spacing=sz, z_lo=z_lo, z_hi=z_hi, centre_offset=centre_offset, world_shift=world_shift,
        orientation=orientation, ops=ops, body=body, diaphragm=dia, kidney_phase=kidney_phase,
    )


def _draw_frame(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Body wall, thorax, ribs, spine and the retroperitoneal muscles (psoas, quadratus lumborum)."""
    body = a.body
    a.vb_rx, a.vb_ry = rng.uniform(19.0, 24.0), rng.uniform(14.0, 17.0)
    a.y_back = body.cavity_edge_y(0.0, posterior=True)
    a.ys = a.y_back + a.vb_ry - 3.0  # vertebral body centre
    a.yf = a.ys + a.vb_ry  # its anterior surface
    a.depth = a.y_front - a.yf  # room in front of the spine (mm): anterior organs scale with it
    z_l1, pitch = rng.uniform(2.0, 18.0), rng.uniform(31.0, 36.0)
    spine = {"ys": a.ys, "rx": a.vb_rx, "ry": a.vb_ry, "z_l1": z_l1, "pitch": pitch, "tp_len": rng.uniform(22.0, 32.0),
                 "canal_y": a.ys - a.vb_ry - 9.0, "spin_tip": -body.by_post + body.fat(np.array(-math.pi / 2)) + 6.0}
    ribs = {"z0": z_l1 + pitch + rng.uniform(-4.0, 4.0), "pitch": pitch * rng.uniform(0.9, 1.0),
                "dmax": rng.uniform(100.0, 135.0), "phi_low": rng.uniform(0.58, 0.7) * math.pi,
                "d_ant": rng.uniform(15.0, 40.0), "half": rng.uniform(4.5, 6.0)}
    ops: list[_Op] = [_paint_body, _paint_thorax, lambda s: _paint_ribs(s, ribs)]
    for side in (1.0, -1.0):
        zk = np.array([a.zb_lo, -90.0, -40.0, 0.0, 12.0])
        r = np.array([22.0, 20.0, 15.0, 7.0, 2.0]) * rng.uniform(0.85, 1.15)
        psoas = _ZTube(zk, side * (a.vb_rx + 4.0 + r * 0.9), a.ys + 2.0, r, r * 0.85, a.zb_lo, 14.0)
        ql_x = side * (a.vb_rx + rng.uniform(40.0, 50.0))
        ql_y = body.cavity_edge_y(ql_x, posterior=True) + rng.uniform(1.0, 5.0)
        ql = _ZTube([a.zb_lo, -40.0, 20.0], ql_x, ql_y, [16.0, 13.0, 5.0], [8.0, 7.0, 3.0], a.zb_lo, 25.0)
        ops.append(lambda s, sh=psoas: s.fill(sh, [(0.0, _MUSCLE, 0)], clip=-20.0))
        ops.append(lambda s, sh=ql: s.fill(sh, [(0.0, _MUSCLE, 0)], clip=-30.0))
    ops.append(lambda s: _paint_spine(s, spine))
    return ops


def _draw_great_vessels(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Aorta (left-anterior of the spine, with calcified plaques), IVC (right-anterior), crura.

    The shapes are drawn here (other structures are placed relative to them); their painting
    operations, returned, come last.
    """
    a.ra = ra = rng.uniform(10.0, 13.0)
    a.hiatus = hiatus = a.dia.zc - rng.uniform(2.0, 10.0)
    vb_rx, yf, ys = a.vb_rx, a.yf, a.ys
    a.ax_low = ax = -(vb_rx * 0.45 + rng.uniform(0.0, 6.0))
    grow = np.array([0.85, 0.9, 1.0, 1.0, 1.05, 1.1]) * ra
    aorta = _ZTube(
        [a.zb_lo, -60.0, 0.0, hiatus, hiatus + 40.0, a.zb_hi],
        [ax, ax - 1.0, ax - 2.0, -vb_rx * 0.7, -(vb_rx * 0.55 + ra * 0.7), -(vb_rx * 0.55 + ra * 0.8)],
        [yf + ra * 0.85, yf + ra + 1.0, yf + ra + 1.0, yf + ra * 0.7, ys + 0.6 * a.vb_ry + ra * 0.5,
         ys + 0.6 * a.vb_ry + ra * 0.4],
        grow, grow, a.zb_lo, a.zb_hi,
    )
    a.ivc_x = ivc_x = vb_rx * 0.8 + rng.uniform(4.0, 10.0)
    a.ivc_top = ivc_top = a.dia.zc + rng.uniform(5.0, 15.0)
    irx, iry = rng.uniform(11.0, 14.0), rng.uniform(7.5, 10.0)
    ivc = _ZTube(
        [a.zb_lo, -30.0, 10.0, 45.0, ivc_top],
        [ivc_x - 4.0, ivc_x, ivc_x + 2.0, ivc_x + 2.0, ivc_x - 4.0],
        [yf + iry + 2.0, yf + iry + 4.0, yf + iry + 10.0, yf + iry + 24.0, yf + iry + 34.0],
        [irx * 0.9, irx, irx, irx * 1.05, irx * 1.2],
        [iry * 0.9, iry, iry, iry * 1.1, iry * 1.3],
        a.zb_lo, ivc_top,
    )
    a.aorta_centre = lambda z: np.array([np.interp(z, aorta.zk, aorta.cx), np.interp(z, aorta.zk, aorta.cy)])
    # the heart on the central tendon, anterior to the aorta and the oesophagus
    d = a.dia
    heart_e = _Ellipsoid([rng.uniform(-35.0, -15.0), a.y_front - rng.uniform(45.0, 60.0), d.zc + rng.uniform(45.0, 60.0)],
                         [rng.uniform(55.0, 68.0), rng.uniform(42.0, 50.0), 55.0],
                         _rotation(0.0, 0.25, rng.uniform(-0.6, -0.3)))
    y_behind = yf + 2 * ra + 14.0
    heart = _Region(*heart_e.bounds(), lambda s, box, X, Y, Z: _smax(heart_e.sdf(s, box, 0.0), y_behind - Y, 8.0))
    a.ivc_centre = lambda z: np.array([np.interp(z, ivc.zk, ivc.cx), np.interp(z, ivc.zk, ivc.cy)])
    ops: list[_Op] = [lambda s: s.fill(heart, [(6.0, _VFAT, 0), (0.0, _T["myocardium"], 0),
                                               (-9.0, _T["heart_blood"], 0)], clip=0.0, region="thorax")]
    for side in (1.0, -1.0):  # diaphragmatic crura around the aorta
        crus = _Tube([[side * vb_rx * 0.6, yf + 2.0, -40.0 + a.breath * 0.3],
                      [ax + side * (ra + 6.0), yf + ra * 0.9, 0.0],
                      [ax + side * (ra + 5.0), yf + ra * 2.0 + 4.0, hiatus - 15.0],
                      [ax * 0.5 + side * 8.0, yf + ra * 2.0 + 12.0, hiatus]],
                     rng.uniform(3.0, 5.0) * (1.2 if side > 0 else 1.0))
        ops.append(lambda s, sh=crus: s.fill(sh, [(0.0, _MUSCLE, 0)], only=[_VFAT, _T["liver"], _T["bowel_wall"]]))
    ops.append(lambda s: s.fill(
        aorta, [(2.0, _VFAT, 0), (0.0, _T["artery"], _ID["aorta"])], clip=-15.0,
        only=[_VFAT, _MUSCLE, _T["liver"], _T["lung"], _T["bowel_wall"], _T["bowel_fluid"], _T["pancreas"],
              _T["portal_vein"], _T["vein"], _T["esophagus"], _T["fat_strand"]]))
    for _ in range(int(rng.poisson(3.0))):
        cz = rng.uniform(a.zb_lo, a.z_hi)
        ang = rng.uniform(0.0, 2 * math.pi)
        rr = float(np.interp(cz, aorta.zk, aorta.rx))
        c = a.aorta_centre(cz)
        calc = _Ellipsoid([c[0] + rr * math.cos(ang), c[1] + rr * math.sin(ang), cz], [1.6, 1.6, rng.uniform(2.0, 5.0)])
        ops.append(lambda s, sh=calc: s.fill(sh, [(0.0, _T["calcification"], _ID["aorta"])], onlylabel=_ID["aorta"]))
    ops.append(lambda s: s.fill(
        ivc, [(0.0, _T["vein"], _ID["inferior_vena_cava"])], clip=-15.0,
        only=[_VFAT, _MUSCLE, _T["liver"], _T["hepatic_vessel"], _T["bowel_wall"], _T["bowel_fluid"],
              _T["pancreas"], _T["vein"], _T["adrenal"], _T["portal_vein"], _T["fat_strand"]]))
    return ops


def _draw_spleen(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Spleen: against the posterolateral left wall under the left dome, shaped by its neighbours."""
    thick, length, height = rng.uniform(18.0, 26.0), rng.uniform(45.0, 65.0), rng.uniform(40.0, 55.0)
    y = a.y_back * rng.uniform(0.3, 0.7)  # in the posterolateral gutter, against the ribs
    xy = np.array([a.body.cavity_edge_x(y, left=True) + thick + 4.0, y])
    th = math.atan2(y - 10.0, xy[0])
    top = float(a.dia.height(np.array(xy[0]), np.array(xy[1])))
    kidney_top = a.kidneys["left_kidney"]["top"][2]
    a.sp_c = np.array([xy[0], xy[1], max(top - 6.0 - 0.8 * height, kidney_top + 0.2 * height)])
    spleen = _Ellipsoid(a.sp_c, [thick, length, height],
                        _rotation(rng.uniform(-0.5, -0.2), rng.uniform(-0.2, 0.2), th), _harm(rng, 0.06))
    a.sp_hilum = a.sp_c + np.array([-thick * math.cos(th), -thick * math.sin(th), -5.0]) * 0.9
    return [lambda s: s.fill(spleen, [(0.0, _T["spleen"], _ID["spleen"])], clip=2.0, region="abdomen")]


def _draw_liver(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Liver: the right upper cavity under the diaphragm, bounded below by an oblique inferior
    surface and on the left by a boundary that recedes to the right in lower slices; hepatic and
    portal vein branches inside (labelled liver)."""
    breath, yf, dia = a.breath, a.yf, a.dia
    tip_x = a.x_right - rng.uniform(8.0, 25.0)
    tip_z = rng.uniform(-85.0, -40.0) + breath
    slope = rng.uniform(0.45, 0.7)
    xl0, xl_k = rng.uniform(10.0, 30.0), rng.uniform(1.0, 1.4)
    xl_z, xl_ref = rng.uniform(0.9, 1.4), dia.zl - rng.uniform(20.0, 35.0)
    xl_c, depth = rng.uniform(0.3, 0.7), a.depth  # curvature of the medial boundary around the stomach
    lh, lf, lp = (v.tolist() for v in (rng.normal(0.0, 5.0, 4), rng.uniform(0.02, 0.05, 4),
                                       rng.uniform(0.0, 2 * math.pi, 4)))
    ivc_x = a.ivc_x

    def liver_sdf(s: _Scene, box: Box, X, Y, Z):
        z_inf = tip_z + slope * np.maximum(tip_x - X, 0.0) - 0.12 * (Y - yf - 60.0)
        z_inf = z_inf + lh[0] * np.sin(lf[0] * Y + lp[0]) + lh[1] * np.sin(lf[1] * X + lp[1])
        yy = np.maximum(Y - yf, 0.0)
        x_left = xl0 - xl_k * yy * (1.0 - xl_c + xl_c * yy / depth) + xl_z * np.maximum(xl_ref - Z, 0.0)
        x_left = x_left + lh[2] * np.sin(lf[2] * Z + lf[3] * Y + lp[2]) + lh[3] * np.sin(lf[3] * Y + lp[3])
        d = _smax(1.5 - s.cavity(box), -s.below_diaphragm(box), 6.0)
        d = _smax(d, z_inf - Z, 10.0)
        d = _smax(d, x_left - X, 10.0)
        # behind the IVC, nothing left of the right crus
        return _smax(d, np.where(yf + 20.0 > Y, ivc_x - 8.0 - X, -1e3), 6.0)

    liver = _Region([-150.0, -160.0, tip_z - 5.0], [250.0, 200.0, dia.zr + 5.0], liver_sdf)
    ops: list[_Op] = [lambda s: s.fill(liver, [(0.0, _T["liver"], _ID["liver"])], only=(*_SOFT, _MUSCLE),
                                       region="abdomen")]
    a.hilum = np.array([ivc_x + rng.uniform(15.0, 30.0), yf + rng.uniform(55.0, 70.0),
                        rng.uniform(15.0, 30.0) + breath])
    hv_root = np.array([*a.ivc_centre(a.ivc_top - 15.0), a.ivc_top - 15.0])
    hv_targets = [[tip_x - 15.0, yf + 20.0, 15.0 + breath], [ivc_x + 15.0, a.y_front - 20.0, 10.0 + breath],
                  [xl0 - 60.0, a.y_front - 25.0, 45.0 + breath]]
    pv_targets = [[tip_x - 10.0, yf + 40.0, 20.0 + breath], [xl0 - 50.0, a.y_front - 30.0, 35.0 + breath],
                  [tip_x - 20.0, yf + 60.0, -10.0 + breath]]
    branches = []
    for root, targets in ((hv_root, hv_targets), (a.hilum, pv_targets)):
        for tgt in targets:
            tgt = _jitter(rng, tgt, 6.0)
            mid = (root + tgt) / 2.0 + rng.normal(0.0, 5.0, 3)
            branches.append(_Tube([root, mid, tgt], [6.0, 4.0, 1.8]))
            for _ in range(3):  # second-generation branches
                start = root + (tgt - root) * rng.uniform(0.3, 0.8)
                step = rng.normal(0.0, 1.0, 3) * rng.uniform(8.0, 14.0)
                end = start + 2.0 * step + rng.normal(0.0, 4.0, 3)
                branches.append(_Tube([start, start + step + rng.normal(0.0, 3.0, 3), end], [2.6, 2.0, 1.0]))
    hepatic = _Union(*branches)
    ops.append(lambda s: s.fill(hepatic, [(0.0, _T["hepatic_vessel"], _KEEP)], onlylabel=_ID["liver"]))
    return ops


def _draw_kidneys(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Kidneys in the paravertebral gutters (right lower than left), perirenal fat, sinus fat,
    pelvis, medulla; renal veins into the IVC (the left one between aorta and SMA), renal arteries."""
    ops: list[_Op] = []
    a.kidneys = {}
    kz_right = rng.uniform(-45.0, -25.0) + a.breath * 0.7
    kz_left = kz_right + rng.uniform(8.0, 25.0)  # the right kidney sits lower (under the liver)
    for name, side, kz in (("right_kidney", 1.0, kz_right), ("left_kidney", -1.0, kz_left)):
        kx = side * (a.vb_rx + rng.uniform(38.0, 50.0))
        radii = np.array([rng.uniform(24.0, 30.0), rng.uniform(18.0, 23.0), rng.uniform(48.0, 60.0)])
        ky = max(a.body.cavity_edge_y(kx, posterior=True) + radii[1] + rng.uniform(4.0, 12.0), a.ys - 25.0)
        rot = _rotation(rng.uniform(-0.35, -0.15), side * rng.uniform(0.1, 0.3), side * rng.uniform(0.35, 0.7))
        centre = np.array([kx, ky, kz])
        kidney = _Ellipsoid(centre, radii, rot, _harm(rng, 0.04))
        medial = rot @ np.array([-side, 0.0, 0.0])
        sinus_c = centre + medial * radii[0] * 0.75
        sinus = _Ellipsoid(sinus_c, radii * np.array([0.55, 0.45, 0.5]), rot)
        pelvis = _Ellipsoid(sinus_c + medial * 3.0, radii * np.array([0.28, 0.22, 0.25]), rot)
        medulla = _Ellipsoid(centre, radii * 0.72, rot, kidney.harm)
        halo, lab = rng.uniform(4.0, 12.0), _ID[name]
        ops.append(lambda s, k=kidney, h=halo, lb=lab: s.fill(k, [(h, _VFAT, 0), (0.0, _T["kidney_cortex"], lb)]))
        ops.append(lambda s, m=medulla, lb=lab: s.fill(m, [(0.0, _T["kidney_medulla"], lb)], onlylabel=lb))
        ops.append(lambda s, si=sinus, lb=lab: s.fill(si, [(0.0, _VFAT, 0)], onlylabel=lb))
        ops.append(lambda s, pe=pelvis, lb=lab: s.fill(pe, [(0.0, _T["urine"], lb)], only=[_VFAT]))
        a.kidneys[name] = {"centre": centre, "hilum": sinus_c + medial * radii[0] * 0.4,
                               "top": centre + rot @ np.array([0.0, 0.0, radii[2]])}
    ra = a.ra
    for name in ("right_kidney", "left_kidney"):
        h = a.kidneys[name]["hilum"]
        vz = h[2] + rng.uniform(-4.0, 4.0)
        ic = a.ivc_centre(vz)
        if name == "left_kidney":
            ac = a.aorta_centre(vz)
            pts = [h, [ac[0] - ra - 8.0, ac[1] + ra * 0.6, vz], [ac[0], ac[1] + ra + 5.0, vz], [ic[0], ic[1], vz]]
        else:
            pts = [h, [(h[0] + ic[0]) / 2, (h[1] + ic[1]) / 2 + 3.0, vz], [ic[0], ic[1], vz]]
        vein = _Tube(pts, rng.uniform(4.0, 5.5))
        ops.append(lambda s, sh=vein: s.fill(sh, [(0.0, _T["vein"], 0)],
                                             only=(*_SOFT, _T["kidney_cortex"], _T["urine"], _MUSCLE)))
        az = h[2] + rng.uniform(4.0, 10.0)
        ac = a.aorta_centre(az)
        artery = _Tube([[ac[0], ac[1], az], [(ac[0] + h[0]) / 2, ac[1] - 4.0, az - 2.0], h + np.array([0.0, -3.0, 4.0])],
                       rng.uniform(2.2, 3.2))
        ops.append(lambda s, sh=artery: s.fill(sh, [(0.0, _T["artery"], 0)],
                                               only=(*_SOFT, _T["kidney_cortex"], _T["urine"])))
    return ops


def _draw_adrenals(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Adrenal glands: thin (3-5 mm) inverted-V / Y plates in fat, superomedial to the kidneys;
    the right one behind the IVC, the left one lateral to the aorta / left crus."""
    ops: list[_Op] = []
    for name, side in (("right_adrenal_gland", 1.0), ("left_adrenal_gland", -1.0)):
        top = a.kidneys[name.replace("adrenal_gland", "kidney")]["top"]
        if side > 0:
            apex = np.array([a.ivc_x + rng.uniform(-2.0, 4.0), a.yf + rng.uniform(-2.0, 6.0)])
            z0 = top[2] + rng.uniform(4.0, 10.0)
            z1 = z0 + rng.uniform(28.0, 42.0)
        else:
            apex = np.array([a.ax_low - a.ra - rng.uniform(8.0, 14.0), a.yf + rng.uniform(0.0, 8.0)])
            z1 = top[2] + rng.uniform(5.0, 15.0)
            z0 = z1 - rng.uniform(30.0, 42.0)
        limb = rng.uniform(1.6, 2.4)
        med = apex + np.array([side * rng.uniform(-4.0, 2.0), -rng.uniform(16.0, 24.0)])
        lat = apex + np.array([side * rng.uniform(10.0, 18.0), -rng.uniform(12.0, 20.0)])
        lean = rng.normal(0.0, 3.0, 2)
        gland = _Union(
            _Slab(apex, med, apex + lean, med + lean * 1.5, z0, z1 - rng.uniform(0.0, 8.0), limb),
            _Slab(apex, lat, apex + lean, lat + lean * 1.5, z0 + rng.uniform(0.0, 8.0), z1, limb),
            _Slab(apex, apex + np.array([0.0, 5.0]), apex + lean, apex + lean + np.array([0.0, 5.0]),
                  z0 + 4.0, z1 - 6.0, limb * 1.3),
        )
        lab = _ID[name]
        ops.append(lambda s, sh=gland, lb=lab: s.fill(sh, [(2.5, _VFAT, 0), (0.0, _T["adrenal"], lb)], clip=0.0))
    return ops


def _draw_pancreas_duodenum(rng: np.random.Generator, a: SimpleNamespace) -> tuple[list[_Op], list[_Op]]:
    """Pancreas (head in the duodenal C-loop, neck in front of the portal confluence, body across
    the aorta, tail to the splenic hilum) and the duodenum (bulb, descending, horizontal between
    aorta and SMA, ascending to the duodeno-jejunal flexure), partly collapsed."""
    db = a.breath * 0.6
    yf, ivc_x, ax, ra = a.yf, a.ivc_x, a.ax_low, a.ra
    a.pylorus = pyl = np.array([rng.uniform(10.0, 30.0), yf + rng.uniform(0.6, 0.78) * a.depth,
                                rng.uniform(0.0, 15.0) + db])
    d_lat = ivc_x + rng.uniform(28.0, 40.0)
    d3_z = rng.uniform(-60.0, -40.0) + db
    pts = np.array([
        pyl,
        [pyl[0] + 18.0, pyl[1] - 8.0, pyl[2] + 6.0],
        [d_lat, yf + 48.0, pyl[2] + 2.0],
        [d_lat + 4.0, yf + 40.0, (pyl[2] + d3_z) / 2.0],
        [d_lat, yf + 36.0, d3_z + 10.0],
        [d_lat - 18.0, yf + 34.0, d3_z],
        [ivc_x - 10.0, yf + 38.0, d3_z - 2.0],
        [ax - 12.0, yf + 40.0, d3_z + 2.0],
        [ax - 26.0, yf + 44.0, d3_z + 18.0],
        [ax - 28.0, yf + 52.0, d3_z + 35.0],
    ])
    pts[1:] = _jitter(rng, pts[1:], 3.0)
    a.dj = pts[-1]
    radii = np.array([9.0, 13.0, 12.0, 12.0, 11.5, 11.0, 10.0, 10.0, 10.0, 9.0]) * rng.uniform(0.85, 1.15)
    duo = _Tube(pts, radii, step=4.0)
    collapse = np.interp(np.linspace(0, 1, len(duo.p)), np.linspace(0, 1, len(pts)), rng.uniform(0.0, 1.0, len(pts)))
    lumen = _Tube(duo.p, np.maximum(duo.r - 2.5 - collapse * 8.0, 0.0), smooth=False)
    gas = max(pyl[1] - rng.uniform(0.0, 8.0), yf + 58.0)  # a little gas in the bulb at most
    duo_ops: list[_Op] = [
        lambda s: s.fill(duo, [(0.0, _T["bowel_wall"], _ID["duodenum"])], clip=2.0),
        lambda s: s.fill(lumen, [(0.0, _T["bowel_fluid"], _ID["duodenum"])], onlylabel=_ID["duodenum"],
                         gas_above=gas),
    ]
    a.pz = pz = rng.uniform(-12.0, 2.0) + db
    a.aly = aly = yf + 2 * ra
    sp = a.sp_hilum
    pan_pts = np.array([
        [d_lat - 22.0, yf + 40.0, d3_z + 18.0],  # uncinate process / lower head
        [d_lat - 22.0, yf + 46.0, pz - 8.0],  # head
        [ivc_x - 10.0, aly + 22.0, pz + 2.0],  # neck, anterior to the portal confluence
        [ax - 15.0, aly + 18.0, pz + 8.0],  # body, anterior to aorta and SMA
        [ax - 50.0, aly + 2.0, pz + 15.0],
        [sp[0] + 15.0, sp[1] + 20.0, sp[2] - 10.0],  # tail towards the splenic hilum
    ])
    pan_pts = _jitter(rng, pan_pts, 3.5)
    pan_r = np.array([11.0, 15.0, 8.5, 11.0, 10.0, 7.0]) * rng.uniform(0.8, 1.15) * rng.uniform(0.9, 1.1, 6)
    a.pancreas = pancreas = _Tube(pan_pts, pan_r, step=4.0)
    pan_ops: list[_Op] = [lambda s: s.fill(pancreas, [(1.5, _VFAT, 0), (0.0, _T["pancreas"], _ID["pancreas"])],
                                           clip=2.0, region="abdomen")]
    return pan_ops, duo_ops


def _draw_bowel(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Colon (haustra, stool with gas, gas anteriorly) and packed small-bowel loops (jejunum from the
    duodeno-jejunal flexure in the left abdomen, ileum lower right): fluid-filled, collapsed or with
    gas; unlabelled, of the same attenuation as the duodenum."""
    ops: list[_Op] = []
    rc = rng.uniform(20.0, 27.0)
    sag = rng.uniform(-95.0, -35.0)
    flex_r = rng.uniform(-40.0, -20.0) + a.breath * 0.5
    flex_l = rng.uniform(-5.0, 25.0) + a.breath * 0.7
    xr, xl, yfr, zb = a.x_right, a.x_left, a.y_front, a.zb_lo
    pts = np.array([
        [xr - rc - 6.0, -5.0, zb - 10.0],
        [xr - rc - 5.0, -2.0, -70.0],
        [xr - rc - 8.0, 5.0, flex_r - 10.0],
        [xr - rc - 22.0, 30.0, flex_r],
        [xr * 0.45, yfr - rc - 8.0, (flex_r + sag) / 2.0],
        [0.0, yfr - rc - 5.0, sag],
        [xl * 0.45, yfr - rc - 10.0, (flex_l + sag) / 2.0],
        [xl + rc + 20.0, 20.0, flex_l],
        [xl + rc + 6.0, -8.0, flex_l - 15.0],
        [xl + rc + 6.0, -12.0, -60.0],
        [xl + rc + 8.0, -10.0, zb - 10.0],
    ])
    pts = _jitter(rng, pts, 5.0)
    period, phase = rng.uniform(28.0, 40.0), rng.uniform(0.0, 2 * math.pi)
    colon = _Tube(pts, rc * rng.uniform(0.85, 1.1, len(pts)), step=6.0,
                  modulation=lambda s: 1.0 + 0.13 * np.sin(2 * math.pi * s / period + phase))
    lumen = _Tube(colon.p, np.maximum(colon.r - 2.5, 0.0), smooth=False)
    gas = rng.uniform(yfr - 60.0, yfr - 10.0)
    ops.append(lambda s: s.fill(colon, [(3.0, _VFAT, 0), (0.0, _T["bowel_wall"], 0)]))
    ops.append(lambda s: s.fill(lumen, [(0.0, _T["stool"], 0)], gas_above=gas))

    sb_r = rng.uniform(10.0, 13.0)
    k_front = a.ys + 18.0
    dj = a.dj
    jej = _bowel_walk(rng, dj, [-0.6, 0.5, -0.4], [xl + 30.0, k_front + 12.0, zb], [10.0, yfr - 18.0, dj[2] + 10.0],
                      rng.uniform(900.0, 1400.0), 7.0, [])
    ile = _bowel_walk(rng, [xr * 0.4, yfr - 40.0, -70.0], [0.3, -0.2, -0.6],
                      [-15.0, k_front + 20.0, zb], [xr - 45.0, yfr - 15.0, -45.0 + a.breath * 0.6],
                      rng.uniform(500.0, 900.0), 7.0, [jej])
    loop_only = [_VFAT, _T["bowel_wall"], _T["fat_strand"]]
    for path, rad in ((jej, sb_r), (ile, sb_r * 0.9)):
        start = 0
        while start < len(path) - 2:
            n = int(rng.integers(10, 22))
            piece = path[start : start + n + 1]
            start += n
            mode = int(rng.choice(3, p=[0.55, 0.3, 0.15]))  # fluid-filled, collapsed, with gas
            r_out = rad * (0.65 if mode == 1 else rng.uniform(0.85, 1.15))
            wall = 2.2 if mode != 1 else r_out * rng.uniform(0.55, 0.8)
            outer = _Tube(piece, r_out, smooth=False)
            inner = _Tube(piece, max(r_out - wall, 0.0), smooth=False)
            level = float(piece[:, 1].max() - rng.uniform(1.0, 6.0)) if mode == 2 else None
            ops.append(lambda s, o=outer: s.fill(o, [(0.0, _T["bowel_wall"], 0)], only=loop_only))
            if inner.r.max() > 0:
                ops.append(lambda s, i=inner, lv=level: s.fill(i, [(0.0, _T["bowel_fluid"], 0)],
                                                               only=[_T["bowel_wall"]], gas_above=lv))
    return ops


def _draw_stomach(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Oesophagus (anterior to the aorta, through the hiatus to the cardia) and stomach (fundus
    under the left dome, body along the left anterior wall, antrum across to the pylorus), with a
    gas-fluid level."""
    ra, yf, hiatus = a.ra, a.yf, a.hiatus
    gej = np.array([a.ax_low - rng.uniform(22.0, 35.0), yf + rng.uniform(35.0, 50.0), hiatus - rng.uniform(8.0, 16.0)])
    ex, ey = a.aorta_centre(hiatus + 40.0)
    pts = np.array([
        [ex + ra + 4.0, ey + ra + 6.0, a.zb_hi],
        [ex + ra + 2.0, ey + ra + 8.0, hiatus + 35.0],
        [gej[0] * 0.4, yf + ra * 2 + 12.0, hiatus],
        [gej[0] + 4.0, gej[1] - 3.0, gej[2] + 3.0],
    ])
    pts[1:3] = _jitter(rng, pts[1:3], 2.5)
    eso = _Tube(pts, rng.uniform(7.0, 9.5))
    ops: list[_Op] = [lambda s: s.fill(eso, [(1.5, _VFAT, 0), (0.0, _T["esophagus"], _ID["esophagus"])], clip=None)]
    if rng.uniform() < 0.5:
        air = _Tube(eso.p, np.full(len(eso.p), 2.0) * (eso.p[:, 2] > hiatus), smooth=False)
        ops.append(lambda s: s.fill(air, [(0.0, _T["gas"], _ID["esophagus"])], onlylabel=_ID["esophagus"]))

    dist = rng.uniform(0.7, 1.2)
    pyl, yfr = a.pylorus, a.y_front
    fundus = _jitter(rng, [(a.dia.xl + a.sp_c[0]) * 0.5 + 20.0, a.ys + 0.5 * (a.y_front - a.ys), a.dia.zl - 30.0], 4.0)
    pts = np.array([
        gej + np.array([-8.0, 2.0, -4.0]),
        fundus + np.array([0.0, 12.0, -20.0]),
        [fundus[0] - 5.0, yfr - 45.0, fundus[2] - 50.0],
        [fundus[0] + 25.0, yfr - 30.0, min(pyl[2] - 10.0, fundus[2] - 70.0)],
        [pyl[0] - 30.0, pyl[1] + 5.0, pyl[2] - 6.0],
        pyl,
    ])
    pts[1:5] = _jitter(rng, pts[1:5], 4.0)
    stomach = _Union(
        _Ellipsoid(fundus, np.array([30.0, 32.0, 30.0]) * dist, _rotation(0, 0, rng.uniform(-0.4, 0.4)),
                   _harm(rng, 0.05)),
        _Tube(pts, np.array([18.0, 32.0, 34.0, 26.0, 17.0, 9.0]) * dist),
    )
    wall = rng.uniform(3.0, 5.0) if dist > 0.85 else rng.uniform(5.0, 8.0)
    gas = rng.uniform(yfr - 45.0, yfr - 5.0)
    lab = _ID["stomach"]
    ops.append(lambda s: s.fill(stomach, [(2.0, _VFAT, 0), (0.0, _T["stomach_wall"], lab),
                                          (-wall, _T["stomach_content"], lab)],
                                clip=2.0, region="abdomen", gas_above=gas))
    return ops


def _draw_gallbladder(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Gallbladder: a pear under the liver, fundus anterior-inferior, sometimes with a stone."""
    c = np.array([a.hilum[0] + rng.uniform(0.0, 20.0), a.y_front - rng.uniform(30.0, 45.0),
                  rng.uniform(-15.0, 5.0) + a.breath])
    size = rng.uniform(0.7, 1.2)
    rot = _rotation(rng.uniform(0.5, 0.9), rng.uniform(-0.3, 0.1), rng.uniform(-0.3, 0.3))
    gb = _Ellipsoid(c, np.array([14.0, 13.0, 33.0]) * size, rot, _harm(rng, 0.05))
    lab = _ID["gallbladder"]
    ops: list[_Op] = [lambda s: s.fill(gb, [(0.0, _T["gallbladder_wall"], lab), (-2.0, _T["bile"], lab)], clip=2.0)]
    if rng.uniform() < 0.15:
        stone = _Ellipsoid(c + rot @ np.array([0.0, -4.0, -14.0 * size]), [5.0, 5.0, 5.0])
        ops.append(lambda s: s.fill(stone, [(0.0, _T["gallstone"], lab)], onlylabel=lab))
    return ops


def _draw_visceral_vessels(rng: np.random.Generator, a: SimpleNamespace) -> list[_Op]:
    """Portal venous system (SMV, portal and splenic veins: BTCV's "portal and splenic vein"),
    SMA with its fat collar, celiac trunk with hepatic and splenic arteries, small mesenteric
    vessels."""
    aly, pz, ra = a.aly, a.pz, a.ra
    conf = np.array([a.ivc_x - 14.0, aly + 8.0, pz + 2.0]) + rng.normal(0.0, 2.0, 3)
    smv = _Tube([[conf[0] + 6.0, aly + 14.0, a.zb_lo], [conf[0] + 4.0, aly + 12.0, pz - 40.0], conf],
                rng.uniform(4.5, 6.0))
    portal = _Tube([conf, (conf + a.hilum) / 2 + rng.normal(0.0, 3.0, 3), a.hilum], rng.uniform(5.5, 7.0))
    pp = a.pancreas.p
    tail = pp[pp[:, 0] < conf[0] - 5.0][::3] + np.array([0.0, -9.0, 2.0])
    splenic = _Tube(np.vstack([conf, tail, a.sp_hilum]), rng.uniform(3.8, 5.0))
    vein_only = (*_SOFT, _T["pancreas"], _T["liver"], _MUSCLE)
    ops: list[_Op] = [lambda s, sh=sh: s.fill(sh, [(0.0, _T["portal_vein"], 0)], only=vein_only)
                      for sh in (smv, portal, splenic)]
    sma_z = pz + rng.uniform(4.0, 12.0)
    ac = a.aorta_centre(sma_z)
    sma = _Tube([[ac[0], ac[1], sma_z], [ac[0] + 3.0, ac[1] + ra + 12.0, sma_z - 10.0],
                 [conf[0] - 10.0, aly + 12.0, sma_z - 40.0], [conf[0] - 8.0, aly + 22.0, a.zb_lo]],
                rng.uniform(3.2, 4.2))
    ops.append(lambda s: s.fill(sma, [(3.5, _VFAT, 0), (0.0, _T["artery"], 0)], only=vein_only))
    cel_z = sma_z + rng.uniform(10.0, 18.0)
    ac = a.aorta_centre(cel_z)
    c0 = np.array([ac[0] + 2.0, ac[1] + ra + 10.0, cel_z + 3.0])
    celiac = _Union(
        _Tube([[ac[0], ac[1], cel_z], c0], 3.5),
        _Tube([c0, [c0[0] + 20.0, c0[1] + 6.0, c0[2] + 3.0], a.hilum], 2.6),
        _Tube(np.vstack([c0, _jitter(rng, tail + np.array([0.0, 2.0, 16.0]), 4.0)]), 2.6),
    )
    ops.append(lambda s: s.fill(celiac, [(0.0, _T["artery"], 0)], only=_SOFT))
    for _ in range(int(rng.integers(10, 20))):
        p0 = np.array([conf[0] + rng.uniform(-15.0, 5.0), aly + rng.uniform(10.0, 25.0),
                       rng.uniform(a.zb_lo + 40.0, pz - 10.0)])
        p1 = p0 + rng.normal(0.0, 1.0, 3) * np.array([45.0, 25.0, 25.0])
        small = _Tube([p0, (p0 + p1) / 2 + rng.normal(0.0, 6.0, 3), p1], rng.uniform(1.2, 2.2))
        tis = _T["vein"] if rng.uniform() < 0.5 else _T["artery"]
        ops.append(lambda s, sh=small, ti=tis: s.fill(sh, [(0.0, ti, 0)], only=[_VFAT]))
    return ops


# ---------------------------------------------------------------------------------------------
# painters for structures defined by the body frame
# ---------------------------------------------------------------------------------------------


def _paint_body(s: _Scene) -> None:
    """Subcutaneous fat, muscle wall, the cavity filled with visceral fat; the CT table."""
    depth = s.depth2[:, :, None] + s.omega2[:, :, None] * s.delta[None, None, :]
    cav = s.cav2[:, :, None] + s.omega2[:, :, None] * s.delta[None, None, :]
    t = s.tissue
    t[depth >= 0] = _FAT
    t[(depth >= s.fat2[:, :, None]) & (cav < 0)] = _MUSCLE
    t[cav >= 0] = _VFAT
    # the table: a curved shell under the flat back (MR renders it as air)
    X = s.g.x[:, None].astype(np.float64)
    Y = s.g.y[None, :].astype(np.float64)
    top = -s.body.by_post - 1.5 + 0.0005 * X**2
    shell = ((top > Y) & (top - 9.0 < Y)) | ((top - 32.0 > Y) & (top - 41.0 < Y))
    t[shell & (np.abs(X) < 230.0)] = _T["table"]


def _paint_thorax(s: _Scene) -> None:
    """Lung bases above the diaphragm, diaphragm muscle and mediastinal fat."""
    g = s.g
    box = g.box([g.x[0], g.y[0], float(s.zd2.min()) - 6.0], [g.x[-1], g.y[-1], g.z[-1]])
    if box is None:
        return
    X, Y, Z = g.coords(box)
    inside = s.cavity(box) > 0
    zd = s.zd2[box[0], box[1], None]
    t = s.tissue[box]
    t[inside & (zd - 4.0 < Z)] = _MUSCLE
    t[inside & (zd < Z)] = _T["lung"]
    y_back = s.body.cavity_edge_y(0.0, posterior=True)
    t[inside & (zd < Z) & (np.abs(X + 8.0) < 22.0 + 0.12 * (Y - y_back)) & (y_back - 5.0 < Y)] = _VFAT


def _paint_ribs(s: _Scene, p: dict) -> None:
    """Ribs and costal cartilages in the inner part of the wall, oblique: each rib runs down from
    the back to its lowest point anterolaterally, the cartilages climb to the sternum."""
    g = s.g
    reach = float(np.abs(s.delta).max())
    ring = (s.cav2 > -14.0 - reach) & (s.cav2 < 4.0 + reach)
    ring &= np.abs(g.x)[:, None] > s.body.ps_x + 0.3 * s.body.ps_a  # not in front of the paraspinals
    ii, jj = np.nonzero(ring)
    if ii.size == 0:
        return
    X = g.x[ii].astype(np.float64)
    Y = g.y[jj].astype(np.float64)
    phi = np.arccos(np.clip(-Y / np.maximum(np.hypot(X, Y), 1e-6), -1.0, 1.0))
    low = p["phi_low"]
    rise = np.clip((phi - low) / (math.pi - low), 0.0, 1.0)
    drop = np.where(phi <= low, p["dmax"] * (phi / low) * (1.15 - 0.15 * phi / low),
                    p["dmax"] - (p["dmax"] - p["d_ant"]) * rise**1.3)
    cav = s.cav2[ii, jj][:, None] + s.omega2[ii, jj][:, None] * s.delta[None, :]  # (pixels, z)
    u = (g.z[None, :] + drop[:, None] - p["z0"]) / p["pitch"]
    n = np.rint(u)
    dz = (u - n) * p["pitch"]
    phi_max = np.where(n <= 0, 0.42 * math.pi, np.where(n == 1, 0.56 * math.pi, 0.93 * math.pi))
    rib = (((cav + 6.0) / 4.0) ** 2 + (dz / p["half"]) ** 2 < 1.0) & (n >= 0)
    rib &= (phi[:, None] < phi_max) & (phi[:, None] > 0.16 * math.pi)
    cart = rib & (phi[:, None] > 0.62 * math.pi) & (n >= 2)
    pix, kz = np.nonzero(rib)
    s.tissue[ii[pix], jj[pix], kz] = np.where(cart[pix, kz], _T["cartilage"], _T["bone"]).astype(np.uint8)
    s.label[ii[pix], jj[pix], kz] = 0


def _paint_spine(s: _Scene, p: dict) -> None:
    """Vertebral bodies (cortex, cancellous bone), discs, canal, arches, spinous/transverse processes."""
    g = s.g
    ys, rx, ry = p["ys"], p["rx"], p["ry"]
    box = g.box([-rx - p["tp_len"] - 20.0, p["spin_tip"] - 6.0, g.z[0]], [rx + p["tp_len"] + 20.0, ys + ry + 3.0, g.z[-1]])
    if box is None:
        return
    X, Y, Z = g.coords(box)
    phase = ((Z - p["z_l1"]) / p["pitch"] + 0.5) % 1.0  # 0 / 1 at the discs, 0.5 mid-body
    disc = (phase < 0.11) | (phase > 0.89)
    bulge = 1.0 + 0.06 * np.cos(2 * math.pi * phase)
    d_vb = (np.sqrt((X / (rx * bulge)) ** 2 + ((Y - ys) / (ry * bulge)) ** 2) - 1.0) * ry
    t, lab = s.tissue[box], s.label[box]

    def put(mask: np.ndarray, tissue: int) -> None:
        mask = np.broadcast_to(mask, t.shape)
        t[mask] = tissue
        lab[mask] = 0

    put((d_vb < 0) & ~disc, _T["cortical_bone"])
    put((d_vb < -2.2) & ~disc, _T["cancellous_bone"])
    put((d_vb < 0.5) & disc, _T["disc"])
    cy = p["canal_y"]
    arch = (np.sqrt((X / 17.0) ** 2 + ((Y - cy + 1.0) / 13.5) ** 2) < 1.0) & (ys - ry + 3.0 > Y)
    put(arch & (phase > 0.16) & (phase < 0.9), _T["bone"])
    sp_phase = phase + (cy - Y) / (p["pitch"] * 2.2)
    put((np.abs(X) < 3.5) & (cy - 6.0 > Y) & (p["spin_tip"] < Y) & (sp_phase > 0.3) & (sp_phase < 0.95), _T["bone"])
    ax = np.abs(X)
    tp = (np.abs(Y - (cy + 3.0) + 0.25 * (ax - 10.0)) < 2.6 - 0.04 * ax) & (ax > 10.0) & (ax < 12.0 + p["tp_len"])
    put(tp & (phase > 0.38) & (phase < 0.62), _T["bone"])
    put(np.sqrt((X / 10.0) ** 2 + ((Y - cy) / 7.5) ** 2) < 1.0, _T["csf"])


# ---------------------------------------------------------------------------------------------
# intensities
# ---------------------------------------------------------------------------------------------


def _gauss_noise_scale(sigma: Sequence[float]) -> float:
    """Standard deviation of unit white noise after a Gaussian filter with these sigmas (voxels)."""
    out = 1.0
    for s in sigma:
        if s <= 0:
            continue
        r = int(4.0 * s + 0.5)
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        k /= k.sum()
        out *= float(np.sqrt((k**2).sum()))
    return out


def _render(case: _Case, scene: _Scene, modality: str, rng: np.random.Generator, n_sub: int) -> np.ndarray:
    """Tissue map -> intensities: per-case tissue table, textures, partial volume, noise.

    The scene is sampled ``n_sub`` times per slice along z; the sub-slices are averaged (the
    slice profile of a thick slice), then a blur of about one voxel and noise are applied.
    """
    g = scene.g
    n = len(TISSUES)
    table = np.array([row[1:] for row in _TISSUE_TABLE], dtype=np.float64)
    if modality == "ct":
        mean = rng.uniform(table[:, 0], table[:, 1])
        tex = table[:, 2].copy()
        if case.kidney_phase:  # corticomedullary phase: darker medulla
            mean[_T["kidney_medulla"]] = mean[_T["kidney_cortex"]] - rng.uniform(50.0, 80.0)
        mean[_T["kidney_medulla"]] = min(mean[_T["kidney_medulla"]], mean[_T["kidney_cortex"]] - 5.0)
    else:
        mean = table[:, 3] * rng.uniform(0.9, 1.1, n)
        tex = table[:, 4].copy()
    nx, ny, nzf = g.shape
    dz = float(g.z[n_sub] - g.z[0]) if nzf > n_sub else 1.0
    spacing = np.array([g.x[1] - g.x[0], g.y[1] - g.y[0], dz], dtype=float)
    t = scene.tissue
    # fine texture (correlation ~2 mm) and coarse lobules (~5 mm): pancreas fat clefts, stool gas,
    # lung vessels, fat strands; drawn per slice and shared by its sub-slices
    white = rng.standard_normal((nx, ny, nzf // n_sub), dtype=np.float32)
    fine = ndimage.gaussian_filter(white, np.clip(1.2 / spacing, 0.4, 2.0), mode="nearest")
    fine /= max(float(fine.std()), 1e-6)
    coarse = ndimage.gaussian_filter(white, np.clip(3.5 / spacing, 0.6, 4.0), mode="nearest")
    coarse /= max(float(coarse.std()), 1e-6)
    if n_sub > 1:
        fine, coarse = np.repeat(fine, n_sub, axis=2), np.repeat(coarse, n_sub, axis=2)
    lob = rng.uniform(0.9, 1.8)  # fatty lobulation of the pancreas (age)
    t[(t == _T["pancreas"]) & (coarse > lob)] = _T["pancreas_fat"]
    t[(t == _T["stool"]) & (coarse > rng.uniform(0.3, 0.9))] = _T["gas"]
    t[(t == _T["lung"]) & (fine > 2.0)] = _T["lung_vessel"]
    t[(t == _T["visceral_fat"]) & (fine > 2.6)] = _T["fat_strand"]
    image = mean.astype(np.float32)[t] + tex.astype(np.float32)[t] * fine
    del fine, coarse
    if n_sub > 1:
        image = image.reshape(nx, ny, nzf // n_sub, n_sub).mean(axis=3)
    shape = image.shape
    psf = np.array([0.55, 0.55, 0.45 if n_sub == 1 else 0.25])
    if modality == "ct":
        sd = rng.uniform(6.0, 16.0)
        noise = rng.standard_normal(shape, dtype=np.float32)
        image += noise * np.float32(sd / _gauss_noise_scale(psf))
        del noise
        image = ndimage.gaussian_filter(image, psf, mode="nearest")
        np.clip(image, -1024.0, 3071.0, out=image)
    else:
        image = ndimage.gaussian_filter(image, psf, mode="nearest")
        image *= _bias_field(g.x, g.y, g.z[n_sub // 2 :: n_sub], rng)
        sd = np.float32(rng.uniform(10.0, 22.0))
        n1 = rng.standard_normal(shape, dtype=np.float32)
        n2 = rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt((image + sd * n1) ** 2 + (sd * n2) ** 2)
        np.clip(image, 0.0, 4000.0, out=image)
    return np.rint(image).astype(np.float32)


def _bias_field(gx: np.ndarray, gy: np.ndarray, gz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative MR bias field, about 0.75..1.3 over the body: brighter near the
    anterior and posterior coils, plus a slow random drift along each axis; 1 at the body centre."""

    def smooth1d(c: np.ndarray, scale: float) -> np.ndarray:
        f = np.zeros_like(c, dtype=np.float64)
        for k in range(1, 3):
            f += rng.normal(0.0, 0.05) * (np.cos(k * c / scale + rng.uniform(0, 2 * math.pi)))
        return f - np.interp(0.0, c, f)

    x, y, z = (c.astype(np.float64) for c in (gx, gy, gz))
    bx, by, bz = smooth1d(x, 120.0), smooth1d(y, 100.0), smooth1d(z, 150.0)
    coil = rng.uniform(0.08, 0.18) * np.minimum((y / 130.0) ** 2, 1.2)[None, :]
    coil = coil + rng.uniform(0.0, 0.06) * np.minimum((x / 170.0) ** 2, 1.2)[:, None]
    field2 = np.exp(bx[:, None] + by[None, :] + coil)
    return (field2[:, :, None] * np.exp(bz)[None, None, :]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); {hint}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {hint}")
    return int(value)


def _check_modality(modality: str) -> str:
    m = str(modality).strip().lower()
    if m not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of: {', '.join(MODALITIES)}")
    return m


def make_phantom(
    seed: int,
    *,
    case: int = 0,
    modality: str = "ct",
    size: int = 128,
    slice_spacing: float | None = None,
) -> Phantom:
    """Generate one synthetic abdominal CT or MR case in the canonical RAS frame.

    Parameters
    ----------
    seed, case:
        The patient is a deterministic function of ``(seed, case)``; noise and the intensity table
        also depend on ``modality`` and ``size``. Same arguments → byte-identical arrays.
    modality:
        ``"ct"`` (HU, portal-venous phase) or ``"mr"`` (T1-weighted-like, arbitrary units).
    size:
        In-plane matrix (``size × size``); the in-plane spacing is the case's field of view
        (≈ 360-512 mm) divided by ``size``.
    slice_spacing:
        Override the case's slice spacing (mm); by default 1.5-5 mm drawn per case. The number of
        slices follows from the scanned range (about 150-220 mm, at most :data:`MAX_SLICES`).
    """
    seed = _check_int("seed", seed, 0, "use a non-negative random seed")
    case = _check_int("case", case, 0, "cases are numbered from 0")
    size = _check_int("size", size, MIN_SIZE, f"use an in-plane size of at least {MIN_SIZE} voxels")
    modality = _check_modality(modality)
    c = _draw_case(seed, case)
    sz = c.slice_spacing
    z_lo, z_hi = c.z_lo, c.z_hi
    if slice_spacing is not None:
        if not (isinstance(slice_spacing, (int, float)) and 0.3 <= float(slice_spacing) <= 20.0):
            raise ValueError(f"slice_spacing must be a number of mm in [0.3, 20], got {slice_spacing!r}")
        sz = float(slice_spacing)
        z_lo = max(z_lo, z_hi - MAX_SLICES * sz)
    n_z = min(max(round((z_hi - z_lo) / sz) + 1, 8), MAX_SLICES)
    sxy = c.fov / size
    x = (np.arange(size) - (size - 1) / 2.0) * sxy + c.centre_offset[0]
    y = (np.arange(size) - (size - 1) / 2.0) * sxy + c.centre_offset[1]
    z = z_hi - (n_z - 1) * sz + np.arange(n_z) * sz
    # thick slices integrate over their thickness: sample three sub-slices and average them
    n_sub = 3 if sz >= 2.5 else 1
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2.0) * (sz / n_sub)
    grid = _Grid(x, y, (z[:, None] + offsets[None, :]).ravel())
    scene = _Scene(grid, c.body, c.diaphragm)
    for op in c.ops:
        op(scene)
    mod_code = MODALITIES.index(modality)
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, 0x6E6F, mod_code, size]))
    image = _render(c, scene, modality, rng, n_sub)
    centre = slice(n_sub // 2, None, n_sub)
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = sxy, sxy, sz
    affine[:3, 3] = np.array([x[0], y[0], z[0]]) + np.asarray(c.world_shift)
    return Phantom(
        image=image,
        labels=np.ascontiguousarray(scene.label[:, :, centre]),
        affine=affine,
        modality=modality,
        tissue=np.ascontiguousarray(scene.tissue[:, :, centre]),
        orientation=c.orientation,
        seed=seed,
        case=case,
    )


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def _case_files(layout: Layout, out: Path, index: int, modality: str) -> tuple[str, Path, dict[str, Path]]:
    """(case id, image path, {label key: path}) of case ``index`` (0-based) in ``layout``."""
    cid = layout.phantom_case_id(index, modality)
    if layout.label_source == "structures":
        folder = out / cid
        image = folder / f"{TOTALSEG_IMAGES[modality]}{NIFTI}"
        return cid, image, {s: folder / TOTALSEG_MASKS / f"{s}{NIFTI}" for s in TOTALSEG_STRUCTURES}
    img_dir, lab_dir = layout.folders[0]
    return cid, out / img_dir / layout.image_name(cid), {"labels": out / lab_dir / layout.label_name(cid)}


def _dataset_labels(layout: Layout, phantom: Phantom) -> dict[str, np.ndarray]:
    """The label arrays (canonical frame) a layout stores for one case, by label key."""
    lab = phantom.labels
    if layout.label_source == "structures":
        return {s: (lab == ORGAN_BY_NAME[name].id).astype(np.uint8) for s, name in TOTALSEG_STRUCTURES.items()}
    lut = np.zeros(256, dtype=np.uint8)
    for canon, ds in layout.canonical_to_dataset().items():
        lut[canon] = ds
    out = lut[lab]
    others = phantom.other_labels()
    for ds_id, name in layout.other_labels.items():
        if name in others:
            out[others[name]] = ds_id
    return {"labels": out}


def write_dataset(
    out: str | os.PathLike,
    *,
    cases: int,
    seed: int = 0,
    layout: str = "flare22",
    modality: str = "ct",
    size: int = 128,
    overwrite: bool = False,
    quiet: bool = False,
) -> list[str]:
    """Write ``cases`` synthetic cases in a dataset layout; returns the case ids written.

    ``layout`` is a name of :data:`tgated.data.layouts.LAYOUTS`: files are named and labels written
    as that dataset does (its own label ids; BTCV's portal/splenic vein as its id 10; MR cases of
    AMOS numbered above its MR threshold; nnU-Net with a ``dataset.json``; TotalSegmentator one
    binary mask per structure); case ids are the layout's :meth:`~tgated.data.layouts.Layout.phantom_case_id`.
    Images are int16 (HU for CT), labels uint8; each case is stored in its own orientation (:data:`ORIENTATIONS`) with a
    non-trivial origin. Case ``i`` is ``make_phantom(seed, case=i, ...)`` whatever ``cases`` is.

    Existing case files are an error unless ``overwrite``.
    """
    from tgated.io.files import atomic_write_json
    from tgated.io.volumes import reorient, write_nifti
    from tgated.progress import progress

    cases = _check_int("cases", cases, 1, "write at least one case")
    seed = _check_int("seed", seed, 0, "use a non-negative random seed")
    size = _check_int("size", size, MIN_SIZE, f"use an in-plane size of at least {MIN_SIZE} voxels")
    spec = get_layout(layout)
    modality = _check_modality(modality)
    if spec.mr_above is not None and modality == "ct" and cases > spec.mr_above:
        raise ValueError(
            f"{spec.name} layout: {cases} CT cases would need ids above {spec.mr_above}, which {spec.name} "
            f"reserves for MR; write at most {spec.mr_above} CT cases"
        )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder; expected an output folder")
    plan = [_case_files(spec, root, i, modality) for i in range(cases)]
    extra = [root / "dataset.json"] if spec.label_source == "dataset.json" else []
    if not overwrite:
        targets = [p for _, image, labels in plan for p in (image, *labels.values())] + extra
        existing = [p for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"{existing[0]}: already exists ({len(existing)} of the {len(targets)} files to write do); "
                "pass overwrite=True (--overwrite) to replace them, or choose another output folder"
            )
    written: list[str] = []
    for i, (cid, image_path, label_paths) in enumerate(progress(plan, desc="phantoms", unit="case", quiet=quiet)):
        ph = make_phantom(seed, case=i, modality=modality, size=size)
        img = ph.image.astype(np.int16)
        data, aff = reorient(img, ph.affine, ph.orientation)
        write_nifti(image_path, data, aff)
        for key, arr in _dataset_labels(spec, ph).items():
            lab, _ = reorient(arr.astype(np.uint8), ph.affine, ph.orientation)
            write_nifti(label_paths[key], lab, aff)
        written.append(cid)
    if spec.label_source == "dataset.json":
        atomic_write_json(
            root / "dataset.json",
            {
                "name": "phantom",
                "channel_names": {"0": "CT" if modality == "ct" else "MRI"},
                "labels": {"background": 0, **{o.name: o.id for o in ORGANS}},
                "numTraining": cases,
                "file_ending": ".nii.gz",
            },
        )
    logger.info("wrote %d %s phantom case(s) in the %s layout to %s", cases, modality.upper(), layout, root)
    return written
