"""``tgated train``: the training loop, the run folder and exact resume (docs/architecture.md).

This module holds the T-Gated trainer and :func:`train`; the mechanics it shares with the DynUNet
trainer (run folder, epoch runner, checkpoints, resume) are :class:`tgated.training.trainer.Trainer`.

What a run does
---------------
1. Resolve the config (file + ``--set`` overrides, or an :class:`~tgated.config.ExperimentConfig`),
   check it, and prepare the run folder ``RUN``: a fresh run needs an empty (or missing) folder;
   ``resume`` continues ``RUN/checkpoints/last.pt``.
2. Split the dataset (``RUN/splits.json`` on resume, else ``data.splits``, else the reference split
   :func:`tgated.data.datasets.default_split` with ``data.split_seed`` / ``data.split_sizes``).
3. Preprocess each training volume once into memory (:mod:`tgated.training.sampling`) and index its
   positive and negative (slice, organ) samples. With a frozen backbone and no augmentation the
   vision tokens of every slice are computed once (``train.cache_tokens``, below).
4. Each epoch draws its samples (:func:`~tgated.training.sampling.epoch_samples`), augments each
   with its own generator (:mod:`tgated.training.augment`), and optimises BCE + soft Dice + the gate
   regulariser with AdamW (groups ``adapter`` / ``decoder`` / ``backbone`` / ``text`` at
   ``lr_adapter`` / ``lr_decoder`` / ``lr_backbone`` / ``lr_text``), a cosine schedule with warm
   restarts (:func:`scheduled_lr`: moved per optimizer step or per epoch, down to ``min_lr`` /
   ``min_lr_ratio``), gradient clipping, gradient accumulation, and AMP on CUDA (bf16, or fp16 with a GradScaler).
5. Every ``val_every`` epochs (and after the last), each validation volume is segmented by the
   predictor of ``tgated predict`` (:class:`tgated.inference.predictor.Predictor`) and scored with
   3-D Dice per labelled organ (organs absent from both masks are skipped); mean Dice = mean over
   organs of the per-organ means over cases. The best model is saved to ``RUN/model/``.

Run folder: ``config.yaml`` (resolved), ``splits.json``, ``model/`` (best validation Dice; loadable
with ``TGatedModel.from_pretrained``), ``checkpoints/last.pt``, ``log.csv`` (one row per epoch),
``val.json`` (per-organ Dice of the best and the latest validation), ``tensorboard/`` (optional). All
writes are atomic and only rank 0 writes.

Resume
------
``resume=True`` continues from ``RUN/checkpoints/last.pt``: model, optimizer, GradScaler, epoch,
optimizer step, position in the epoch's sample order, running loss sums, validation history and every
rank's Python / NumPy / torch generator states. Sample order and augmentation depend only on
``(seed, train.seed, epoch, sample index)``, so an interrupted run continued on the same machine ends
with the same weights as an uninterrupted one. The given config must equal the run's
``config.yaml`` except for :data:`RESUMABLE_KEYS` (e.g. more ``train.epochs``); any other difference is
an error naming the keys. ``resume`` on a missing or empty folder starts a new run, and on a run
without a checkpoint starts it again from the beginning.

Token cache
-----------
With a frozen backbone the vision tokens of every distinct window image can be computed once
(``train.cache_tokens``; :mod:`tgated.training.token_cache`). ``auto`` caches only when no
augmentation is asked for, so the paper-protocol configs keep the augmenting, uncached path.

Distributed
-----------
``torchrun --nproc-per-node N -m tgated train ...`` runs the same code under DDP (gloo on CPU, NCCL
on CUDA). ``train.batch_size`` is the global batch: rank ``r`` takes samples
``[r·B/N, (r+1)·B/N)`` of each step's ``B`` (``B`` must be divisible by ``N``). Validation is sharded
over the ranks and gathered; rank 0 writes the files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tgated.config import (
    ExperimentConfig,
    TrainConfig,
    apply_overrides,
    check_model_config,
    load_config,
    shorten,
)
from tgated.io.files import (
    check_inputs_spared,
)
from tgated.organs import Organ
from tgated.progress import progress
from tgated.training.augment import (
    Transform,
    apply_transform,
    draw_transform,
    sample_rng,
    target_organ,
)
from tgated.training.distributed import DistContext, init_distributed
from tgated.training.losses import segmentation_loss
from tgated.training.runs import (
    RESUMABLE_KEYS,
    config_differences,
    prepare_run,
    resolve_precision,
    split_cases,
)
from tgated.training.sampling import (
    SampleIndex,
    TrainVolume,
    build_sample_index,
    epoch_samples,
    epoch_size,
    load_train_volume,
    resolve_organ_weights,
)
from tgated.training.token_cache import TokenCache, build_token_cache, window_images
from tgated.training.trainer import RankBatches, Trainer, TrainResult

if TYPE_CHECKING:
    from tgated.models.tgated import WindowPlan

logger = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("adapter", "decoder", "backbone", "conditioning", "text")
LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "step",
    *(f"lr_{g}" for g in GROUPS),
    "loss",
    "loss_bce",
    "loss_dice",
    "loss_gate",
    "val_dice",
    "val_dice_centre_only",
    "time_s",
)
"""``log.csv``'s columns; models with adapters add ``gate_open_l<layer>`` and
``temporal_share_l<layer>`` per adapted layer (see :meth:`TGatedModel.pop_adapter_stats`)."""
VAL_BATCH_SIZE = 16


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def resolve_config(
    config: str | os.PathLike | ExperimentConfig, overrides: Sequence[str] | None = None
) -> ExperimentConfig:
    """A config file path (+ overrides) or a config object (+ overrides) → a checked copy."""
    if isinstance(config, ExperimentConfig):
        cfg = apply_overrides(copy.deepcopy(config), list(overrides or []))
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config, list(overrides or []))
    else:
        raise ValueError(
            f"config: expected a YAML file path or an ExperimentConfig, got {type(config).__name__}"
        )
    try:
        check_config(cfg)
    except ValueError as exc:
        if isinstance(config, ExperimentConfig):
            raise
        raise ValueError(f"{config}: {exc}") from None
    return cfg


def _need(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={shorten(value)}: expected {expected}")


def check_config(cfg: ExperimentConfig) -> None:
    """Check the training-related values of ``cfg``; errors name the key, the value and the fix."""
    t = cfg.train
    _need(
        cfg.model.model_type in ("tgated", "dynunet"),
        "model.model_type",
        cfg.model.model_type,
        "'tgated' (T-Gated / CLIPSeg) or 'dynunet' (the 3-D baseline, tgated.training.dynunet)",
    )
    _need(
        bool(cfg.data.root),
        "data.root",
        cfg.data.root,
        "a dataset folder (set it in the config or with --set data.root=PATH)",
    )
    check_model_config(cfg.model)
    sizes = cfg.data.split_sizes
    _need(
        min(sizes) >= 0 and sizes[0] >= 1,
        "data.split_sizes",
        list(sizes),
        "case counts [train, val, test] >= 0 with at least one training case, e.g. [30, 10, 10]",
    )
    _need(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _need(
        t.steps_per_epoch >= 0, "train.steps_per_epoch", t.steps_per_epoch, "an integer >= 0 (0 = one pass)"
    )
    _need(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer >= 1")
    for key in (
        "lr_adapter",
        "lr_decoder",
        "lr_backbone",
        "lr_conditioning",
        "lr_text",
        "weight_decay",
        "grad_clip",
        "cache_max_gb",
    ):
        v = getattr(t, key)
        _need(math.isfinite(v) and v >= 0, f"train.{key}", v, "a finite number >= 0")
    _need(t.cache_max_gb > 0, "train.cache_max_gb", t.cache_max_gb, "a positive number of GB")
    _need(t.warm_restart_epochs >= 1, "train.warm_restart_epochs", t.warm_restart_epochs, "an integer >= 1")
    _need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "a number in [0, 1]")
    _need(math.isfinite(t.min_lr) and t.min_lr >= 0, "train.min_lr", t.min_lr, "a finite learning rate >= 0")
    check_min_lr(t, _rates_in_use(cfg))
    _need(0 <= t.negative_fraction < 1, "train.negative_fraction", t.negative_fraction, "a number in [0, 1)")
    _need(0 <= t.flip_lr <= 1, "train.flip_lr", t.flip_lr, "a probability in [0, 1]")
    _need(0 <= t.rotate_deg <= 180, "train.rotate_deg", t.rotate_deg, "degrees in [0, 180]")
    _need(0 <= t.scale < 1, "train.scale", t.scale, "a number in [0, 1)")
    _need(0 <= t.intensity < 1, "train.intensity", t.intensity, "a number in [0, 1)")
    _need(
        t.dice_weight >= 0 and t.bce_weight >= 0 and t.dice_weight + t.bce_weight > 0,
        "train.dice_weight / train.bce_weight",
        (t.dice_weight, t.bce_weight),
        "weights >= 0, not both 0",
    )
    _need(
        math.isfinite(t.bce_pos_weight) and t.bce_pos_weight > 0,
        "train.bce_pos_weight",
        t.bce_pos_weight,
        "a weight > 0 (1 = plain BCE)",
    )
    _need(
        math.isfinite(t.dice_smooth) and t.dice_smooth > 0,
        "train.dice_smooth",
        t.dice_smooth,
        "a positive smoothing constant (1 = ours, 1e-5 = MONAI's)",
    )
    _need(t.val_every >= 1, "train.val_every", t.val_every, "an integer >= 1")
    _need(t.val_max_cases >= 0, "train.val_max_cases", t.val_max_cases, "an integer >= 0 (0 = all)")
    _need(
        t.num_workers == "auto" or t.num_workers >= 0,
        "train.num_workers",
        t.num_workers,
        "an integer >= 0 or auto",
    )
    _need(
        t.checkpoint_every >= 0,
        "train.checkpoint_every",
        t.checkpoint_every,
        "an integer >= 0 (0 = epoch ends only)",
    )
    _need(t.max_steps >= 0, "train.max_steps", t.max_steps, "an integer >= 0 (0 = no limit)")
    _need(t.seed >= 0, "train.seed", t.seed, "an integer >= 0")
    _need(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    resolve_organ_weights(t.organ_weights)
    if t.cache_tokens in ("memory", "disk") and cfg.model.train_backbone:
        raise ValueError(
            f"train.cache_tokens={t.cache_tokens!r} with model.train_backbone: true: the vision tokens change "
            "as the backbone trains, so they cannot be cached; use cache_tokens: off (or auto)"
        )


def cosine_restart_factor(step: int, cycle_steps: int, min_ratio: float) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based) under cosine annealing with warm
    restarts every ``cycle_steps`` steps: 1 at each cycle's start, down to ``min_ratio``."""
    t = (step % cycle_steps) / cycle_steps
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def scheduled_lr(base: float, t: TrainConfig, *, step: int, epoch: int, steps_per_epoch: int) -> float:
    """Learning rate of a group whose rate is ``base`` for optimizer step ``step`` (0-based, counted
    over the run) taken in epoch ``epoch`` (0-based): cosine annealing with warm restarts every
    ``train.warm_restart_epochs`` epochs, moved per step or per epoch (``train.schedule_step``), from
    ``base`` down to ``min_lr + min_lr_ratio · (base − min_lr)``. With ``schedule_step: epoch`` and
    ``min_lr_ratio: 0`` this is PyTorch's ``CosineAnnealingWarmRestarts(T_0=warm_restart_epochs,
    eta_min=min_lr)`` stepped at every epoch end."""
    if t.schedule_step == "epoch":
        factor = cosine_restart_factor(epoch, t.warm_restart_epochs, t.min_lr_ratio)
    else:
        factor = cosine_restart_factor(step, t.warm_restart_epochs * steps_per_epoch, t.min_lr_ratio)
    return t.min_lr + (base - t.min_lr) * factor


def _rates_in_use(cfg: ExperimentConfig) -> dict[str, float]:
    """The learning rates the config's trainable parts use: config key → rate."""
    t, m = cfg.train, cfg.model
    if m.model_type == "dynunet":
        return {"train.dynunet.lr": t.dynunet.lr}
    rates = {"train.lr_decoder": t.lr_decoder}
    if m.adapter != "none":
        rates["train.lr_adapter"] = t.lr_adapter
    if m.train_backbone:
        rates["train.lr_backbone"] = t.lr_backbone
    if m.train_text:
        rates["train.lr_text"] = t.lr_text
    if m.conditioning == "learned" or (m.conditioning == "auto" and m.backbone.source == "random"):
        rates["train.lr_conditioning"] = t.lr_conditioning
    return rates


def check_min_lr(t: TrainConfig, rates: dict[str, float]) -> None:
    """``train.min_lr`` may not exceed the rate of a group in use (``rates``: config key → rate):
    the schedule would raise that group's rate above what the config gives it."""
    for key, rate in rates.items():
        _need(
            t.min_lr <= rate,
            "train.min_lr",
            t.min_lr,
            f"at most every learning rate in use, but {key}={rate:g} is lower (lower min_lr, or raise {key})",
        )


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class _EpochBatches(RankBatches):
    """Item ``i`` = this rank's share of the epoch's ``i``-th forward batch (windows or tokens,
    binary masks of the centre slices, organ ids)."""

    def __init__(
        self,
        order: np.ndarray,
        volumes: Sequence[TrainVolume],
        plans: Sequence[WindowPlan],
        tokens: Sequence[Any] | None,
        train_cfg: Any,
        seed: Sequence[int],
        epoch: int,
        batch_size: int,
        rank: int,
        world: int,
    ) -> None:
        super().__init__(order, batch_size, rank, world)
        self.volumes = volumes
        self.plans = plans
        self.tokens = tokens
        self.cfg = train_cfg
        self.seed = list(seed)
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        inputs, masks, organs = [], [], []
        for sample, (v, z, organ, _neg) in self.rows(i):
            vol, plan = self.volumes[v], self.plans[v]
            rng = sample_rng(self.seed, self.epoch, sample)
            t = draw_transform(self.cfg, rng) if self.tokens is None else Transform()
            label_id, flip = target_organ(organ, t.flip, vol.labelled, self.cfg.flip_lateral)
            t = dataclasses.replace(t, flip=flip)
            mask = vol.labels[z] == label_id
            if self.tokens is None:
                window, m = apply_transform(window_images(vol.slices, plan, plan.index[z]), mask, t)
            else:
                store = self.tokens[v]
                if isinstance(store, torch.Tensor):
                    window = store[plan.index[z]]
                else:  # memory-mapped .npy (cache_tokens: disk)
                    window = torch.from_numpy(np.ascontiguousarray(store[plan.index[z].numpy()]))
                m = mask.float()
            inputs.append(window)
            masks.append(m)
            organs.append(organ)
        return {
            "inputs": torch.stack(inputs),
            "masks": torch.stack(masks),
            "organs": torch.tensor(organs, dtype=torch.long),
        }


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


class _Trainer(Trainer):
    """The T-Gated trainer: its data, model, optimizer groups, loss, validation and log row; the run
    mechanics are :class:`~tgated.training.trainer.Trainer`'s."""

    loss_names = ("loss", "loss_bce", "loss_dice", "loss_gate")

    def __init__(self, cfg: ExperimentConfig, run: Path, ctx: DistContext, resume: bool, quiet: bool) -> None:
        super().__init__(cfg, run, ctx, resume, quiet)
        self._tb: Any = None
        self._cache: TokenCache | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Data and model, the run folder, the schedule, the token cache, the optimizer, the state."""
        self._setup_data()
        self._setup_schedule()
        self._setup_optimizer()
        self._setup_state()

    def _setup_data(self) -> None:
        """Split, model, training volumes and their sample index, the run folder, window plans."""
        from tgated.models.tgated import TGatedModel

        cfg, t = self.cfg, self.t
        resuming = self.ckpt_path is not None
        self.splits, cases = split_cases(cfg, self.run, resuming)
        self.train_cases = [cases[c] for c in self.splits["train"]]
        val_ids = self.splits.get("val", [])
        if t.val_max_cases:
            val_ids = val_ids[: t.val_max_cases]
        self.val_cases = [cases[c] for c in val_ids]

        self.model = TGatedModel.from_config(cfg.model).to(self.device)
        self.model.track_adapter_stats(True)
        self.log_columns = list(LOG_COLUMNS)
        for layer in self.model.adapted_layers:
            self.log_columns[-1:-1] = [f"gate_open_l{layer}", f"temporal_share_l{layer}"]
        self.model_organs: tuple[Organ, ...] = tuple(self.model.organs)
        organ_ids = [o.id for o in self.model_organs]

        self.volumes = [
            load_train_volume(c, cfg.model.preprocess)
            for c in progress(self.train_cases, desc="loading training volumes", unit="case", quiet=self.quiet)
        ]
        mb = sum(v.nbytes for v in self.volumes) / 1e6
        self.info(
            "%d training volumes in memory (%.0f MB), %d validation cases",
            len(self.volumes),
            mb,
            len(self.val_cases),
        )
        self.index: SampleIndex = build_sample_index(self.volumes, organ_ids, t.organ_weights, t.negatives)
        if not len(self.index.pos):
            raise ValueError(
                f"{cfg.data.root}: the training cases hold no voxels of the model's organs "
                f"({', '.join(o.name for o in self.model_organs)}); check the labels and model.organs"
            )
        self.info(
            "samples: %d positive, %d negative (slice, organ) pairs (negatives: %s)",
            len(self.index.pos),
            len(self.index.neg),
            t.negatives,
        )
        if t.negative_fraction > 0 and not len(self.index.neg):
            logger.warning(
                "train.negative_fraction=%g but no %s negatives exist in the training volumes: no negatives "
                "are drawn",
                t.negative_fraction,
                t.negatives,
            )
        self._write_run_files(self.splits)  # the data is usable: now the run folder is created
        self.plans = [self.model.plan(v.num_slices, v.positions_mm) for v in self.volumes]

    def _setup_schedule(self) -> None:
        """Batches per epoch, optimizer steps, the warm-restart cycle; the token cache."""
        cfg, t = self.cfg, self.t
        self._plan_batches(epoch_size(self.index, t.negative_fraction))

        self._cache = build_token_cache(
            self.model,
            self.volumes,
            self.plans,
            t,
            train_backbone=cfg.model.train_backbone,
            amp_dtype=self.amp_dtype,
            device=self.device,
            run=self.run,
            rank=self.ctx.rank,
            quiet=self.quiet,
            info=self.info,
        )
        self.tokens = self._cache.tokens if self._cache is not None else None

    def _setup_optimizer(self) -> None:
        """AdamW with one learning-rate group per part, the GradScaler, DDP."""
        t = self.t
        groups = self.model.param_groups()
        lrs = {
            "adapter": t.lr_adapter,
            "decoder": t.lr_decoder,
            "backbone": t.lr_backbone,
            "conditioning": t.lr_conditioning,
            "text": t.lr_text,
        }
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps],
            lr=t.lr_decoder,
            weight_decay=t.weight_decay,
        )
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._wrap_ddp()

    def _setup_state(self) -> None:
        """A fresh start (seeded) or the checkpoint's state; TensorBoard."""
        t = self.t
        if self.ckpt_path is not None:
            self._load_checkpoint()
        else:
            torch.manual_seed(
                int(np.random.SeedSequence([*self.seed, self.ctx.rank, 0x7C]).generate_state(1)[0])
            )
        if t.tensorboard and self.ctx.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError(
                    "train.tensorboard: true needs the tensorboard package: pip install 'tgated[tensorboard]' "
                    "(or set train.tensorboard: false)"
                ) from None
            self._tb = SummaryWriter(str(self.run / "tensorboard"))

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        state["adapter_stats"] = self.ctx.all_gather({k: a.stats_state() for k, a in self.model.adapters.items()})
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        stats = state.get("adapter_stats") or []
        if stats:
            mine = stats[self.ctx.rank] if len(stats) == self.ctx.world_size else stats[0]
            for key, values in mine.items():
                self.model.adapters[key].load_stats_state(values)

    # ------------------------------------------------------------------ training

    def _set_lr(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = scheduled_lr(
                base, self.t, step=self.step, epoch=self.epoch, steps_per_epoch=self.steps_per_epoch
            )

    def _lrs(self) -> dict[str, Any]:
        lrs: dict[str, Any] = {f"lr_{g}": "" for g in GROUPS}
        for g in self.optimizer.param_groups:
            lrs[f"lr_{g['name']}"] = g["lr"]
        return lrs

    def _epoch_data(self) -> _EpochBatches:
        t = self.t
        order = epoch_samples(self.index, self.samples_per_epoch, t.negative_fraction, self.seed, self.epoch)
        return _EpochBatches(
            order,
            self.volumes,
            self.plans,
            self.tokens,
            t,
            self.seed,
            self.epoch,
            t.batch_size,
            self.ctx.rank,
            self.ctx.world_size,
        )

    def _batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]:
        """BCE + soft Dice of the centre slices' masks + the gate regulariser."""
        t = self.t
        inputs = batch["inputs"].to(self.device, non_blocking=True)
        masks = batch["masks"].to(self.device, non_blocking=True)
        organs = batch["organs"].to(self.device)
        with self._autocast():
            if self.tokens is None:
                logits = self.net(pixel_windows=inputs, organs=organs)
            else:
                logits = self.net(token_windows=inputs, organs=organs)
        parts = segmentation_loss(
            logits,
            masks,
            bce_weight=t.bce_weight,
            dice_weight=t.dice_weight,
            pos_weight=t.bce_pos_weight,
            dice_smooth=t.dice_smooth,
        )
        gate = self.model.gate_regularization().float()
        loss = parts.total + gate
        return loss, int(masks.shape[0]), (loss, parts.bce, parts.dice, gate)

    # ------------------------------------------------------------------ validation

    def _val_predictor(self) -> Any:
        from tgated.inference.predictor import Predictor

        return Predictor(self.model, device=self.device, batch_size=VAL_BATCH_SIZE, quiet=True)

    def _val_variants(self) -> tuple[str, ...]:
        """With context (K > 1) and ``val_context_ablation`` also the pass with every window's
        neighbours replaced by its centre slice (``centre``: ``mean_dice_centre_only``)."""
        if self.model.context > 1 and self.t.val_context_ablation:
            return ("real", "centre")
        return ("real",)

    def _after_validation(self) -> None:
        self.model.pop_adapter_stats()  # validation passes are not training statistics
        super()._after_validation()

    # ------------------------------------------------------------------ epoch end

    def _end_epoch(self, started: float) -> None:
        t = self.t
        stats: dict[str, float] = {}  # the adapters' statistics over this epoch's training batches
        for layer, values in self.model.pop_adapter_stats().items():
            for key, value in values.items():
                stats[f"{key}_l{layer}"] = value
        if stats and self.ctx.distributed:  # mean over the processes
            keys = sorted(stats)
            total = self.ctx.all_reduce_sum([stats[k] for k in keys])
            stats = {k: v / self.ctx.world_size for k, v in zip(keys, total, strict=True)}
        val = self._validate_if_due()
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            **self._lrs(),
            **self._epoch_losses(),
            "val_dice": "" if val is None or val["mean_dice"] is None else val["mean_dice"],
            "val_dice_centre_only": ""
            if val is None or val.get("mean_dice_centre_only") is None
            else val["mean_dice_centre_only"],
            **{k: round(v, 6) for k, v in stats.items()},
            "time_s": round(time.perf_counter() - started, 3),
        }
        self.history.append(row)
        extra = f", val mean Dice {row['val_dice']:.4f}" if row["val_dice"] != "" else ""
        if row["val_dice_centre_only"] != "":
            extra += f" ({row['val_dice_centre_only']:.4f} with the neighbours replaced by the centre slice)"
        for layer in self.model.adapted_layers:
            if f"gate_open_l{layer}" in row:
                extra += (
                    f"; layer {layer}: gate {row[f'gate_open_l{layer}']:.3f}, "
                    f"temporal share {row[f'temporal_share_l{layer}']:.3f}"
                )
        self.info(
            "epoch %d/%d: loss %.4f (bce %.4f, dice %.4f)%s",
            self.epoch + 1,
            t.epochs,
            row["loss"],
            row["loss_bce"],
            row["loss_dice"],
            extra,
        )
        self._write_logs()
        if self.ctx.is_main and self._tb is not None:
            for key in (*self.loss_names, *(f"lr_{g}" for g in GROUPS), *stats):
                if row[key] != "":
                    self._tb.add_scalar(f"train/{key}", row[key], self.step)
            for key in ("val_dice", "val_dice_centre_only"):
                if row[key] != "":
                    self._tb.add_scalar(f"val/{key}", row[key], self.step)
            self._tb.flush()
        self._next_epoch()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._cache is not None:
            self.tokens = None
            self._cache.close()


def stage1_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config that makes ``cfg.model.init_from``: ``cfg`` with ``pretrain.overrides`` applied,
    and neither an ``init_from`` nor a pretrain stage of its own."""
    base = copy.deepcopy(cfg)
    base.model.init_from = ""
    base.pretrain.overrides = []
    stage1 = apply_overrides(base, list(cfg.pretrain.overrides))
    if stage1.model.init_from or stage1.pretrain.overrides:
        raise ValueError(
            "pretrain.overrides may not set model.init_from or pretrain.*: the stage-1 model starts from "
            "model.backbone"
        )
    return stage1


def ensure_init_model(cfg: ExperimentConfig, quiet: bool) -> None:
    """Train the stage-1 model named by ``model.init_from`` when it is missing (``pretrain``)."""
    run = Path(cfg.model.init_from)
    if cfg.pretrain.overrides:
        stage1 = stage1_config(cfg)
        log = run / "log.csv"
        done = log.is_file() and (run / "model" / "config.json").is_file() and (
            len(log.read_text(encoding="utf-8").strip().splitlines()) - 1 >= stage1.train.epochs
        )
        if not done:
            logger.info("model.init_from=%s does not exist yet: training it (pretrain.overrides)", run)
            train(stage1, run, resume=True, quiet=quiet)
    elif not ((run / "config.json").is_file() or (run / "model" / "config.json").is_file()):
        raise ValueError(
            f"model.init_from={cfg.model.init_from!r}: no saved model there (expected a model folder with "
            "config.json, or a run folder with model/); train it first, or give pretrain.overrides so that "
            "tgated train makes it"
        )


def train(
    config: str | os.PathLike | ExperimentConfig,
    out: str | os.PathLike,
    overrides: Sequence[str] | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Train a model into the run folder ``out`` (see the module docstring for what is written).

    ``config``: a YAML file or an :class:`~tgated.config.ExperimentConfig` (not modified);
    ``overrides``: ``key=value`` strings applied on top (``train.epochs=5``); ``resume``: continue
    ``out/checkpoints/last.pt`` (a missing or empty ``out`` starts a new run); ``quiet``: no progress
    bars. Returns a :class:`TrainResult` (``result.run_dir`` is the run folder). Under ``torchrun``
    every process calls this; rank 0 writes the files.
    """
    cfg = resolve_config(config, overrides)
    data_inputs = [(f"data.{k}", getattr(cfg.data, k)) for k in ("root", "labels") if getattr(cfg.data, k)]
    check_inputs_spared(("--out", out), data_inputs, not_containing=data_inputs)
    if cfg.model.init_from:
        ensure_init_model(cfg, quiet)
    ctx = init_distributed(cfg.train.device)
    trainer = None
    try:
        with warnings.catch_warnings():
            # DDP notes that the decoder's transposed-convolution gradient has other (equivalent)
            # strides than its bucket; harmless, and every process would print it
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            if cfg.model.model_type == "dynunet":
                from tgated.training.dynunet import DynUNetTrainer

                trainer = DynUNetTrainer(cfg, Path(out), ctx, resume=resume, quiet=quiet)
            else:
                trainer = _Trainer(cfg, Path(out), ctx, resume=resume, quiet=quiet)
            return trainer.run_all()
    finally:
        if trainer is not None:
            trainer.close()
        ctx.close()


__all__ = [
    "GROUPS",
    "RESUMABLE_KEYS",
    "TrainResult",
    "check_config",
    "check_min_lr",
    "config_differences",
    "cosine_restart_factor",
    "ensure_init_model",
    "prepare_run",
    "resolve_config",
    "resolve_precision",
    "scheduled_lr",
    "train",
]
