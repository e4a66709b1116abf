"""Per-case metric time: tgated.metrics (cropped, exact) vs MONAI's uncropped calls, same process.

A synthetic abdominal label volume (13 organs: ellipsoids, and tubes along z for aorta, IVC and
esophagus) and a perturbed prediction (shifted, grown / shrunk organs, scattered false positives) are
scored for all 13 organs with

* ours:  ``tgated.metrics.native_case_scores`` (Dice, NSD at each organ's tolerance, HD95);
* MONAI: per organ, one-channel full-volume tensors into ``compute_dice``,
  ``compute_surface_dice(use_subvoxels=True)`` and ``compute_hausdorff_distance(percentile=95)``.

It prints both times, their ratio, and the largest differences between the two sets of values.

    python benchmarks/bench_metrics.py                 # 512×512×200, spacing 0.8×0.8×2.5 mm
    python benchmarks/bench_metrics.py --quick         # 256×256×100
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from tgated.metrics import native_case_scores
from tgated.organs import ORGANS

# (centre as a fraction of the volume, semi-axes in mm) per organ id; ids 5, 6, 10 are tubes along z.
_SHAPES = {
    1: ((0.35, 0.45, 0.60), (80, 70, 90)),
    2: ((0.30, 0.65, 0.45), (30, 30, 50)),
    3: ((0.72, 0.62, 0.62), (45, 35, 50)),
    4: ((0.55, 0.50, 0.50), (55, 15, 20)),
    5: ((0.53, 0.62, 0.50), (11, 11, None)),
    6: ((0.45, 0.60, 0.50), (12, 10, None)),
    7: ((0.38, 0.68, 0.66), (10, 6, 15)),
    8: ((0.64, 0.68, 0.66), (10, 6, 15)),
    9: ((0.36, 0.36, 0.50), (18, 18, 30)),
    10: ((0.52, 0.68, 0.80), (8, 8, None)),
    11: ((0.62, 0.40, 0.66), (55, 45, 45)),
    12: ((0.48, 0.42, 0.45), (40, 15, 20)),
    13: ((0.70, 0.66, 0.45), (30, 30, 50)),
}


def make_case(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0):
    """(ground truth, prediction) uint8 label maps with canonical ids 1-13."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    sp = np.asarray(spacing)
    for oid, (centre, radii) in _SHAPES.items():
        for target, jitter, scale in ((gt, 0.0, 1.0), (pred, 1.5, rng.uniform(0.9, 1.1))):
            c = np.asarray(centre) * np.asarray(shape) * sp + rng.normal(0, jitter, 3) * sp
            r = np.asarray([v if v is not None else 1e9 for v in radii], dtype=float) * scale
            lo = np.maximum(((c - r) / sp).astype(int), 0)
            hi = np.minimum(((c + r) / sp).astype(int) + 2, shape)
            if radii[2] is None:  # tube: 60 % of the z extent
                zc = int(centre[2] * shape[2])
                lo[2], hi[2] = max(zc - int(0.3 * shape[2]), 0), min(zc + int(0.3 * shape[2]), shape[2])
            grids = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            d = sum(((g * s - cc) / rr) ** 2 for g, s, cc, rr in zip(grids, sp, c, r, strict=True))
            view = target[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            view[d <= 1] = oid
    # scattered false positives: small blobs of random organs
    for _ in range(20):
        x, y, z = (int(rng.integers(0, n - 4)) for n in shape)
        pred[x : x + 4, y : y + 4, z : z + 2] = rng.integers(1, 14)
    return gt, pred


def monai_case(gt: np.ndarray, pred: np.ndarray, spacing) -> dict[str, tuple[float, float, float]]:
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    out = {}
    for organ in ORGANS:
        y = torch.from_numpy(gt == organ.id)[None, None].float()
        yp = torch.from_numpy(pred == organ.id)[None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = compute_dice(yp, y, include_background=True).item()
            nsd = compute_surface_dice(
                yp, y, [organ.nsd_tolerance_mm], include_background=True, spacing=spacing, use_subvoxels=True
            ).item()
            hd = compute_hausdorff_distance(
                yp, y, include_background=True, percentile=95, spacing=spacing
            ).item()
        out[organ.name] = (d, nsd, hd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    ap.add_argument("--quick", action="store_true", help="256×256×100")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions of ours (best is reported)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    shape = (256, 256, 100) if args.quick else tuple(args.shape)
    spacing = tuple(args.spacing)
    gt, pred = make_case(shape, spacing)
    print(f"volume {shape}, spacing {spacing} mm, organ voxels {int((gt > 0).sum())}")

    # warm-up: imports and the surfel-area table for this spacing are not part of a case's time
    warm = np.zeros((6, 6, 6), np.uint8)
    warm[2:4, 2:4, 2:4] = 1
    native_case_scores(warm, np.roll(warm, 1, axis=0), spacing, ["liver"])
    times = []
    for _ in range(max(args.repeat, 1)):
        t0 = time.perf_counter()
        ours = native_case_scores(gt, pred, spacing, [o.name for o in ORGANS])
        times.append(time.perf_counter() - t0)
    t_ours = min(times)

    t0 = time.perf_counter()
    ref = monai_case(gt, pred, spacing)
    t_monai = time.perf_counter() - t0

    diffs = {"dice": 0.0, "nsd": 0.0, "hd95": 0.0}
    for s in ours:
        for key, mine, theirs in zip(
            ("dice", "nsd", "hd95"), (s.dice, s.nsd, s.hd95), ref[s.organ], strict=True
        ):
            if not (math.isnan(mine) and math.isnan(theirs)):
                diffs[key] = max(diffs[key], abs(mine - theirs))
    print(f"ours  (cropped)  : {t_ours:7.2f} s per case (13 organs; Dice, NSD, HD95)")
    print(f"MONAI (uncropped): {t_monai:7.2f} s per case")
    print(f"ratio MONAI / ours: {t_monai / t_ours:.1f}x")
    print("max |difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if args.json:
        figures = {"shape": list(shape), "spacing_mm": list(spacing), "ours_s": t_ours, "monai_s": t_monai}
        figures.update(ratio=t_monai / t_ours, max_abs_diff=diffs)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
