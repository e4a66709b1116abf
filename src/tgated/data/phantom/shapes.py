"""Signed distance shapes in the patient frame (mm, negative inside), evaluated only inside their
bounding box on the voxel grid: ellipsoids with harmonic deformations, tubes along smooth centre-lines,
per-slice ellipses along z, swept plates, unions and region functions; and the random parameters of
shapes (jittered points, harmonic deformations, packed bowel loops).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.interpolate import CubicSpline

if TYPE_CHECKING:
    from tgated.data.phantom.body import Scene

Box = tuple[slice, slice, slice]


class Grid:
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


def box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(s.stop - s.start for s in box)  # type: ignore[return-value]


def intersect(outer: Box, inner: Box | None) -> tuple[Box, Box] | None:
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


def smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (intersection of SDFs) with blending width ``k`` mm."""
    h = np.clip(0.5 - 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


class Shape:
    """A signed distance function (mm, < 0 inside) with a bounding box in the patient frame."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sdf(self, scene: Scene, box: Box, margin: float) -> np.ndarray:
        raise NotImplementedError


class Ellipsoid(Shape):
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
        X, Y, Z = scene.grid.coords(box)
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


class Tube(Shape):
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
        out = np.full(box_shape(box), np.inf, dtype=np.float32)
        grid = scene.grid
        for a, b, ra, rb in zip(self.p[:-1], self.p[1:], self.r[:-1].tolist(), self.r[1:].tolist(), strict=True):
            if ra <= 0 and rb <= 0:
                continue
            reach = max(ra, rb) + margin
            hit = intersect(box, grid.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach))
            if hit is None:
                continue
            absolute, rel = hit
            X, Y, Z = grid.coords(absolute)
            ab = (b - a).tolist()
            inv = 1.0 / (ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2)
            px, py, pz = X - float(a[0]), Y - float(a[1]), Z - float(a[2])
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) * inv, 0.0, 1.0)
            dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
            d = np.sqrt(dx * dx + dy * dy + dz * dz) - (ra + t * (rb - ra))
            np.minimum(out[rel], d, out=out[rel])
        return out


class ZTube(Shape):
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
        X, Y, Z = scene.grid.coords(box)
        zz = Z.ravel().astype(np.float64)
        cx, cy, rx, ry = (np.interp(zz, self.zk, v).astype(np.float32)[None, None, :] for v in
                          (self.cx, self.cy, self.rx, self.ry))
        u, v = (X - cx) / rx, (Y - cy) / ry
        d = (np.sqrt(u * u + v * v) - 1.0) * np.minimum(rx, ry)
        return np.maximum(d, np.maximum(self.z0 - Z, Z - self.z1)).astype(np.float32, copy=False)


class Slab(Shape):
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
        X, Y, Z = scene.grid.coords(box)
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


class Union(Shape):
    def __init__(self, *shapes: Shape) -> None:
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


class Region(Shape):
    """A shape given by a function ``f(scene, X, Y, Z) -> sdf`` over fixed bounds."""

    def __init__(self, lo, hi, fn: Callable[..., np.ndarray]) -> None:
        self.lo, self.hi, self.fn = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), fn

    def bounds(self):
        return self.lo, self.hi

    def sdf(self, scene, box, margin):
        X, Y, Z = scene.grid.coords(box)
        return np.broadcast_to(self.fn(scene, box, X, Y, Z), box_shape(box)).astype(np.float32, copy=False)


def jitter(rng: np.random.Generator, pts, sd: float) -> np.ndarray:
    p = np.asarray(pts, dtype=np.float64)
    return p + rng.normal(0.0, sd, p.shape)


def harmonics(rng: np.random.Generator, amp: float) -> np.ndarray:
    return rng.normal(0.0, amp, 8) * np.array([1, 1, 1, 0.7, 0.7, 0.7, 0.5, 0.5])


def bowel_walk(
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
