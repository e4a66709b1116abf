"""Nothing lost: ``tgated train`` killed (SIGKILL) part-way through a run, then ``--resume``d, ends
with the same weights and log as the same run left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import checkpoint_step
from tgated.config import dump_yaml
from tgated.io.files import is_temporary
from tgated.training.checkpoint import load_checkpoint


def _train(cfg: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tgated", "train", str(cfg), "--out", str(run), "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.slow
def test_killed_train_resumes_to_the_same_weights(tiny_cfg, tmp_path):
    # augmentation and dropout on, a checkpoint every 2 optimizer steps, validation every epoch
    cfg = tiny_cfg("train.epochs=3", "train.steps_per_epoch=24", "train.checkpoint_every=2")
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))

    full = tmp_path / "full"
    _finish(_train(path, full))

    run = tmp_path / "killed"
    proc = _train(path, run)
    deadline = time.monotonic() + 300
    while checkpoint_step(run) < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # kill in the second epoch, after its first checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped = checkpoint_step(run)
    assert 30 <= stopped < 72
    # only complete files: a checkpoint that loads, no stray temporaries except in-flight ones
    assert all(is_temporary(p) or p.name in {"config.yaml", "splits.json", "environment.json",
               "model", "checkpoints", "log.csv", "val.json"} for p in run.iterdir())  # fmt: skip

    _finish(_train(path, run, "--resume"))
    assert checkpoint_step(run) == checkpoint_step(full) == 72
    a, b = _weights(full), _weights(run)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    last_a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    last_b = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert max((last_a[k] - last_b[k]).abs().max().item() for k in last_a) <= 1e-6
    strip = [line.rsplit(",", 1)[0] for line in (full / "log.csv").read_text().splitlines()]
    assert strip == [line.rsplit(",", 1)[0] for line in (run / "log.csv").read_text().splitlines()]
    assert not any(is_temporary(p) for p in run.rglob("*"))
