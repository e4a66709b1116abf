"""Peak memory of ``tgated predict`` on one CT-sized volume, with and without ``--save-probabilities``.

A 512 × 512 × 300 CT (0.8 × 0.8 × 1.5 mm, random int16 HU values, written as an uncompressed NIfTI)
and a saved model with random weights (``--model tiny`` by default: memory, not speed, is measured)
go through the real command line (``tgated.cli.main(["predict", ...])``) in a fresh child process
per run, which reports its own peak resident memory (``ru_maxrss``) when the command returns. Each
peak is compared with the bound 3 × (volume as float32 + model weights).

With ``--save-probabilities`` the 13 organs' probabilities of the volume are 2 GB of float16; they
are staged in a scratch file next to ``<case>_probs.npz`` and written organ by organ
(:mod:`tgated.inference.probabilities`), so the peak should stay near the run without them.

    python benchmarks/predict_memory.py                       # tiny model, 512 × 512 × 300: about a minute per run
    python benchmarks/predict_memory.py --size 64 --slices 8  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder_sharing import model_config, perturb_adapters
from whole_ct import SPACING, cpu_name, weights_bytes

from tgated.io.files import is_temporary
from tgated.io.volumes import write_nifti
from tgated.models.tgated import TGatedModel
from tgated.organs import ORGANS

GB = 1e9


def write_ct(path: Path, size: int, slices: int, seed: int = 0) -> None:
    """A (size, size, slices) int16 HU volume, made slice by slice."""
    gen = np.random.default_rng(seed)
    data = np.empty((size, size, slices), dtype=np.int16)
    for z in range(slices):
        data[:, :, z] = (gen.normal(-200, 300, (size, size))).clip(-1024, 3071)
    write_nifti(path, data, np.diag([*SPACING, 1.0]))


CHILD = """
import json, resource, sys
from tgated.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_predict(model: Path, image: Path, out: Path, organs: int, batch_size: int, probs: bool) -> dict:
    """One ``tgated predict`` in a fresh child process: its wall time and peak RSS (Linux: kB)."""
    names = ",".join(o.name for o in ORGANS[:organs])
    cmd = [sys.executable, "-c", CHILD, "predict", "--model", str(model), "--input", str(image)]
    cmd += ["--output", str(out), "--organs", names, "--device", "cpu", "--modality", "ct"]
    cmd += ["--batch-size", str(batch_size), "--quiet"] + (["--save-probabilities"] if probs else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout else {}
    if report.get("code") != 0:
        raise SystemExit(f"tgated predict failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = {"seconds": seconds, "peak_rss_gb": report["maxrss_kb"] * 1024 / GB}
    npz = out / "ct_probs.npz"
    if probs:
        with np.load(npz) as saved:
            result["probability_organs"] = len([k for k in saved.files if k != "affine"])
        result["npz_gb"] = npz.stat().st_size / GB
    left = [p.name for p in out.iterdir() if is_temporary(p)]
    if left:
        raise SystemExit(f"tgated predict left temporaries in {out}: {left}")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (default), small or full")
    p.add_argument("--size", type=int, default=512, help="in-plane voxels (default 512)")
    p.add_argument("--slices", type=int, default=300, help="slices (default 300)")
    p.add_argument("--organs", type=int, default=13)
    p.add_argument("--context", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--runs",
        default="probabilities,labels",
        help="comma-separated runs, measured in this order: probabilities (--save-probabilities), labels",
    )
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"probabilities", "labels"}:
        p.error(f"--runs {args.runs!r}: expected probabilities and/or labels")
    with tempfile.TemporaryDirectory(prefix="predict_memory-") as tmp:
        work = Path(tmp)
        model = TGatedModel.from_config(model_config(args.model, args.context))
        perturb_adapters(model)
        weights_gb = weights_bytes(model) / GB
        model.save_pretrained(work / "model")
        del model
        image = work / "ct.nii"
        write_ct(image, args.size, args.slices)
        volume_gb = args.size * args.size * args.slices * 4 / GB
        bound = 3 * (volume_gb + weights_gb)
        figures = {}
        for name in runs:
            out = work / f"out-{name}"
            figures[name] = run_predict(
                work / "model", image, out, args.organs, args.batch_size, name == "probabilities"
            )
    result = {
        "volume": [args.size, args.size, args.slices],
        "model": args.model,
        "organs": args.organs,
        "batch_size": args.batch_size,
        "volume_gb": volume_gb,
        "weights_gb": weights_gb,
        "bound_gb": bound,
        "runs": figures,
        "machine": {
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    print(
        f"volume {args.size}x{args.size}x{args.slices}, model {args.model} ({weights_gb:.3f} GB), {args.organs} organs, "
        f"bound 3 × ({volume_gb:.3f} + {weights_gb:.3f}) = {bound:.2f} GB"
    )
    for name, f in figures.items():
        peak = f"{f['peak_rss_gb']:.2f} GB ({f['peak_rss_gb'] / bound:.2f} of the bound)"
        extra = f", npz {f['npz_gb']:.2f} GB" if "npz_gb" in f else ""
        print(f"{name:14s} peak RSS {peak}  ({f['seconds']:.0f} s{extra})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
