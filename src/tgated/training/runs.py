"""The run folder and its rules: what a run folder must hold to start or resume, which config keys may
change on resume, the split, and the run's settings that depend on the machine (autocast precision,
data-loading workers). Used by :class:`tgated.training.trainer.Trainer` for both models; and how
several trainings run side by side (:func:`side_by_side`: worker processes, torch threads each), used
by the demo and the evidence experiment."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from tgated.config import ConfigError, ExperimentConfig, load_config, to_dict
from tgated.io.files import is_temporary

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

RUN_FILES: tuple[str, ...] = (
    "config.yaml",
    "splits.json",
    "environment.json",
    "log.csv",
    "val.json",
    "model",
    "model.old",
)
"""The run folder's own files (leftover temporaries of these are removed when a run starts)."""


RESUMABLE_KEYS: tuple[str, ...] = (
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every",
    "train.val_every",
    "train.val_max_cases",
    "train.tensorboard",
    "train.device",
    "train.num_workers",
)
"""Config keys that may differ between a run's ``config.yaml`` and the config given to resume it."""


ENVIRONMENT_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "monai",
    "numpy",
    "scipy",
    "nibabel",
    "SimpleITK",
    "safetensors",
)
"""The installed packages whose versions a run records: what its numbers depend on besides the config,
the data and the seeds."""


def environment(device: torch.device | str = "cpu", processes: int = 1) -> dict[str, Any]:
    """What a run's numbers depend on besides its config, data and seeds (``RUN/environment.json``).

    The same config, data and seeds give bit-identical weights only under the same package versions,
    processor kind, thread count and device: another version of a library may initialise a random
    backbone or sum in another order, another processor (``cpu_capability``: the vector instructions
    torch's kernels use) or thread count sums floats in another order.
    """
    import platform
    from importlib import metadata

    from tgated import __version__

    packages: dict[str, str | None] = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    dev = torch.device(device)
    env: dict[str, Any] = {
        "tgated": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "processes": int(processes),
        "device": str(dev),
    }
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def _cpu_model() -> str:
    """The processor's model name (Linux: ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys (packages as ``packages.NAME``) whose values differ: ``{key: (old, new)}``; the platform
    string is left out (a kernel update does not change the numbers)."""
    fo, fn = _flatten(old), _flatten(new)
    keys = sorted((set(fo) | set(fn)) - {"platform"})
    return {k: (fo.get(k), fn.get(k)) for k in keys if fo.get(k) != fn.get(k)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("organ_weights") and not key.endswith("prompts"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: ``{key: (value in a, value in b)}``."""
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` → the autocast dtype (None = float32)."""
    if device.type != "cuda":
        if precision in ("auto", "fp32"):
            return None
        if precision == "bf16":
            return torch.bfloat16
        raise ValueError(
            f"train.precision={precision!r} needs CUDA (GradScaler); on the CPU use fp32 (or bf16, or auto)"
        )
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision='bf16': this GPU does not support bfloat16; use fp16 or auto")
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ---------------------------------------------------------------------------------------------
# run folder
# ---------------------------------------------------------------------------------------------


def _run_entries(run: Path) -> list[str]:
    if not run.exists():
        return []
    if not run.is_dir():
        raise ValueError(f"{run}: exists and is not a folder; --out must be a run folder")
    return sorted(
        p.name for p in run.iterdir() if not is_temporary(p) and not p.name.startswith(".token-cache")
    )


def prepare_run(cfg: ExperimentConfig, run: Path, resume: bool) -> Path | None:
    """Check ``run`` for a new run or a resume (read-only); returns the checkpoint to resume or None."""
    entries = _run_entries(run)
    if not entries:
        if resume:
            logger.info("%s: nothing to resume; starting a new run", run)
        return None
    if not resume:
        raise ValueError(
            f"{run}: run folder is not empty ({', '.join(entries[:5])}); pass --resume to continue that run, "
            "or choose another --out"
        )
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise ValueError(
            f"{run}: not a tgated run folder (no config.yaml, found {', '.join(entries[:5])}); cannot resume it — "
            "choose another --out"
        )
    try:
        saved = load_config(cfg_file)
    except ConfigError as exc:
        raise ValueError(f"{cfg_file}: cannot be read to resume the run ({exc})") from None
    diffs = {k: v for k, v in config_differences(saved, cfg).items() if k not in RESUMABLE_KEYS}
    if diffs:
        listed = "; ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in list(diffs.items())[:8])
        raise ValueError(
            f"{run}: --resume with a config that differs from the run's {cfg_file.name} in {len(diffs)} key(s) "
            f"({listed}); resume with the run's own config ({cfg_file}) — only {', '.join(RESUMABLE_KEYS)} may change"
        )
    ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        logger.warning("%s: no checkpoint yet (%s); starting the run from the beginning", run, ckpt)
        return None
    return ckpt


def split_cases(
    cfg: ExperimentConfig, run: Path, resuming: bool
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """(split, cases by id) of the run's dataset."""
    from tgated.data.datasets import default_split, discover, read_splits

    data = cfg.data
    cases = discover(
        data.root,
        data.layout,
        labels=data.labels or None,
        totalseg_task=data.totalseg_task or None,
    )
    ids = [c.case_id for c in cases]
    if resuming and (run / "splits.json").is_file():
        splits = read_splits(run / "splits.json", available=ids)
    elif data.splits:
        splits = read_splits(data.splits, available=ids)
    else:
        splits = default_split(ids, seed=data.split_seed, sizes=tuple(data.split_sizes))  # type: ignore[arg-type]
    if not splits["train"]:
        raise ValueError(
            f"{data.splits or data.root}: the split has no training cases; give a splits.json with a 'train' list"
        )
    return splits, {c.case_id: c for c in cases}


AUTO_WORKERS_MAX = 8
"""The most data-loading workers ``train.num_workers: auto`` starts per training process."""


def resolve_num_workers(value: int | str, device: torch.device) -> int:
    """``train.num_workers`` → worker processes per training process (see
    :attr:`tgated.config.TrainConfig.num_workers`): ``auto`` is 0 on the CPU and, on CUDA, the cores
    this process may use divided among the ``LOCAL_WORLD_SIZE`` processes (torchrun) on this machine,
    less one for the training process, at most :data:`AUTO_WORKERS_MAX`."""
    if value != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(AUTO_WORKERS_MAX, usable_cores() // local - 1))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(device: str, threads: int) -> int:
    """How many trainings run side by side unless told: on the CPU as many as the usable cores hold
    at ``threads`` torch threads each, on an accelerator one."""
    return max(1, usable_cores() // threads) if torch.device(device).type == "cpu" else 1


def side_by_side(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    *,
    jobs: int,
    threads: int,
    first: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
) -> Iterator[R]:
    """``first`` (a function and its arguments, e.g. the shared stage 1), then ``fn(task)`` for every
    task, ``jobs`` at a time with ``threads`` torch threads each; yields each result as it comes.
    A training's numbers depend on its thread count, not on what runs beside it, so any ``jobs``
    gives the same results. One job runs in this process (its thread count restored afterwards);
    more run in :func:`training_pool` workers, so ``fn``, ``first`` and the tasks must pickle."""
    jobs = max(1, min(jobs, len(tasks)))
    if jobs == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if first is not None:
                first[0](*first[1])
            for task in tasks:
                yield fn(task)
        finally:
            torch.set_num_threads(before)
        return
    with training_pool(jobs, threads) as pool:
        if first is not None:
            pool.apply(*first)
        yield from pool.imap_unordered(fn, tasks)


def training_pool(processes: int, threads: int) -> multiprocessing.pool.Pool:
    """Worker processes for trainings side by side: ``processes`` workers, each task in a fresh
    process (``maxtasksperchild=1``: nothing of one training's state leaks into the next) with
    ``threads`` torch threads. A training's numbers depend on its thread count, not on what runs
    beside it. Use it as a context manager: leaving the block terminates the workers, so an error
    or Ctrl-C does not wait for the other trainings. Workers start from a fresh interpreter
    (forkserver, else spawn), never forked from a process that has torch's threads running."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(processes, _set_threads, (threads,), maxtasksperchild=1)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)

