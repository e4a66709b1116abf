"""Figures for reports: per-organ Dice bars, per-case distributions, and slice overlays."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from tgated.data.views import axial, display_window, foreground_slices, label_rgba
from tgated.organs import ORGAN_BY_ID, ORGAN_BY_NAME, ORGAN_NAMES, organ_rgb
from tgated.report.tables import Evaluation

logger = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from tgated.io.files import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def dice_bars(evals: list[Evaluation], path: Path, metric: str = "dice") -> Path:
    plt = _plt()
    organs = [o for o in ORGAN_NAMES if any(e.organ(o, metric)[1] for e in evals)]
    x = np.arange(len(organs))
    width = 0.8 / max(len(evals), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(organs) + 2), 3.6))
    for i, e in enumerate(evals):
        vals = [e.organ(o, metric)[0] for o in organs]
        ax.bar(x + (i - (len(evals) - 1) / 2) * width, np.nan_to_num(vals), width, label=e.name)
    ax.set_xticks(x, [o.replace("_", " ") for o in organs], rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def case_distribution(evals: list[Evaluation], path: Path, metric: str = "dice") -> Path:
    """Per-case mean over organs, one box per evaluation."""
    plt = _plt()
    data, names = [], []
    for e in evals:
        per_case: dict[str, list[float]] = {}
        for r in e.rows:
            try:
                v = float(r.get(metric) or "nan")
            except ValueError:
                v = math.nan
            if not math.isnan(v):
                per_case.setdefault(r["case"], []).append(v)
        data.append([float(np.mean(v)) for v in per_case.values()] or [math.nan])
        names.append(e.name)
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(evals) + 2), 3.2))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"per-case mean {metric}")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def overlay(
    image: np.ndarray | None,
    gt: np.ndarray,
    pred: np.ndarray,
    path: Path,
    *,
    title: str,
    modality: str | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    slices: list[int] | None = None,
) -> Path:
    """Ground truth (left) and prediction (right) over the image, for a few axial slices.

    All arrays are canonical (X, Y, Z); shown radiologically (patient's right on the left).
    """
    plt = _plt()
    zs = slices or foreground_slices(gt)
    img = display_window(image, modality) if image is not None else np.zeros(gt.shape)
    aspect = spacing[1] / spacing[0]
    fig, axes = plt.subplots(len(zs), 2, figsize=(6.4, 3.2 * len(zs)), squeeze=False)
    for row, z in enumerate(zs):
        for col, (lab, what) in enumerate(((gt, "ground truth"), (pred, "prediction"))):
            ax = axes[row][col]
            ax.imshow(axial(img, z), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
            ax.imshow(label_rgba(axial(lab, z)), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{what}, slice {z}", fontsize=8)
            ax.axis("off")
    present = sorted({int(v) for v in np.unique(np.concatenate([np.unique(gt), np.unique(pred)])) if v})
    handles = [plt.Rectangle((0, 0), 1, 1, color=organ_rgb(i)) for i in present]
    if handles:
        fig.legend(
            handles,
            [ORGAN_BY_ID[i].name.replace("_", " ") for i in present],
            loc="lower center",
            ncol=min(5, len(handles)),
            fontsize=7,
            frameon=False,
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 0.97))
    _save(fig, path)
    plt.close(fig)
    return path


def evaluation_overlays(e: Evaluation, out_dir: Path, max_cases: int = 2) -> list[Path]:
    """Overlays for the first cases of an evaluation, when its predictions and labels can be found.

    Uses ``summary["pred"]`` / ``summary["gt"]`` (written by ``tgated evaluate``) and the prediction
    folder's ``provenance.json`` for the input image; the ground truth shows the scored organs only
    (``summary["scored_organs"]``). Missing pieces are skipped with a log message.
    """
    from tgated.data.datasets import ground_truth_cases, load_label
    from tgated.inference.provenance import case_entries
    from tgated.io.volumes import read_volume

    pred_dir, gt_root = e.summary.get("pred"), e.summary.get("gt")
    if not pred_dir or not gt_root or not Path(pred_dir).is_dir() or not Path(gt_root).exists():
        logger.info("%s: predictions or ground truth not found; no overlays", e.name)
        return []
    try:
        gts = {
            c.case_id: c
            for c in ground_truth_cases(gt_root, e.dataset, totalseg_task=e.summary.get("totalseg_task"))
        }
    except (OSError, ValueError) as exc:
        logger.info("%s: ground truth unreadable (%s); no overlays", e.name, exc)
        return []
    provenance = case_entries(pred_dir)
    cases = sorted({r["case"] for r in e.rows})[:max_cases]
    scored = e.summary.get("scored_organs")  # None: every organ the dataset labels
    keep = [ORGAN_BY_NAME[n].id for n in scored if n in ORGAN_BY_NAME] if scored else None
    out = []
    for cid in cases:
        pred_file = Path(pred_dir) / f"{cid}.nii.gz"
        if cid not in gts or not pred_file.is_file():
            continue
        gt = load_label(gts[cid])
        gt_labels = gt.data if keep is None else np.where(np.isin(gt.data, keep), gt.data, 0)
        pred = read_volume(pred_file, label=True)
        image, modality = None, None
        src = (provenance.get(cid) or {}).get("input")
        if src and Path(src).exists():
            try:
                vol = read_volume(src)
                if vol.shape == gt.shape:
                    image, modality = vol.data, (provenance.get(cid) or {}).get("modality")
            except (OSError, ValueError):
                pass
        if pred.shape != gt.shape:
            continue
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{e.name}_{cid}")
        out.append(
            overlay(
                image,
                gt_labels,
                pred.data,
                out_dir / f"overlay_{safe}.png",
                title=f"{e.name}: {cid}",
                modality=modality,
                spacing=gt.spacing,
            )
        )
    return out


def relpath(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()
