"""The 3-D DynUNet baseline (``model.model_type: dynunet``): MONAI's ``DynUNet`` with the published
baseline's preprocessing, saved and loaded like :class:`~tgated.models.tgated.TGatedModel`.

* Network: ``monai.networks.nets.DynUNet``; kernel sizes and strides follow from the patch size and
  the voxel spacing by the rule of MONAI's DynUNet / nnU-Net recipe (:func:`kernels_and_strides`).
  Output channels: background + the model's organs, in canonical-id order.
* Preprocessing (part of the saved config, as for T-Gated): intensities normalised as
  ``model.preprocess`` says (CT window, MR percentiles; :func:`tgated.data.slices.normalise_intensity`),
  MONAI ``Spacing`` to ``model.dynunet.spacing`` and ``CropForeground`` (:func:`preprocessing`); the
  predictor inverts both with MONAI's ``inverse`` so that outputs lie on the native grid.
* Saving: ``config.json`` (``model_type: dynunet``, the model config, the weights' SHA-256) +
  ``model.safetensors``; :meth:`DynUNetModel.from_pretrained` verifies the checksum. No pickle.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tgated.config import ConfigError, ModelConfig, from_dict, to_dict
from tgated.io.files import atomic_path, atomic_write_json, read_json, safe_join, sha256_file
from tgated.organs import Organ, parse_organs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def kernels_and_strides(
    patch_size: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[list[list[int]], list[list[int]]]:
    """DynUNet kernel sizes and strides for a patch and voxel spacing, by the rule of MONAI's DynUNet
    tutorial (after nnU-Net): at each level an axis is halved while it is at least 8 voxels and its
    spacing at most twice the finest; its kernel is 3 unless the axis is more than twice as coarse as
    the finest (then 1: an in-plane convolution). 96³ patches at 1.5 mm give five levels (96 → 6)."""
    sizes, spacings = list(patch_size), [float(s) for s in spacing]
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        ratios = [sp / min(spacings) for sp in spacings]
        stride = [2 if r <= 2 and s >= 8 else 1 for r, s in zip(ratios, sizes, strict=True)]
        if all(st == 1 for st in stride):
            break
        kernels.append([3 if r <= 2 else 1 for r in ratios])
        strides.append(stride)
        sizes = [s // st for s, st in zip(sizes, stride, strict=True)]
        spacings = [sp * st for sp, st in zip(spacings, stride, strict=True)]
    strides.insert(0, [1] * len(patch_size))
    kernels.append([3] * len(patch_size))
    return kernels, strides


def check_dynunet_config(cfg: ModelConfig) -> None:
    """Errors naming the key, the value and what is expected."""
    d = cfg.dynunet
    if any(s <= 0 for s in d.spacing):
        raise ValueError(f"model.dynunet.spacing={list(d.spacing)}: expected three positive sizes in mm")
    if any(p < 8 for p in d.patch_size):
        raise ValueError(
            f"model.dynunet.patch_size={list(d.patch_size)}: expected three sizes of at least 8 voxels"
        )
    _, strides = kernels_and_strides(d.patch_size, d.spacing)
    for axis, size in enumerate(d.patch_size):
        factor = 1
        for st in strides:
            factor *= st[axis]
        if size % factor:
            raise ValueError(
                f"model.dynunet.patch_size={list(d.patch_size)}: axis {axis} ({size}) is not divisible by its "
                f"total stride {factor}; use a multiple of {factor}"
            )
    if d.filters and len(d.filters) != len(strides):
        raise ValueError(
            f"model.dynunet.filters={d.filters}: expected {len(strides)} values (one per level for patch "
            f"{list(d.patch_size)} at {list(d.spacing)} mm), or [] for MONAI's default"
        )
    if d.deep_supervision and not 1 <= d.deep_supr_num <= len(strides) - 2:
        raise ValueError(
            f"model.dynunet.deep_supr_num={d.deep_supr_num}: expected 1..{len(strides) - 2} for {len(strides)} levels"
        )
    if not 0 <= d.sw_overlap < 1:
        raise ValueError(f"model.dynunet.sw_overlap={d.sw_overlap}: expected a number in [0, 1)")
    if d.sw_batch_size < 1:
        raise ValueError(f"model.dynunet.sw_batch_size={d.sw_batch_size}: expected an integer >= 1")


def preprocessing(cfg: ModelConfig) -> Any:
    """The invertible geometric preprocessing of one channel-first ``MetaTensor`` (already
    intensity-normalised): resample to ``spacing`` (bilinear), crop to the foreground (> 0)."""
    from monai.transforms import Compose, CropForeground, Spacing

    d = cfg.dynunet
    steps: list[Any] = [Spacing(pixdim=tuple(d.spacing), mode="bilinear", padding_mode="border")]
    if d.crop_foreground:
        steps.append(CropForeground(select_fn=lambda x: x > 0, margin=0, allow_smaller=True))
    return Compose(steps)


class DynUNetModel(nn.Module):
    """MONAI's DynUNet with the model config it was built from (``config``) and its organs."""

    def __init__(self, config: ModelConfig) -> None:
        from monai.networks.nets import DynUNet

        super().__init__()
        self.config = copy.deepcopy(config)
        if self.config.model_type != "dynunet":
            raise ValueError(f"model.model_type is {self.config.model_type!r}; DynUNetModel needs 'dynunet'")
        check_dynunet_config(self.config)
        d = self.config.dynunet
        self.organs: tuple[Organ, ...] = parse_organs(self.config.organs or None)
        kernels, strides = kernels_and_strides(d.patch_size, d.spacing)
        self.net = DynUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1 + len(self.organs),
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(d.filters) or None,
            norm_name=d.norm,
            deep_supervision=d.deep_supervision,
            deep_supr_num=d.deep_supr_num,
            res_block=d.res_block,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def channel_ids(self) -> list[int]:
        """Canonical organ id of each output channel (0 = background)."""
        return [0] + [o.id for o in self.organs]

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> DynUNetModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> logits (B, C, X, Y, Z); in training mode with deep supervision
        (B, 1 + deep_supr_num, C, X, Y, Z), the heads upsampled to full size (MONAI)."""
        return self.net(x)

    def parameter_counts(self) -> dict[str, Any]:
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    # ---------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically; config last)."""
        from safetensors.torch import save_model

        from tgated import __version__

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # DynUNet registers each block twice (its skip-layer tree and its lists): save_model stores
        # every shared tensor once
        with atomic_path(out / WEIGHTS_NAME, suffix=".safetensors") as tmp:
            save_model(self, str(tmp), metadata={"format": "pt", "model_type": "dynunet"})
        atomic_write_json(
            out / CONFIG_NAME,
            {
                "model_type": "dynunet",
                "format_version": FORMAT_VERSION,
                "tgated_version": __version__,
                "model": to_dict(self.config),
                "weights": WEIGHTS_NAME,
                "weights_sha256": sha256_file(out / WEIGHTS_NAME),
            },
        )
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> DynUNetModel:
        """Load a model written by :meth:`save_pretrained` (or a run folder holding ``model/``),
        verifying the weights' checksum; returned in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        root = Path(directory)
        if not (root / CONFIG_NAME).is_file() and (root / "model" / CONFIG_NAME).is_file():
            root = root / "model"
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} does not exist: {str(root)!r} is not a saved DynUNet model")
        meta = read_json(cfg_path)
        if not isinstance(meta, dict) or meta.get("model_type") != "dynunet":
            found = meta.get("model_type") if isinstance(meta, dict) else None
            raise ValueError(f"{cfg_path}: model_type is {found!r}; expected 'dynunet'")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path}: format_version {meta.get('format_version')} is newer than this tgated "
                f"understands ({FORMAT_VERSION}); upgrade tgated"
            )
        for key in ("model", "weights_sha256"):
            if key not in meta:
                raise ValueError(
                    f"{cfg_path}: missing key {key!r}; the file is incomplete — re-save the model"
                )
        try:
            model_cfg = from_dict(ModelConfig, meta["model"])
        except ConfigError as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
        weights = safe_join(
            root, str(meta.get("weights", WEIGHTS_NAME)), what="weights file", source=cfg_path
        )
        if not weights.is_file():
            raise ValueError(f"{weights} is missing; the saved model is incomplete — re-save it")
        digest = sha256_file(weights)
        if digest != meta["weights_sha256"]:
            raise ValueError(
                f"{weights}: SHA-256 {digest[:16]}… does not match the {meta['weights_sha256'][:16]}… recorded in "
                f"{cfg_path}: the file was truncated or modified after saving — restore it or re-save the model"
            )
        model = cls(model_cfg)
        try:
            missing, unexpected = load_model(model, str(weights), strict=False, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from None
        except RuntimeError as exc:
            raise ValueError(
                f"{weights}: tensors do not fit the model in {cfg_path} ({str(exc)[:300]})"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"{weights}: tensors do not match the model described by {cfg_path} "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return model.to(device).eval()


def saved_model_type(directory: str | os.PathLike) -> str | None:
    """``model_type`` recorded in a saved model's ``config.json`` (or a run's ``model/``), if readable."""
    root = Path(directory)
    for cand in (root / CONFIG_NAME, root / "model" / CONFIG_NAME):
        if cand.is_file():
            try:
                meta = json.loads(cand.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
                return None  # the loader reports it
            return meta.get("model_type") if isinstance(meta, dict) else None
    return None
