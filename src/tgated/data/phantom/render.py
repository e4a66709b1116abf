"""From a drawn patient to a :class:`Phantom`: the voxel grid, painting, and intensities (per-case
tissue table, texture, partial volume along z, blur, noise; CT in HU, MR T1-like with a bias field
and Rician noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from tgated.data.phantom.anatomy import MAX_SLICES, CasePlan, draw_case
from tgated.data.phantom.body import Scene
from tgated.data.phantom.shapes import Grid
from tgated.data.phantom.tissues import TISSUE, TISSUE_TABLE, TISSUES

MODALITIES: tuple[str, ...] = ("ct", "mr")
MIN_SIZE = 32


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
        return {"portal_and_splenic_vein": (self.tissue == TISSUE["portal_vein"]) & (self.labels == 0)}


def gauss_noise_scale(sigma: Sequence[float]) -> float:
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


def render_intensities(plan: CasePlan, scene: Scene, modality: str, rng: np.random.Generator, n_sub: int) -> np.ndarray:
    """Tissue map -> intensities: per-case tissue table, textures, partial volume, noise.

    The scene is sampled ``n_sub`` times per slice along z; the sub-slices are averaged (the
    slice profile of a thick slice), then a blur of about one voxel and noise are applied.
    """
    grid = scene.grid
    n = len(TISSUES)
    table = np.array([row[1:] for row in TISSUE_TABLE], dtype=np.float64)
    if modality == "ct":
        mean = rng.uniform(table[:, 0], table[:, 1])
        tex = table[:, 2].copy()
        if plan.kidney_phase:  # corticomedullary phase: darker medulla
            mean[TISSUE["kidney_medulla"]] = mean[TISSUE["kidney_cortex"]] - rng.uniform(50.0, 80.0)
        mean[TISSUE["kidney_medulla"]] = min(mean[TISSUE["kidney_medulla"]], mean[TISSUE["kidney_cortex"]] - 5.0)
    else:
        mean = table[:, 3] * rng.uniform(0.9, 1.1, n)
        tex = table[:, 4].copy()
    nx, ny, nzf = grid.shape
    dz = float(grid.z[n_sub] - grid.z[0]) if nzf > n_sub else 1.0
    spacing = np.array([grid.x[1] - grid.x[0], grid.y[1] - grid.y[0], dz], dtype=float)
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
    t[(t == TISSUE["pancreas"]) & (coarse > lob)] = TISSUE["pancreas_fat"]
    t[(t == TISSUE["stool"]) & (coarse > rng.uniform(0.3, 0.9))] = TISSUE["gas"]
    t[(t == TISSUE["lung"]) & (fine > 2.0)] = TISSUE["lung_vessel"]
    t[(t == TISSUE["visceral_fat"]) & (fine > 2.6)] = TISSUE["fat_strand"]
    image = mean.astype(np.float32)[t] + tex.astype(np.float32)[t] * fine
    del fine, coarse
    if n_sub > 1:
        image = image.reshape(nx, ny, nzf // n_sub, n_sub).mean(axis=3)
    shape = image.shape
    psf = np.array([0.55, 0.55, 0.45 if n_sub == 1 else 0.25])
    if modality == "ct":
        sd = rng.uniform(6.0, 16.0)
        noise = rng.standard_normal(shape, dtype=np.float32)
        image += noise * np.float32(sd / gauss_noise_scale(psf))
        del noise
        image = ndimage.gaussian_filter(image, psf, mode="nearest")
        np.clip(image, -1024.0, 3071.0, out=image)
    else:
        image = ndimage.gaussian_filter(image, psf, mode="nearest")
        image *= bias_field(grid.x, grid.y, grid.z[n_sub // 2 :: n_sub], rng)
        sd = np.float32(rng.uniform(10.0, 22.0))
        n1 = rng.standard_normal(shape, dtype=np.float32)
        n2 = rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt((image + sd * n1) ** 2 + (sd * n2) ** 2)
        np.clip(image, 0.0, 4000.0, out=image)
    return np.rint(image).astype(np.float32)


def bias_field(gx: np.ndarray, gy: np.ndarray, gz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


def check_int(name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); {hint}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {hint}")
    return int(value)


def check_modality(modality: str) -> str:
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
    seed = check_int("seed", seed, 0, "use a non-negative random seed")
    case = check_int("case", case, 0, "cases are numbered from 0")
    size = check_int("size", size, MIN_SIZE, f"use an in-plane size of at least {MIN_SIZE} voxels")
    modality = check_modality(modality)
    plan = draw_case(seed, case)
    spacing_z = plan.slice_spacing
    z_lo, z_hi = plan.z_lo, plan.z_hi
    if slice_spacing is not None:
        if not (isinstance(slice_spacing, (int, float)) and 0.3 <= float(slice_spacing) <= 20.0):
            raise ValueError(f"slice_spacing must be a number of mm in [0.3, 20], got {slice_spacing!r}")
        spacing_z = float(slice_spacing)
        z_lo = max(z_lo, z_hi - MAX_SLICES * spacing_z)
    n_z = min(max(round((z_hi - z_lo) / spacing_z) + 1, 8), MAX_SLICES)
    spacing_xy = plan.fov / size
    x = (np.arange(size) - (size - 1) / 2.0) * spacing_xy + plan.centre_offset[0]
    y = (np.arange(size) - (size - 1) / 2.0) * spacing_xy + plan.centre_offset[1]
    z = z_hi - (n_z - 1) * spacing_z + np.arange(n_z) * spacing_z
    # thick slices integrate over their thickness: sample three sub-slices and average them
    n_sub = 3 if spacing_z >= 2.5 else 1
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2.0) * (spacing_z / n_sub)
    grid = Grid(x, y, (z[:, None] + offsets[None, :]).ravel())
    scene = Scene(grid, plan.body, plan.diaphragm)
    for op in plan.ops:
        op(scene)
    mod_code = MODALITIES.index(modality)
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, 0x6E6F, mod_code, size]))
    image = render_intensities(plan, scene, modality, rng, n_sub)
    centre = slice(n_sub // 2, None, n_sub)
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = spacing_xy, spacing_xy, spacing_z
    affine[:3, 3] = np.array([x[0], y[0], z[0]]) + np.asarray(plan.world_shift)
    return Phantom(
        image=image,
        labels=np.ascontiguousarray(scene.label[:, :, centre]),
        affine=affine,
        modality=modality,
        tissue=np.ascontiguousarray(scene.tissue[:, :, centre]),
        orientation=plan.orientation,
        seed=seed,
        case=case,
    )


