"""``tgated train`` for ``model.model_type: dynunet``: the 3-D DynUNet baseline (MONAI).

The run folder, resume rules, the epoch runner, checkpoints and DDP are those of T-Gated
(:class:`tgated.training.trainer.Trainer`, the base of both trainers); what differs is the data, the
network, the loss and the validation:

* Each training volume is read once, normalised (``model.preprocess``), resampled to
  ``model.dynunet.spacing`` and cropped to its foreground (:func:`tgated.models.dynunet.preprocessing`),
  padded to at least one patch (MONAI ``SpatialPad``); labels go to channel indices (background +
  ``model.organs``), and MONAI ``FgBgToIndices`` records the organ and background voxels once.
* An epoch draws ``train.dynunet.samples_per_volume`` patches from every volume in a shuffled order;
  each patch is MONAI ``RandCropByPosNegLabeld`` (organ vs background centre at ``pos_neg_ratio``),
  ``RandFlipd`` along each axis and ``RandRotate90d`` in the axial plane, with the transforms' random
  state set from ``(seed, train.seed, epoch, sample index)``: a patch does not depend on the process,
  the worker or on where a run was interrupted, so resume is exact and DDP computes one process's
  gradients (up to float rounding, which AdamW turns into steps of up to lr where a gradient is near
  zero: docs/architecture.md, several processes). ``model.dynunet.norm: batch`` under DDP needs CUDA
  (``SyncBatchNorm``).
* Loss: MONAI ``DiceCELoss`` (softmax, one-hot targets; ``train.dynunet.dice_background``) over the
  deep-supervision heads, weighted 1, 1/2, 1/4 ... (normalised) or by
  ``train.dynunet.deep_supervision_weights``; AdamW at ``train.dynunet.lr``; cosine warm restarts as for T-Gated
  (:func:`tgated.training.loop.scheduled_lr`: ``train.warm_restart_epochs``, ``schedule_step``,
  ``min_lr``, ``min_lr_ratio``), gradient clipping, AMP on CUDA.
* Validation: sliding-window inference of every validation volume by the predictor of ``tgated
  predict`` (:class:`tgated.inference.dynunet.DynUNetPredictor`) and 3-D Dice per organ; the best
  model goes to ``RUN/model/`` (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tgated.config import ExperimentConfig
from tgated.progress import progress
from tgated.training.augment import sample_rng
from tgated.training.distributed import DistContext
from tgated.training.loop import scheduled_lr
from tgated.training.runs import split_cases
from tgated.training.trainer import RankBatches, Trainer

logger = logging.getLogger(__name__)


def dice_ce_loss(cfg: ExperimentConfig) -> Any:
    """MONAI ``DiceCELoss`` on softmax outputs and label maps (one-hot inside), the Dice term with or
    without the background channel (``train.dynunet.dice_background``)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=cfg.train.dynunet.dice_background)


def deep_supervision_weights(cfg: ExperimentConfig) -> list[float]:
    """Loss weight of each output head: ``train.dynunet.deep_supervision_weights``, or 1, 1/2, 1/4 ...
    normalised to sum to 1; a wrong count or value is an error naming the key."""
    d = cfg.model.dynunet
    heads = 1 + (d.deep_supr_num if d.deep_supervision else 0)
    given = list(cfg.train.dynunet.deep_supervision_weights)
    if not given:
        w = np.array([0.5**i for i in range(heads)])
        return (w / w.sum()).tolist()
    if len(given) != heads or not all(math.isfinite(v) and v >= 0 for v in given) or sum(given) <= 0:
        raise ValueError(
            f"train.dynunet.deep_supervision_weights={given}: expected {heads} finite weights >= 0, not all 0 "
            f"(the full-resolution output and {heads - 1} deep-supervision head(s)), or [] for 1, 1/2, 1/4 ..."
        )
    return [float(v) for v in given]

LOG_COLUMNS: tuple[str, ...] = ("epoch", "step", "lr", "loss", "val_dice", "time_s")


def check_dynunet_train_config(cfg: ExperimentConfig) -> None:
    d = cfg.train.dynunet
    if not (math.isfinite(d.lr) and d.lr > 0):
        raise ValueError(f"train.dynunet.lr={d.lr!r}: expected a positive learning rate")
    if d.samples_per_volume < 1:
        raise ValueError(f"train.dynunet.samples_per_volume={d.samples_per_volume}: expected an integer >= 1")
    if not (math.isfinite(d.pos_neg_ratio) and d.pos_neg_ratio >= 0):
        raise ValueError(f"train.dynunet.pos_neg_ratio={d.pos_neg_ratio}: expected a number >= 0")
    for key in ("flip_prob", "rotate90_prob"):
        v = getattr(d, key)
        if not 0 <= v <= 1:
            raise ValueError(f"train.dynunet.{key}={v}: expected a probability in [0, 1]")
    deep_supervision_weights(cfg)


def init_seed(cfg: ExperimentConfig) -> int:
    """Seed of the network's initial weights (from ``seed`` and ``train.seed``)."""
    return int(np.random.SeedSequence([int(cfg.seed), int(cfg.train.seed)]).generate_state(1)[0])


def _channel_labels(label: np.ndarray, organ_ids: Sequence[int]) -> np.ndarray:
    """Canonical ids -> channel indices (0 background, i for the i-th model organ; others -> 0)."""
    lut = np.zeros(256, dtype=np.uint8)
    for c, oid in enumerate(organ_ids, start=1):
        lut[oid] = c
    return lut[label.astype(np.uint8)]


def load_patch_source(case: Any, model_cfg: Any, organ_ids: Sequence[int]) -> dict[str, Any]:
    """A training case preprocessed for patch sampling: ``image`` (1, X, Y, Z) float32 and ``label``
    (1, X, Y, Z) channel indices on the model's grid, and MONAI's ``fg`` / ``bg`` voxel indices."""
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, FgBgToIndices, Spacing, SpatialPad

    from tgated.data.datasets import load_case
    from tgated.data.slices import normalise_intensity
    from tgated.organs import ORGAN_BY_ID

    image, label = load_case(case)
    if label is None:
        raise ValueError(f"case {case.case_id}: has no label file; training cases need labels")
    unlabelled = [ORGAN_BY_ID[i].name for i in organ_ids if ORGAN_BY_ID[i].name not in case.labelled]
    if unlabelled:
        raise ValueError(
            f"case {case.case_id}: its dataset does not label {', '.join(unlabelled)}; the DynUNet learns every "
            "model organ against background (softmax), so an unlabelled organ would be taught as background — "
            "set model.organs to the organs the dataset labels"
        )
    modality = case.modality or image.modality or model_cfg.preprocess.modality
    norm = normalise_intensity(image.data, modality, model_cfg.preprocess)
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    img = MetaTensor(norm[None], affine=affine)
    lab = MetaTensor(torch.from_numpy(_channel_labels(label.data, organ_ids)[None]).float(), affine=affine)
    # the label follows the image through the same resampling (nearest) and foreground crop as the
    # predictor's preprocessing (tgated.models.dynunet.preprocessing)
    d = model_cfg.dynunet
    img_sp = Spacing(pixdim=tuple(d.spacing), mode="bilinear", padding_mode="border")(img)
    lab_sp = Spacing(pixdim=tuple(d.spacing), mode="nearest", padding_mode="border")(lab)
    if d.crop_foreground:
        crop = CropForeground(select_fn=lambda x: x > 0, margin=0, allow_smaller=True)
        box = crop.compute_bounding_box(img_sp)
        img_sp = crop.crop_pad(img_sp, *box)
        lab_sp = crop.crop_pad(lab_sp, *box)
    pad = SpatialPad(spatial_size=tuple(d.patch_size), mode="constant")
    img_t = pad(img_sp).as_tensor().float().contiguous()
    lab_t = pad(lab_sp).as_tensor().round().to(torch.uint8).contiguous()
    fg, bg = FgBgToIndices()(lab_t)
    return {
        "image": img_t,
        "label": lab_t,
        "fg": torch.as_tensor(fg),
        "bg": torch.as_tensor(bg),
        "case": case.case_id,
    }


def patch_transform(cfg: ExperimentConfig) -> Any:
    """The per-patch random transforms (MONAI): positive/negative crop, flips, axial 90° rotations."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d

    d, t = cfg.model.dynunet, cfg.train.dynunet
    keys = ["image", "label"]
    pos, neg = (1.0, 0.0) if math.isinf(t.pos_neg_ratio) else (t.pos_neg_ratio, 1.0)
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=tuple(d.patch_size),
                pos=pos,
                neg=neg,
                num_samples=1,
                fg_indices_key="fg",
                bg_indices_key="bg",
                allow_smaller=False,
            ),
            RandFlipd(keys=keys, prob=t.flip_prob, spatial_axis=0),
            RandFlipd(keys=keys, prob=t.flip_prob, spatial_axis=1),
            RandFlipd(keys=keys, prob=t.flip_prob, spatial_axis=2),
            RandRotate90d(keys=keys, prob=t.rotate90_prob, max_k=3, spatial_axes=(0, 1)),
        ]
    )


class _PatchBatches(RankBatches):
    """Item ``i`` = this rank's share of the epoch's ``i``-th batch of patches."""

    def __init__(
        self,
        order: np.ndarray,
        sources: Sequence[dict[str, Any]],
        cfg: ExperimentConfig,
        seed: Sequence[int],
        epoch: int,
        rank: int,
        world: int,
    ) -> None:
        super().__init__(order, cfg.train.batch_size, rank, world)
        self.sources, self.cfg = sources, cfg
        self.seed, self.epoch = list(seed), epoch
        self.transform = patch_transform(cfg)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        images, labels = [], []
        for sample, v in self.rows(i):
            src = self.sources[v]
            rng = sample_rng(self.seed, self.epoch, sample)
            self.transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
            out = self.transform(
                {"image": src["image"], "label": src["label"], "fg": src["fg"], "bg": src["bg"]}
            )
            out = out[0] if isinstance(out, list) else out
            images.append(torch.as_tensor(out["image"]).float())
            labels.append(torch.as_tensor(out["label"]).long())
        return {"image": torch.stack(images), "label": torch.stack(labels)}


class DynUNetTrainer(Trainer):
    """The DynUNet trainer: its patches, network, loss and validation; the run mechanics (run folder,
    epochs, checkpoints, resume, DDP) are :class:`~tgated.training.trainer.Trainer`'s."""

    def __init__(self, cfg: ExperimentConfig, run: Path, ctx: DistContext, resume: bool, quiet: bool) -> None:
        check_dynunet_train_config(cfg)
        if ctx.distributed and cfg.model.dynunet.norm == "batch" and ctx.device.type != "cuda":
            raise ValueError(
                f"model.dynunet.norm='batch' with {ctx.world_size} processes on the CPU: each process would "
                "normalise by the statistics of its share of the batch (torch's SyncBatchNorm needs CUDA), so "
                "the run would differ from one process's — use model.dynunet.norm=instance, one process, or CUDA"
            )
        super().__init__(cfg, run, ctx, resume, quiet)
        self.log_columns = list(LOG_COLUMNS)

    def setup(self) -> None:
        from tgated.models.dynunet import DynUNetModel

        cfg, t = self.cfg, self.t
        self.splits, cases = split_cases(cfg, self.run, self.ckpt_path is not None)
        train_cases = [cases[c] for c in self.splits["train"]]
        val_ids = self.splits.get("val", [])[: t.val_max_cases or None]
        self.val_cases = [cases[c] for c in val_ids]
        self.model = DynUNetModel.from_config(cfg.model, seed=init_seed(cfg))
        self.model.to(self.device)
        organ_ids = [o.id for o in self.model.organs]
        self.sources = [
            load_patch_source(c, cfg.model, organ_ids)
            for c in progress(train_cases, desc="loading training volumes", unit="case", quiet=self.quiet)
        ]
        if not any(len(s["fg"]) for s in self.sources):
            raise ValueError(
                f"{cfg.data.root}: the training cases hold no voxels of the model's organs "
                f"({', '.join(o.name for o in self.model.organs)}); check the labels and model.organs"
            )
        self.info(
            "%d training volumes on the %s mm grid (%.0f MB), %d validation cases",
            len(self.sources),
            "×".join(f"{s:g}" for s in cfg.model.dynunet.spacing),
            sum(s["image"].numel() * 5 for s in self.sources) / 1e6,
            len(self.val_cases),
        )
        self._write_run_files(self.splits)
        self._plan_batches(len(self.sources) * t.dynunet.samples_per_volume)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.dynunet.lr, weight_decay=t.weight_decay
        )
        self.base_lr = t.dynunet.lr
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = dice_ce_loss(cfg)
        self.head_weights = deep_supervision_weights(cfg)
        self._wrap_ddp()
        if self.ckpt_path is not None:
            self._load_checkpoint()

    # ------------------------------------------------------------------ training

    def _epoch_order(self) -> np.ndarray:
        per = self.t.dynunet.samples_per_volume
        rng = np.random.default_rng([*self.seed, self.epoch, 0xD7])
        order = np.repeat(np.arange(len(self.sources)), per)
        need = self.micro_per_epoch * self.t.batch_size
        reps = -(-need // len(order))
        return np.concatenate([rng.permutation(order) for _ in range(reps)])[:need]

    def _loss(self, out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if out.dim() == 6:  # (B, heads, C, X, Y, Z): deep supervision
            return sum(w * self.loss_fn(out[:, i], label) for i, w in enumerate(self.head_weights))
        return self.loss_fn(out, label)

    def _epoch_data(self) -> _PatchBatches:
        return _PatchBatches(
            self._epoch_order(),
            self.sources,
            self.cfg,
            self.seed,
            self.epoch,
            self.ctx.rank,
            self.ctx.world_size,
        )

    def _batch_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]:
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        with self._autocast():
            out = self.net(image)
        loss = self._loss(out.float(), label)
        return loss, int(image.shape[0]), (loss,)

    def _set_lr(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = scheduled_lr(
                self.base_lr, self.t, step=self.step, epoch=self.epoch, steps_per_epoch=self.steps_per_epoch
            )

    # ------------------------------------------------------------------ validation and logs

    def _val_predictor(self) -> Any:
        from tgated.inference.dynunet import DynUNetPredictor

        return DynUNetPredictor(self.model, device=self.device)

    def _end_epoch(self, started: float) -> None:
        val = self._validate_if_due()
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self._epoch_losses(),
            "val_dice": "" if val is None or val["mean_dice"] is None else val["mean_dice"],
            "time_s": round(time.perf_counter() - started, 3),
        }
        self.history.append(row)
        self.info(
            "epoch %d/%d: loss %.4f%s",
            self.epoch + 1,
            self.t.epochs,
            row["loss"],
            f", val mean Dice {row['val_dice']:.4f}" if row["val_dice"] != "" else "",
        )
        self._write_logs()
        self._next_epoch()
