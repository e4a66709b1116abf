"""Shared-encoder inference core vs the naive path, same process, same model, same stack.

For a stack of Z slices, K slices per window and O organs:

* naive (the published code's inference, ``TGatedModel.segment_stack_naive``): every window is
  re-encoded for every organ — Z·K·O vision-encoder passes, Z·O adapter and decoder passes;
* shared (``TGatedModel.segment_stack``): each slice is encoded once (Z passes), the adapter runs
  once per centre slice over cached tokens (Z), the decoder once per (slice, organ) pair (Z·O).

Both outputs are compared (max |Δ logit|) and the speed ratio is printed. Models are random
(``backbone.source: random``), so no checkpoint is needed; the adapter's zero-initialised layers
get random values (gate half open) so that neighbours change the output, as after training.

    python benchmarks/bench_encoder_sharing.py                       # tiny + small on CPU
    python benchmarks/bench_encoder_sharing.py --models full --device cuda   # ViT-B/16 rd64 at 352 px
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tgated.config import AdapterConfig, BackboneConfig, ModelConfig, PreprocessConfig
from tgated.models.tgated import TGatedModel
from tgated.organs import ORGANS


def model_config(name: str, k: int) -> ModelConfig:
    """``tiny`` (64 px, width 64, 4 layers), ``small`` (224 px, width 192, 6 layers), ``full`` (rd64, 352 px)."""
    if name == "tiny":
        return ModelConfig(
            backbone=BackboneConfig(source="random", preset="tiny"),
            adapter_config=AdapterConfig(dim=32, layers=2, heads=4, ffn_dim=64, spatial_heads=4),
            context=k,
            adapt_layers=[3],
            preprocess=PreprocessConfig(image_size=64),
        )
    if name == "small":
        return ModelConfig(
            backbone=BackboneConfig(
                source="random",
                preset="tiny",
                hidden_size=192,
                num_hidden_layers=6,
                num_attention_heads=3,
                intermediate_size=768,
                text_hidden_size=96,
                projection_dim=64,
                extract_layers=[1, 3, 5],
                reduce_dim=32,
            ),
            adapter_config=AdapterConfig(dim=128, layers=2, heads=4, ffn_dim=512, spatial_heads=4),
            context=k,
            adapt_layers=[5],
            preprocess=PreprocessConfig(image_size=224),
        )
    if name == "full":
        return ModelConfig(backbone=BackboneConfig(source="random", preset="rd64"), context=k)
    raise ValueError(f"unknown benchmark model {name!r}; expected tiny, small or full")


def perturb_adapters(model: TGatedModel, seed: int = 0) -> None:
    """Random values for the zero-initialised adapter weights; gate bias 0 (g ≈ 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            if name.endswith("gate.proj.bias"):
                p.zero_()
            elif p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(
    name: str,
    z: int,
    k: int,
    n_organs: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    repeat: int = 1,
) -> dict:
    """Best-of-``repeat`` wall times of both paths on one random model and stack."""
    model = TGatedModel.from_config(model_config(name, k))
    perturb_adapters(model)
    model = model.to(device=device, dtype=dtype).eval()
    s = model.image_size
    stack = torch.rand(z, 1, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    organs = [o.name for o in ORGANS[:n_organs]]
    model.text_embeddings([model.prompt(o) for o in organs])  # cached text embeddings, as in use
    model.segment_stack(stack[: min(z, 2)], organs[:1])  # warm-up
    t_shared, shared = _timed(
        lambda: model.segment_stack(stack, organs, batch_size=batch_size), device, repeat
    )
    t_naive, naive = _timed(
        lambda: model.segment_stack_naive(stack, organs, batch_size=batch_size), device, repeat
    )
    return {
        "model": name,
        "S": s,
        "tokens": (s // 16) ** 2 + 1,
        "width": model.channels,
        "shared_s": t_shared,
        "naive_s": t_naive,
        "ratio": t_naive / t_shared,
        "max_abs_diff": float((shared.float() - naive.float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small, full")
    p.add_argument("--slices", type=int, default=32, help="Z (default 32)")
    p.add_argument("--context", type=int, default=5, help="K (default 5)")
    p.add_argument("--organs", type=int, default=13, help="O (default 13)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs per path (noisy machines)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(
        f"Z={args.slices} K={args.context} O={args.organs} batch={args.batch_size} device={device} "
        f"threads={torch.get_num_threads()} dtype={args.dtype}"
    )
    print(f"{'model':6} {'S':>4} {'N':>4} {'C':>4} {'shared s':>9} {'naive s':>9} {'ratio':>7} {'max|Δ|':>9}")
    results = []
    for name in args.models.split(","):
        r = bench(
            name.strip(), args.slices, args.context, args.organs, args.batch_size, device, dtype, args.repeat
        )
        print(
            f"{r['model']:6} {r['S']:>4} {r['tokens']:>4} {r['width']:>4} {r['shared_s']:>9.3f} "
            f"{r['naive_s']:>9.3f} {r['ratio']:>6.1f}x {r['max_abs_diff']:>9.2e}"
        )
        results.append(r)
    if args.json:
        run = {"slices": args.slices, "context": args.context, "organs": args.organs, "dtype": args.dtype}
        run.update(device=str(device), threads=torch.get_num_threads(), models=results)
        args.json.write_text(json.dumps(run, indent=2) + "\n")


if __name__ == "__main__":
    main()
