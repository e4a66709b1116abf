"""Volume → label map with the 3-D DynUNet baseline (:class:`~tgated.models.dynunet.DynUNetModel`).

The same contract as :class:`tgated.inference.predictor.Predictor`
(:class:`~tgated.inference.predictor.VolumePredictor`: ``organs_for``, ``check_memory`` of host and
GPU memory, ``predict_volume`` returning a :class:`~tgated.inference.predictor.Prediction` on the
volume's own grid), so ``tgated predict``, validation and ``evaluate`` treat both models alike:

1. intensities normalised as the saved ``preprocess`` says (CT window, MR percentiles);
2. MONAI ``Spacing`` to the model's voxel size and ``CropForeground`` (:func:`preprocessing`);
3. MONAI ``sliding_window_inference`` (tiles of ``patch_size``, overlap ``sw_overlap``, Gaussian
   weighting) → softmax probabilities;
4. the preprocessing is inverted by MONAI (``Compose.inverse``: padding back the crop, resampling the
   probabilities bilinearly to the native grid), then argmax over background and the chosen organs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

from tgated.data.slices import axial_slices, normalise_intensity
from tgated.inference.predictor import (
    GB,
    NATIVE_BLOCK_VALUES,
    RUNTIME_OVERHEAD_GB,
    MemoryEstimate,
    Prediction,
    VolumePredictor,
    resolve_device,
    resolve_modality,
)
from tgated.inference.probabilities import WRITE_BYTES_PER_VOXEL, ProbabilityMaps
from tgated.io.volumes import Volume
from tgated.models.dynunet import DynUNetModel, preprocessing


class DynUNetPredictor(VolumePredictor):
    """Segments canonical volumes with a :class:`DynUNetModel` by sliding-window inference."""

    def __init__(
        self, model: DynUNetModel, device: str | torch.device | None = None, quiet: bool = True, **_: object
    ):
        self.device = resolve_device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        self.quiet = quiet

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | None = "auto", **kwargs) -> DynUNetPredictor:
        dev = resolve_device(device)
        return cls(DynUNetModel.from_pretrained(path, device=dev), device=dev, **kwargs)

    def memory_estimate(
        self, volume_shape: tuple[int, ...], n_organs: int, keep_probabilities: bool = False
    ) -> MemoryEstimate:
        """Host memory: the volume (float32, three copies), the resampled grid's channels (float32
        probabilities accumulated and resampled back), the labels, one organ's probabilities while
        they are written (kept ones are staged on disk); work: the tiles' activations."""
        d = self.model.config.dynunet
        voxels = math.prod(int(v) for v in volume_shape)
        channels = 1 + len(self.model.organs)
        kept = WRITE_BYTES_PER_VOXEL if keep_probabilities else 0
        native = voxels * (4 * 3 + 3 + channels * 4 * 2 + kept)
        tile = math.prod(int(p) for p in d.patch_size)
        filters = list(d.filters) or [32]
        work = d.sw_batch_size * tile * filters[0] * 4 * 12
        return MemoryEstimate(native / GB, work / GB + RUNTIME_OVERHEAD_GB, self.device.type)

    def _work_description(self) -> str:
        d = self.model.config.dynunet
        return f"{d.sw_batch_size} tiles of {'×'.join(str(int(p)) for p in d.patch_size)} voxels at a time"

    def _memory_fix(
        self,
        volume_shape: tuple[int, ...],
        n_organs: int,
        keep_probabilities: bool,
        available: float,
        need: Callable[[MemoryEstimate], float],
    ) -> str:
        """Dropping the probabilities when that is enough, else a crop: the host arrays scale with the
        volume, the tiles do not."""
        if keep_probabilities and need(self.memory_estimate(volume_shape, n_organs, False)) <= available:
            return "leave out --save-probabilities"
        return "crop the volume" + (" and leave out --save-probabilities" if keep_probabilities else "")

    def _device_fix(
        self, volume_shape: tuple[int, ...], n_organs: int, keep_probabilities: bool, available: float
    ) -> str:
        return "predict on the CPU (--device cpu) or on a GPU with more free memory"

    @torch.no_grad()
    def probabilities(self, volume: Volume, modality: str) -> torch.Tensor:
        """Softmax probabilities (C, X, Y, Z) on the volume's canonical grid (C = background + organs)."""
        from monai.data import MetaTensor
        from monai.inferers import sliding_window_inference

        cfg = self.model.config
        d = cfg.dynunet
        norm = normalise_intensity(volume.data, modality, cfg.preprocess)
        pre = preprocessing(cfg)
        image = pre(MetaTensor(norm[None], affine=torch.as_tensor(volume.affine, dtype=torch.float64)))
        with self._autocast():
            logits = sliding_window_inference(
                image.as_tensor()[None].to(self.device),
                roi_size=tuple(d.patch_size),
                sw_batch_size=d.sw_batch_size,
                predictor=self.model,
                overlap=d.sw_overlap,
                mode="gaussian",
                progress=False,
            )
        probs = torch.softmax(logits[0].float(), dim=0).cpu()
        out = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
        back = pre.inverse(out)
        back = back.as_tensor() if hasattr(back, "as_tensor") else torch.as_tensor(back)
        if tuple(back.shape[1:]) != volume.shape:
            raise RuntimeError(
                f"{volume.source}: DynUNet probabilities came back with shape {tuple(back.shape[1:])}, expected "
                f"{volume.shape}"
            )
        return back.float()

    def predict_volume(
        self,
        volume: Volume,
        organs=None,
        modality: str | None = None,
        *,
        keep_probabilities: bool = False,
        probabilities_path: str | os.PathLike | None = None,
    ) -> Prediction:
        """Segment one canonical volume; labels on its own grid: argmax over background and ``organs``
        (``keep_probabilities``, ``probabilities_path``: as for
        :meth:`tgated.inference.predictor.Predictor.predict_volume`)."""
        organ_list = self.organs_for(organs)
        self.check_memory(
            volume.shape,
            len(organ_list),
            keep_probabilities,
            source=volume.source,
            loaded_gb=volume.data.nbytes / GB,
        )
        mod = resolve_modality(volume, modality, self.model.config.preprocess.modality)
        probs = self.probabilities(volume, mod)
        index = {cid: c for c, cid in enumerate(self.model.channel_ids)}
        channels = [0] + [index[o.id] for o in organ_list]
        chosen = probs[channels]
        arg = chosen.argmax(dim=0)
        ids = torch.tensor([0] + [o.id for o in organ_list], dtype=torch.uint8)
        labels = ids[arg].numpy().astype(np.uint8)
        if not keep_probabilities:
            return Prediction(labels, organ_list, mod, volume)
        kept = ProbabilityMaps(organ_list, volume.shape, probabilities_path)
        try:
            x, y, z = volume.shape
            step = max(1, NATIVE_BLOCK_VALUES // max(1, len(organ_list) * x * y))  # slices per write
            for start in range(0, z, step):
                block = axial_slices(chosen[1:, :, :, start : start + step]).transpose(0, 1)
                kept.put(range(start, min(start + step, z)), block)
        except BaseException:
            kept.close()
            raise
        return Prediction(labels, organ_list, mod, volume, kept)
