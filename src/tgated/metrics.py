"""Segmentation metrics per organ and per case, with their conventions (docs/architecture.md, Metrics).

All metrics compare a ground-truth mask ``G`` with a predicted mask ``P`` on the ground truth's
voxel grid; ``spacing`` is the voxel size in mm along the arrays' three axes, in the same order.

Metrics
-------
* **Dice** = 2|P∩G| / (|P| + |G|) (voxel counts); NaN when both masks are empty.
* **NSD** (normalised surface Dice) at a tolerance τ in mm, as DeepMind's ``surface-distance``
  package computes it (= MONAI ``compute_surface_dice(use_subvoxels=True)``): the surfaces are the
  marching-cubes surface elements ("surfels") on the grid of voxel corners, each weighted by its
  area in mm²; NSD = (area of G's surfels within τ of P's surface + area of P's surfels within τ of
  G's surface) / (total surfel area of G and P). Distances are Euclidean in mm between surfel
  positions; "within" means ``distance <= τ``. A surface facing an empty mask is at distance ∞
  (so NSD is 0 when exactly one mask is empty) and NSD is NaN when both are empty.
* **HD95** in mm, as MONAI ``compute_hausdorff_distance(percentile=95)``: the edge voxels of a mask
  are its voxels with a 6-neighbour outside the mask (``mask XOR binary_erosion(mask)``, the volume
  border counting as outside); for each edge voxel the Euclidean distance in mm to the nearest edge
  voxel of the other mask; HD95 = max of the two directed 95th percentiles (linear interpolation,
  as ``numpy.percentile`` / ``torch.quantile``). NaN when either mask is empty.

Distances are exact: each organ is cropped to the bounding box of P∪G and padded by one background
voxel (what both reference implementations do internally); surface points are extracted only in the
32³ blocks that hold voxels of P or G (a few stray predicted voxels far away cost little), and
nearest surface points are found with a k-d tree; the distance itself is computed from the integer
voxel offsets as ``sqrt(Σ (Δ_i · spacing_i)²)``, the same expression as scipy's Euclidean distance
transform that the DeepMind code uses, so comparisons with τ agree with it to the last bit.

Protocols (how empty masks and cropping are handled)
----------------------------------------------------
* ``native`` (default): organs the dataset does not label are excluded by the caller (never scored).
  A labelled organ with G and P both empty gets NaN metrics (a row is kept, but it is excluded from
  means); exactly one empty → Dice 0, NSD 0, HD95 NaN (a false positive or a missed organ).
* ``flare22``: the official FLARE22 evaluation script ``FLARE22_DSC_NSD_Eval.py`` (github.com/
  JunMa11/FLARE, ``FLARE22/Evaluation``), reproduced in :func:`flare22_case_scores`.
* ``paper``: Dice on the 352×352 model grid, as the reference T-Gated code scored it
  (:func:`paper_case_scores`); NSD and HD95 are NaN.

Aggregation (:func:`summarise`): per organ, the mean over cases of the non-NaN values (and ``n``, the
number of cases that entered the mean); mean Dice = unweighted mean over organs of those per-organ
means. :func:`cross_domain_drop` gives (in-domain − zero-shot) / in-domain mean Dice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import product

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from tgated.organs import ORGAN_BY_NAME, ORGAN_NAMES, Organ
from tgated.protocols import check_protocol

logger = logging.getLogger(__name__)

NAN = float("nan")
HD_PERCENTILE = 95.0
PAPER_SIZE = 352
"""Side of the square model grid on which the ``paper`` protocol scores Dice."""
FLARE22_Z_CROPPED: tuple[int, ...] = (5, 6, 10)
"""Canonical ids (aorta, inferior vena cava, esophagus) that FLARE22 scores only on the GT's slices."""
FLARE22_DECIMALS = 4
"""The FLARE22 script rounds every per-case DSC and NSD to 4 decimals."""
CSV_COLUMNS: tuple[str, ...] = ("case", "organ", "dice", "nsd", "hd95", "gt_voxels", "pred_voxels")

# Bit of each corner of a 2×2×2 neighbourhood in the surfel code (DeepMind / MONAI encoding kernel
# [[[128, 64], [32, 16]], [[8, 4], [2, 1]]]): corner (a, b, c) carries 128 >> (4a + 2b + c).
_CORNER_BITS = tuple(((a, b, c), 128 >> (4 * a + 2 * b + c)) for a, b, c in product((0, 1), repeat=3))


@dataclass(frozen=True)
class OrganScore:
    """Metrics of one organ in one case. Dice and NSD in [0, 1], HD95 in mm, NaN = not defined."""

    organ: str
    dice: float
    nsd: float
    hd95: float
    gt_voxels: int
    pred_voxels: int

    @property
    def status(self) -> str:
        """``both_empty``, ``false_positive`` (G empty), ``missed`` (P empty) or ``present``."""
        if self.gt_voxels == 0:
            return "both_empty" if self.pred_voxels == 0 else "false_positive"
        return "missed" if self.pred_voxels == 0 else "present"

    def row(self, case: str) -> dict[str, object]:
        """A ``metrics.csv`` row (:data:`CSV_COLUMNS`)."""
        return {"case": case, **asdict(self)}


# ---------------------------------------------------------------------------------------------
# checks and small helpers
# ---------------------------------------------------------------------------------------------


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    s = np.asarray([float(v) for v in spacing], dtype=np.float64)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing {tuple(spacing)} is not {ndim} positive voxel sizes in mm")
    return s


def _masks(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, p = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if g.shape != p.shape:
        raise ValueError(f"ground truth of shape {g.shape} and prediction of shape {p.shape} differ")
    if g.ndim != 3:
        raise ValueError(f"masks have {g.ndim} dimensions {g.shape}; expected 3")
    return g, p


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a mask's True voxels, or None when it is empty."""
    out = []
    for axis in range(mask.ndim):
        proj = np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
        idx = np.flatnonzero(proj)
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _label_boxes(labels: np.ndarray) -> list[tuple[slice, ...] | None]:
    """Bounding box of each label value (index = value - 1), in one pass over the array."""
    arr = labels if labels.dtype.kind in "iu" else labels.astype(np.int32)
    if arr.size == 0 or int(arr.max(initial=0)) <= 0:
        return []
    return list(ndimage.find_objects(arr))


def _box_of(boxes: list[tuple[slice, ...] | None], value: int) -> tuple[slice, ...] | None:
    return boxes[value - 1] if 0 < value <= len(boxes) else None


# ---------------------------------------------------------------------------------------------
# surfaces and distances
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Area in mm² of the surface elements of each of the 256 corner codes (DeepMind's table via MONAI).

    Computed in float64 from MONAI's table of unit-cell surfel normals (multiples of 1/8, exact in
    any precision) as DeepMind's code does: Σ ‖n ⊙ (s₁s₂, s₀s₂, s₀s₁)‖. MONAI's public helper computes
    the same in float32; it is the fallback should the normals table move.
    """
    try:
        from monai.metrics.utils import _get_neighbour_code_to_normals_table

        normals = _get_neighbour_code_to_normals_table().double().cpu().numpy()  # (256, 4, 3)
        s0, s1, s2 = spacing
        scale = np.asarray([s1 * s2, s0 * s2, s0 * s1], dtype=np.float64)
        return np.linalg.norm(normals * scale, axis=-1).sum(axis=-1)
    except ImportError:  # pragma: no cover - depends on MONAI's internals
        from monai.metrics.utils import create_table_neighbour_code_to_surface_area

        table, _kernel = create_table_neighbour_code_to_surface_area(spacing)
        return table.double().cpu().numpy()


# Surfaces are extracted block by block: a prediction with a few specks far from the organ has a
# bounding box as large as the volume, but only the blocks holding voxels cost anything.
_BLOCK = 32


@dataclass(frozen=True)
class _Points:
    """Surface points of one mask: integer coordinates, surfel areas (mm², or None), and whether
    each point is also a surface point of the other mask (its distance is then 0)."""

    coords: np.ndarray
    areas: np.ndarray | None
    shared: np.ndarray

    @staticmethod
    def concat(parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]], with_areas: bool) -> _Points:
        if not parts:
            return _Points(np.zeros((0, 3), np.int64), np.zeros(0) if with_areas else None, np.zeros(0, bool))
        coords = np.concatenate([c for c, _, _ in parts])
        areas = np.concatenate([a for _, a, _ in parts]) if with_areas else None  # type: ignore[misc]
        return _Points(coords, areas, np.concatenate([sh for _, _, sh in parts]))


def _occupancy(mask: np.ndarray) -> np.ndarray:
    """Which ``_BLOCK``³ voxel blocks of ``mask`` hold a True voxel."""
    occ = mask
    for axis in range(3):
        occ = np.logical_or.reduceat(occ, np.arange(0, mask.shape[axis], _BLOCK), axis=axis)
    return occ


def _window(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``mask[lo:hi]`` along each axis, background where the range leaves the array."""
    n = mask.shape
    inner = tuple(slice(max(int(a), 0), min(int(b), s)) for a, b, s in zip(lo, hi, n, strict=True))
    pad = tuple((max(0, -int(a)), max(0, int(b) - s)) for a, b, s in zip(lo, hi, n, strict=True))
    w = mask[inner]
    return np.pad(w, pad) if any(x or y for x, y in pad) else w


def _corner_codes(window: np.ndarray) -> np.ndarray:
    """2×2×2 neighbourhood codes of the voxel corners inside ``window`` (shape ``window.shape - 1``).

    Corner ``q`` sits between voxels ``q - 1`` and ``q`` of the mask, so a window over voxels
    ``[c0 - 1, c1)`` gives the codes of corners ``[c0, c1)``. This is the valid cross-correlation
    with the encoding kernel that MONAI (``conv3d``) and DeepMind (``ndimage.correlate``) compute on
    their one-voxel-padded crops.
    """
    w = window.astype(np.uint8, copy=False)
    m0, m1, m2 = (s - 1 for s in w.shape)
    code = np.zeros((m0, m1, m2), dtype=np.uint8)
    for (a, b, c), bit in _CORNER_BITS:
        code += w[a : a + m0, b : b + m1, c : c + m2] * np.uint8(bit)
    return code


def _edges(window: np.ndarray) -> np.ndarray:
    """``mask XOR binary_erosion(mask)`` (6-connected) of the window's interior (one-voxel halo)."""
    c = window[1:-1, 1:-1, 1:-1]
    inner = (
        c
        & window[:-2, 1:-1, 1:-1]
        & window[2:, 1:-1, 1:-1]
        & window[1:-1, :-2, 1:-1]
        & window[1:-1, 2:, 1:-1]
        & window[1:-1, 1:-1, :-2]
        & window[1:-1, 1:-1, 2:]
    )
    return c & ~inner


def _active_corner_blocks(occ: np.ndarray, n_corners: np.ndarray) -> np.ndarray:
    """Corner blocks that can hold surface points: corner block k reads voxel blocks k - 1 and k."""
    n_blocks = -(-n_corners // _BLOCK)
    act = np.zeros(tuple(n_blocks), dtype=bool)
    for d in product((0, 1), repeat=3):
        src = occ[tuple(slice(0, min(occ.shape[i], n_blocks[i] - d[i])) for i in range(3))]
        act[tuple(slice(d[i], d[i] + src.shape[i]) for i in range(3))] |= src
    return act


def _surfel_points(
    g: np.ndarray, p: np.ndarray, table: np.ndarray, occ: np.ndarray | None = None
) -> tuple[_Points, _Points]:
    """Surfel positions (corner grid) and areas of both masks, found block by block."""
    n_corners = np.asarray(g.shape) + 1
    occ = _occupancy(g) | _occupancy(p) if occ is None else occ
    act = _active_corner_blocks(occ, n_corners)
    parts_g: list = []
    parts_p: list = []
    for blk in np.argwhere(act):
        c0 = blk * _BLOCK
        c1 = np.minimum(c0 + _BLOCK, n_corners)
        code_g = _corner_codes(_window(g, c0 - 1, c1))
        code_p = _corner_codes(_window(p, c0 - 1, c1))
        border_g = (code_g != 0) & (code_g != 255)
        border_p = (code_p != 0) & (code_p != 255)
        for border, other, code, parts in (
            (border_g, border_p, code_g, parts_g),
            (border_p, border_g, code_p, parts_p),
        ):
            idx = np.nonzero(border)
            if idx[0].size:
                parts.append((np.stack(idx, axis=1) + c0, table[code[idx]], other[idx]))
    return _Points.concat(parts_g, True), _Points.concat(parts_p, True)


def _edge_points(g: np.ndarray, p: np.ndarray, occ: np.ndarray | None = None) -> tuple[_Points, _Points]:
    """Edge voxels (MONAI's Hausdorff convention) of both masks, found block by block."""
    n = np.asarray(g.shape)
    occ = _occupancy(g) | _occupancy(p) if occ is None else occ
    parts_g: list = []
    parts_p: list = []
    for blk in np.argwhere(occ):
        v0 = blk * _BLOCK
        v1 = np.minimum(v0 + _BLOCK, n)
        edge_g = _edges(_window(g, v0 - 1, v1 + 1))
        edge_p = _edges(_window(p, v0 - 1, v1 + 1))
        for edge, other, parts in ((edge_g, edge_p, parts_g), (edge_p, edge_g, parts_p)):
            idx = np.nonzero(edge)
            if idx[0].size:
                parts.append((np.stack(idx, axis=1) + v0, None, other[idx]))
    return _Points.concat(parts_g, False), _Points.concat(parts_p, False)


def _directed_distances(
    src: _Points,
    dst: _Points,
    spacing: np.ndarray,
    bound: float | None = None,
) -> np.ndarray:
    """Distance in mm from each point of ``src`` to the nearest point of ``dst``.

    Shared points have distance 0. With ``bound``, distances greater than ``bound`` come back as ∞
    (enough for a tolerance test, and faster). ∞ everywhere when ``dst`` is empty.
    """
    out = np.zeros(len(src.coords), dtype=np.float64)
    if len(out) == 0:
        return out
    if len(dst.coords) == 0:
        out[:] = np.inf
        return out
    todo = ~src.shared
    if not todo.any():
        return out
    src_idx = src.coords[todo]
    tree = cKDTree(dst.coords * spacing)
    upper = np.inf if bound is None else bound * (1 + 1e-9) + 1e-9
    _, nearest = tree.query(src_idx * spacing, k=1, distance_upper_bound=upper)
    found = nearest < len(dst.coords)
    dist = np.full(len(src_idx), np.inf)
    if found.any():
        # the distance transform's expression, from integer offsets: sqrt(Σ (Δ_i · spacing_i)²)
        delta = (src_idx[found] - dst.coords[nearest[found]]).astype(np.float64) * spacing
        delta *= delta
        dist[found] = np.sqrt(delta[:, 0] + delta[:, 1] + delta[:, 2])
    if bound is not None:
        dist[dist > bound] = np.inf
    out[todo] = dist
    return out


@dataclass(frozen=True)
class SurfaceDistances:
    """Surfel distances both ways with surfel areas (DeepMind's ``compute_surface_distances``), unsorted."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    surfel_areas_gt: np.ndarray
    surfel_areas_pred: np.ndarray


def _surface_distances_cropped(
    g: np.ndarray,
    p: np.ndarray,
    spacing: np.ndarray,
    bound: float | None = None,
    occ: np.ndarray | None = None,
) -> SurfaceDistances:
    table = _surfel_area_table(tuple(float(s) for s in spacing))
    pts_g, pts_p = _surfel_points(g, p, table, occ)
    return SurfaceDistances(
        distances_gt_to_pred=_directed_distances(pts_g, pts_p, spacing, bound),
        distances_pred_to_gt=_directed_distances(pts_p, pts_g, spacing, bound),
        surfel_areas_gt=pts_g.areas,  # type: ignore[arg-type]
        surfel_areas_pred=pts_p.areas,  # type: ignore[arg-type]
    )


def surface_distances(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """Distances (mm) from each surfel of one mask to the other mask's surface, and surfel areas (mm²).

    DeepMind's ``compute_surface_distances`` convention (see the module docstring); ∞ towards an
    empty mask, empty arrays for an empty mask's own surfels.
    """
    g, p = _masks(gt, pred)
    s = _spacing(spacing, 3)
    box = _union_box(_bbox(g), _bbox(p))
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    return _surface_distances_cropped(g[box], p[box], s)


def surface_dice_at_tolerance(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """NSD from :func:`surface_distances`; NaN when neither mask has a surface."""
    total = distances.surfel_areas_gt.sum() + distances.surfel_areas_pred.sum()
    if total == 0:
        return NAN
    good = distances.surfel_areas_gt[distances.distances_gt_to_pred <= tolerance_mm].sum()
    good += distances.surfel_areas_pred[distances.distances_pred_to_gt <= tolerance_mm].sum()
    return float(good / total)


def _hd_cropped(
    g: np.ndarray, p: np.ndarray, spacing: np.ndarray, percentile: float, occ: np.ndarray | None = None
) -> float:
    if not g.any() or not p.any():
        return NAN
    pts_g, pts_p = _edge_points(g, p, occ)
    d_pg = _directed_distances(pts_p, pts_g, spacing)
    d_gp = _directed_distances(pts_g, pts_p, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def _dice_counts(n_gt: int, n_pred: int, n_both: int) -> float:
    return NAN if n_gt + n_pred == 0 else 2.0 * n_both / (n_gt + n_pred)


# ---------------------------------------------------------------------------------------------
# single-mask metrics (public, work on full-size masks: they crop internally)
# ---------------------------------------------------------------------------------------------


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice = 2|P∩G| / (|P| + |G|); NaN when both masks are empty."""
    g, p = _masks(gt, pred)
    return _dice_counts(int(g.sum()), int(p.sum()), int(np.count_nonzero(g & p)))


def normalized_surface_dice(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """NSD at ``tolerance_mm`` (DeepMind / MONAI ``use_subvoxels=True`` convention); NaN if both empty."""
    g, p = _masks(gt, pred)
    s = _spacing(spacing, 3)
    box = _union_box(_bbox(g), _bbox(p))
    if box is None:
        return NAN
    return surface_dice_at_tolerance(
        _surface_distances_cropped(g[box], p[box], s, tolerance_mm), tolerance_mm
    )


def hausdorff_distance(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], percentile: float = HD_PERCENTILE
) -> float:
    """Percentile Hausdorff distance in mm (MONAI convention, see module docstring); NaN if a mask is empty."""
    g, p = _masks(gt, pred)
    s = _spacing(spacing, 3)
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile {percentile} is outside [0, 100]")
    box = _union_box(_bbox(g), _bbox(p))
    if box is None:
        return NAN
    return _hd_cropped(g[box], p[box], s, percentile)


def _native_from_crop(
    g: np.ndarray, p: np.ndarray, s: np.ndarray, tolerance_mm: float
) -> tuple[float, float, float]:
    n_g, n_p = int(np.count_nonzero(g)), int(np.count_nonzero(p))
    if n_g == 0 and n_p == 0:
        return NAN, NAN, NAN
    if n_g == 0 or n_p == 0:
        return 0.0, 0.0, NAN
    d = _dice_counts(n_g, n_p, int(np.count_nonzero(g & p)))
    occ = _occupancy(g) | _occupancy(p)  # shared by both surface extractions
    nsd = surface_dice_at_tolerance(_surface_distances_cropped(g, p, s, tolerance_mm, occ), tolerance_mm)
    return d, nsd, _hd_cropped(g, p, s, HD_PERCENTILE, occ)


# ---------------------------------------------------------------------------------------------
# per-case scoring of label maps
# ---------------------------------------------------------------------------------------------


def _resolve_organs(organs: Iterable[str | Organ]) -> list[Organ]:
    out = []
    for o in organs:
        if isinstance(o, Organ):
            out.append(o)
        elif o in ORGAN_BY_NAME:
            out.append(ORGAN_BY_NAME[o])
        else:
            raise ValueError(f"unknown organ {o!r}; expected one of: {', '.join(ORGAN_NAMES)}")
    return sorted(out, key=lambda o: o.id)


def _check_label_maps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, p = np.asarray(gt), np.asarray(pred)
    if g.shape != p.shape:
        raise ValueError(f"ground truth of shape {g.shape} and prediction of shape {p.shape} differ")
    if g.ndim != 3:
        raise ValueError(f"label maps have {g.ndim} dimensions {g.shape}; expected 3")
    for name, arr in (("ground truth", g), ("prediction", p)):
        if arr.dtype.kind not in "iub":
            raise ValueError(f"{name} label map has data type {arr.dtype}; expected integer label ids")
    return g, p


def native_case_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    organs: Iterable[str | Organ],
) -> list[OrganScore]:
    """Scores of ``organs`` (canonical ids in both label maps) under the ``native`` protocol.

    Each organ is cropped to the bounding box of P∪G (found for all labels in one pass), so the cost
    scales with the organs' size, not the volume's.
    """
    g_lab, p_lab = _check_label_maps(gt, pred)
    s = _spacing(spacing, 3)
    g_boxes, p_boxes = _label_boxes(g_lab), _label_boxes(p_lab)
    out = []
    for organ in _resolve_organs(organs):
        box = _union_box(_box_of(g_boxes, organ.id), _box_of(p_boxes, organ.id))
        if box is None:
            out.append(OrganScore(organ.name, NAN, NAN, NAN, 0, 0))
            continue
        g, p = g_lab[box] == organ.id, p_lab[box] == organ.id
        d, nsd, hd = _native_from_crop(g, p, s, organ.nsd_tolerance_mm)
        out.append(OrganScore(organ.name, d, nsd, hd, int(np.count_nonzero(g)), int(np.count_nonzero(p))))
    return out


def flare22_case_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    organs: Iterable[str | Organ],
) -> list[OrganScore]:
    """Scores as the official FLARE22 script ``FLARE22_DSC_NSD_Eval.py`` computes them.

    ``gt`` and ``pred`` must be in the ground-truth **file's own array layout** (not the canonical
    frame) and ``spacing`` its header's ``get_zooms()``, because the script works on
    ``nibabel.load(...).get_fdata()`` arrays. Reproduced behaviour, per organ (label id i):

    * G and P both empty (whole volume) → DSC 1, NSD 1.
    * G empty, P not → DSC 0, NSD 0.
    * otherwise, for aorta (5), IVC (6) and esophagus (10) only the slab ``[:, :, z_lower:z_upper]``
      is scored, where z_lower / z_upper are the first and last indices of G along the file's third
      array axis. The upper bound is exclusive, so G's last slice is left out (the script's quirk,
      kept). Then DSC = 2|P∩G|/(|P|+|G|) and NSD by DeepMind's surface distances at the organ's
      tolerance (P empty → DSC 0, NSD 0). There is no other shortcut (no "NSD = 0 when DSC < 0.2").
    * DSC and NSD are rounded to 4 decimals per case, as the script does.

    Where the script would fail (G of a z-cropped organ lies in a single slice, so the slab is
    empty and its bounding-box code reduces an empty array), DSC and NSD are NaN.
    ``hd95`` is not part of the script: it is computed on the same (slab) masks with the native
    convention. ``gt_voxels`` / ``pred_voxels`` count the whole volume.
    """
    g_lab, p_lab = _check_label_maps(gt, pred)
    s = _spacing(spacing, 3)
    g_boxes, p_boxes = _label_boxes(g_lab), _label_boxes(p_lab)
    out = []
    for organ in _resolve_organs(organs):
        g_box, p_box = _box_of(g_boxes, organ.id), _box_of(p_boxes, organ.id)
        n_g = 0 if g_box is None else int(np.count_nonzero(g_lab[g_box] == organ.id))
        n_p = 0 if p_box is None else int(np.count_nonzero(p_lab[p_box] == organ.id))
        if n_g == 0:
            value = 1.0 if n_p == 0 else 0.0
            out.append(OrganScore(organ.name, value, value, NAN, n_g, n_p))
            continue
        if organ.id in FLARE22_Z_CROPPED:
            z_lower, z_upper = g_box[2].start, g_box[2].stop - 1  # first / last labelled index
            if z_upper == z_lower:
                logger.debug(
                    "%s lies in a single slice: the FLARE22 z-crop leaves nothing to score", organ.name
                )
                out.append(OrganScore(organ.name, NAN, NAN, NAN, n_g, n_p))
                continue
            box = _union_box(_clip_z(g_box, z_lower, z_upper), _clip_z(p_box, z_lower, z_upper))
        else:
            box = _union_box(g_box, p_box)
        # Any box holding all voxels of P and G gives exact results (see the module docstring).
        g, p = g_lab[box] == organ.id, p_lab[box] == organ.id
        n_gs, n_ps = int(np.count_nonzero(g)), int(np.count_nonzero(p))
        d = _dice_counts(n_gs, n_ps, int(np.count_nonzero(g & p)))
        occ = _occupancy(g) | _occupancy(p)
        dist = _surface_distances_cropped(g, p, s, organ.nsd_tolerance_mm, occ)
        nsd = surface_dice_at_tolerance(dist, organ.nsd_tolerance_mm)
        hd = _hd_cropped(g, p, s, HD_PERCENTILE, occ)
        out.append(OrganScore(organ.name, _round_flare(d), _round_flare(nsd), hd, n_g, n_p))
    return out


def _clip_z(box: tuple[slice, ...] | None, lo: int, hi: int) -> tuple[slice, ...] | None:
    """``box`` restricted to slices ``lo:hi`` of the third axis (None when nothing is left)."""
    if box is None:
        return None
    start, stop = max(box[2].start, lo), min(box[2].stop, hi)
    return None if stop <= start else (box[0], box[1], slice(start, stop))


def _round_flare(x: float) -> float:
    return x if math.isnan(x) else round(float(x), FLARE22_DECIMALS)


def to_paper_grid(labels: np.ndarray, size: int = PAPER_SIZE) -> np.ndarray:
    """A canonical label volume as the reference code saw it: (Z, size, size) uint8 axial slices.

    Each axial slice (radiological view, :func:`tgated.data.slices.axial_slices`) is padded to a
    centred square and resized to ``size``×``size`` by nearest neighbour
    (:func:`tgated.data.slices.to_model_grid` with ``mode="nearest"``).
    """
    import torch

    from tgated.data.slices import axial_slices, to_model_grid

    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"label map has {arr.ndim} dimensions {arr.shape}; expected 3")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label values {arr.min()}..{arr.max()} do not fit 0..255")
    slices = axial_slices(torch.from_numpy(np.ascontiguousarray(arr.astype(np.uint8, copy=False))))
    out = [to_model_grid(chunk[:, None], size, mode="nearest")[:, 0] for chunk in slices.split(64)]
    return torch.cat(out).numpy() if out else np.zeros((0, size, size), np.uint8)


def paper_case_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    organs: Iterable[str | Organ],
    size: int = PAPER_SIZE,
) -> list[OrganScore]:
    """Dice on the ``size``×``size`` model grid (the reference code's evaluation); NSD, HD95 NaN.

    ``gt`` and ``pred`` are canonical-frame label maps; both are brought to the model grid by
    :func:`to_paper_grid` and Dice is computed over the whole stack of slices. Empty masks follow the
    native rules (both empty → NaN, one empty → 0). ``gt_voxels`` / ``pred_voxels`` count voxels on
    the native grid.
    """
    g_lab, p_lab = _check_label_maps(gt, pred)
    g_grid, p_grid = to_paper_grid(g_lab, size), to_paper_grid(p_lab, size)
    g_boxes, p_boxes = _label_boxes(g_lab), _label_boxes(p_lab)
    gg_boxes, pg_boxes = _label_boxes(g_grid), _label_boxes(p_grid)
    out = []
    for organ in _resolve_organs(organs):
        g_box, p_box = _box_of(g_boxes, organ.id), _box_of(p_boxes, organ.id)
        n_g = 0 if g_box is None else int(np.count_nonzero(g_lab[g_box] == organ.id))
        n_p = 0 if p_box is None else int(np.count_nonzero(p_lab[p_box] == organ.id))
        box = _union_box(_box_of(gg_boxes, organ.id), _box_of(pg_boxes, organ.id))
        if box is None:
            d = NAN if n_g + n_p == 0 else 0.0  # an organ can vanish when slices shrink
        else:
            g, p = g_grid[box] == organ.id, p_grid[box] == organ.id
            d = _dice_counts(int(np.count_nonzero(g)), int(np.count_nonzero(p)), int(np.count_nonzero(g & p)))
        out.append(OrganScore(organ.name, d, NAN, NAN, n_g, n_p))
    return out


def case_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    organs: Iterable[str | Organ],
    protocol: str = "native",
) -> list[OrganScore]:
    """Scores of one case under ``protocol``: the one dispatch over :data:`tgated.protocols.PROTOCOLS`
    (see :func:`native_case_scores`, :func:`flare22_case_scores`, :func:`paper_case_scores`; the label
    maps are in the file's own axes for :data:`tgated.protocols.FILE_AXES_PROTOCOLS`, else canonical)."""
    return CASE_SCORERS[check_protocol(protocol)](gt, pred, spacing, organs)


CASE_SCORERS: dict[str, Callable[..., list[OrganScore]]] = {
    "native": native_case_scores,
    "flare22": flare22_case_scores,
    "paper": lambda gt, pred, spacing, organs: paper_case_scores(gt, pred, organs),
}
"""Protocol name -> ``scorer(gt, pred, spacing, organs)``: one entry per :data:`tgated.protocols.PROTOCOLS`."""


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> tuple[float, int]:
    ok = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return (float(np.mean(ok)) if ok else NAN), len(ok)


def summarise(rows: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """Aggregate ``metrics.csv`` rows (:data:`CSV_COLUMNS`) into means per organ and overall.

    Per organ: ``dice``, ``nsd``, ``hd95`` = mean over cases of the non-NaN values; ``n`` = number of
    cases in the Dice mean (``n_nsd``, ``n_hd95`` likewise); ``n_both_empty``,
    ``false_positive_cases`` (G empty, P not) and ``missed_cases`` (P empty, G not) count cases.
    Overall: ``mean_dice`` / ``mean_nsd`` / ``mean_hd95`` = unweighted mean over organs of the
    per-organ means (organs without any value are skipped); ``cases`` = number of distinct cases.
    Organs come in canonical id order.
    """
    rows = list(rows)
    by_organ: dict[str, list[Mapping[str, object]]] = {}
    for r in rows:
        by_organ.setdefault(str(r["organ"]), []).append(r)
    order = {n: i for i, n in enumerate(ORGAN_NAMES)}
    organs: dict[str, dict[str, object]] = {}
    for name in sorted(by_organ, key=lambda n: (order.get(n, len(order)), n)):
        rs = by_organ[name]
        d, n = _nanmean([r["dice"] for r in rs])  # type: ignore[misc]
        nsd, n_nsd = _nanmean([r["nsd"] for r in rs])  # type: ignore[misc]
        hd, n_hd = _nanmean([r["hd95"] for r in rs])  # type: ignore[misc]
        g = [int(r["gt_voxels"]) for r in rs]  # type: ignore[call-overload]
        p = [int(r["pred_voxels"]) for r in rs]  # type: ignore[call-overload]
        organs[name] = {
            "dice": d,
            "nsd": nsd,
            "hd95": hd,
            "n": n,
            "n_nsd": n_nsd,
            "n_hd95": n_hd,
            "n_both_empty": sum(1 for a, b in zip(g, p, strict=True) if a == 0 and b == 0),
            "false_positive_cases": sum(1 for a, b in zip(g, p, strict=True) if a == 0 and b > 0),
            "missed_cases": sum(1 for a, b in zip(g, p, strict=True) if a > 0 and b == 0),
        }
    return {
        "cases": len({str(r["case"]) for r in rows}),
        "mean_dice": mean_over_organs(organs, "dice"),
        "mean_nsd": mean_over_organs(organs, "nsd"),
        "mean_hd95": mean_over_organs(organs, "hd95"),
        "organs": organs,
    }


def mean_over_organs(organs: Mapping[str, Mapping[str, object]], key: str = "dice") -> float:
    """Unweighted mean over organs of per-organ means (NaN / None entries skipped; NaN if none)."""
    return _nanmean([v.get(key) for v in organs.values()])[0]  # type: ignore[misc]


def cross_domain_drop(in_domain_dice: float, zero_shot_dice: float) -> float:
    """Relative drop (in-domain mean Dice − zero-shot mean Dice) / in-domain mean Dice.

    0.25 means the zero-shot model loses a quarter of its in-domain Dice; NaN when the in-domain
    Dice is NaN or 0 (undefined).
    """
    a, b = float(in_domain_dice), float(zero_shot_dice)
    if math.isnan(a) or math.isnan(b) or a == 0:
        return NAN
    return (a - b) / a
