"""Render docs/phantom.png: axial and coronal views of a synthetic CT phantom with its labels, and an MR slice.

Run from the repository root (or anywhere): ``python docs/make_phantom_figure.py [--seed S] [--case C]``.
The figure is about 1200 px wide. Axial slices are shown in radiological convention (the patient's
right on the image's left, anterior up); the coronal view has superior up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from tgated.data.phantom import TISSUES, make_phantom
from tgated.data.views import CT_DISPLAY_WINDOW as CT_WINDOW
from tgated.data.views import axial, coronal, label_rgba
from tgated.organs import ORGANS, organ_rgb


def body_box(image: np.ndarray, air: float, margin: int = 3) -> tuple[slice, slice]:
    """In-plane (x, y) index box around everything denser than ``air`` (the body and the table)."""
    dense = (image > air).any(axis=2)
    xs, ys = np.nonzero(dense)
    return (
        slice(max(xs.min() - margin, 0), min(xs.max() + margin + 1, image.shape[0])),
        slice(max(ys.min() - margin, 0), min(ys.max() + margin + 1, image.shape[1])),
    )


def overlay(ax, labels: np.ndarray, aspect: float = 1.0) -> None:
    ax.imshow(label_rgba(labels), interpolation="nearest", aspect=aspect)


def pick_slices(labels: np.ndarray) -> list[int]:
    """Three informative axial levels: adrenals/spleen, pancreas/gallbladder, lower kidneys/duodenum."""

    def area(organ: str) -> np.ndarray:
        oid = next(o.id for o in ORGANS if o.name == organ)
        return (labels == oid).sum(axis=(0, 1))

    upper = int(np.argmax(area("left_adrenal_gland") + area("right_adrenal_gland") + area("spleen") * 0.05))
    middle = int(np.argmax(area("pancreas") + 2 * area("gallbladder")))
    kidney = area("right_kidney")
    low = int(np.argmax(area("duodenum") * (np.arange(labels.shape[2]) < middle - 2) + 0.2 * kidney))
    return [upper, middle, low]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, default=1)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--out", default=str(Path(__file__).with_name("phantom.png")))
    args = parser.parse_args()

    ct = make_phantom(args.seed, case=args.case, modality="ct", size=args.size)
    mr = make_phantom(args.seed, case=args.case, modality="mr", size=args.size)
    # crop the empty field of view around the body (the table stays below it)
    bx, by = body_box(np.where(ct.tissue == TISSUES.index("table"), -1000.0, ct.image), -500.0)
    by = slice(max(by.start - 12, 0), by.stop)
    crop = (bx, by, slice(None))
    ct_image, ct_labels, mr_image = ct.image[crop], ct.labels[crop], mr.image[crop]
    ks = pick_slices(ct_labels)
    sx, _, sz = ct.spacing
    j = int(np.argmax((ct_labels == 5).sum(axis=(0, 2)) + (ct_labels == 2).sum(axis=(0, 2))))

    fig, axes = plt.subplots(2, 4, figsize=(12.0, 6.6), dpi=100, gridspec_kw={"wspace": 0.03, "hspace": 0.12})
    z0 = ct.affine[2, 3]
    for col, k in enumerate(ks):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(axial(ct_image, k), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])
            if row == 1:
                overlay(ax, axial(ct_labels, k))
            ax.set_title(f"CT axial, z = {z0 + k * sz:.0f} mm" if row == 0 else "labels", fontsize=9)
    k_mr = ks[1]
    hi = float(np.percentile(mr_image, 99.5))
    axes[0, 3].imshow(axial(mr_image, k_mr), cmap="gray", vmin=0, vmax=hi)
    axes[0, 3].set_title("MR (T1-like), same patient", fontsize=9)
    ax = axes[1, 3]
    aspect = sz / sx
    ax.imshow(coronal(ct_image, j), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect)
    overlay(ax, coronal(ct_labels, j), aspect)
    ax.set_title("CT coronal + labels", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=organ_rgb(o), label=o.name.replace("_", " ")) for o in ORGANS]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(
        f"Synthetic abdominal phantom (seed {args.seed}, case {args.case}): {ct.shape[0]}×{ct.shape[1]}×{ct.shape[2]}"
        f" voxels, {sx:.2f}×{sx:.2f}×{sz:.1f} mm",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.1)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
