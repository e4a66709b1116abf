"""Two CPU processes under torchrun (DDP, gloo) train the same model as one process with the same
global batch, and end with identical replicas."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.training.conftest import no_dropout
from tgated.config import dump_yaml
from tgated.training import train
from tgated.training.checkpoint import load_checkpoint


@pytest.mark.slow
def test_two_processes_match_one(tiny_cfg, tmp_path):
    # augmentation stays on (flips, rotations: per-sample generators); dropout off so the two runs
    # draw no process-dependent random numbers
    cfg = tiny_cfg(
        "train.epochs=2", "train.steps_per_epoch=3", "train.batch_size=4", "train.grad_accum=2", *no_dropout()
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tgated", "train", str(path), "--out", str(tmp_path / "ddp"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(path, out=tmp_path / "single", quiet=True)

    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    one = load_checkpoint(single.run_dir / "checkpoints" / "last.pt")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp["replica_sha256"]) == 2 and ddp["replica_sha256"][0] == ddp["replica_sha256"][1]
    assert ddp["step"] == one["step"] == 6
    worst = max((ddp["model"][k] - one["model"][k]).abs().max().item() for k in one["model"])
    assert worst <= 1e-5
    changed = max((one["model"][k] - v).abs().max().item() for k, v in _initial(cfg).items())
    assert changed > 1e-4  # the comparison is not between two untrained models
    for a, b in zip(ddp["history"], one["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-4)
    # only rank 0 wrote: one set of files, no leftovers
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in single.run_dir.iterdir()
    )


def _initial(cfg):
    from tgated.models.tgated import TGatedModel

    return TGatedModel.from_config(cfg.model).state_dict()
