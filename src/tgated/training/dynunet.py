"""``tgated train`` for ``model.model_type: dynunet``: the 3-D DynUNet baseline (MONAI).

The run folder, resume rules, checkpoints, DDP and validation are those of T-Gated
(:mod:`tgated.training.loop`, :mod:`tgated.training.checkpoint`, :mod:`tgated.training.distributed`);
what differs is the data and the network:

* Each training volume is read once, normalised (``model.preprocess``), resampled to
  ``model.dynunet.spacing`` and cropped to its foreground (:func:`tgated.models.dynunet.preprocessing`),
  padded to at least one patch (MONAI ``SpatialPad``); labels go to channel indices (background +
  ``model.organs``), and MONAI ``FgBgToIndices`` records the organ and background voxels once.
* An epoch draws ``train.dynunet.samples_per_volume`` patches from every volume in a shuffled order;
  each patch is MONAI ``RandCropByPosNegLabeld`` (organ vs background centre at ``pos_neg_ratio``),
  ``RandFlipd`` along each axis and ``RandRotate90d`` in the axial plane, with the transforms' random
  state set from ``(seed, train.seed, epoch, sample index)``: a patch does not depend on the process,
  the worker or on where a run was interrupted, so resume is exact and DDP matches one process.
* Loss: MONAI ``DiceCELoss`` (softmax, one-hot targets) over the deep-supervision heads, weighted 1, 1/2,
  1/4 ... (normalised); AdamW at ``train.dynunet.lr``; cosine warm restarts as for T-Gated
  (:func:`tgated.training.loop.scheduled_lr`: ``train.warm_restart_epochs``, ``schedule_step``,
  ``min_lr``, ``min_lr_ratio``), gradient clipping, AMP on CUDA.
* Validation: sliding-window inference of every validation volume by the predictor of ``tgated
  predict`` (:class:`tgated.inference.dynunet.DynUNetPredictor`) and 3-D Dice per organ; the best
  model goes to ``RUN/model/`` (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tgated.config import ExperimentConfig, dump_yaml
from tgated.io.files import atomic_write_json, atomic_write_text, remove_stale_temporaries, replace_dir
from tgated.progress import progress
from tgated.training.augment import sample_rng
from tgated.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from tgated.training.distributed import DistContext
from tgated.training.loop import (
    TrainResult,
    _splits,
    check_min_lr,
    prepare_run,
    resolve_precision,
    scheduled_lr,
)

logger = logging.getLogger(__name__)

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


class _PatchBatches(Dataset):
    """Item ``i`` = this rank's share of the epoch's ``i``-th batch of patches."""

    def __init__(
        self,
        order: np.ndarray,
        sources: Sequence[dict[str, Any]],
        cfg: ExperimentConfig,
        seed,
        epoch,
        rank,
        world,
    ):
        self.order, self.sources, self.cfg = order, sources, cfg
        self.seed, self.epoch = list(seed), epoch
        self.batch = cfg.train.batch_size
        self.local = self.batch // world
        self.rank = rank
        self.transform = patch_transform(cfg)

    def __len__(self) -> int:
        return len(self.order) // self.batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.batch + self.rank * self.local
        images, labels = [], []
        for j, v in enumerate(self.order[start : start + self.local].tolist()):
            src = self.sources[v]
            rng = sample_rng(self.seed, self.epoch, start + j)
            self.transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
            out = self.transform(
                {"image": src["image"], "label": src["label"], "fg": src["fg"], "bg": src["bg"]}
            )
            out = out[0] if isinstance(out, list) else out
            images.append(torch.as_tensor(out["image"]).float())
            labels.append(torch.as_tensor(out["label"]).long())
        return {"image": torch.stack(images), "label": torch.stack(labels)}


class DynUNetTrainer:
    """The DynUNet counterpart of :class:`tgated.training.loop._Trainer` (same run folder and resume)."""

    def __init__(self, cfg: ExperimentConfig, run: Path, ctx: DistContext, resume: bool, quiet: bool) -> None:
        check_dynunet_train_config(cfg)
        self.cfg, self.t, self.run, self.ctx = cfg, cfg.train, run, ctx
        self.quiet = quiet or not ctx.is_main
        self.seed = [int(cfg.seed), int(cfg.train.seed)]
        self.device = ctx.device
        self.amp_dtype = resolve_precision(self.t.precision, self.device)
        if self.t.batch_size % ctx.world_size:
            raise ValueError(
                f"train.batch_size={self.t.batch_size} is not divisible by the {ctx.world_size} processes; "
                f"it is the global batch (each process takes batch_size / {ctx.world_size}) — use a multiple"
            )
        self.ckpt_path = prepare_run(cfg, run, resume)
        ctx.barrier()
        self.history: list[dict[str, Any]] = []
        self.val_best: dict[str, Any] | None = None
        self.val_latest: dict[str, Any] | None = None

    def info(self, msg: str, *args: Any) -> None:
        logger.log(logging.INFO if self.ctx.is_main else logging.DEBUG, msg, *args)

    def setup(self) -> None:
        from monai.losses import DiceCELoss

        from tgated.data.datasets import write_splits
        from tgated.models.dynunet import DynUNetModel

        cfg, t = self.cfg, self.t
        self.splits, cases = _splits(cfg, self.run, self.ckpt_path is not None)
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
        if self.ctx.is_main:
            remove_stale_temporaries(
                self.run, ["config.yaml", "splits.json", "log.csv", "val.json", "model", "model.old"]
            )
            remove_stale_temporaries(self.run / "checkpoints", ["last.pt"])
            self.run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run / "config.yaml", dump_yaml(cfg))
            write_splits(self.run / "splits.json", self.splits)
        b, a = t.batch_size, t.grad_accum
        per_epoch = len(self.sources) * t.dynunet.samples_per_volume
        self.micro_per_epoch = (
            t.steps_per_epoch * a if t.steps_per_epoch else max(a, (per_epoch // b) // a * a)
        )
        self.steps_per_epoch = self.micro_per_epoch // a
        self.info(
            "%d epochs × %d optimizer steps (batch %d × accumulation %d, %d processes)",
            t.epochs,
            self.steps_per_epoch,
            b,
            a,
            self.ctx.world_size,
        )
        check_min_lr(t, {"train.dynunet.lr": t.dynunet.lr})
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.dynunet.lr, weight_decay=t.weight_decay
        )
        self.base_lr = t.dynunet.lr
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        heads = 1 + (cfg.model.dynunet.deep_supr_num if cfg.model.dynunet.deep_supervision else 0)
        w = np.array([0.5**i for i in range(heads)])
        self.head_weights = (w / w.sum()).tolist()
        self.net: Any = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.epoch, self.pos, self.step = 0, 0, 0
        self.loss_sums = [0.0, 0.0]  # loss × samples, samples
        self.best_dice: float | None = None
        self.best_epoch: int | None = None
        if self.ckpt_path is not None:
            self._restore(load_checkpoint(self.ckpt_path))

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "pos": self.pos,
            "step": self.step,
            "micro_per_epoch": self.micro_per_epoch,
            "world_size": self.ctx.world_size,
            "loss_sums": self.ctx.all_reduce_sum(self.loss_sums),
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "val_best": self.val_best,
            "val_latest": self.val_latest,
            "rng": self.ctx.all_gather(rng_state()),
        }

    def _checkpoint(self) -> None:
        state = self._state()
        if self.ctx.is_main:
            save_checkpoint(self.run / "checkpoints" / "last.pt", state)
        self.ctx.barrier()

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("micro_per_epoch") != self.micro_per_epoch:
            raise ValueError(
                f"{self.ckpt_path}: the checkpoint was taken with {state.get('micro_per_epoch')} batches per epoch, "
                f"this data gives {self.micro_per_epoch}: the training data changed since — restore it or start a new run"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.pos, self.step = int(state["epoch"]), int(state["pos"]), int(state["step"])
        sums = [float(x) for x in state["loss_sums"]]
        self.loss_sums = [s / self.ctx.world_size for s in sums]  # all-reduced again at the epoch's end
        self.best_dice, self.best_epoch = state["best_dice"], state["best_epoch"]
        self.history = list(state["history"])
        self.val_best, self.val_latest = state["val_best"], state["val_latest"]
        rngs = state["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])
        self.info("resumed %s at epoch %d, step %d", self.ckpt_path, self.epoch + 1, self.step)

    # ------------------------------------------------------------------ training

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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

    def _train_epoch(self) -> bool:
        t = self.t
        data = _PatchBatches(
            self._epoch_order(),
            self.sources,
            self.cfg,
            self.seed,
            self.epoch,
            self.ctx.rank,
            self.ctx.world_size,
        )
        loader = DataLoader(
            data,
            batch_size=None,
            sampler=range(self.pos, self.micro_per_epoch),
            num_workers=t.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.epoch),
        )
        bar = progress(
            total=self.micro_per_epoch,
            initial=self.pos,
            desc=f"epoch {self.epoch + 1}/{t.epochs}",
            unit="batch",
            quiet=self.quiet,
            lines=False,  # one line per epoch is logged after it
            leave=False,
        )
        self.net.train()
        a = t.grad_accum
        for mb, batch in zip(range(self.pos, self.micro_per_epoch), loader, strict=True):
            last = (mb + 1) % a == 0
            sync = self.net.no_sync() if self.ctx.distributed and not last else contextlib.nullcontext()
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            with sync:
                with self._autocast():
                    out = self.net(image)
                loss = self._loss(out.float(), label)
                self.scaler.scale(loss / a).backward()
            n = int(image.shape[0])
            self.loss_sums[0] += float(loss.detach()) * n
            self.loss_sums[1] += n
            bar.update(1)
            if last:
                for g in self.optimizer.param_groups:
                    g["lr"] = scheduled_lr(
                        self.base_lr, t, step=self.step, epoch=self.epoch, steps_per_epoch=self.steps_per_epoch
                    )
                if t.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.pos = mb + 1
                stop = bool(t.max_steps) and self.step >= t.max_steps
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or stop:
                    self._checkpoint()
                if stop:
                    bar.close()
                    self.info(
                        "stopped at train.max_steps=%d (epoch %d); continue with --resume",
                        t.max_steps,
                        self.epoch + 1,
                    )
                    return False
        bar.close()
        return True

    # ------------------------------------------------------------------ validation and logs

    def _validate(self) -> dict[str, Any]:
        from tgated.data.datasets import load_case
        from tgated.inference.dynunet import DynUNetPredictor
        from tgated.metrics import dice

        predictor = DynUNetPredictor(self.model, device=self.device)
        rows: list[tuple[str, str, float]] = []
        pred_log = logging.getLogger("tgated.inference.predictor")
        level = pred_log.level
        pred_log.setLevel(max(level, logging.WARNING))
        try:
            for case in self.val_cases[self.ctx.rank :: self.ctx.world_size]:
                image, label = load_case(case)
                modality = case.modality or image.modality or self.cfg.model.preprocess.modality
                pred = predictor.predict_volume(image, modality=modality).labels
                for organ in self.model.organs:
                    if organ.name in case.labelled:
                        g, p = label.data == organ.id, pred == organ.id
                        if g.any() or p.any():
                            rows.append((case.case_id, organ.name, float(dice(g, p))))
        finally:
            pred_log.setLevel(level)
            self.model.train()
        all_rows = [r for part in self.ctx.all_gather(rows) for r in part]
        organs = {}
        for o in self.model.organs:
            vals = [d for _, name, d in all_rows if name == o.name]
            if vals:
                organs[o.name] = {"dice": float(np.mean(vals)), "n": len(vals)}
        mean = float(np.mean([v["dice"] for v in organs.values()])) if organs else float("nan")
        return {
            "epoch": self.epoch + 1,
            "step": self.step,
            "mean_dice": None if math.isnan(mean) else mean,
            "cases": len(self.val_cases),
            "organs": organs,
        }

    def _save_model(self) -> None:
        if self.ctx.is_main:
            replace_dir(self.run / "model", self.model.save_pretrained)

    def _end_epoch(self, started: float) -> None:
        t = self.t
        val = None
        if self.val_cases and ((self.epoch + 1) % t.val_every == 0 or self.epoch + 1 == t.epochs):
            val = self._validate()
            self.val_latest = val
            d = val["mean_dice"]
            if d is not None and (self.best_dice is None or d > self.best_dice):
                self.best_dice, self.best_epoch, self.val_best = d, self.epoch + 1, val
                self._save_model()
                self.info(
                    "epoch %d: new best validation mean Dice %.4f -> %s",
                    self.epoch + 1,
                    d,
                    self.run / "model",
                )
        sums = self.ctx.all_reduce_sum(self.loss_sums)
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": sums[0] / max(sums[1], 1.0),
            "val_dice": "" if val is None or val["mean_dice"] is None else val["mean_dice"],
            "time_s": round(time.perf_counter() - started, 3),
        }
        self.history.append(row)
        self.info(
            "epoch %d/%d: loss %.4f%s",
            self.epoch + 1,
            t.epochs,
            row["loss"],
            f", val mean Dice {row['val_dice']:.4f}" if row["val_dice"] != "" else "",
        )
        if self.ctx.is_main:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(LOG_COLUMNS), lineterminator="\n")
            writer.writeheader()
            for r in self.history:
                writer.writerow({k: r.get(k, "") for k in LOG_COLUMNS})
            atomic_write_text(self.run / "log.csv", buf.getvalue())
            atomic_write_json(
                self.run / "val.json", {"metric": "dice", "best": self.val_best, "latest": self.val_latest}
            )
        self.epoch += 1
        self.pos = 0
        self.loss_sums = [0.0, 0.0]
        self._checkpoint()

    def run_all(self) -> TrainResult:
        self.setup()
        finished = True
        while self.epoch < self.t.epochs:
            started = time.perf_counter()
            if not self._train_epoch():
                finished = False
                break
            self._end_epoch(started)
        if finished and not (self.run / "model" / "config.json").is_file():
            if not self.val_cases:
                logger.warning(
                    "no validation cases: %s holds the model of the last epoch", self.run / "model"
                )
            self._save_model()
        self.ctx.barrier()
        return TrainResult(self.run, self.best_dice, self.best_epoch, self.epoch, self.step, finished)

    def close(self) -> None:
        pass
