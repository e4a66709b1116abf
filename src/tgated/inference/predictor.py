"""Volume → label map with the shared-encoder core (docs/architecture.md).

For one volume in the canonical frame:

1. the intensity window is chosen for the volume's modality (CT: HU window; MR: per-volume
   percentiles);
2. a chunk of axial slices at a time is windowed to [0, 1], padded to square and resized to the
   model grid;
3. the model encodes each slice once, adapts each centre slice over its window's cached tokens and
   decodes every organ from the same adapted tokens (:meth:`TGatedModel.iter_segment_stack`);
4. per-organ probabilities are resampled back to the slice's native grid (bilinear), slice by slice,
   and only then turned into labels: argmax over organs, background where no organ reaches
   ``preprocess.background_threshold``.

Memory is bounded by the volume: slices are processed in chunks (with the neighbours their windows
need), the only volume-sized arrays are the input and the label map, and probabilities at native
resolution exist only for a few slices at a time (``NATIVE_BLOCK_VALUES``), never as an
organs × volume array: when they are requested (``keep_probabilities``), those of each few slices
go into a scratch file on disk (:class:`tgated.inference.probabilities.ProbabilityMaps`), and are written out
one organ at a time. For a 512 × 512 × 300 CT and the full-size model the peak stays below
3 × (volume as float32 + model weights) (``benchmarks/whole_ct.py``). :meth:`Predictor.memory_estimate` gives the
peak for a volume; :meth:`Predictor.check_memory` turns an estimate above the available memory into
an error before any work starts (with the fixes: a smaller ``batch_size``, no probabilities, a
crop), and running out of memory anyway is reported the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tgated.data.slices import (
    apply_window,
    axial_slices,
    from_axial_slices,
    from_model_grid,
    intensity_window,
    to_model_grid,
)
from tgated.inference.probabilities import WRITE_BYTES_PER_VOXEL, ProbabilityMaps
from tgated.io.volumes import Volume
from tgated.organs import ORGANS, Organ, get_organ
from tgated.progress import progress

logger = logging.getLogger(__name__)

# Intensity statistics that tell CT from MR: CT volumes hold air (about −1000 HU) around the body and in
# the lungs and bowel; MR intensities are non-negative.
CT_LOW_PERCENTILE = 0.5
CT_LOW_HU = -200.0
GB = 1e9
NATIVE_BLOCK_VALUES = 16_000_000
"""Probabilities resampled to the native grid at once (64 MB of float32: 4 slices of 13 organs at 512²)."""
RUNTIME_OVERHEAD_GB = 0.15
"""Allocator caches, thread pools and the prompts' text-tower pass, measured on CPU (about 0.1-0.2 GB)."""


@dataclass
class Prediction:
    """A volume's segmentation in the canonical frame (see :class:`tgated.io.volumes.Volume`)."""

    labels: np.ndarray
    """(X, Y, Z) uint8 canonical organ ids."""
    organs: tuple[Organ, ...]
    modality: str
    volume: Volume
    probabilities: ProbabilityMaps | None = None
    """(O, X, Y, Z) float16 per-organ probabilities in ``organs`` order, on disk (when requested):
    ``probabilities.organ(i)`` reads one, ``np.asarray`` all; ``probabilities.close()`` removes them."""


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


def _evidence(stats: str) -> str:
    return (
        f"{CT_LOW_PERCENTILE}th percentile below {CT_LOW_HU:.0f}: air in HU"
        if stats == "ct"
        else f"{CT_LOW_PERCENTILE}th percentile above {CT_LOW_HU:.0f}: no air in HU"
    )


def resolve_modality(volume: Volume, requested: str | None, model_modality: str | None = None) -> str:
    """The modality used to normalise ``volume``: the request, else the file's tag, else intensities.

    Warnings naming the file (the volume is still segmented):

    * a request that contradicts the intensity statistics (an MR volume sent as CT, or the reverse);
    * a volume of another modality than the model was trained on (``model_modality``, the saved
      ``preprocess.modality``): e.g. an MR volume given to a CT-windowed model is a zero-shot
      cross-modality prediction.
    """
    if requested not in (None, "auto", "ct", "mr"):
        raise ValueError(f"unknown modality {requested!r}; expected 'auto', 'ct' or 'mr'")
    stats = looks_like(volume)
    if requested in ("ct", "mr"):
        if requested != stats and volume.modality != requested:
            logger.warning(
                "%s: --modality %s, but the intensities look like %s (%s); CT windowing of an MR volume "
                "(or the reverse) gives meaningless input — check --modality",
                volume.source,
                requested,
                stats.upper(),
                _evidence(stats),
            )
        mod, why = requested, "--modality"
    elif volume.modality in ("ct", "mr"):
        mod, why = volume.modality, "the DICOM Modality tag"
    else:
        mod, why = stats, f"intensity statistics, {_evidence(stats)}"
    # a modality the caller chose needs no note; one read from the file or the intensities does
    logger.log(
        logging.DEBUG if requested in ("ct", "mr") else logging.INFO,
        "%s: modality %s (from %s)",
        volume.source,
        mod.upper(),
        why,
    )
    if model_modality in ("ct", "mr") and mod != model_modality:
        logger.warning(
            "%s: the volume is %s (from %s) but the model was trained on %s; this is a zero-shot "
            "cross-modality prediction — expect lower accuracy, or use a model trained on %s",
            volume.source,
            mod.upper(),
            why,
            model_modality.upper(),
            mod.upper(),
        )
    return mod


def available_memory_gb(
    meminfo: str | os.PathLike = "/proc/meminfo", cgroup: str | os.PathLike = "/sys/fs/cgroup"
) -> float | None:
    """Memory this process can still allocate (GB): the kernel's ``MemAvailable``, capped by a
    cgroup v2 (container) limit when there is one (limit − usage + reclaimable page cache);
    ``os.sysconf`` where there is no ``/proc``; None when unknown."""
    avail: float | None = None
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024 / GB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
        except (OSError, ValueError, AttributeError):
            avail = None
    try:  # cgroup v2 limit; the page cache ("file") counts as used there but can be reclaimed
        cg = Path(cgroup)
        limit = (cg / "memory.max").read_text().strip()
        used = (cg / "memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            stat = dict(
                line.split()[:2] for line in (cg / "memory.stat").read_text().splitlines() if " " in line
            )
            cache = int(stat.get("file", 0)) if str(stat.get("file", "0")).isdigit() else 0
            room = (int(limit) - int(used) + cache) / GB
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def _device_free_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return None
    return free / GB


def _out_of_memory(exc: BaseException) -> bool:
    """True for the ways torch and numpy report a failed allocation."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or ("allocate" in text and "memory" in text)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of :meth:`Predictor.predict_volume` for one volume, in GB.

    ``volume_gb``: host arrays that scale with the volume (image, normalised copy, labels, outputs,
    probabilities); ``work_gb``: model-grid work that scales with ``batch_size`` and
    ``chunk_slices`` (slice stack, token cache, encoder / adapter / decoder activations), on the
    model's device. Model weights are not included (they are loaded before any check).
    """

    volume_gb: float
    work_gb: float
    device: str

    @property
    def host_gb(self) -> float:
        return self.volume_gb + (self.work_gb if self.device == "cpu" else 0.0)


def choose_organs(known, organs) -> tuple[Organ, ...]:
    """The requested ``organs`` (names, ids or :class:`Organ`; None = all of ``known``) in id order;
    an organ the model was not trained for is an error naming the ones it segments."""
    known = tuple(known)
    if organs is None:
        return known
    chosen = tuple(o if isinstance(o, Organ) else get_organ(o) for o in organs)
    unknown = [o.name for o in chosen if o not in known]
    if unknown:
        raise ValueError(
            f"organs {unknown} were not trained by this model; it segments: {', '.join(o.name for o in known)}"
        )
    return tuple(sorted(set(chosen), key=lambda o: o.id))


class VolumePredictor:
    """The contract every predictor keeps (``tgated predict``, validation and ``evaluate`` treat them
    alike): organ choice (:meth:`organs_for`), the memory check before any work (:meth:`check_memory`),
    mixed precision on CUDA, and ``predict_volume`` returning a :class:`Prediction` on the volume's
    own grid. A subclass sets ``model`` (with ``organs``) and ``device`` and gives
    :meth:`memory_estimate`, :meth:`_work_description` and :meth:`_memory_fix`."""

    model: Any
    device: torch.device

    def organs_for(self, organs) -> tuple[Organ, ...]:
        return choose_organs(self.model.organs, organs)

    def memory_estimate(
        self, volume_shape: tuple[int, ...], n_organs: int, keep_probabilities: bool = False
    ) -> MemoryEstimate:
        raise NotImplementedError

    def _work_description(self) -> str:
        """What the estimate's ``work_gb`` is spent on, for the messages (\"batches of 16 slices\")."""
        raise NotImplementedError

    def _memory_fix(
        self,
        volume_shape: tuple[int, ...],
        n_organs: int,
        keep_probabilities: bool,
        available: float,
        need: Callable[[MemoryEstimate], float],
    ) -> str:
        """The advice that makes a case fit in ``available`` GB (``need``: the part of an estimate
        that must fit there)."""
        raise NotImplementedError

    def _device_fix(
        self, volume_shape: tuple[int, ...], n_organs: int, keep_probabilities: bool, available: float
    ) -> str:
        """The advice when the work does not fit in the device's ``available`` GB."""
        return self._memory_fix(volume_shape, n_organs, keep_probabilities, available, lambda e: e.work_gb)

    def check_memory(
        self,
        volume_shape: tuple[int, ...],
        n_organs: int,
        keep_probabilities: bool = False,
        *,
        source: str = "volume",
        loaded_gb: float = 0.0,
        available_gb: float | None = None,
    ) -> MemoryEstimate:
        """Raise a ``ValueError`` (estimate, available memory, fixes) when ``predict_volume`` would not
        fit.

        ``loaded_gb``: part of the estimate already allocated (the image read from disk);
        ``available_gb``: host memory available (default: :func:`available_memory_gb`; unknown
        means no check). On CUDA, the model-grid work is compared with the device's free memory.
        """
        est = self.memory_estimate(volume_shape, n_organs, keep_probabilities)
        host = available_memory_gb() if available_gb is None else available_gb
        need = est.host_gb - loaded_gb
        if host is not None and need > host:
            fix = self._memory_fix(
                volume_shape, n_organs, keep_probabilities, host, lambda e: e.host_gb - loaded_gb
            )
            raise ValueError(
                f"{source}: segmenting {tuple(int(v) for v in volume_shape)} voxels × {n_organs} organs needs about "
                f"{need:.1f} GB of memory ({est.volume_gb:.1f} GB for the volume and its outputs, "
                f"{est.work_gb:.1f} GB for {self._work_description()} on {est.device}), but only "
                f"{host:.1f} GB is available; {fix}"
            )
        free = _device_free_gb(self.device)
        if free is not None and est.work_gb > free:
            fix = self._device_fix(volume_shape, n_organs, keep_probabilities, free)
            raise ValueError(
                f"{source}: {self._work_description()} × {n_organs} organs need about "
                f"{est.work_gb:.1f} GB on {self.device}, but only {free:.1f} GB is free; {fix}"
            )
        return est

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 on CUDA where supported (else fp16); float32 on the CPU."""
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()


class Predictor(VolumePredictor):
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
        if int(batch_size) < 1:
            raise ValueError(
                f"--batch-size {batch_size}: expected a positive number of slices per forward pass"
            )
        self.device = resolve_device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.chunk_slices = max(int(chunk_slices), 1)
        self.quiet = quiet

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | None = "auto", **kwargs) -> Predictor:
        """Load a saved model (a run folder holding ``model/``, or the model folder itself); a saved
        3-D DynUNet gets its own predictor with the same interface
        (:class:`tgated.inference.dynunet.DynUNetPredictor`)."""
        from tgated.models.dynunet import saved_model_type
        from tgated.models.tgated import TGatedModel

        if saved_model_type(path) == "dynunet":
            from tgated.inference.dynunet import DynUNetPredictor

            return DynUNetPredictor.from_path(path, device=device, **kwargs)  # type: ignore[return-value]
        dev = resolve_device(device)
        return cls(TGatedModel.from_pretrained(path, device=dev), device=dev, **kwargs)

    # ------------------------------------------------------------------------------------------

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

    def _native_group(self, n_organs: int, h: int, w: int) -> int:
        """Slices whose probabilities are resampled to the native grid at once: at most
        ``NATIVE_BLOCK_VALUES`` float32 values (organs × slices × H × W), never the whole volume's."""
        return max(1, min(self.batch_size, NATIVE_BLOCK_VALUES // max(1, n_organs * h * w)))

    def memory_estimate(
        self,
        volume_shape: tuple[int, ...],
        n_organs: int,
        keep_probabilities: bool = False,
        batch_size: int | None = None,
    ) -> MemoryEstimate:
        """Peak memory of :meth:`predict_volume` for a volume of ``volume_shape`` (x, y, z) voxels
        (with ``batch_size`` slices per forward pass; default: this predictor's)."""
        m = self.model
        vis = m.backbone.config.vision_config
        s = int(m.config.preprocess.image_size)
        patch = int(vis.patch_size)
        tokens = (s // patch) ** 2 + 1
        width = int(vis.hidden_size)
        heads = int(vis.num_attention_heads)
        layers = len(m.token_layers)
        k = int(m.context)
        z = int(volume_shape[2]) if len(volume_shape) > 2 else 1
        images = min(z, self.chunk_slices) + 2 * (k // 2)
        if m.config.context_mode == "physical" and k > 1:
            images *= 2  # interpolated neighbours: up to two source slices each
        b = min(self.batch_size if batch_size is None else int(batch_size), images)
        reduce = int(m.backbone.config.reduce_dim)
        adapter = int(m.config.adapter_config.dim) if len(m.adapters) else 0
        slice_px = s * s
        per_slice = (  # activations per slice of a batch (float32)
            3 * slice_px * 4
            + tokens * width * 4 * 8
            + heads * tokens * tokens * 4 * 2  # encoder
            + k * layers * tokens * width * 4 * 2  # window tokens gathered for the adapter
            + len(m.adapters) * tokens * (k * adapter * 4 * 12 + width * 4 * 8)  # temporal + spatial blocks
            + n_organs * (reduce * tokens * 4 * 6 + (reduce // 2) * (s // 4) ** 2 * 4 * 2 + slice_px * 4 * 4)
        )
        work = (
            images * slice_px * 4  # the chunk's slices on the model grid
            + images * layers * tokens * width * 4  # token cache
            + b * per_slice
        )
        x, y = int(volume_shape[0]), int(volume_shape[1])
        work += images * x * y * 4 * 3  # the chunk's slab of the volume: windowed, flipped to slices
        group = self._native_group(n_organs, y, x)
        work += group * n_organs * x * y * 4 * 3  # native-resolution probabilities of a few slices
        return MemoryEstimate(
            estimate_memory_gb(volume_shape, n_organs, keep_probabilities),
            work / GB + RUNTIME_OVERHEAD_GB,
            self.device.type,
        )

    def _work_description(self) -> str:
        return f"batches of {self.batch_size} slices"

    def _memory_fix(
        self,
        volume_shape: tuple[int, ...],
        n_organs: int,
        keep_probabilities: bool,
        available: float,
        need: Callable[[MemoryEstimate], float],
    ) -> str:
        """The advice that makes a case fit in ``available`` GB: the largest batch size that fits,
        dropping the probabilities, cropping the volume, or (when one slice alone is too much) a model
        with a smaller input size."""

        def largest_batch(keep: bool) -> int | None:
            for b in range(self.batch_size, 0, -1):
                if need(self.memory_estimate(volume_shape, n_organs, keep, batch_size=b)) <= available:
                    return b
            return None

        b = largest_batch(keep_probabilities)
        if b is not None:
            return f"use --batch-size {b} (or less)"
        if keep_probabilities and (b := largest_batch(False)) is not None:
            return "leave out --save-probabilities" + (
                f" and use --batch-size {b}" if b < self.batch_size else ""
            )
        one = self.memory_estimate(volume_shape, n_organs, False, batch_size=1)
        s = int(self.model.config.preprocess.image_size)
        if one.work_gb > available:
            where = "--device cpu or " if self.device.type == "cuda" else ""
            return (
                f"even one slice at a time needs about {one.work_gb:.1f} GB at the model's input size {s} × {s} "
                f"(model.preprocess.image_size): use {where}a model with a smaller input size, or a machine with "
                "more memory"
            )
        arrays = self.memory_estimate(volume_shape, n_organs, keep_probabilities, batch_size=1).volume_gb
        return (
            f"the volume's arrays{' and probabilities' if keep_probabilities else ''} alone need about "
            f"{arrays:.1f} GB: crop or downsample the volume"
            + (", leave out --save-probabilities" if keep_probabilities else "")
            + " (or use a machine with more memory)"
        )

    @torch.no_grad()
    def predict_volume(
        self,
        volume: Volume,
        organs=None,
        modality: str | None = None,
        *,
        keep_probabilities: bool = False,
        probabilities_path: str | os.PathLike | None = None,
        neighbours: str = "real",
    ) -> Prediction:
        """Segment one canonical volume; returns labels on its own grid (canonical frame).

        ``keep_probabilities``: also return the per-organ probabilities, staged on disk next to
        ``probabilities_path``, the file they are for (:class:`ProbabilityMaps`; default: the
        system's temporary folder); close them when done. ``neighbours="centre"`` is the context
        ablation: each window holds its centre slice K times.

        Fails early with a ``ValueError`` when the volume would not fit in memory
        (:meth:`check_memory`), and the same way when memory runs out anyway.
        """
        organ_list = self.organs_for(organs)
        self.check_memory(
            volume.shape,
            len(organ_list),
            keep_probabilities,
            source=volume.source,
            loaded_gb=volume.data.nbytes / GB,
        )
        pre = self.model.config.preprocess
        mod = resolve_modality(volume, modality, pre.modality)
        try:
            return self._predict(volume, organ_list, mod, keep_probabilities, neighbours, probabilities_path)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            est = self.memory_estimate(volume.shape, len(organ_list), keep_probabilities)
            where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "host"
            raise ValueError(
                f"{volume.source}: ran out of {where} memory on {self.device} with batches of {self.batch_size} "
                f"slices × {len(organ_list)} organs (estimated {est.volume_gb:.1f} GB for the volume, "
                f"{est.work_gb:.1f} GB for the batches); use a smaller --batch-size"
                + (" and no --save-probabilities" if keep_probabilities else "")
            ) from None

    def _predict(
        self,
        volume: Volume,
        organ_list: tuple[Organ, ...],
        mod: str,
        keep_probabilities: bool,
        neighbours: str = "real",
        probabilities_path: str | os.PathLike | None = None,
    ) -> Prediction:
        probs = ProbabilityMaps(organ_list, volume.shape, probabilities_path) if keep_probabilities else None
        try:
            return self._segment(volume, organ_list, mod, probs, neighbours)
        except BaseException:
            if probs is not None:
                probs.close()
            raise

    def _segment(
        self,
        volume: Volume,
        organ_list: tuple[Organ, ...],
        mod: str,
        probs: ProbabilityMaps | None,
        neighbours: str,
    ) -> Prediction:
        pre = self.model.config.preprocess
        size = int(pre.image_size)
        window = intensity_window(volume.data, mod, pre)
        w, h, z = volume.shape  # canonical (X, Y, Z); axial slices are (Z, H = Y, W = X)
        positions = volume.slice_positions()
        ids = torch.tensor([o.id for o in organ_list], dtype=torch.uint8)
        threshold = float(pre.background_threshold)
        labels = torch.zeros((z, h, w), dtype=torch.uint8)
        group = self._native_group(len(organ_list), h, w)
        chunks = range(0, z, self.chunk_slices)
        bar = progress(
            total=z, desc=Path(volume.source).name[:30], unit="slice", quiet=self.quiet, lines=False, leave=False
        )
        for start in chunks:
            end = min(start + self.chunk_slices, z)
            lo, hi = self._halo(positions, start, end)
            # only this chunk (and its windows' neighbours) is normalised and resized
            slab = axial_slices(apply_window(volume.data[:, :, lo:hi], window))
            stack = to_model_grid(slab.unsqueeze(1).contiguous(), size).to(self.device)
            del slab
            with self._autocast():
                stream = self.model.iter_segment_stack(
                    stack,
                    organ_list,
                    positions_mm=positions[lo:hi],
                    batch_size=self.batch_size,
                    neighbours=neighbours,
                )
                for centres, logits in stream:
                    keep = (centres + lo >= start) & (centres + lo < end)
                    if not bool(keep.any()):
                        continue
                    cz = (centres[keep] + lo).tolist()
                    p = logits[keep.to(logits.device)].float().sigmoid_()
                    del logits
                    for g in range(0, len(cz), group):
                        native = from_model_grid(p[g : g + group], (h, w)).cpu()
                        best, arg = native.max(dim=1)
                        lab = torch.where(
                            best >= threshold, ids[arg], torch.zeros_like(arg, dtype=torch.uint8)
                        )
                        sel = cz[g : g + group]
                        labels[sel] = lab.to(torch.uint8)
                        if probs is not None:
                            probs.put(sel, native)
            bar.update(end - start)
        bar.close()
        out_labels = from_axial_slices(labels).contiguous().numpy()
        return Prediction(out_labels, organ_list, mod, volume, probs)


def estimate_memory_gb(volume_shape: tuple[int, ...], n_organs: int, keep_probabilities: bool) -> float:
    """Host memory (GB) of the arrays of :meth:`Predictor.predict_volume` that scale with the volume.

    Per voxel: the image (float32), the label map, its canonical and original-layout copies (uint8
    each); with probabilities, which are staged on disk, one organ's while it is written
    (``WRITE_BYTES_PER_VOXEL``, whatever the number of organs). Intensities are normalised a chunk
    of slices at a time, so no normalised copy of the volume exists; that and the other
    batch-dependent work is in :meth:`Predictor.memory_estimate`.
    """
    voxels = math.prod(int(v) for v in volume_shape)
    per_voxel = 4 + 1 * 3
    if keep_probabilities:
        per_voxel += WRITE_BYTES_PER_VOXEL
    return voxels * per_voxel / GB


__all__ = [
    "ORGANS",
    "MemoryEstimate",
    "Prediction",
    "Predictor",
    "available_memory_gb",
    "estimate_memory_gb",
    "looks_like",
    "resolve_device",
    "resolve_modality",
]
