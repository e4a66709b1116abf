"""What training records to show whether context is used, and the stage-1 / init_from recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.training.test_train import log_rows
from tgated.training import train


def test_log_records_gate_temporal_share_and_the_context_ablation(tiny_cfg, tmp_path) -> None:
    run = tmp_path / "tgated"
    train(tiny_cfg("train.epochs=1"), out=run, quiet=True)
    (row,) = log_rows(run)
    gate, share = float(row["gate_open_l3"]), float(row["temporal_share_l3"])
    sigma = 1 / (1 + math.exp(5.0))
    assert 0.5 * sigma < gate < 5 * sigma  # nearly closed after 3 steps from σ(−5)
    assert 0 < share < 0.1
    assert row["val_dice"] != "" and row["val_dice_centre_only"] != ""
    val = json.loads((run / "val.json").read_text())
    assert "mean_dice_centre_only" in val["latest"] and "organs_centre_only" in val["latest"]


def test_baseline_logs_no_adapter_statistics(tiny_cfg, tmp_path) -> None:
    run = tmp_path / "baseline"
    train(tiny_cfg("train.epochs=1", "model.adapter=none"), out=run, quiet=True)
    (row,) = log_rows(run)
    assert not any(k.startswith(("gate_open", "temporal_share")) for k in row)
    assert row["val_dice"] != "" and row["val_dice_centre_only"] == ""


def test_stage1_is_trained_once_when_missing_and_initialises_stage2(tiny_cfg, tmp_path) -> None:
    from tgated.models.tgated import TGatedModel

    stage1 = tmp_path / "stage1"
    overrides = (
        f"model.init_from={stage1}",
        "pretrain.overrides=[model.adapter=none,model.train_backbone=true,train.epochs=1,train.steps_per_epoch=2]",
        "train.epochs=1",
        "train.steps_per_epoch=2",
    )
    train(tiny_cfg(*overrides), out=tmp_path / "a", quiet=True)
    first = TGatedModel.from_pretrained(stage1)
    assert first.context == 1 and first.config.train_backbone
    assert len(log_rows(stage1)) == 1
    stamp = (stage1 / "log.csv").stat().st_mtime_ns
    train(tiny_cfg(*overrides, "model.context=1"), out=tmp_path / "b", quiet=True)
    assert (stage1 / "log.csv").stat().st_mtime_ns == stamp  # not trained again
    second = TGatedModel.from_pretrained(tmp_path / "b")
    # the frozen backbone of stage 2 is stage 1's
    for name, p in first.backbone.clip.vision_model.named_parameters():
        assert torch.equal(p, dict(second.backbone.clip.vision_model.named_parameters())[name]), name


def test_missing_init_from_without_pretrain_is_an_error(tiny_cfg, tmp_path) -> None:
    with pytest.raises(ValueError, match="model.init_from=.*no saved model there"):
        train(tiny_cfg(f"model.init_from={tmp_path / 'nowhere'}"), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_info_on_a_run_shows_conditioning_and_adapter_statistics(tiny_cfg, tmp_path, capsys) -> None:
    from tgated.cli import main

    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=1"), out=run, quiet=True)
    assert main(["info", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["conditioning"]["conditioning"] == "learned"
    assert len(info["conditioning"]["organs"]) == 13
    assert info["conditioning"]["max_off_diagonal"] < 0.9
    assert {"gate_open_l3", "temporal_share_l3", "val_dice_centre_only"} <= set(info["last_epoch"])
    assert main(["info", str(run), "--set", "train.epochs=2"]) == 1


def test_pretrain_may_not_nest(tiny_cfg) -> None:
    from tgated.training.loop import stage1_config

    cfg = tiny_cfg("model.init_from=x", "pretrain.overrides=[model.init_from=y]")
    with pytest.raises(ValueError, match="may not set model.init_from"):
        stage1_config(cfg)
    cfg = tiny_cfg("model.init_from=x", "pretrain.overrides=[model.adapter=none]")
    s1 = stage1_config(cfg)
    assert s1.model.adapter == "none" and s1.model.init_from == "" and s1.pretrain.overrides == []
