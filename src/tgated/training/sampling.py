"""Training samples: preprocessed volumes in memory, the (slice, organ) index and each epoch's order.

A **sample** is ``(volume, centre slice, organ)``: the model sees the context window of the centre
slice and the organ's prompt, and learns the organ's mask on the centre slice.

* **Positives**: every (slice, organ) where the organ has voxels on the model-grid slice.
* **Negatives** (``train.negatives``):

  - ``organ_absent`` (default): every (slice, organ) where the organ is labelled by the dataset
    (:attr:`tgated.data.datasets.Case.labelled`) but absent from the slice; drawn uniformly.
  - ``label_free`` (the published code's): only slices without any labelled voxel, each paired with
    every organ the case labels; an organ's pairs are drawn in proportion to ``w_o · P_o`` (below),
    as the published code pairs label-free slices with organs in proportion to their positive counts
    and weighs them by the organ's weight.

  An organ the dataset does not label (BTCV's duodenum) is never a sample at all
  (docs/architecture.md, Organs and dataset layouts).
* Only the model's organs are targets.

Each epoch draws ``n`` samples with replacement: ``round(n · negative_fraction)`` negatives and
positives drawn with probability proportional to their organ's weight (``train.organ_weights``;
organs not listed weigh 1), so organ ``o`` appears about ``w_o · P_o / Σ_p w_p P_p`` of the positive
draws, ``P_o`` being its number of positive slices. The order depends only on ``(seed, epoch)``,
never on the number of processes.

Volumes are preprocessed once (:func:`preprocess_volume`): canonical volume → intensity window
for its modality → axial slices (inferior → superior) → model grid, stored as float16 in [0, 1];
labels as uint8 canonical ids (nearest-neighbour resize); slice positions in mm for physical context.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tgated.config import PreprocessConfig
from tgated.data.slices import axial_slices, normalise_intensity, to_model_grid
from tgated.organs import NUM_ORGANS, ORGAN_BY_NAME, get_organ

logger = logging.getLogger(__name__)

PREPROCESS_CHUNK = 32
"""Slices resized per call while preprocessing a volume (bounds the float32 working memory)."""


@dataclass
class TrainVolume:
    """One preprocessed training volume, on the model grid, in memory."""

    case_id: str
    slices: torch.Tensor
    """(Z, 1, S, S) float16 intensities in [0, 1], slices ordered inferior → superior."""
    labels: torch.Tensor
    """(Z, S, S) uint8 canonical organ ids."""
    positions_mm: np.ndarray
    """(Z,) float64 slice positions along the superior axis (mm), increasing."""
    labelled: tuple[int, ...]
    """Canonical ids of the organs the dataset labels for this case (others are excluded)."""
    modality: str

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def nbytes(self) -> int:
        return self.slices.numel() * self.slices.element_size() + self.labels.numel()


def preprocess_volume(
    image: np.ndarray,
    label: np.ndarray,
    positions_mm: np.ndarray,
    *,
    case_id: str,
    modality: str,
    labelled: Sequence[int],
    pre: PreprocessConfig,
) -> TrainVolume:
    """Canonical (X, Y, Z) image and label arrays → a :class:`TrainVolume` on the model grid."""
    if image.shape != label.shape:
        raise ValueError(f"case {case_id}: image shape {image.shape} and label shape {label.shape} differ")
    size = int(pre.image_size)
    norm = axial_slices(normalise_intensity(image, modality, pre))  # (Z, H, W) float32
    labs = axial_slices(torch.as_tensor(np.ascontiguousarray(label)))
    z = norm.shape[0]
    slices = torch.empty((z, 1, size, size), dtype=torch.float16)
    labels = torch.empty((z, size, size), dtype=torch.uint8)
    for start in range(0, z, PREPROCESS_CHUNK):
        sel = slice(start, start + PREPROCESS_CHUNK)
        slices[sel] = to_model_grid(norm[sel].unsqueeze(1).contiguous(), size).clamp(0, 1).half()
        lab = to_model_grid(labs[sel].unsqueeze(1).float(), size, mode="nearest")
        labels[sel] = lab[:, 0].round().to(torch.uint8)
    return TrainVolume(
        case_id=case_id,
        slices=slices,
        labels=labels,
        positions_mm=np.asarray(positions_mm, dtype=np.float64).copy(),
        labelled=tuple(sorted(int(i) for i in labelled)),
        modality=modality,
    )


def load_train_volume(case, pre: PreprocessConfig) -> TrainVolume:
    """Read a labelled :class:`~tgated.data.datasets.Case` and preprocess it (:func:`preprocess_volume`).

    The modality is the case's (layout, DICOM tag), else ``pre.modality``.
    """
    from tgated.data.datasets import load_case

    if not case.has_labels:
        raise ValueError(f"case {case.case_id}: has no label file; training cases need labels")
    image, label = load_case(case)
    assert label is not None
    modality = case.modality or image.modality or pre.modality
    return preprocess_volume(
        image.data,
        label.data,
        image.slice_positions(),
        case_id=case.case_id,
        modality=modality,
        labelled=[ORGAN_BY_NAME[n].id for n in case.labelled],
        pre=pre,
    )


def resolve_organ_weights(weights: Mapping[str, float]) -> np.ndarray:
    """``train.organ_weights`` → (NUM_ORGANS + 1,) weights by canonical id (index 0 unused; default 1)."""
    out = np.ones(NUM_ORGANS + 1, dtype=np.float64)
    for name, w in weights.items():
        try:
            organ = get_organ(name)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"train.organ_weights: {exc}") from None
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(
                f"train.organ_weights.{name}={w!r}: expected a finite weight >= 0 (1 = not up-weighted)"
            )
        out[organ.id] = float(w)
    return out


@dataclass
class SampleIndex:
    """All positive and negative (volume, slice, organ) triples of a training set."""

    pos: np.ndarray
    """(P, 3) int64 rows (volume, slice, organ id)."""
    neg: np.ndarray
    """(Q, 3) int64 rows (volume, slice, organ id)."""
    pos_weight: np.ndarray
    """(P,) float64 sampling weight of each positive (its organ's weight)."""
    neg_weight: np.ndarray | None = None
    """(Q,) float64 sampling weights of the negatives, or None: uniform."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Positive and negative slice counts per organ name."""
        from tgated.organs import ORGAN_BY_ID

        out: dict[str, dict[str, int]] = {}
        for key, rows in (("positive", self.pos), ("negative", self.neg)):
            ids, n = np.unique(rows[:, 2], return_counts=True) if len(rows) else ([], [])
            for i, c in zip(ids, n, strict=True):
                out.setdefault(ORGAN_BY_ID[int(i)].name, {"positive": 0, "negative": 0})[key] = int(c)
        return out


NEGATIVE_KINDS = ("organ_absent", "label_free")
"""The values of ``train.negatives``."""


def build_sample_index(
    volumes: Sequence[TrainVolume],
    organs: Sequence[int],
    organ_weights: Mapping[str, float] | None = None,
    negatives: str = "organ_absent",
) -> SampleIndex:
    """Index the positives and negatives of ``volumes`` for the organ ids ``organs`` (the model's);
    ``negatives`` is ``train.negatives`` (module docstring).

    An organ is a target of a volume only if the volume's dataset labels it (``labelled``).
    """
    if negatives not in NEGATIVE_KINDS:
        raise ValueError(f"train.negatives={negatives!r}: expected one of {', '.join(NEGATIVE_KINDS)}")
    weights = resolve_organ_weights(organ_weights or {})
    wanted = np.zeros(256, dtype=bool)
    wanted[[int(o) for o in organs]] = True
    pos_rows, neg_rows = [], []
    for v, vol in enumerate(volumes):
        targets = np.zeros(256, dtype=bool)
        targets[list(vol.labelled)] = True
        targets &= wanted
        ids = np.flatnonzero(targets)
        if not len(ids):
            continue
        lab = vol.labels.reshape(vol.num_slices, -1).numpy()
        present = np.stack([np.bincount(row, minlength=256)[ids] > 0 for row in lab])  # (Z, O)
        absent = ~present
        if negatives == "label_free":
            absent &= (lab.max(axis=1) == 0)[:, None]
        for rows, mask in ((pos_rows, present), (neg_rows, absent)):
            z, j = np.nonzero(mask)
            rows.append(np.stack([np.full(z.shape, v), z, ids[j]], axis=1))
    pos = np.concatenate(pos_rows).astype(np.int64) if pos_rows else np.zeros((0, 3), np.int64)
    neg = np.concatenate(neg_rows).astype(np.int64) if neg_rows else np.zeros((0, 3), np.int64)
    neg_weight = None
    if negatives == "label_free" and len(neg):
        # organ o's negatives share w_o · P_o of the draws, spread evenly over its negative pairs
        per_organ = np.bincount(pos[:, 2], weights=weights[pos[:, 2]], minlength=256)  # w_o · P_o
        neg_per_organ = np.bincount(neg[:, 2], minlength=256)
        neg_weight = per_organ[neg[:, 2]] / neg_per_organ[neg[:, 2]]
        if neg_weight.sum() <= 0:  # no positives to take proportions from
            neg_weight = np.ones(len(neg))
    return SampleIndex(
        pos=pos, neg=neg, pos_weight=weights[pos[:, 2]] if len(pos) else np.zeros(0), neg_weight=neg_weight
    )


def epoch_size(index: SampleIndex, negative_fraction: float) -> int:
    """Samples of one pass: every positive once, plus negatives making up ``negative_fraction``."""
    p = len(index.pos)
    if negative_fraction <= 0 or not len(index.neg):
        return p
    return round(p / (1.0 - negative_fraction))


def epoch_samples(
    index: SampleIndex, n: int, negative_fraction: float, seed: Sequence[int], epoch: int
) -> np.ndarray:
    """The epoch's ``n`` samples as (n, 4) int64 rows (volume, slice, organ id, is_negative).

    Deterministic in ``(seed, epoch)``. Negatives are placed at random positions of the order.
    """
    rng = np.random.default_rng([*seed, int(epoch), 0x5A])
    n_neg = round(n * negative_fraction) if len(index.neg) else 0
    if not len(index.pos):
        n_neg = n if len(index.neg) else 0
    n_pos = n - n_neg
    if n_pos and (not len(index.pos) or index.pos_weight.sum() <= 0):
        raise ValueError(
            "no positive training samples to draw: the training volumes hold none of the model's organs "
            "(or all their train.organ_weights are 0)"
        )
    parts = []
    if n_pos:
        p = index.pos_weight / index.pos_weight.sum()
        rows = index.pos[rng.choice(len(index.pos), size=n_pos, replace=True, p=p)]
        parts.append(np.concatenate([rows, np.zeros((n_pos, 1), np.int64)], axis=1))
    if n_neg:
        if index.neg_weight is None:
            rows = index.neg[rng.integers(0, len(index.neg), size=n_neg)]
        else:
            p = index.neg_weight / index.neg_weight.sum()
            rows = index.neg[rng.choice(len(index.neg), size=n_neg, replace=True, p=p)]
        parts.append(np.concatenate([rows, np.ones((n_neg, 1), np.int64)], axis=1))
    out = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    return out[rng.permutation(len(out))]
