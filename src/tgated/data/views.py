"""Display planes of canonical volumes, intensity windows for display, and coloured label overlays.

Shared by the prediction previews (:mod:`tgated.inference.preview`) and the report's overlays
(:mod:`tgated.report.figures`), so that every picture the tool draws is oriented, windowed and
coloured the same way. Arrays are canonical (X, Y, Z) = (towards the patient's right, anterior,
superior), as :func:`tgated.io.volumes.read_volume` returns them. Planes follow the radiological
convention of 3D Slicer and ITK-SNAP:

* axial: anterior up, the patient's right on the image's left;
* coronal: superior up, the patient's right on the image's left;
* sagittal: superior up, anterior on the image's left.

Colours come from the one organ colour table, :data:`tgated.organs.ORGAN_COLOURS`. numpy only: no
plotting library is imported here.
"""

from __future__ import annotations

import numpy as np

from tgated.organs import colour_lookup

CT_DISPLAY_WINDOW = (-160.0, 240.0)
"""Abdominal soft-tissue window for display (level 40 HU, width 400 HU)."""
MR_DISPLAY_PERCENTILES = (0.5, 99.5)
"""MR (and unknown modality) display range: these percentiles of the volume's intensities."""


def display_window(image: np.ndarray, modality: str | None) -> np.ndarray:
    """Intensities mapped to 0-1 for display: the CT window for ``"ct"``, else the volume's
    0.5-99.5 percentile range (``None``: CT when the darkest percent is below -500, i.e. air in HU)."""
    image = np.asarray(image, dtype=np.float32)
    if modality == "ct" or (modality is None and np.percentile(image, 1) < -500):
        lo, hi = CT_DISPLAY_WINDOW
    else:
        lo, hi = (float(v) for v in np.percentile(image, MR_DISPLAY_PERCENTILES))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial plane ``k`` (rows anterior → posterior, columns patient right → left)."""
    return volume[::-1, ::-1, k].T


def coronal(volume: np.ndarray, j: int) -> np.ndarray:
    """Coronal plane ``j`` (rows superior → inferior, columns patient right → left)."""
    return volume[::-1, j, ::-1].T


def sagittal(volume: np.ndarray, i: int) -> np.ndarray:
    """Sagittal plane ``i`` (rows superior → inferior, columns anterior → posterior)."""
    return volume[i, ::-1, ::-1].T


def label_rgba(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGBA image (…, 4) of a canonical-id label map in the organ colours; background transparent."""
    return colour_lookup(alpha)[np.asarray(labels, dtype=np.uint8)]


def foreground_slices(labels: np.ndarray, n: int = 3) -> list[int]:
    """``n`` axial levels through the labelled z-range (20 % to 80 % of it); the middle slice when
    nothing is labelled."""
    z = np.nonzero(labels.reshape(-1, labels.shape[-1]).any(axis=0))[0]
    if z.size == 0:
        return [labels.shape[-1] // 2]
    qs = np.linspace(0.2, 0.8, n) if n > 1 else [0.5]
    return sorted({int(z[min(int(q * (z.size - 1)), z.size - 1)]) for q in qs})
