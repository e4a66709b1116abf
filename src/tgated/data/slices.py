"""Slices for the 2-D model: intensity normalisation, resizing to the model grid, context windows.

All of it runs in torch (never through ``CLIPSegProcessor``, which rescales by 1/255 and falls back to
PIL without torchvision), on whatever device the tensors live on.

Conventions
-----------
* Volumes are in the canonical RAS frame (:mod:`tgated.io.volumes`): ``data[x, y, z]``.
* A model slice is shown the radiological way: rows run anterior → posterior, columns run from the
  patient's right to their left. :func:`axial_slices` / :func:`from_axial_slices` convert exactly.
* Resizing pads the slice to a square (centred, with the normalised background value 0) and then
  resizes to ``size × size``; :func:`from_model_grid` inverts it (resize back, crop).
* Context windows hold ``K`` (odd) slices centred on each slice; beyond the volume's ends the edge
  slice is repeated (``index`` mode). In ``physical`` mode neighbours sit at ``k · step_mm`` from the
  centre and are interpolated linearly between the two nearest slices, clamped at the ends.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tgated.config import PreprocessConfig


def intensity_window(volume: torch.Tensor | np.ndarray, modality: str, pre: PreprocessConfig) -> tuple[float, float]:
    """The intensities ``(lo, hi)`` that :func:`normalise_intensity` maps to 0 and 1.

    CT: ``pre.ct_window`` (HU). MR: the volume's own ``pre.mr_percentiles`` (from a strided
    subsample of at most 4 M voxels).
    """
    if modality == "ct":
        lo, hi = pre.ct_window
        return float(lo), float(hi)
    if modality == "mr":
        flat = torch.as_tensor(volume).reshape(-1)
        if flat.numel() > 4_000_000:  # quantile() limit; a strided subsample is plenty
            flat = flat[:: flat.numel() // 4_000_000 + 1]
        flat = flat.float()
        q = torch.quantile(flat, torch.tensor([p / 100.0 for p in pre.mr_percentiles], device=flat.device))
        return float(q[0]), float(q[1])
    raise ValueError(f"unknown modality {modality!r}; expected 'ct' or 'mr'")


def apply_window(volume: torch.Tensor | np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """Clip to ``window = (lo, hi)`` and scale to [0, 1] (float32; all zeros when ``hi <= lo``)."""
    x = torch.as_tensor(volume)
    lo, hi = window
    if hi <= lo:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return x.float().clamp(lo, hi).sub_(lo).div_(hi - lo)


def normalise_intensity(
    volume: torch.Tensor | np.ndarray,
    modality: str,
    pre: PreprocessConfig,
) -> torch.Tensor:
    """Map a volume's intensities to [0, 1] (float32).

    CT: clip to ``pre.ct_window`` (HU) and scale. MR: clip to the volume's own
    ``pre.mr_percentiles`` and scale (a constant volume maps to 0). Equal to
    :func:`apply_window` with :func:`intensity_window`, which normalises a volume in parts.
    """
    return apply_window(volume, intensity_window(volume, modality, pre))


def axial_slices(volume: torch.Tensor) -> torch.Tensor:
    """(..., X, Y, Z) canonical volume -> (..., Z, H=Y, W=X) slices in radiological view."""
    return volume.flip(-3, -2).permute(*range(volume.dim() - 3), -1, -2, -3)


def from_axial_slices(slices: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Inverse of :func:`axial_slices`: (..., Z, H, W) -> (..., X, Y, Z) (for a numpy array: a view,
    no copy)."""
    if isinstance(slices, np.ndarray):
        return np.flip(np.swapaxes(slices, -1, -3), axis=(-3, -2))
    return slices.permute(*range(slices.dim() - 3), -1, -2, -3).flip(-3, -2)


def _square_pads(h: int, w: int) -> tuple[int, int, int, int]:
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return left, side - w - left, top, side - h - top


def to_model_grid(slices: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Pad (N, C, H, W) slices to a centred square with zeros and resize to (N, C, size, size).

    ``mode`` is ``bilinear`` (images, soft masks; antialiased when shrinking) or ``nearest``
    (label maps, nearest-exact).
    """
    if slices.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) slices, got shape {tuple(slices.shape)}")
    h, w = slices.shape[-2:]
    x = F.pad(slices, _square_pads(h, w))
    if x.shape[-1] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
    )


def from_model_grid(x: torch.Tensor, shape: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Inverse of :func:`to_model_grid`: (N, C, size, size) -> (N, C, H, W) on the slice's own grid."""
    h, w = int(shape[0]), int(shape[1])
    side = max(h, w)
    if x.shape[-1] != side:
        if mode == "nearest":
            x = F.interpolate(x, size=(side, side), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    left, _, top, _ = _square_pads(h, w)
    return x[..., top : top + h, left : left + w]


def clip_normalise(x: torch.Tensor, pre: PreprocessConfig) -> torch.Tensor:
    """(N, 1, S, S) slices in [0, 1] -> (N, 3, S, S) pixel values with CLIP's mean and std."""
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def check_context(k: int, what: str = "context K") -> int:
    """``k`` when it is a valid window size (an odd number >= 1: the centre slice has as many
    neighbours below as above), else a ValueError naming ``what``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
        raise ValueError(f"{what}={k!r}: expected an odd number >= 1 (1, 3, 5, 7, ...)")
    return int(k)


def context_indices(n_slices: int, k: int, centres: torch.Tensor | None = None) -> torch.Tensor:
    """(n, K) slice indices of each centre's window, edge slices repeated (``index`` mode)."""
    check_context(k)
    c = torch.arange(n_slices) if centres is None else torch.as_tensor(centres)
    offsets = torch.arange(k) - k // 2
    return (c[:, None] + offsets[None, :]).clamp(0, n_slices - 1)


def physical_context(
    positions_mm: np.ndarray | torch.Tensor,
    k: int,
    step_mm: float,
    centres: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbours at fixed millimetre offsets (``physical`` mode).

    Returns ``(lo, hi, w)``, each (n, K): the window's k-th slice is
    ``(1 - w) · slice[lo] + w · slice[hi]``, with positions clamped to the volume's extent.
    ``positions_mm`` must increase (canonical frame).
    """
    check_context(k)
    if step_mm <= 0:
        raise ValueError(f"context_step_mm must be > 0, got {step_mm}")
    pos = torch.as_tensor(np.asarray(positions_mm, dtype=np.float64))
    n = pos.numel()
    c = torch.arange(n) if centres is None else torch.as_tensor(centres)
    offsets = (torch.arange(k, dtype=torch.float64) - k // 2) * float(step_mm)
    target = (pos[c][:, None] + offsets[None, :]).clamp(float(pos[0]), float(pos[-1]))
    hi = torch.searchsorted(pos, target.contiguous()).clamp(1, max(n - 1, 1))
    lo = (hi - 1).clamp(min=0)
    if n == 1:
        zeros = torch.zeros_like(target, dtype=torch.long)
        return zeros, zeros, torch.zeros_like(target, dtype=torch.float32)
    gap = (pos[hi] - pos[lo]).clamp(min=1e-9)
    w = ((target - pos[lo]) / gap).clamp(0.0, 1.0)
    return lo, hi, w.float()


def gather_windows(
    slices: torch.Tensor,
    index: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Windows (n, K, ...) from per-slice tensors (Z, ...) and :func:`context_indices` or
    :func:`physical_context` output. Works on images and on cached encoder tokens alike.
    """
    if isinstance(index, torch.Tensor):
        return slices[index.to(slices.device)]
    lo, hi, w = (t.to(slices.device) for t in index)
    w = w.to(slices.dtype).view(*w.shape, *([1] * (slices.dim() - 1)))
    return (1 - w) * slices[lo] + w * slices[hi]
