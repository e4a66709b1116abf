"""Loss values, the learning-rate schedule, checkpoint files and generator states."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tgated.config import TrainConfig
from tgated.io.files import is_temporary, replace_dir
from tgated.training.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from tgated.training.loop import (
    check_config,
    check_min_lr,
    config_differences,
    cosine_restart_factor,
    resolve_precision,
    scheduled_lr,
)
from tgated.training.losses import segmentation_loss, soft_dice_loss
from tgated.training.runs import default_jobs, resolve_num_workers, side_by_side


def test_loss_by_hand():
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    parts = segmentation_loss(logits, target, bce_weight=1.0, dice_weight=2.0)
    # p = 0.5 everywhere: BCE = ln 2; soft Dice = (2·0.5 + 1) / (2 + 1 + 1) = 0.5
    assert parts.bce.item() == pytest.approx(math.log(2))
    assert parts.dice.item() == pytest.approx(0.5)
    assert parts.total.item() == pytest.approx(math.log(2) + 2 * 0.5)
    # a negative sample (empty target) predicted empty costs nothing; predicted full costs 1 - 1/(4+1)
    empty = torch.zeros(1, 2, 2)
    assert soft_dice_loss(torch.full((1, 2, 2), -50.0), empty).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(torch.full((1, 2, 2), 50.0), empty).item() == pytest.approx(0.8)
    # batch mean of per-sample losses
    both = soft_dice_loss(torch.stack([logits[0], torch.full((2, 2), 50.0)]), torch.cat([target, empty]))
    assert both.item() == pytest.approx((0.5 + 0.8) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_loss(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))


def test_bce_pos_weight_by_hand():
    # logits 2 on the one organ pixel, -1 on the three background pixels
    logits = torch.tensor([[[2.0, -1.0], [-1.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    pos = -math.log(1 / (1 + math.exp(-2.0)))  # -log σ(2)
    neg = -math.log(1 - 1 / (1 + math.exp(1.0)))  # -log(1 - σ(-1))
    plain = segmentation_loss(logits, target)
    weighted = segmentation_loss(logits, target, pos_weight=10.0)
    assert plain.bce.item() == pytest.approx((pos + 3 * neg) / 4)
    assert weighted.bce.item() == pytest.approx((10 * pos + 3 * neg) / 4)
    assert weighted.dice.item() == pytest.approx(plain.dice.item())  # the Dice term is unweighted
    # the organ pixel's gradient is 10 times the plain one; the background's is unchanged
    grads = []
    for w in (1.0, 10.0):
        x = logits.clone().requires_grad_(True)
        segmentation_loss(x, target, pos_weight=w, dice_weight=0.0).total.backward()
        grads.append(x.grad[0])
    assert grads[1][0, 0].item() == pytest.approx(10 * grads[0][0, 0].item())
    assert grads[1][1, 1].item() == pytest.approx(grads[0][1, 1].item())
    from tgated.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.data.root = "x"
    for bad in (0.0, -2.0, float("nan")):
        cfg.train.bce_pos_weight = bad
        with pytest.raises(ValueError, match=r"train.bce_pos_weight=.*: expected a weight > 0 \(1 = plain BCE\)"):
            check_config(cfg)
    cfg.train.bce_pos_weight = 10.0
    check_config(cfg)


def test_dice_smoothing_of_the_published_loss():
    """``dice_smooth`` 1e-5 is MONAI's DiceLoss(sigmoid=True): p = 0.5 on 4 pixels, one foreground:
    Dice = (2·0.5 + 1e-5) / (2 + 1 + 1e-5); an empty target costs about 1 even when almost nothing is
    predicted (Σp = 4·σ(−10) ≈ 1.8e-4)."""
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    parts = segmentation_loss(logits, target, dice_smooth=1e-5)
    assert parts.dice.item() == pytest.approx(1 - (1 + 1e-5) / (3 + 1e-5))
    s = 4 / (1 + math.exp(10.0))
    empty = torch.zeros(1, 2, 2)
    assert soft_dice_loss(torch.full((1, 2, 2), -10.0), empty, 1e-5).item() == pytest.approx(1 - 1e-5 / (s + 1e-5))
    assert soft_dice_loss(torch.full((1, 2, 2), -10.0), empty, 1e-5).item() > 0.9
    assert soft_dice_loss(torch.full((1, 2, 2), -10.0), empty).item() < 2e-4  # ours: about 0
    try:
        from monai.losses import DiceLoss
    except ImportError:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, generator=g) * 3
    t = (torch.rand(3, 8, 8, generator=g) > 0.7).float()
    t[1] = 0  # an empty target among them
    ref = DiceLoss(sigmoid=True, batch=False, include_background=True)(x[:, None], t[:, None])
    assert soft_dice_loss(x, t, 1e-5).item() == pytest.approx(ref.item(), rel=1e-5)


def test_cosine_schedule_with_warm_restarts():
    r = 0.01
    assert cosine_restart_factor(0, 10, r) == pytest.approx(1.0)
    assert cosine_restart_factor(5, 10, r) == pytest.approx((1 + r) / 2)
    assert cosine_restart_factor(9, 10, r) == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert cosine_restart_factor(10, 10, r) == pytest.approx(1.0)  # restart
    assert cosine_restart_factor(25, 10, r) == pytest.approx(cosine_restart_factor(5, 10, r))


def test_epoch_schedule_with_absolute_minimum_is_pytorchs_warm_restarts():
    """schedule_step: epoch + min_lr (ratio 0) gives, per epoch, the rates of PyTorch's
    CosineAnnealingWarmRestarts(T_0=5, eta_min=1e-7) stepped at every epoch end, for every group
    (the 1e-6 group goes down to 1e-7, not to a fraction of its own rate)."""
    t = TrainConfig(warm_restart_epochs=5, schedule_step="epoch", min_lr=1e-7, min_lr_ratio=0.0)
    bases = [5e-5, 1e-5, 1e-6]
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": b} for b in bases])
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=1, eta_min=1e-7)
    steps_per_epoch = 7
    for epoch in range(12):
        expected = [g["lr"] for g in opt.param_groups]
        for i in range(steps_per_epoch):  # constant within the epoch
            step = epoch * steps_per_epoch + i
            got = [scheduled_lr(b, t, step=step, epoch=epoch, steps_per_epoch=steps_per_epoch) for b in bases]
            assert got == pytest.approx(expected, rel=1e-12, abs=0)
        opt.step()
        sched.step()
    # by hand: epoch 4 of 5 (T_cur = 4), the 1e-6 group
    e4 = scheduled_lr(1e-6, t, step=0, epoch=4, steps_per_epoch=1)
    assert e4 == pytest.approx(1e-7 + 0.9e-6 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert scheduled_lr(1e-6, t, step=0, epoch=5, steps_per_epoch=1) == pytest.approx(1e-6)  # restart


def test_step_schedule_default_is_the_relative_cosine():
    t = TrainConfig(warm_restart_epochs=2)  # schedule_step: step, min_lr 0, min_lr_ratio 0.01
    for step in range(0, 45, 7):
        assert scheduled_lr(1e-4, t, step=step, epoch=step // 10, steps_per_epoch=10) == (
            1e-4 * cosine_restart_factor(step, 20, 0.01)
        )
    # both: the lowest rate is min_lr + ratio · (lr − min_lr), reached just before a restart
    t = TrainConfig(warm_restart_epochs=1, min_lr=1e-6, min_lr_ratio=0.5)
    low = scheduled_lr(1e-4, t, step=10_000 - 1, epoch=0, steps_per_epoch=10_000)
    assert low == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6), rel=1e-6)


def test_min_lr_above_a_group_rate_is_an_error():
    t = TrainConfig(min_lr=1e-5)
    check_min_lr(t, {"train.lr_adapter": 1e-4, "train.lr_decoder": 1e-5})  # equal is fine
    with pytest.raises(ValueError, match=r"train.min_lr=1e-05: expected at most every learning rate in use, "
                       r"but train.lr_backbone=1e-06 is lower"):
        check_min_lr(t, {"train.lr_adapter": 1e-4, "train.lr_backbone": 1e-6})
    from tgated.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.data.root = "x"
    cfg.train.min_lr = -1e-7
    with pytest.raises(ValueError, match=r"train.min_lr=-1e-07: expected a finite learning rate >= 0"):
        check_config(cfg)
    cfg.train.min_lr = 0.0
    cfg.train.schedule_step = "epoch"
    check_config(cfg)


def test_precision_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize(
    ("value", "device", "cores", "local", "expected"),
    [
        ("auto", "cpu", 16, "1", 0),  # on the CPU workers only take cores from the computation
        ("auto", "cuda", 16, "1", 8),  # 15 free cores, capped at AUTO_WORKERS_MAX
        ("auto", "cuda", 16, "4", 3),  # 4 processes share 16 cores: 4 each, one is the trainer
        ("auto", "cuda", 2, "1", 1),
        ("auto", "cuda", 1, "1", 0),
        (3, "cpu", 16, "1", 3),  # a number is used as given
        (0, "cuda", 16, "1", 0),
    ],
)
def test_num_workers_auto(monkeypatch, value, device, cores, local, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert resolve_num_workers(value, torch.device(device)) == expected


@pytest.mark.parametrize(
    ("device", "cores", "threads", "expected"),
    [("cpu", 2, 1, 2), ("cpu", 16, 4, 4), ("cpu", 2, 3, 1), ("cuda", 16, 1, 1), ("cuda:1", 16, 1, 1)],
)
def test_default_jobs(monkeypatch, device, cores, threads, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_jobs(device, threads) == expected


def _threads_times(x: int) -> tuple[int, int]:
    return x, torch.get_num_threads()


def test_side_by_side_runs_every_task_with_its_threads():
    before = torch.get_num_threads()
    calls: list[int] = []
    inline = list(side_by_side(_threads_times, [1, 2, 3], jobs=1, threads=before + 1, first=(calls.append, (7,))))
    assert inline == [(1, before + 1), (2, before + 1), (3, before + 1)] and calls == [7]
    assert torch.get_num_threads() == before  # given back
    pooled = sorted(side_by_side(_threads_times, [1, 2, 3], jobs=2, threads=1))  # worker processes
    assert pooled == [(1, 1), (2, 1), (3, 1)]


def test_config_differences_name_dotted_keys():
    from tgated.config import ExperimentConfig, apply_overrides

    a = ExperimentConfig()
    b = apply_overrides(
        a, ["train.lr_adapter=0.5", "model.adapter_config.dim=64", "train.organ_weights={liver: 2}"]
    )
    diffs = config_differences(a, b)
    assert set(diffs) == {"train.lr_adapter", "model.adapter_config.dim", "train.organ_weights"}
    assert diffs["train.lr_adapter"] == (1e-4, 0.5)


def _state() -> dict:
    opt_state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "name": "adapter"}],
    }
    return {
        "model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "optimizer": opt_state,
        "epoch": 2,
        "best": None,
        "rng": rng_state(),
    }


def test_checkpoint_round_trip(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    back = load_checkpoint(path)
    assert state_digest(back) == state_digest(state)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporaries left


def test_tampered_and_truncated_checkpoints_are_errors_naming_the_file(tmp_path):
    state = _state()
    w = state["model"]["w"]
    path = save_checkpoint(tmp_path / "last.pt", state)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(w.numpy().tobytes()[:16])
    assert at > 0
    data[at + 5] ^= 0x40  # one bit of a weight: torch.load still reads the file
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tampered\.pt: checkpoint contents do not match"):
        load_checkpoint(tampered)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": w}, other)
    with pytest.raises(ValueError, match="not a tgated training checkpoint"):
        load_checkpoint(other)


def test_rng_states_restore_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random()
    np.random.normal()  # leaves a cached Gaussian in NumPy's legacy state
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_replace_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "model"

    def write(text):
        return lambda d: (d / "a.txt").write_text(text)

    replace_dir(target, write("one"))
    replace_dir(target, write("two"))
    assert (target / "a.txt").read_text() == "two"

    def fail(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_dir(target, fail)
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_dir_restores_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    replace_dir(target, lambda d: (d / "a.txt").write_text("one"))
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder has been moved aside; the new one fails to move in
            raise OSError("device busy")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="device busy"):
        replace_dir(target, lambda d: (d / "a.txt").write_text("two"))
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # both the folder being written and the old one moved aside are leftovers remove_stale_temporaries sees
    (dest, old), (new, _) = calls[0], calls[1]
    assert Path(dest) == target and is_temporary(Path(old)) and is_temporary(Path(new))
