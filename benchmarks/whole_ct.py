"""One whole CT, two segmenters, one process: our Predictor vs MONAI DynUNet sliding-window inference.

The volume is CT-sized: 512 × 512 × 300 voxels of 0.8 × 0.8 × 1.5 mm (random HU values; both models
have random weights, which does not change their cost). It is segmented

* by ours: :class:`tgated.inference.predictor.Predictor` with the full-size model (ViT-B/16 rd64 at
  352 px, T-Gated adapter, K = 5, 13 organs): window → resize → shared encoder → adapter → decoder →
  probabilities resampled to 512² → label map;
* by the 3-D baseline's recipe, with MONAI's own pieces: ``Spacing`` to 1.5 mm isotropic, HU
  [−125, 275] → [0, 1], ``sliding_window_inference`` with 96³ windows, overlap 0.5, Gaussian weighting,
  through the project's ``DynUNet`` as ``configs/flare22_dynunet.yaml`` builds it (the published
  baseline's network: five 3³ stages, strides 1-2-2-2-2, filters 32-320, plain convolution blocks,
  14 output channels, 16.5 M parameters), argmax, and the labels resampled
  back to the native grid (nearest). Resampling labels instead of probabilities is the cheaper
  choice; the ratio is, if anything, in DynUNet's favour.

Ours runs first, so the process's peak resident memory at that point is ours (``ru_maxrss``); it is
compared with the bound 3 × (volume as float32 + our model's weights).

On a CPU a whole DynUNet pass (150 windows of 96³) takes far too long, so ``--dynunet-windows M``
stands in for it: M real windows run through ``sliding_window_inference`` on a sub-volume (one row
of windows along z), and their time is scaled to the volume's full window count; resampling in and
out runs on the whole volume (``"windows_scaled"`` in the JSON). On a loaded CPU a shorter stack
may stand in for ours as well (``--our-slices N``): the first N slices of the same volume (which is
in memory whole) are predicted, the time is scaled by the slices encoded (each 64-slice chunk also
encodes its windows' neighbours) and the peak memory by the label maps of the remaining slices (the
only arrays that grow with the stack); ``"scaled"`` in the JSON names what was scaled. With ``--device cuda`` both models run in bf16 autocast and peak CUDA memory is reported.

    python benchmarks/whole_ct.py --device cuda --json whole_ct.json          # a GPU: everything real
    python benchmarks/whole_ct.py --dynunet-windows 2 --json whole_ct.json    # 2 CPU cores: 10-20 min
    python benchmarks/whole_ct.py --dynunet-windows 2 --our-slices 64         # a loaded CPU: shorter
    python benchmarks/whole_ct.py --model tiny --size 64 --slices 12 --dynunet-windows 1 --roi 32   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder_sharing import model_config, perturb_adapters

from tgated.inference.predictor import Predictor
from tgated.io.volumes import volume_from_array
from tgated.models.tgated import TGatedModel
from tgated.organs import ORGANS

GB = 1e9
SPACING = (0.8, 0.8, 1.5)
TARGET_MM = 1.5
DYNUNET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flare22_dynunet.yaml"
"""The 3-D baseline's recipe (network, spacing, window) as the project trains it."""


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ct_volume(size: int, slices: int, seed: int = 0):
    """A (size, size, slices) float32 HU volume, made slice by slice (no float64 or full-size temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    data = np.empty((size, size, slices), dtype=np.float32)
    for z in range(slices):
        data[:, :, z] = (torch.randn(size, size, generator=gen) * 300 - 200).numpy()
    affine = np.diag([*SPACING, 1.0])
    return volume_from_array(data, affine, source=f"ct_{size}x{size}x{slices}", modality="ct")


def weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def run_ours(volume, args, device: torch.device) -> dict:
    model = TGatedModel.from_config(model_config(args.model, args.context))
    perturb_adapters(model)
    organs = [o.name for o in ORGANS[: args.organs]]
    predictor = Predictor(model, device=device, batch_size=args.batch_size, chunk_slices=args.chunk_slices)
    model.text_embeddings([model.prompt(o) for o in organs])  # prompt embeddings are cached in use
    warm = ct_volume(64, 3, seed=1)
    predictor.predict_volume(warm, organs)  # one-off set-up (thread pools, kernels) outside the timing
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    z = volume.shape[2]
    run = args.our_slices if 0 < args.our_slices < z else z
    part = (
        volume if run == z else volume_from_array(volume.data[:, :, :run], volume.affine, source="stand-in")
    )
    t0 = time.perf_counter()
    pred = predictor.predict_volume(part, organs)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    # a shorter stack stands in: time scales with the slices encoded (chunks re-encode their halo), and
    # the only arrays that grow with the stack are the label maps (3 uint8 copies per voxel)
    scale = encoded_slices(z, args.chunk_slices, model.context) / encoded_slices(
        run, args.chunk_slices, model.context
    )
    out = {
        "seconds": seconds * scale,
        "organs": len(organs),
        "context": model.context,
        "model": args.model,
        "weights_gb": weights_bytes(model) / GB,
        "peak_rss_gb": peak + (z - run) * volume.shape[0] * volume.shape[1] * 3 / GB,
        "slices_run": run,
        "scaled": run != z,
        "seconds_run": seconds,
        "peak_rss_gb_run": peak,
    }
    if device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / GB
    del pred, predictor, model
    return out


def encoded_slices(z: int, chunk: int, k: int) -> int:
    """Slice images the predictor encodes for a z-slice stack: each chunk of centres plus its
    windows' neighbours (index mode)."""
    return sum(min(start + chunk + k // 2, z) - max(start - k // 2, 0) for start in range(0, z, chunk))


def dynunet(roi: int) -> torch.nn.Module:
    """The 3-D baseline as ``tgated train`` builds it from ``configs/flare22_dynunet.yaml`` (the
    published baseline's network: 5 levels for 96³, filters 32-320, plain convolution blocks, 14
    output channels), with the window edge set to ``roi``."""
    from tgated.config import load_config
    from tgated.models.dynunet import DynUNetModel

    cfg = load_config(DYNUNET_CONFIG, [f"model.dynunet.patch_size=[{roi},{roi},{roi}]"])
    return DynUNetModel(cfg.model)


def windows_along(size: int, roi: int, overlap: float) -> int:
    """Window positions along one axis, as MONAI's sliding_window_inference places them."""
    if size <= roi:
        return 1
    step = max(int(roi * (1 - overlap)), 1)
    return math.ceil((size - roi) / step) + 1


def run_dynunet(volume, args, device: torch.device) -> dict:
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import ScaleIntensityRange, Spacing, SpatialResample

    roi = (args.roi,) * 3
    net = dynunet(args.roi).to(device).eval()
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), amp:
            return sliding_window_inference(
                x, roi, args.sw_batch_size, net, overlap=0.5, mode="gaussian", sw_device=device, device=device
            )

    with torch.no_grad():  # warm-up: one window
        infer(torch.zeros(1, 1, *roi, device=device))
    _sync(device)
    t0 = time.perf_counter()
    image = MetaTensor(torch.from_numpy(volume.data)[None], affine=torch.from_numpy(volume.affine))
    resampled = Spacing(pixdim=(TARGET_MM,) * 3, mode="bilinear")(image)
    x = ScaleIntensityRange(-125.0, 275.0, 0.0, 1.0, clip=True)(resampled)
    t_in = time.perf_counter() - t0
    grid = tuple(int(v) for v in x.shape[1:])
    n_windows = math.prod(windows_along(s, args.roi, 0.5) for s in grid)
    x = x.as_tensor()[None].to(device)

    def labels_of(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1).to(torch.uint8)

    t1 = time.perf_counter()
    if args.dynunet_windows <= 0 or args.dynunet_windows >= n_windows:
        lab = labels_of(infer(x))
        _sync(device)
        timed, t_windows = n_windows, time.perf_counter() - t1
        scale = 1.0
    else:  # a sub-volume holding M windows along z stands in
        m = args.dynunet_windows
        step = int(args.roi * 0.5)
        depth = min(args.roi + step * (m - 1), grid[2])
        sub = x[..., : args.roi, : args.roi, :depth]
        timed = windows_along(depth, args.roi, 0.5)
        sub_lab = labels_of(infer(sub))
        _sync(device)
        t_windows = time.perf_counter() - t1
        scale = n_windows / timed
        lab = torch.zeros(grid, dtype=torch.uint8)  # the full label grid, for the resampling back
        lab[: args.roi, : args.roi, :depth] = sub_lab[0].cpu()
        lab = lab[None]
    t2 = time.perf_counter()
    labels = MetaTensor(lab.reshape(1, *grid).cpu().float(), affine=resampled.affine)
    native = SpatialResample(mode="nearest")(
        labels, dst_affine=torch.from_numpy(volume.affine), spatial_size=volume.shape
    )
    native = native.as_tensor().to(torch.uint8)
    t_out = time.perf_counter() - t2
    assert tuple(native.shape[1:]) == tuple(volume.shape)
    seconds = t_in + t_windows * scale + t_out
    return {
        "seconds": seconds,
        "resample_in_s": t_in,
        "windows_s": t_windows * scale,
        "resample_out_s": t_out,
        "grid_1p5mm": list(grid),
        "roi": args.roi,
        "windows": n_windows,
        "windows_timed": timed,
        "windows_scaled": scale != 1.0,
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="full", help="full (rd64, 352 px), small or tiny (default full)")
    p.add_argument("--size", type=int, default=512, help="in-plane voxels (default 512)")
    p.add_argument("--slices", type=int, default=300, help="slices (default 300)")
    p.add_argument("--organs", type=int, default=13)
    p.add_argument("--context", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-slices", type=int, default=64)
    p.add_argument("--roi", type=int, default=96, help="DynUNet window edge (default 96)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="DynUNet windows per forward pass")
    p.add_argument(
        "--dynunet-windows",
        type=int,
        default=0,
        help="time only this many DynUNet windows and scale to the full count (CPU; 0 = all windows)",
    )
    p.add_argument(
        "--our-slices",
        type=int,
        default=0,
        help="predict only the first N slices with ours and scale to the volume (CPU; 0 = all)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rss_start = peak_rss_gb()
    volume = ct_volume(args.size, args.slices)
    ours = run_ours(volume, args, device)
    theirs = run_dynunet(volume, args, device)
    bound = 3 * (volume.data.nbytes / GB + ours["weights_gb"])
    result = {
        "volume": [args.size, args.size, args.slices],
        "spacing_mm": list(SPACING),
        "ours": {**ours, "slices_per_s": args.slices / ours["seconds"]},
        "scaled": [n for n, on in (("ours", ours["scaled"]), ("dynunet", theirs["windows_scaled"])) if on],
        "dynunet": {**theirs, "slices_per_s": args.slices / theirs["seconds"]},
        "ratio": ours["seconds"] / theirs["seconds"],
        "peak_rss_gb": ours["peak_rss_gb"],
        "rss_at_start_gb": rss_start,
        "bound_gb": bound,
        "within_bound": ours["peak_rss_gb"] < bound,
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    o, d = result["ours"], result["dynunet"]
    print(
        f"volume {args.size}x{args.size}x{args.slices} ({', '.join(map(str, SPACING))} mm), device {device}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"ours     {o['seconds']:9.1f} s  {o['slices_per_s']:6.2f} slices/s  peak RSS {o['peak_rss_gb']:.2f} GB "
        f"(bound {bound:.2f} GB)"
    )
    print(
        f"DynUNet  {d['seconds']:9.1f} s  {d['slices_per_s']:6.2f} slices/s  {d['windows']} windows "
        f"({d['windows_timed']} timed)"
    )
    print(f"ratio ours / DynUNet: {result['ratio']:.3f}")
    if o["scaled"]:
        print(
            f"  ours: {o['slices_run']} slices run in {o['seconds_run']:.1f} s (peak RSS {o['peak_rss_gb_run']:.2f} GB), "
            f"scaled to {args.slices}"
        )
    if d["windows_scaled"]:
        print(f"  DynUNet: {d['windows_timed']} of {d['windows']} windows run, scaled to all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
