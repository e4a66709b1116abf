"""Segmentation loss: BCE + soft Dice on the centre slice's mask, computed in float32.

``loss = bce_weight · BCE + dice_weight · (1 − soft Dice)`` (BCE with the organ's pixels weighted by
``pos_weight``, ``train.bce_pos_weight``) with, per sample,
``soft Dice = (2 Σ p·t + s) / (Σ p + Σ t + s)`` (``p = sigmoid(logits)``, sums over pixels, smoothing
``s = train.dice_smooth``, 1 by default), both averaged over the batch. With ``s = 1`` a negative
sample (empty target) costs ``1 − 1 / (Σ p + 1)``: zero when nothing is predicted; with MONAI's
``s = 1e-5`` (the published code) it costs about 1 whatever is predicted. The gate regulariser of the model
(:meth:`tgated.models.tgated.TGatedModel.gate_regularization`) is added by the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0


@dataclass
class LossParts:
    total: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Mean over the batch of ``1 − soft Dice`` for logits and binary targets (B, H, W)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    dice = (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1 - dice).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    pos_weight: float = 1.0,
    dice_smooth: float = DICE_SMOOTH,
) -> LossParts:
    """BCE + soft Dice for logits (B, H, W) and binary targets (B, H, W); ``pos_weight`` weights the
    BCE of target pixels."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ in shape")
    weight = None if pos_weight == 1.0 else torch.tensor(float(pos_weight), device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight)
    dice = soft_dice_loss(logits, target, dice_smooth)
    return LossParts(total=bce_weight * bce + dice_weight * dice, bce=bce, dice=dice)
