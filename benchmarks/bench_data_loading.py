"""Training input pipeline: batches prepared in the training process vs in DataLoader workers.

What a GPU waits for when ``train.num_workers`` is 0: each T-Gated training batch is drawn and
augmented on the CPU (window of K slices, rotation / zoom / flip / intensity jitter on every slice
and the mask, :mod:`tgated.training.augment`) in the training process, between two GPU steps. With
N workers (:meth:`tgated.training.trainer.Trainer._loader`) the batches are prepared by N other
processes while the GPU computes.

The script builds the trainer of ``tgated train`` for a recipe (default the full-size
``configs/flare22_tgated.yaml``: batch 8, K = 5, 352 px, augmentation on) on synthetic phantoms,
and reports

1. the CPU time of one batch prepared in the training process (``Dataset[i]``, no loader);
2. for each worker count, the loader's throughput (batches/s, samples/s; after the first batch)
   and the time to its first batch (the workers' start), with ``--step-ms`` of simulated device
   work per batch in the training process (a sleep: the CPU is free while a GPU step runs); the
   ratio is each row's batches/s over the 0-worker row's;
3. whether every worker count gives the same batches, bit for bit (it must: a batch depends on
   ``(seed, epoch, sample index)`` only).

The backbone is never run, so ``--model tiny`` (the default) swaps in the tiny random backbone:
the batches are the same as with the full one. Phantoms are written at ``--size`` px in-plane and
resized to the recipe's input size once, as ``tgated train`` does.

    python benchmarks/bench_data_loading.py                         # flare22_tgated.yaml, workers 0,1,2
    python benchmarks/bench_data_loading.py --step-ms 60 --workers 0,2,4
    python benchmarks/bench_data_loading.py --config configs/flare22_dynunet.yaml --batches 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from tgated.config import ExperimentConfig, apply_overrides, load_config
from tgated.data.phantom import write_dataset
from tgated.training.distributed import DistContext

ROOT = Path(__file__).resolve().parents[1]


def recipe(path: Path, root: Path, model: str, batches: int) -> ExperimentConfig:
    """The recipe on the phantoms, one epoch of ``batches`` batches, on the CPU, no validation."""
    cfg = load_config(
        path,
        [
            f"data.root={root}",
            "data.split_sizes=[4, 0, 0]",
            "train.epochs=1",
            f"train.steps_per_epoch={batches}",
            "train.grad_accum=1",
            "train.device=cpu",
            "train.precision=fp32",
        ],
    )
    if model == "tiny" and cfg.model.model_type == "tgated":
        tiny = load_config(ROOT / "configs" / "tiny_cpu.yaml")
        cfg.model.backbone = tiny.model.backbone
        cfg.model.adapt_layers = tiny.model.adapt_layers
        cfg.model.adapter_config = tiny.model.adapter_config
    elif model == "full" and cfg.model.model_type == "tgated":
        cfg = apply_overrides(cfg, ["model.backbone.source=random"])
    return cfg


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flare22_tgated.yaml")
    ap.add_argument(
        "--model", choices=("tiny", "full"), default="tiny", help="backbone (never run; default tiny)"
    )
    ap.add_argument("--workers", default="0,1,2", help="worker counts, comma-separated (default 0,1,2)")
    ap.add_argument("--batches", type=int, default=12, help="batches per worker count (default 12)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="simulated device time per batch (default 0)")
    ap.add_argument("--cases", type=int, default=4, help="phantom training cases (default 4)")
    ap.add_argument("--size", type=int, default=128, help="phantom in-plane size (default 128)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of the training process (default 1)"
    )
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    counts = [int(w) for w in args.workers.split(",")]
    if 0 not in counts:
        counts.insert(0, 0)

    from tgated.training.dynunet import DynUNetTrainer
    from tgated.training.loop import _Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_dataset(root, cases=args.cases, size=args.size, quiet=True)
        cfg = recipe(args.config, root, args.model, args.batches)
        kind = DynUNetTrainer if cfg.model.model_type == "dynunet" else _Trainer
        trainer = kind(cfg, Path(tmp) / "run", DistContext(), resume=False, quiet=True)
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        data = trainer._epoch_data()
        n = min(args.batches, len(data))

        data[0]  # warm-up: imports, allocator
        t0, c0 = time.perf_counter(), time.process_time()
        reference = [data[i] for i in range(n)]
        in_process_s = (time.perf_counter() - t0) / n
        in_process_cpu_s = (time.process_time() - c0) / n

        rows = []
        for workers in counts:
            trainer.num_workers = workers
            loader = trainer._loader(data)
            identical = True
            t0 = time.perf_counter()
            first = None
            for i, batch in enumerate(loader):
                if i == 0:
                    first = time.perf_counter()
                identical &= same(batch, reference[i])
                if args.step_ms:
                    time.sleep(args.step_ms / 1e3)
            end = time.perf_counter()
            steady = (end - first) / max(n - 1, 1)
            rows.append(
                {
                    "workers": workers,
                    "first_batch_s": first - t0,
                    "s_per_batch": steady,
                    "batches_per_s": 1.0 / steady,
                    "samples_per_s": cfg.train.batch_size / steady,
                    "identical": identical,
                }
            )
        trainer.close()
    base = rows[0]["batches_per_s"]
    for r in rows:
        r["ratio"] = r["batches_per_s"] / base
    pre = cfg.model.preprocess
    what = (
        f"{args.config.name}: batch {cfg.train.batch_size}, "
        + (
            f"K={cfg.model.context}, {pre.image_size} px, augment {cfg.train.augment}"
            if cfg.model.model_type == "tgated"
            else f"patches {'x'.join(str(p) for p in cfg.model.dynunet.patch_size)}"
        )
        + f"; {args.cases} phantoms of {args.size} px; cpus {len(os.sched_getaffinity(0))}, threads {args.threads}"
    )
    print(what)
    print(f"setup (volumes read, preprocessed, indexed): {setup_s:.1f} s")
    print(
        f"one batch in the training process: {in_process_s * 1e3:.1f} ms wall, {in_process_cpu_s * 1e3:.1f} ms CPU"
    )
    print(f"loader, {n} batches, simulated device step {args.step_ms:g} ms:")
    print("workers  first batch s  ms/batch  batches/s  samples/s  ratio  same batches")
    for r in rows:
        print(
            f"{r['workers']:7d}  {r['first_batch_s']:13.2f}  {r['s_per_batch'] * 1e3:8.1f}  "
            f"{r['batches_per_s']:9.2f}  {r['samples_per_s']:9.1f}  {r['ratio']:5.2f}  {'yes' if r['identical'] else 'NO'}"
        )
    if args.json:
        figures = {
            "config": args.config.name,
            "batch_size": cfg.train.batch_size,
            "context": cfg.model.context,
            "image_size": pre.image_size,
            "cases": args.cases,
            "size": args.size,
            "cpus": len(os.sched_getaffinity(0)),
            "threads": args.threads,
            "step_ms": args.step_ms,
            "batches": n,
            "setup_s": setup_s,
            "in_process_s_per_batch": in_process_s,
            "in_process_cpu_s_per_batch": in_process_cpu_s,
            "loader": rows,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not all(r["identical"] for r in rows):
        raise SystemExit("the batches differ between worker counts")


if __name__ == "__main__":
    main()
