"""The vision encoder's physical floor for a whole CT, and how close the shared encoder gets to it.

The encoder is most of the work at prediction (each slice encoded once, then adapter and decoder).
Its floor for Z slices is the matrix-multiply FLOPs of the encoder blocks run (ViT-B/16 at 352 px:
485 tokens, width 768, MLP 3072; blocks 0-9 for rd64's extract layers 3/6/9 — about 76 GFLOP per
slice, about 91 GFLOP for all 12 blocks) divided by the device's peak dense matrix throughput.
The script times ``TGatedModel.encode_stack`` over Z slices (bf16 autocast on CUDA) and reports
seconds, achieved TFLOP/s and the fraction of the floor reached.

    python benchmarks/encoder_floor.py --device cuda --json floor.json        # 300 slices, full size
    python benchmarks/encoder_floor.py --model tiny --slices 8                 # a CPU try-out

``--peak-tflops`` sets the peak (default: from the device name for common GPUs; none on a CPU,
where only the achieved rate is reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder_sharing import model_config

from tgated.models.tgated import TGatedModel

# dense bf16 tensor-core peaks (TFLOP/s) of common data-centre GPUs, from their data sheets
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def encoder_flops(model: TGatedModel, blocks: int) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of ``blocks`` ViT blocks on one slice."""
    vis = model.backbone.config.vision_config
    n = (model.image_size // int(vis.patch_size)) ** 2 + 1
    c, f = int(vis.hidden_size), int(vis.intermediate_size)
    patch = (model.image_size // int(vis.patch_size)) ** 2 * 3 * int(vis.patch_size) ** 2 * c
    per_block = 4 * n * c * c + 2 * n * c * f + 2 * n * n * c  # q, k, v, out; MLP; scores and values
    return 2.0 * (patch + blocks * per_block)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="full", help="full (rd64, 352 px), small or tiny")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: known GPUs)")
    p.add_argument("--repeat", type=int, default=3, help="best of N timed passes")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = TGatedModel.from_config(model_config(args.model, 5)).to(device).eval()
    s = model.image_size
    slices = torch.rand(args.slices, 1, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    best = float("inf")
    with amp:
        model.encode_stack(slices[: min(args.slices, args.batch_size)], batch_size=args.batch_size)  # warm-up
        for _ in range(max(args.repeat, 1)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model.encode_stack(slices, batch_size=args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    blocks = model.deepest + 1
    flops = encoder_flops(model, blocks) * args.slices
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "model": args.model,
        "slices": args.slices,
        "blocks_run": blocks,
        "gflop_per_slice": encoder_flops(model, blocks) / 1e9,
        "gflop_per_slice_all_blocks": encoder_flops(model, model.num_encoder_layers) / 1e9,
        "seconds": best,
        "achieved_tflops": flops / best / 1e12,
        "peak_tflops": peak,
        "floor_s": flops / (peak * 1e12) if peak else None,
        "fraction_of_floor": (flops / (peak * 1e12)) / best if peak else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(
        f"encoder, {args.slices} slices of {s} px, blocks 0-{blocks - 1}: {result['gflop_per_slice']:.1f} GFLOP/slice, "
        f"{best:.3f} s, {result['achieved_tflops']:.2f} TFLOP/s"
    )
    if peak:
        print(
            f"floor at {peak:.0f} TFLOP/s: {result['floor_s'] * 1e3:.1f} ms; reached {result['fraction_of_floor']:.0%} of it"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
