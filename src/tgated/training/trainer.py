"""What the two trainers share: the run's position, the epoch runner, checkpoints and the logs.

:class:`Trainer` is the base of the T-Gated trainer (:mod:`tgated.training.loop`) and of the DynUNet
trainer (:mod:`tgated.training.dynunet`). A subclass builds its data and model in :meth:`setup`
and supplies:

* :meth:`Trainer._epoch_data` — the epoch's batches as a ``Dataset`` whose item ``i`` is this
  process's share of the epoch's ``i``-th batch (:class:`RankBatches`), random only through
  :func:`tgated.training.augment.sample_rng` (so a batch depends on ``(seed, epoch, sample index)``
  alone, not on the process, the worker or where a run was interrupted);
* :meth:`Trainer._batch_loss` — one batch → the loss to back-propagate and the terms to log;
* :meth:`Trainer._set_lr` — the learning rates of the next optimizer step;
* :meth:`Trainer._val_predictor` (and :meth:`Trainer._val_variants`) — the predictor of ``tgated
  predict`` that validation segments each validation volume with;
* :meth:`Trainer._end_epoch` — its log row.

The base runs the rest the same way for both: the run folder's files, batches per epoch, DDP,
the epoch (:meth:`Trainer._train_epoch`: the ``DataLoader`` started at the interrupted batch,
gradient accumulation with DDP's ``no_sync`` between optimizer steps, the running loss sums, the
progress bar, ``max_steps`` and ``checkpoint_every``), the optimizer step (GradScaler, gradient
clipping), the checkpoint (``RUN/checkpoints/last.pt``: model, optimizer, scaler, position, loss
sums, validation history, every process's generator states) and its exact restore, validation
(:meth:`Trainer._validate`: 3-D Dice per organ, cases sharded over the processes), the best model,
``log.csv`` / ``val.json`` and :meth:`Trainer.run_all`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tgated.config import ExperimentConfig, dump_yaml
from tgated.io.files import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    remove_stale_temporaries,
    replace_dir,
)
from tgated.progress import progress
from tgated.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from tgated.training.distributed import DistContext
from tgated.training.runs import (
    RUN_FILES,
    environment,
    environment_differences,
    prepare_run,
    resolve_num_workers,
    resolve_precision,
)

logger = logging.getLogger(__name__)

VAL_CACHE_GB = 4.0
"""Validation volumes are kept in memory between validations up to this size."""

@dataclass(frozen=True)
class TrainResult:
    """What :func:`tgated.training.train` returns: where the run is and how it ended."""

    run_dir: Path
    """The run folder (``run_dir / "model"`` is the best model)."""
    best_dice: float | None
    """Best validation mean Dice (None when no validation ran)."""
    best_epoch: int | None
    """1-based epoch of the best validation."""
    epochs: int
    """Epochs completed."""
    steps: int
    """Optimizer steps taken."""
    finished: bool
    """False when the run stopped at ``train.max_steps`` before its last epoch."""


@dataclass
class LossMeter:
    """Sums of named loss terms, each weighted by its batch's sample count, since the epoch began."""

    names: tuple[str, ...]
    """The terms' log columns, the total first (``("loss", "loss_bce", ...)``)."""
    sums: list[float] = field(default_factory=list)
    samples: float = 0.0

    def __post_init__(self) -> None:
        if not self.sums:
            self.sums = [0.0] * len(self.names)

    def add(self, n: int, *terms: float) -> None:
        """Add one batch of ``n`` samples with the batch means ``terms`` (in the order of ``names``)."""
        for i, value in enumerate(terms):
            self.sums[i] += value * n
        self.samples += n

    def as_list(self) -> list[float]:
        """``[*sums, samples]`` (the checkpoint's ``loss_sums``; summed over the processes)."""
        return [*self.sums, self.samples]

    @classmethod
    def from_list(cls, names: Sequence[str], values: Sequence[float]) -> LossMeter:
        *sums, samples = (float(v) for v in values)
        return cls(tuple(names), sums, samples)

    def means(self) -> dict[str, float]:
        n = max(self.samples, 1.0)
        return {name: s / n for name, s in zip(self.names, self.sums, strict=True)}


class RankBatches(Dataset):
    """Item ``i`` = this process's share of the epoch's ``i``-th batch: samples
    ``[i·B + r·B/N, i·B + (r+1)·B/N)`` of ``order`` for rank ``r`` of ``N`` (``B`` the global batch).
    A subclass turns :meth:`rows` into tensors."""

    def __init__(self, order: np.ndarray, batch_size: int, rank: int, world: int) -> None:
        self.order = order
        self.batch = batch_size
        self.local = batch_size // world
        self.rank = rank

    def __len__(self) -> int:
        return len(self.order) // self.batch

    def rows(self, i: int) -> list[tuple[int, Any]]:
        """``(sample index in the epoch, row of order)`` of this process's share of batch ``i``."""
        start = i * self.batch + self.rank * self.local
        return list(enumerate(self.order[start : start + self.local].tolist(), start=start))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float) -> None:
    """One optimizer step from the accumulated gradients: unscale and clip the gradient norm of every
    optimised parameter to ``grad_clip`` (0 = no clipping), step, update the scaler, clear."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class Trainer:
    """The run mechanics of ``tgated train`` (see the module docstring for what a subclass adds)."""

    loss_names: tuple[str, ...] = ("loss",)
    """The loss terms :meth:`_batch_loss` returns (log columns; the total first)."""
    log_columns: list[str]
    """``log.csv``'s columns (set by the subclass)."""

    def __init__(self, cfg: ExperimentConfig, run: Path, ctx: DistContext, resume: bool, quiet: bool) -> None:
        self.cfg = cfg
        self.t = cfg.train
        self.run = run
        self.ctx = ctx
        self.quiet = quiet or not ctx.is_main
        self.seed = [int(cfg.seed), int(cfg.train.seed)]
        self.device = ctx.device
        self.amp_dtype = resolve_precision(self.t.precision, self.device)
        if self.t.batch_size % ctx.world_size:
            raise ValueError(
                f"train.batch_size={self.t.batch_size} is not divisible by the {ctx.world_size} processes; "
                f"it is the global batch (each process takes batch_size / {ctx.world_size}) — use a multiple"
            )
        self.num_workers = resolve_num_workers(self.t.num_workers, self.device)
        self.ckpt_path = prepare_run(cfg, run, resume)
        ctx.barrier()
        self.history: list[dict[str, Any]] = []
        self.val_best: dict[str, Any] | None = None
        self.val_latest: dict[str, Any] | None = None
        self.epoch, self.pos, self.step = 0, 0, 0
        self.losses = LossMeter(self.loss_names)
        self.best_dice: float | None = None
        self.best_epoch: int | None = None
        self._val_volumes: dict[str, tuple[Any, Any]] = {}

    def info(self, msg: str, *args: Any) -> None:
        """Log at INFO on rank 0 (other ranks: DEBUG), so a message appears once per run."""
        logger.log(logging.INFO if self.ctx.is_main else logging.DEBUG, msg, *args)

    # ------------------------------------------------------------------ what a subclass supplies

    def setup(self) -> None:
        """Data, model, run folder (:meth:`_write_run_files`), :meth:`_plan_batches`, the optimizer,
        the scaler and :meth:`_wrap_ddp`, then :meth:`_restore` when resuming."""
        raise NotImplementedError

    def _epoch_data(self) -> Dataset:
        """The current epoch's batches (see the module docstring)."""
        raise NotImplementedError

    def _batch_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]:
        """(loss to back-propagate, samples in the batch, the terms of :attr:`loss_names`)."""
        raise NotImplementedError

    def _set_lr(self) -> None:
        """Set the learning rates of optimizer step ``self.step``."""
        raise NotImplementedError

    def _val_predictor(self) -> Any:
        """The predictor of ``tgated predict`` for the model being trained."""
        raise NotImplementedError

    def _val_variants(self) -> tuple[str, ...]:
        """The validation passes: ``real``, and others the predictor knows (``neighbours=...``)."""
        return ("real",)

    def _end_epoch(self, started: float) -> None:
        """Validate when due, log the epoch's row and call :meth:`_next_epoch`."""
        raise NotImplementedError

    def _save_model(self) -> None:
        if self.ctx.is_main:
            replace_dir(self.run / "model", self.model.save_pretrained)

    def close(self) -> None:
        """Release what :meth:`setup` opened."""

    # ------------------------------------------------------------------ setup helpers

    def _write_run_files(self, splits: dict[str, list[str]]) -> None:
        """Create the run folder with ``config.yaml``, ``splits.json`` and ``environment.json`` (rank 0),
        after removing the leftovers of a run killed while writing (writes are atomic: the targets
        themselves are whole). A resumed run keeps the environment it started in and warns when this
        one differs: it will not end bit-identical to an uninterrupted run."""
        from tgated.data.datasets import write_splits

        if not self.ctx.is_main:
            return
        remove_stale_temporaries(self.run, list(RUN_FILES))
        remove_stale_temporaries(self.run / "checkpoints", ["last.pt"])
        self.run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run / "config.yaml", dump_yaml(self.cfg))
        write_splits(self.run / "splits.json", splits)
        env = environment(self.device, self.ctx.world_size)
        env_file = self.run / "environment.json"
        if self.ckpt_path is None or not env_file.is_file():
            atomic_write_json(env_file, env)
            return
        try:
            started = read_json(env_file)
        except ValueError as exc:
            started = exc
        if not isinstance(started, dict):
            logger.warning("%s: unreadable (%s); not compared with this environment", env_file, started)
            return
        diffs = environment_differences(started, env)
        if diffs:
            listed = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in diffs.items())
            logger.warning(
                "%s: resuming in another environment than the run started in (%s); the run continues, but "
                "its weights will not be bit-identical to an uninterrupted run's",
                self.run,
                listed,
            )

    def _plan_batches(self, samples: int) -> None:
        """Batches per epoch (``train.steps_per_epoch``, else one pass over ``samples``, whole
        accumulation cycles, at least one), optimizer steps and samples per epoch."""
        t = self.t
        b, a = t.batch_size, t.grad_accum
        if t.steps_per_epoch:
            self.micro_per_epoch = t.steps_per_epoch * a
        else:
            self.micro_per_epoch = max(a, (samples // b) // a * a)
        self.steps_per_epoch = self.micro_per_epoch // a
        self.samples_per_epoch = self.micro_per_epoch * b
        self.info(
            "%d epochs × %d optimizer steps (batch %d × accumulation %d, %d processes); batches prepared %s",
            t.epochs,
            self.steps_per_epoch,
            b,
            a,
            self.ctx.world_size,
            f"by {self.num_workers} worker processes per process"
            if self.num_workers
            else "in the training process",
        )

    def _wrap_ddp(self) -> None:
        """``self.net``: the model, wrapped in DistributedDataParallel under torchrun (its batch norms,
        if any, made ``SyncBatchNorm`` on CUDA; a trainer refuses batch norm under DDP on the CPU)."""
        self.net: Any = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if self.device.type == "cuda":
                # batch statistics over the global batch, not each process's share (the parameters
                # and buffers are kept, so the optimizer and the state dict are unchanged)
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

            self.net = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        """The checkpoint (collective: every process takes part)."""
        rngs = self.ctx.all_gather(rng_state())
        sums = self.ctx.all_reduce_sum(self.losses.as_list())
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        replicas = self.ctx.all_gather(state_digest(trainable))
        if len(set(replicas)) > 1:
            logger.warning(
                "step %d: the model replicas of the %d processes differ (trainable-weight digests %s)",
                self.step,
                self.ctx.world_size,
                ", ".join(d[:12] for d in replicas),
            )
        return {
            "model": {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "pos": self.pos,
            "step": self.step,
            "micro_per_epoch": self.micro_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "world_size": self.ctx.world_size,
            "loss_sums": sums,
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "val_best": self.val_best,
            "val_latest": self.val_latest,
            "rng": rngs,
            "replica_sha256": replicas,
        }

    def _checkpoint(self) -> None:
        state = self._state()
        if self.ctx.is_main:
            save_checkpoint(self.run / "checkpoints" / "last.pt", state)
        self.ctx.barrier()

    def _load_checkpoint(self) -> dict[str, Any]:
        """Read and restore ``RUN/checkpoints/last.pt``; returns the checkpoint for the subclass's parts."""
        assert self.ckpt_path is not None
        state = load_checkpoint(self.ckpt_path)
        self._restore(state)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.ckpt_path
        if (
            state.get("micro_per_epoch") != self.micro_per_epoch
            or state.get("samples_per_epoch", self.samples_per_epoch) != self.samples_per_epoch
        ):
            raise ValueError(
                f"{path}: the checkpoint was taken with {state.get('micro_per_epoch')} batches per epoch, this data "
                f"gives {self.micro_per_epoch}: the training data changed since — restore it or start a new run"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: does not fit this run's model ({str(exc)[:300]})") from None
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.pos, self.step = int(state["epoch"]), int(state["pos"]), int(state["step"])
        # the sums of every process, kept once: they are summed over the processes again
        self.losses = (
            LossMeter.from_list(self.loss_names, state["loss_sums"])
            if self.ctx.is_main
            else LossMeter(self.loss_names)
        )
        self.best_dice, self.best_epoch = state["best_dice"], state["best_epoch"]
        self.history = list(state["history"])
        self.val_best, self.val_latest = state["val_best"], state["val_latest"]
        rngs = state["rng"]
        if int(state["world_size"]) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        else:
            logger.warning(
                "%s: written by %s process(es), resumed with %d: dropout randomness differs from an "
                "uninterrupted run (sample order and augmentation do not)",
                path,
                state["world_size"],
                self.ctx.world_size,
            )
            set_rng_state(rngs[0])
            torch.manual_seed(
                int(np.random.SeedSequence([*self.seed, self.ctx.rank, self.step]).generate_state(1)[0])
            )
        self.info("resumed %s at epoch %d, step %d", path, self.epoch + 1, self.step)

    # ------------------------------------------------------------------ the epoch

    def _optimizer_step(self) -> None:
        self._set_lr()
        optimizer_step(self.optimizer, self.scaler, self.t.grad_clip)
        self.step += 1

    def _loader(self, data: Dataset) -> DataLoader:
        """The epoch's batches from the interrupted one on (``self.pos``)."""
        return DataLoader(
            data,
            batch_size=None,
            sampler=range(self.pos, self.micro_per_epoch),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating an iterator must not consume the global torch RNG (dropout),
            # or a resumed epoch would differ from an uninterrupted one
            generator=torch.Generator().manual_seed(self.epoch),
        )

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False when ``max_steps`` stopped it."""
        t = self.t
        loader = self._loader(self._epoch_data())
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
            with sync:
                loss, n, terms = self._batch_loss(batch)
                self.scaler.scale(loss / a).backward()
            self.losses.add(n, *(float(v.detach()) for v in terms))
            bar.update(1)
            if not self.quiet:
                bar.set_postfix(loss=f"{self.losses.means()['loss']:.4f}")
            if last:
                self._optimizer_step()
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

    # ------------------------------------------------------------------ epoch end

    def _val_volume(self, case: Any) -> tuple[Any, Any]:
        """A validation case's image and label, kept in memory up to :data:`VAL_CACHE_GB` in all."""
        from tgated.data.datasets import load_case

        if case.case_id in self._val_volumes:
            return self._val_volumes[case.case_id]
        image, label = load_case(case)
        held = sum(im.data.nbytes + lb.data.nbytes for im, lb in self._val_volumes.values())
        if (held + image.data.nbytes + label.data.nbytes) / 1e9 <= VAL_CACHE_GB:
            self._val_volumes[case.case_id] = (image, label)
        return image, label

    def _validate(self) -> dict[str, Any]:
        """3-D Dice per labelled organ of every validation case (cases sharded over the processes and
        gathered; organs absent from both masks skipped), for each of :meth:`_val_variants`: the mean
        over organs of the per-organ means over cases (``mean_dice``, ``organs``; other variants with
        the suffix ``_<variant>_only``)."""
        from tgated.metrics import dice

        variants = self._val_variants()
        predictor = self._val_predictor()
        rows: list[tuple[str, str, str, float]] = []
        try:
            for case in self.val_cases[self.ctx.rank :: self.ctx.world_size]:
                image, label = self._val_volume(case)
                modality = case.modality or image.modality or self.cfg.model.preprocess.modality
                for variant in variants:
                    extra = {} if variant == "real" else {"neighbours": variant}
                    pred = predictor.predict_volume(image, modality=modality, **extra).labels
                    for organ in self.model.organs:
                        if organ.name not in case.labelled:
                            continue
                        g, p = label.data == organ.id, pred == organ.id
                        if g.any() or p.any():
                            rows.append((variant, case.case_id, organ.name, float(dice(g, p))))
        finally:
            self._after_validation()
        all_rows = [r for part in self.ctx.all_gather(rows) for r in part]
        out: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "cases": len(self.val_cases)}
        for variant in variants:
            organs: dict[str, dict[str, float]] = {}
            for o in self.model.organs:
                vals = [d for v, _, name, d in all_rows if v == variant and name == o.name]
                if vals:
                    organs[o.name] = {"dice": float(np.mean(vals)), "n": len(vals)}
            mean = float(np.mean([v["dice"] for v in organs.values()])) if organs else float("nan")
            suffix = "" if variant == "real" else f"_{variant}_only"
            out[f"mean_dice{suffix}"] = None if math.isnan(mean) else mean
            out[f"organs{suffix}"] = organs
        return out

    def _after_validation(self) -> None:
        """Back to training after the validation passes."""
        self.model.train()

    def _validation_due(self) -> bool:
        """Every ``val_every`` epochs and after the last, when there are validation cases."""
        return bool(self.val_cases) and (
            (self.epoch + 1) % self.t.val_every == 0 or self.epoch + 1 == self.t.epochs
        )

    def _validate_if_due(self) -> dict[str, Any] | None:
        """This epoch's validation, recorded (:meth:`_record_validation`), or None when not due."""
        if not self._validation_due():
            return None
        val = self._validate()
        self._record_validation(val)
        return val

    def _record_validation(self, val: dict[str, Any]) -> None:
        """Keep ``val`` as the latest; a better mean Dice saves the model to ``RUN/model/``."""
        self.val_latest = val
        d = val["mean_dice"]
        if d is not None and (self.best_dice is None or d > self.best_dice):
            self.best_dice, self.best_epoch = d, self.epoch + 1
            self.val_best = val
            self._save_model()
            self.info(
                "epoch %d: new best validation mean Dice %.4f -> %s", self.epoch + 1, d, self.run / "model"
            )

    def _epoch_losses(self) -> dict[str, float]:
        """The epoch's mean loss terms over every process (collective)."""
        return LossMeter.from_list(self.loss_names, self.ctx.all_reduce_sum(self.losses.as_list())).means()

    def _write_logs(self) -> None:
        """``log.csv`` (one row per epoch) and ``val.json`` (rank 0)."""
        if not self.ctx.is_main:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.log_columns, lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: row.get(k, "") for k in self.log_columns})
        atomic_write_text(self.run / "log.csv", buf.getvalue())
        atomic_write_json(
            self.run / "val.json",
            {"metric": "dice", "best": self.val_best, "latest": self.val_latest},
        )

    def _next_epoch(self) -> None:
        """Move to the next epoch's first batch and checkpoint there."""
        self.epoch += 1
        self.pos = 0
        self.losses = LossMeter(self.loss_names)
        self._checkpoint()

    # ------------------------------------------------------------------ main

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
        return TrainResult(
            run_dir=self.run,
            best_dice=self.best_dice,
            best_epoch=self.best_epoch,
            epochs=self.epoch,
            steps=self.step,
            finished=finished,
        )
