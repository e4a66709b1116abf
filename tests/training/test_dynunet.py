"""The 3-D DynUNet baseline: architecture rule, save/load, training (kill + resume exact, two
processes), prediction files with the T-Gated predictor's contract, and evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.training.conftest import checkpoint_step
from tgated.cli import main
from tgated.config import ModelConfig, apply_overrides, dump_yaml, load_config
from tgated.models.dynunet import DynUNetModel, kernels_and_strides
from tgated.training.checkpoint import load_checkpoint
from tgated.training.dynunet import init_seed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_cpu_dynunet.yaml"


def test_kernels_and_strides_follow_monai_s_rule():
    # 96³ at 1.5 mm: halve every axis while it is >= 8 voxels: 96, 48, 24, 12, 6 -> five levels
    kernels, strides = kernels_and_strides((96, 96, 96), (1.5, 1.5, 1.5))
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 4 and kernels == [[3, 3, 3]] * 5
    # 5 mm slices vs 1 mm in-plane: z is not halved (nor convolved) until the in-plane axes are
    # within twice its spacing: 1 -> 2 -> 4 mm in-plane, then z joins
    kernels, strides = kernels_and_strides((64, 64, 32), (1.0, 1.0, 5.0))
    assert strides[:4] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert kernels[:3] == [[3, 3, 1], [3, 3, 1], [3, 3, 3]]


def test_config_errors_name_the_key():
    cfg = load_config(CONFIG)
    bad = apply_overrides(cfg, ["model.dynunet.filters=[8,16]"])
    with pytest.raises(ValueError, match=r"model.dynunet.filters=\[8, 16\]: expected 4 values"):
        DynUNetModel(bad.model)
    bad = apply_overrides(cfg, ["model.dynunet.patch_size=[32,32,4]"])
    with pytest.raises(ValueError, match="at least 8 voxels"):
        DynUNetModel(bad.model)
    with pytest.raises(ValueError, match="DynUNetModel needs 'dynunet'"):
        DynUNetModel(ModelConfig())


def test_deep_supervision_weights_and_dice_background():
    """Default head weights 1, 1/2, 1/4 normalised; the published [0.5333, 0.2667, 0.2] as given; a
    wrong count is an error naming the key before training; dice_background reaches MONAI's loss."""
    from tgated.training.dynunet import check_dynunet_train_config, deep_supervision_weights

    cfg = apply_overrides(load_config(CONFIG), ["data.root=x", "model.dynunet.deep_supr_num=2"])
    assert deep_supervision_weights(cfg) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    published = apply_overrides(cfg, ["train.dynunet.deep_supervision_weights=[0.5333,0.2667,0.2]"])
    assert deep_supervision_weights(published) == [0.5333, 0.2667, 0.2]
    no_ds = apply_overrides(cfg, ["model.dynunet.deep_supervision=false"])
    assert deep_supervision_weights(no_ds) == [1.0]
    bad = apply_overrides(cfg, ["train.dynunet.deep_supervision_weights=[0.5,0.5]"])
    with pytest.raises(ValueError, match=r"train.dynunet.deep_supervision_weights=\[0.5, 0.5\]: expected 3 finite"):
        check_dynunet_train_config(bad)
    from tgated.training.dynunet import dice_ce_loss

    out = torch.zeros(1, 3, 4, 4, 4)
    out[:, 0] = 5.0  # background everywhere, confidently
    label = torch.zeros(1, 1, 4, 4, 4)
    label[..., :2] = 1  # half the voxels are class 1
    ours = dice_ce_loss(cfg)
    published = dice_ce_loss(apply_overrides(cfg, ["train.dynunet.dice_background=false"]))
    assert ours.dice.include_background and not published.dice.include_background
    # the well-predicted background channel no longer lowers the Dice term; the cross-entropy is the same
    assert float(published(out, label)) > float(ours(out, label))
    assert float(published.ce(out, label[:, 0].long()[:, None])) == pytest.approx(float(ours.ce(out, label[:, 0].long()[:, None])))


def test_memory_check_names_the_fix():
    """A volume too large for memory fails before any work, with the DynUNet's own advice: drop the
    probabilities when that is enough, else crop (its tiles do not grow with the volume)."""
    from tgated.inference.dynunet import DynUNetPredictor

    cfg = load_config(CONFIG)
    pred = DynUNetPredictor(DynUNetModel.from_config(cfg.model, seed=0), device="cpu")
    shape = (512, 512, 2000)
    kept, lean = pred.memory_estimate(shape, 4, True), pred.memory_estimate(shape, 4, False)
    assert kept.work_gb == lean.work_gb and kept.volume_gb > lean.volume_gb > 0
    with pytest.raises(ValueError, match=r"GB is available; leave out --save-probabilities$"):
        pred.check_memory(shape, 4, True, available_gb=(lean.host_gb + kept.host_gb) / 2)
    with pytest.raises(ValueError) as exc:
        pred.check_memory(shape, 4, True, source="big.nii.gz", available_gb=1.0)
    assert str(exc.value) == (
        f"big.nii.gz: segmenting (512, 512, 2000) voxels × 4 organs needs about {kept.host_gb:.1f} GB of "
        f"memory ({kept.volume_gb:.1f} GB for the volume and its outputs, {kept.work_gb:.1f} GB for 2 tiles "
        "of 32×32×16 voxels at a time on cpu), but only 1.0 GB is available; crop the volume and leave out "
        "--save-probabilities"
    )
    assert pred.check_memory(shape, 4, True, available_gb=kept.host_gb + 1) == kept  # fits: no error


def test_save_load_round_trip_and_tampering(tmp_path):
    cfg = load_config(CONFIG)
    model = DynUNetModel.from_config(cfg.model, seed=3).eval()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model_type"] == "dynunet" and meta["model"]["dynunet"]["patch_size"] == [32, 32, 16]
    loaded = DynUNetModel.from_pretrained(tmp_path / "m")
    x = torch.randn(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="does not match"):
        DynUNetModel.from_pretrained(tmp_path / "m")


@pytest.fixture(scope="module")
def dyn_cfg(tmp_path_factory, phantom_root) -> Path:
    cfg = load_config(
        CONFIG, [f"data.root={phantom_root}", "train.device=cpu", "train.epochs=2", "train.steps_per_epoch=4"]
    )
    path = tmp_path_factory.mktemp("dyncfg") / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    return path


@pytest.fixture(scope="module")
def dyn_run(tmp_path_factory, dyn_cfg) -> Path:
    run = tmp_path_factory.mktemp("dynrun") / "run"
    assert main(["train", str(dyn_cfg), "--out", str(run), "--quiet"]) == 0
    return run


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_train_writes_a_run_that_learns(dyn_run):
    names = {p.name for p in dyn_run.iterdir()}
    assert {"config.yaml", "splits.json", "environment.json", "model", "checkpoints", "log.csv", "val.json"} <= names
    state = load_checkpoint(dyn_run / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["epoch"] == 2
    log = (dyn_run / "log.csv").read_text().splitlines()
    assert log[0] == "epoch,step,lr,loss,val_dice,time_s" and len(log) == 3
    losses = [float(line.split(",")[3]) for line in log[1:]]
    assert losses[1] < losses[0]  # the DiceCE loss falls from epoch 1 to 2
    cfg = load_config(dyn_run / "config.yaml")
    first = DynUNetModel.from_config(cfg.model, seed=init_seed(cfg)).state_dict()
    trained = DynUNetModel.from_pretrained(dyn_run).state_dict()
    assert sum(torch.equal(first[k], trained[k]) for k in first) < len(first) // 4  # most tensors trained


@pytest.mark.slow
def test_killed_dynunet_train_resumes_to_the_same_weights(tmp_path, dyn_cfg):
    cfg = load_config(dyn_cfg, ["train.checkpoint_every=1", "train.epochs=3"])
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    full, run = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "tgated", "train", str(path), "--quiet", "--out"]
    done = subprocess.run([*cmd, str(full)], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the killed run prepares its patches in 2 worker processes, its resumption in 1, the full run in
    # the training process: the patches do not depend on where they are made
    workers = ["--set", "train.num_workers=2"]
    proc = subprocess.Popen(
        [*cmd, str(run), *workers], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while checkpoint_step(run) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # kill in the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 6 <= checkpoint_step(run) < 12
    again = subprocess.run(
        [*cmd, str(run), "--resume", "--set", "train.num_workers=1"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) == 0.0
    strip = [line.rsplit(",", 1)[0] for line in (full / "log.csv").read_text().splitlines()]
    assert strip == [line.rsplit(",", 1)[0] for line in (run / "log.csv").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, dyn_cfg):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tgated", "train", str(dyn_cfg), "--out", str(tmp_path / "ddp"), "--quiet"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "tgated", "train", str(dyn_cfg), "--out", str(tmp_path / "one"), "--quiet"],
                         env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["step"] == b["step"] == 8
    # the same patches give the same losses up to what AdamW makes of float rounding (below): each
    # epoch's loss within 0.5 % of how far training moved it (measured: 0.03 %; 1e-4 in 2.42 apart)
    fell = b["history"][0]["loss"] - b["history"][-1]["loss"]
    assert fell > 0.1
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=0.005 * fell)
        assert x["val_dice"] == pytest.approx(y["val_dice"], abs=1e-3)
    # instance norm and per-sample patches: the two halves' averaged gradients are the whole batch's;
    # Adam turns float-rounding differences of near-zero gradients into steps of up to lr, so the
    # weights agree in aggregate (measured: 0.2 % of the training change), not element by element
    init = DynUNetModel.from_config(
        load_config(dyn_cfg).model, seed=init_seed(load_config(dyn_cfg))
    ).state_dict()
    floats = [k for k in b["model"] if b["model"][k].is_floating_point()]
    apart = sum((a["model"][k] - b["model"][k]).abs().sum().item() for k in floats)
    moved = sum((b["model"][k] - init[k]).abs().sum().item() for k in floats)
    assert moved > 0 and apart / moved < 0.02
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


@pytest.mark.slow
def test_two_processes_match_one_element_wise_before_adamw(tmp_path, dyn_cfg):
    """The trainer's batches, network and loss under DDP give one process's gradients and (with SGD)
    its weights element by element: what is left between two processes and one is float rounding,
    which AdamW turns into steps of up to lr (the aggregate comparison above)."""
    from tests.training.dynunet_steps import run

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.training.dynunet_steps", str(dyn_cfg), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "steps_2.pt")
    one = torch.load(run(str(dyn_cfg), tmp_path, []))
    # rank 0's share of the first batch is the single process's first patch (same volume, same draw)
    assert len(one["rows"]) == 2 and two["rows"] == one["rows"][:1]
    # the all-reduced mean of the two half-batch gradients is the whole batch's gradient up to the
    # order of float32 additions: measured 5.6e-7 of the largest gradient, while per-process batch-norm
    # statistics (model.dynunet.norm=batch, now refused on the CPU) put them 4e-2 of it apart
    scale = max(g.abs().max().item() for g in one["grads"].values())
    worst = max((two["grads"][k] - g).abs().max().item() for k, g in one["grads"].items())
    assert scale > 0 and worst <= 1e-5 * scale
    # three SGD steps at lr 1e-2: every weight within 1e-5 (measured 3e-7) of the single process's,
    # while training moved weights by up to ~1e-2 (AdamW: 16 % of the weights more than 1e-4 apart)
    cfg = load_config(dyn_cfg)
    init = dict(DynUNetModel.from_config(cfg.model, seed=init_seed(cfg)).named_parameters())
    moved = max((w - init[k]).abs().max().item() for k, w in one["weights"].items())
    apart = max((two["weights"][k] - w).abs().max().item() for k, w in one["weights"].items())
    assert moved > 1e-3 and apart <= 1e-5


def test_batch_norm_under_ddp_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    from tgated.training.distributed import DistContext
    from tgated.training.dynunet import DynUNetTrainer

    cfg = apply_overrides(load_config(CONFIG), ["data.root=x", "model.dynunet.norm=batch"])
    with pytest.raises(ValueError, match=r"norm='batch' with 2 processes on the CPU: .*norm=instance"):
        DynUNetTrainer(cfg, tmp_path / "run", DistContext(world_size=2), resume=False, quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_predict_and_evaluate_follow_the_predictor_contract(tmp_path, dyn_run, phantom_root):
    from tests.models.conftest import tiny_model_config
    from tgated.models.tgated import TGatedModel

    out = tmp_path / "pred"
    assert main(["predict", "--run", str(dyn_run), "--split", "test", "--output", str(out), "--device", "cpu",
                 "--save-probabilities", "--quiet"]) == 0  # fmt: skip
    (test_id,) = json.loads((dyn_run / "splits.json").read_text())["test"]
    image = nib.load(phantom_root / "images" / f"{test_id}_0000.nii.gz")
    pred = nib.load(out / f"{test_id}.nii.gz")
    assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3, 13}
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {
        "0": "background",
        "1": "liver",
        "2": "right_kidney",
        "3": "spleen",
        "13": "left_kidney",
    }
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model"]["config"]["model_type"] == "dynunet" and prov["model"]["run"] == str(
        dyn_run.resolve()
    )
    probs = np.load(out / f"{test_id}_probs.npz")
    assert probs["liver"].shape == image.shape and probs["liver"].dtype == np.float16
    assert float(probs["liver"].max()) <= 1.0

    # the same files as a T-Gated model's predictions of the same case
    tg_model = tmp_path / "tg" / "model"
    TGatedModel.from_config(
        tiny_model_config(organs=["liver", "right_kidney", "spleen", "left_kidney"])
    ).save_pretrained(tg_model)
    tg = tmp_path / "tg_pred"
    assert main(["predict", "--model", str(tg_model), "--input", str(phantom_root / "images" / f"{test_id}_0000.nii.gz"),
                 "--output", str(tg), "--device", "cpu", "--save-probabilities", "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in tg.iterdir()) == sorted(p.name for p in out.iterdir())
    tg_img = nib.load(tg / f"{test_id}.nii.gz")
    assert tg_img.shape == pred.shape and tg_img.get_data_dtype() == pred.get_data_dtype()
    np.testing.assert_array_equal(tg_img.affine, pred.affine)
    assert json.loads((tg / "labels.json").read_text()) == labels
    assert set(np.load(tg / f"{test_id}_probs.npz").files) == set(probs.files)

    ev = tmp_path / "eval"
    argv = ["evaluate", "--run", str(dyn_run), "--split", "test", "--pred", str(out), "--gt", str(phantom_root),
            "--dataset", "flare22", "--out", str(ev), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["cases"] == 1 and set(summary["organs"]) <= {
        "liver",
        "right_kidney",
        "spleen",
        "left_kidney",
    }
