"""Augmentation that respects anatomy, one transform per sample for all K slices and the mask.

* **Left-right flip** (probability ``train.flip_lr``): mirrors the window and the mask along the
  patient's right-left axis (the slice's columns). With ``train.flip_lateral: swap`` a lateralised
  organ's target becomes its partner's mirrored mask: after a flip, "right kidney" is the flipped
  *left*-kidney label (:data:`tgated.organs.LATERAL_PAIRS`); a lateral sample whose partner the
  dataset does not label is not flipped. With ``skip`` (the published rule) a lateral organ's
  sample is never flipped and other organs keep their own (mirrored) mask.
* **Rotation / zoom** (``rotate_deg``, ``scale``): one in-plane affine about the slice centre;
  intensities bilinear, the mask nearest-neighbour; outside the slice is 0 (the padding value of
  :func:`tgated.data.slices.to_model_grid`).
* **Intensity** (``intensity``): ``x · (1 + a) + b`` clipped to [0, 1], the same for all K slices.

Randomness comes from a per-sample generator seeded by ``(seed, epoch, sample index)``
(:func:`sample_rng`), so a sample's transform does not depend on the number of processes or on
where a run was resumed. :func:`draw_transform` always draws the same number of values.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tgated.config import TrainConfig
from tgated.organs import LATERAL_PAIRS, ORGAN_BY_NAME

LATERAL_PARTNER: dict[int, int] = {
    **{ORGAN_BY_NAME[a].id: ORGAN_BY_NAME[b].id for a, b in LATERAL_PAIRS},
    **{ORGAN_BY_NAME[b].id: ORGAN_BY_NAME[a].id for a, b in LATERAL_PAIRS},
}
"""Canonical id → the id of its left/right counterpart."""


@dataclass(frozen=True)
class Transform:
    """One sample's augmentation: flip, rotation (degrees, counter-clockwise in the displayed slice),
    zoom (> 1 enlarges), contrast gain ``a`` and brightness ``b``."""

    flip: bool = False
    angle_deg: float = 0.0
    zoom: float = 1.0
    gain: float = 0.0
    bias: float = 0.0

    @property
    def geometric(self) -> bool:
        return self.angle_deg != 0.0 or self.zoom != 1.0


def augmentation_active(cfg: TrainConfig) -> bool:
    """True when ``cfg`` asks for any image-space augmentation."""
    return bool(cfg.augment) and any(v > 0 for v in (cfg.flip_lr, cfg.rotate_deg, cfg.scale, cfg.intensity))


def sample_rng(seed: Sequence[int], epoch: int, sample: int) -> np.random.Generator:
    """The generator of global sample ``sample`` of ``epoch``."""
    return np.random.default_rng([*seed, int(epoch), int(sample), 0xA6])


def draw_transform(cfg: TrainConfig, rng: np.random.Generator) -> Transform:
    """Draw a sample's transform (identity when ``cfg.augment`` is off)."""
    u = rng.random(5)
    if not cfg.augment:
        return Transform()
    return Transform(
        flip=bool(u[0] < cfg.flip_lr),
        angle_deg=float((2 * u[1] - 1) * cfg.rotate_deg),
        zoom=float(1.0 + (2 * u[2] - 1) * cfg.scale),
        gain=float((2 * u[3] - 1) * cfg.intensity),
        bias=float((2 * u[4] - 1) * cfg.intensity),
    )


def target_organ(
    organ: int, flip: bool, labelled: Collection[int], lateral: str = "swap"
) -> tuple[int, bool]:
    """(label id whose mask is the target, whether to flip) for a sample of ``organ``.

    ``lateral`` (``train.flip_lateral``): ``swap`` = a flip swaps a lateral organ with its partner
    (when the partner is not labelled the flip is dropped for this sample); ``skip`` = a lateral
    organ's sample is never flipped.
    """
    if lateral not in ("swap", "skip"):
        raise ValueError(f"train.flip_lateral={lateral!r}: expected 'swap' or 'skip'")
    if not flip:
        return organ, False
    partner = LATERAL_PARTNER.get(organ)
    if partner is None:
        return organ, True
    if lateral == "skip" or partner not in labelled:
        return organ, False
    return partner, True


def _theta(t: Transform, device: torch.device) -> torch.Tensor:
    a = math.radians(t.angle_deg)
    c, s = math.cos(a) / t.zoom, math.sin(a) / t.zoom
    return torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=torch.float32, device=device)


def apply_transform(
    window: torch.Tensor, mask: torch.Tensor, t: Transform, *, intensity: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``t`` to a window (K, C, S, S) of intensities in [0, 1] and its mask (S, S).

    Returns float32 tensors; the mask stays binary. ``intensity=False`` skips the intensity jitter
    (for windows that are not intensities).
    """
    w = window.float()
    m = mask.float()
    if t.flip:
        w, m = w.flip(-1), m.flip(-1)
    if t.geometric:
        theta = _theta(t, w.device)
        grid = F.affine_grid(theta, [1, 1, *w.shape[-2:]], align_corners=False)
        k = w.shape[0]
        w = F.grid_sample(
            w, grid.expand(k, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        m = F.grid_sample(m[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[
            0, 0
        ]
    if intensity and (t.gain != 0.0 or t.bias != 0.0):
        w = (w * (1.0 + t.gain) + t.bias).clamp(0.0, 1.0)
    return w, m
