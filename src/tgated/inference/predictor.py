"""Volume → label map with the shared-encoder core (DESIGN §1, §5).

For one volume in the canonical frame:

1. intensities are normalised for the volume's modality (CT: HU window; MR: per-volume percentiles);
2. axial slices are padded to square and resized to the model grid, a chunk of slices at a time;
3. the model encodes each slice once, adapts each centre slice over its window's cached tokens and
   decodes every organ from the same adapted tokens (:meth:`TGatedModel.iter_segment_stack`);
4. per-organ probabilities are resampled back to the slice's native grid (bilinear), slice by slice,
   and only then turned into labels: argmax over organs, background where no organ reaches
   ``preprocess.background_threshold``.

Memory is bounded by the volume: slices are processed in chunks (with the neighbours their windows
need), and probabilities at native resolution exist only for a few slices at a time unless they are
requested (``keep_probabilities``: O × volume float16).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tgated.data.slices import (
    axial_slices,
    from_axial_slices,
    from_model_grid,
    normalise_intensity,
    to_model_grid,
)
from tgated.io.volumes import Volume
from tgated.organs import ORGANS, Organ, get_organ

logger = logging.getLogger(__name__)

# Intensity statistics that tell CT from MR: CT volumes hold air (about −1000 HU) around the body and in
# the lungs and bowel; MR intensities are non-negative.
CT_LOW_PERCENTILE = 0.5
CT_LOW_HU = -200.0


@dataclass
class Prediction:
    """A volume's segmentation in the canonical frame (see :class:`tgated.io.volumes.Volume`)."""

    labels: np.ndarray
    """(X, Y, Z) uint8 canonical organ ids."""
    organs: tuple[Organ, ...]
    modality: str
    volume: Volume
    probabilities: np.ndarray | None = None
    """(O, X, Y, Z) float16 per-organ probabilities in ``organs`` order (when requested)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when available, else CPU; a CUDA request on a machine without one is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def looks_like(volume: Volume) -> str:
    """``ct`` or ``mr`` from intensity statistics (air around −1000 HU means CT)."""
    data = volume.data
    sample = data.reshape(-1)[:: max(1, data.size // 2_000_000)]
    return "ct" if float(np.percentile(sample, CT_LOW_PERCENTILE)) < CT_LOW_HU else "mr"


def resolve_modality(volume: Volume, requested: str | None) -> str:
    """The modality used to normalise ``volume``: the request, else the file's tag, else intensities.

    A request that contradicts the intensity statistics (an MR volume sent as CT, or the reverse) is
    kept, with a warning naming the file.
    """
    stats = looks_like(volume)
    if requested in ("ct", "mr"):
        if requested != stats and volume.modality != requested:
            logger.warning(
                "%s: --modality %s, but the intensities look like %s (%s); CT windowing of an MR volume "
                "(or the reverse) gives meaningless input — check --modality",
                volume.source,
                requested,
                stats.upper(),
                "air near −1000 HU" if stats == "ct" else f"no values below {CT_LOW_HU:.0f}",
            )
        return requested
    if requested not in (None, "auto"):
        raise ValueError(f"unknown modality {requested!r}; expected 'auto', 'ct' or 'mr'")
    if volume.modality in ("ct", "mr"):
        logger.info("%s: modality %s (from the DICOM Modality tag)", volume.source, volume.modality.upper())
        return volume.modality
    logger.info("%s: modality %s (from intensity statistics)", volume.source, stats.upper())
    return stats


class Predictor:
    """Segments volumes with a :class:`~tgated.models.tgated.TGatedModel`.

    ``batch_size`` slices go through the encoder / decoder per call (× organs in the decoder);
    ``chunk_slices`` centre slices are processed per chunk (bounding token memory).
    """

    def __init__(
        self,
        model,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        chunk_slices: int = 64,
        quiet: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.chunk_slices = max(int(chunk_slices), 1)
        self.quiet = quiet

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | None = "auto", **kwargs) -> Predictor:
        """Load a saved model (a run folder holding ``model/``, or the model folder itself)."""
        from tgated.models.tgated import TGatedModel

        dev = resolve_device(device)
        return cls(TGatedModel.from_pretrained(path, device=dev), device=dev, **kwargs)

    # ------------------------------------------------------------------------------------------

    def organs_for(self, organs) -> tuple[Organ, ...]:
        known = tuple(self.model.organs)
        if organs is None:
            return known
        chosen = tuple(o if isinstance(o, Organ) else get_organ(o) for o in organs)
        unknown = [o.name for o in chosen if o not in known]
        if unknown:
            raise ValueError(
                f"organs {unknown} were not trained by this model; it segments: {', '.join(o.name for o in known)}"
            )
        return tuple(sorted(set(chosen), key=lambda o: o.id))

    def _halo(self, positions: np.ndarray, start: int, end: int) -> tuple[int, int]:
        """Slices [lo, hi) a chunk of centres [start, end) needs for its windows."""
        k = self.model.context
        z = positions.shape[0]
        if k == 1:
            return start, end
        if self.model.config.context_mode == "physical":
            reach = (k // 2) * float(self.model.config.context_step_mm)
            lo = int(np.searchsorted(positions, positions[start] - reach, side="left")) - 1
            hi = int(np.searchsorted(positions, positions[end - 1] + reach, side="right")) + 1
            return max(lo, 0), min(hi, z)
        return max(start - k // 2, 0), min(end + k // 2, z)

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def predict_volume(
        self,
        volume: Volume,
        organs=None,
        modality: str | None = None,
        *,
        keep_probabilities: bool = False,
    ) -> Prediction:
        """Segment one canonical volume; returns labels on its own grid (canonical frame)."""
        from tqdm.auto import tqdm

        organ_list = self.organs_for(organs)
        mod = resolve_modality(volume, modality)
        pre = self.model.config.preprocess
        size = int(pre.image_size)
        norm = normalise_intensity(volume.data, mod, pre)
        slices = axial_slices(norm)  # (Z, H, W)
        z, h, w = slices.shape
        positions = volume.slice_positions()
        ids = torch.tensor([o.id for o in organ_list], dtype=torch.uint8)
        threshold = float(pre.background_threshold)
        labels = torch.zeros((z, h, w), dtype=torch.uint8)
        probs = torch.zeros((len(organ_list), z, h, w), dtype=torch.float16) if keep_probabilities else None
        # native-resolution probabilities for this many slices at once (bounded memory)
        group = max(1, min(self.batch_size, int(64e6 // max(1, len(organ_list) * h * w))))
        chunks = range(0, z, self.chunk_slices)
        bar = tqdm(total=z, desc=Path(volume.source).name[:30], unit="slice", disable=self.quiet, leave=False)
        for start in chunks:
            end = min(start + self.chunk_slices, z)
            lo, hi = self._halo(positions, start, end)
            stack = to_model_grid(slices[lo:hi].unsqueeze(1).contiguous(), size).to(self.device)
            with self._autocast():
                stream = self.model.iter_segment_stack(
                    stack, organ_list, positions_mm=positions[lo:hi], batch_size=self.batch_size
                )
                for centres, logits in stream:
                    keep = (centres + lo >= start) & (centres + lo < end)
                    if not bool(keep.any()):
                        continue
                    cz = (centres[keep] + lo).tolist()
                    p = torch.sigmoid(logits[keep.to(logits.device)].float())
                    for g in range(0, len(cz), group):
                        native = from_model_grid(p[g : g + group], (h, w)).cpu()
                        best, arg = native.max(dim=1)
                        lab = torch.where(
                            best >= threshold, ids[arg], torch.zeros_like(arg, dtype=torch.uint8)
                        )
                        sel = cz[g : g + group]
                        labels[sel] = lab.to(torch.uint8)
                        if probs is not None:
                            probs[:, sel] = native.transpose(0, 1).to(torch.float16)
            bar.update(end - start)
        bar.close()
        out_labels = from_axial_slices(labels).contiguous().numpy()
        out_probs = from_axial_slices(probs).contiguous().numpy() if probs is not None else None
        return Prediction(out_labels, organ_list, mod, volume, out_probs)


def estimate_memory_gb(volume_shape: tuple[int, ...], n_organs: int, keep_probabilities: bool) -> float:
    """Rough host memory of :meth:`Predictor.predict_volume` for a volume (GB)."""
    voxels = math.prod(volume_shape)
    per_voxel = 4 + 4 + 1 + 1  # image float32, normalised float32, labels, output
    if keep_probabilities:
        per_voxel += 2 * n_organs
    return voxels * per_voxel / 1e9


__all__ = [
    "ORGANS",
    "Prediction",
    "Predictor",
    "estimate_memory_gb",
    "looks_like",
    "resolve_device",
    "resolve_modality",
]
