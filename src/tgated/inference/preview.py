"""``<case>_preview.png``: a picture to check a segmentation at a glance.

One row of five panels: three axial slices at 20 %, 50 % and 80 % of the segmented z-range, a coronal
and a sagittal plane through the segmentation's centre; the image in grey (CT: abdominal window
W400/L40; MR: 0.5-99.5 percentiles) under the organs in the package's organ colours
(:data:`tgated.organs.ORGAN_COLOURS`), and a legend with each segmented organ's name and volume.
Planes are radiological (:mod:`tgated.data.views`) with the true physical aspect ratio. The PNG is
always :data:`PREVIEW_SIZE` pixels. matplotlib is imported only when a preview is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from tgated.data.views import axial, coronal, display_window, foreground_slices, label_rgba, sagittal
from tgated.inference.statistics import axial_axis, voxel_volume_ml
from tgated.io.files import atomic_path
from tgated.io.volumes import Volume
from tgated.organs import Organ, organ_rgb

PREVIEW_DPI = 100
PREVIEW_INCHES = (15.0, 4.2)
PREVIEW_SIZE = (int(PREVIEW_INCHES[0] * PREVIEW_DPI), int(PREVIEW_INCHES[1] * PREVIEW_DPI))
"""(width, height) of every preview in pixels."""


def _centre(labels: np.ndarray) -> tuple[int, int]:
    """(x, y) index of the segmentation's centre of mass; the volume's centre when it is empty."""
    xs, ys, _ = np.nonzero(labels)
    if xs.size == 0:
        return labels.shape[0] // 2, labels.shape[1] // 2
    return int(np.rint(xs.mean())), int(np.rint(ys.mean()))


def write_preview(
    path: str | os.PathLike,
    volume: Volume,
    labels: np.ndarray,
    organs: Sequence[Organ],
    *,
    title: str,
    modality: str | None = None,
) -> None:
    """Draw the preview of ``labels`` (canonical ids, ``volume``'s canonical frame) and write it
    atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels = np.asarray(labels)
    image = display_window(volume.data, modality)
    sx, sy, sz = volume.spacing
    cx, cy = _centre(labels)
    zs = foreground_slices(labels, 3)
    zs = (zs * 3)[:3] if len(zs) < 3 else zs
    # slice numbers as in the input file (0-based along its own axial axis, as the statistics count)
    flipped = nib.aff2axcodes(volume.original_affine)[axial_axis(volume.original_affine)] == "I"
    nz = labels.shape[2]
    panels = [
        (axial(image, z), axial(labels, z), sy / sx, f"axial, slice {nz - 1 - z if flipped else z}")
        for z in zs
    ]
    panels.append((coronal(image, cy), coronal(labels, cy), sz / sx, "coronal"))
    panels.append((sagittal(image, cx), sagittal(labels, cx), sz / sy, "sagittal"))

    fig = Figure(figsize=PREVIEW_INCHES, dpi=PREVIEW_DPI, facecolor="black")
    axes = fig.subplots(1, len(panels))
    for ax, (img, lab, aspect, name) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax.imshow(label_rgba(lab), aspect=aspect, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    voxel_ml = voxel_volume_ml(volume.affine)
    counts = np.bincount(labels.astype(np.uint8).ravel(), minlength=256)
    present = [o for o in organs if counts[o.id]]
    handles = [
        Patch(color=organ_rgb(o), label=f"{o.name.replace('_', ' ')} {counts[o.id] * voxel_ml:.0f} ml")
        for o in present
    ]
    missing = [o.name.replace("_", " ") for o in organs if not counts[o.id]]
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(7, len(handles)),
            fontsize=8,
            frameon=False,
            labelcolor="white",
        )
    note = f" — not found: {', '.join(missing)}" if missing else ""
    fig.suptitle(f"{title}{note}", color="white", fontsize=10)
    fig.subplots_adjust(
        left=0.005, right=0.995, top=0.88, bottom=0.14 if len(handles) <= 7 else 0.2, wspace=0.02
    )
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=PREVIEW_DPI, format="png", facecolor=fig.get_facecolor())
