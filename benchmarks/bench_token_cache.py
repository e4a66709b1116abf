"""Training with the vision-token cache vs without, same process, same data, same model.

With ``model.train_backbone: false`` the CLIP vision tower is a fixed function of each slice:

* uncached (``train.cache_tokens: off``): every sample re-encodes the K slices of its window,
  every epoch — B·K encoder passes per step;
* cached (``memory``): every distinct slice image is encoded once before training, and each step
  gathers its windows' tokens from the cache — no encoder pass per step.

Both runs use the same config with augmentation off (the cache rules it out), train the same steps
of the same epoch in one process (the training loop of ``tgated train``, validation excluded), and
the script prints seconds per optimizer step, the one-off cache build, the speed-up per step, the
loss of both runs (equal up to float rounding), and the break-even number of steps.

    python benchmarks/bench_token_cache.py                   # tiny model (64 px), 4-case phantoms
    python benchmarks/bench_token_cache.py --model small     # width 192, 6 layers, 224 px
    python benchmarks/bench_token_cache.py --threads 1       # stable timings on a loaded machine
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from tgated.config import ExperimentConfig, apply_overrides, load_config
from tgated.data.phantom import write_dataset
from tgated.training.distributed import DistContext, resolve_device
from tgated.training.loop import _Trainer

ROOT = Path(__file__).resolve().parents[1]


def config(root: Path, model: str, steps: int, batch: int, k: int, device: str) -> ExperimentConfig:
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    overrides = [
        f"data.root={root}",
        "train.epochs=1",
        f"train.steps_per_epoch={steps}",
        f"train.batch_size={batch}",
        "train.augment=false",
        f"train.device={device}",
        f"model.context={k}",
    ]
    cfg = apply_overrides(cfg, overrides)
    if model == "small":  # the small model of bench_encoder_sharing.py (same folder)
        from bench_encoder_sharing import model_config

        cfg.model = model_config("small", k)
    return cfg


def timed_epoch(cfg: ExperimentConfig, cache: str, run: Path) -> tuple[float, float, float]:
    """(setup incl. cache build s, training s, mean loss) of one epoch."""
    cfg = apply_overrides(cfg, [f"train.cache_tokens={cache!r}"])
    trainer = _Trainer(cfg, run, DistContext(device=resolve_device(cfg.train.device)), resume=False, quiet=True)
    t0 = time.perf_counter()
    trainer.setup()
    t1 = time.perf_counter()
    trainer._train_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    loss = trainer.losses.means()["loss"]
    trainer.close()
    return t1 - t0, t2 - t1, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps timed (default 30)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=3, help="K slices per window (default 3)")
    ap.add_argument("--cases", type=int, default=4, help="phantom cases (default 4: 2 train)")
    ap.add_argument("--size", type=int, default=64, help="phantom in-plane size (default 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_dataset(root, cases=args.cases, size=args.size, quiet=True)
        cfg = config(root, args.model, args.steps, args.batch_size, args.context, args.device)
        timed_epoch(cfg, "off", Path(tmp) / "warmup")  # imports, allocator, thread pools
        setup_off, off, loss_off = timed_epoch(cfg, "off", Path(tmp) / "off")
        setup_on, on, loss_on = timed_epoch(cfg, "memory", Path(tmp) / "memory")
    build = max(setup_on - setup_off, 0.0)
    per_off, per_on = off / args.steps, on / args.steps
    print(
        f"model {args.model} ({cfg.model.preprocess.image_size} px, K={args.context}), batch {args.batch_size}, "
        f"{args.steps} steps, device {args.device}, threads {torch.get_num_threads()}"
    )
    print(f"uncached: {per_off * 1e3:8.1f} ms/step   loss {loss_off:.6f}")
    print(f"cached:   {per_on * 1e3:8.1f} ms/step   loss {loss_on:.6f}   (cache build {build:.2f} s)")
    print(f"speed-up per step: {per_off / per_on:.2f}x")
    if per_off > per_on:
        print(f"the cache pays for itself after {build / (per_off - per_on):.0f} steps")
    if args.json:
        figures = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "device": args.device}
        figures.update(uncached_s_per_step=per_off, cached_s_per_step=per_on, cache_build_s=build)
        figures.update(ratio=per_off / per_on, loss_uncached=loss_off, loss_cached=loss_on)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
