"""benchmarks/gpu_check.sh end to end in its CPU dry-run mode (tiny sizes): every step runs and the one
JSON file it writes holds every benchmark's figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "figures" / "gpu_check.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["mode"] == "dry-run" and result["environment"]["device"] == "cpu"
    assert set(result["training"]) == {"fp32"} and 0.0 <= result["training"]["fp32"]["mean_dice"] <= 1.0
    bench = result["benchmarks"]
    sharing = bench["encoder_sharing"]["models"][0]
    assert sharing["model"] == "tiny" and sharing["ratio"] > 0 and sharing["max_abs_diff"] <= 1e-5
    floor = bench["encoder_floor"]
    assert floor["slices"] == 4 and floor["peak_tflops"] is None and floor["achieved_tflops"] > 0
    whole = bench["whole_ct"]
    assert whole["volume"] == [64, 64, 8] and whole["scaled"] == ["ours", "dynunet"]
    assert whole["ours"]["seconds"] == pytest.approx(whole["ours"]["seconds_run"] * 8 / 6)  # 6 of 8 slices run
    assert whole["dynunet"]["windows"] == 4 and whole["dynunet"]["windows_timed"] == 1  # 35 x 35 x 8 voxels at 1.5 mm, 32³ windows
    assert whole["ratio"] == pytest.approx(whole["ours"]["seconds"] / whole["dynunet"]["seconds"])
    assert whole["peak_rss_gb"] > 0 and whole["bound_gb"] > 0
    assert bench["token_cache"]["loss_cached"] == pytest.approx(
        bench["token_cache"]["loss_uncached"], rel=1e-4
    )
    assert bench["metrics"]["max_abs_diff"]["dice"] <= 1e-6
    loading = bench["data_loading"]
    assert [r["workers"] for r in loading["loader"]] == [0, 1] and loading["batches"] == 2
    assert all(r["identical"] for r in loading["loader"]) and loading["in_process_cpu_s_per_batch"] > 0
    assert (out.parent / "gpu_check.log").read_text().rstrip().endswith(f"figures in {out}")


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
