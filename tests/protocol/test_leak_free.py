"""Leak-free scoring: ``--run --split`` / ``--cases`` in predict and evaluate, the refusal to score a
run's training cases, and AMOS CT and MR scored apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.models.conftest import tiny_model_config
from tests.test_evaluate import ground_truth, write
from tgated.cli import main
from tgated.config import ExperimentConfig, dump_yaml, replace
from tgated.data.datasets import select_cases, write_splits
from tgated.data.layouts import LAYOUTS
from tgated.evaluation import evaluate

SPLITS = {
    "train": ["FLARE22_Tr_0001", "FLARE22_Tr_0003"],
    "val": ["FLARE22_Tr_0004"],
    "test": ["FLARE22_Tr_0002"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from tgated.data.phantom import write_dataset

    root = tmp_path_factory.mktemp("flare4")
    write_dataset(root, cases=4, size=48, seed=3, layout="flare22", quiet=True)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset) -> Path:
    """A run folder as tgated train leaves it (config.yaml, splits.json, model/), with a tiny model."""
    from tgated.models.tgated import TGatedModel

    run = tmp_path_factory.mktemp("run")
    cfg = ExperimentConfig(model=tiny_model_config())
    cfg = replace(cfg, data=replace(cfg.data, root=str(dataset), layout="flare22"))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    write_splits(run / "splits.json", SPLITS)
    TGatedModel.from_config(cfg.model).save_pretrained(run / "model")
    return run


def test_select_cases_from_a_list_a_file_and_a_split(tmp_path, run):
    assert select_cases() is None
    assert select_cases(cases="b, a").ids == ("b", "a")
    ids = tmp_path / "ids.txt"
    ids.write_text("# test cases\ncase1\ncase2, case3  # the last one\n\n")
    sel = select_cases(cases=str(ids))
    assert sel.ids == ("case1", "case2", "case3") and sel.source == f"--cases {ids}"
    sel = select_cases(run=run, split="test")
    assert sel.ids == ("FLARE22_Tr_0002",) and sel.source == f"the test split of {run / 'splits.json'}"
    with pytest.raises(ValueError, match="--split test: needs --run RUN"):
        select_cases(split="test")
    with pytest.raises(ValueError, match="give one of them"):
        select_cases(run=run, split="test", cases="a")
    with pytest.raises(ValueError, match="unknown split 'tset'.*Did you mean 'test'"):
        select_cases(run=run, split="tset")
    with pytest.raises(ValueError, match=r"listed more than once: \['a'\]"):
        select_cases(cases="a,b,a")
    with pytest.raises(FileNotFoundError, match="splits.json: does not exist"):
        select_cases(run=tmp_path, split="val")


def test_predict_the_test_split_then_evaluate_refuses_training_cases(tmp_path, run, dataset, capsys):
    out = tmp_path / "test"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--split",
                "test",
                "--output",
                str(out),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["FLARE22_Tr_0002.nii.gz"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model"]["run"] == str(run.resolve()) and prov["model"]["train_cases"] == SPLITS["train"]
    summary = evaluate(out, dataset, "flare22", out=tmp_path / "e", quiet=True, run=run, split="test")
    assert summary["cases"] == 1 and summary["selection"].startswith("the test split of")

    # every case of the dataset (no --split): evaluate refuses the two training cases
    every = tmp_path / "all"
    assert main(["predict", "--run", str(run), "--output", str(every), "--device", "cpu", "--quiet"]) == 0
    assert len(list(every.glob("*.nii.gz"))) == 4
    with pytest.raises(ValueError) as exc:
        evaluate(every, dataset, "flare22", quiet=True)
    msg = str(exc.value)
    assert "2 scored case(s) are in the training split" in msg and "FLARE22_Tr_0001, FLARE22_Tr_0003" in msg
    assert "--allow-train-cases" in msg and f"--run {run.resolve()} --split test" in msg
    # ... also when the run folder has moved away: provenance keeps the training ids
    moved = tmp_path / "moved"
    shutil.copytree(every, moved)
    prov = json.loads((moved / "provenance.json").read_text())
    prov["model"]["run"] = str(tmp_path / "gone")
    (moved / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(ValueError, match="2 scored case"):
        evaluate(moved, dataset, "flare22", quiet=True)
    # the same folder, scored on the val split or on chosen cases: allowed
    assert evaluate(every, dataset, "flare22", quiet=True, run=run, split="val")["cases"] == 1
    assert (
        evaluate(every, dataset, "flare22", quiet=True, cases="FLARE22_Tr_0002,FLARE22_Tr_0004")["cases"] == 2
    )
    capsys.readouterr()  # main() above sent logging to stderr
    assert evaluate(every, dataset, "flare22", quiet=True, allow_train_cases=True)["cases"] == 4
    assert "scored anyway (--allow-train-cases)" in capsys.readouterr().err
    # the CLI: exit code 1 and the message
    argv = [
        "evaluate",
        "--pred",
        str(every),
        "--gt",
        str(dataset),
        "--dataset",
        "flare22",
        "--out",
        str(tmp_path / "c"),
    ]
    assert main([*argv, "--quiet"]) == 1
    assert main([*argv, "--quiet", "--allow-train-cases"]) == 0


def test_selected_cases_need_inputs_predictions_and_ground_truth(tmp_path, run, dataset):
    with pytest.raises(ValueError, match=r"1 case\(s\) of --cases are not among the inputs \(nope\)"):
        from tgated.inference import predict

        predict(None, None, tmp_path / "o", run=run, cases="nope", device="cpu", quiet=True)
    assert not (tmp_path / "o").exists()
    out = tmp_path / "p"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(dataset / "images"),
                "--cases",
                "FLARE22_Tr_0004",
                "--output",
                str(out),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    assert [p.name for p in out.glob("*.nii.gz")] == ["FLARE22_Tr_0004.nii.gz"]
    with pytest.raises(
        ValueError,
        match=r"1 case\(s\) of the test split .* have no prediction \(FLARE22_Tr_0002\); predict them first",
    ):
        evaluate(out, dataset, "flare22", quiet=True, run=run, split="test")
    with pytest.raises(ValueError, match=r"1 case\(s\) of --cases have no ground truth \(FLARE22_Tr_0009\)"):
        evaluate(out, dataset, "flare22", quiet=True, cases="FLARE22_Tr_0009")


def _amos(tmp_path: Path) -> tuple[Path, Path]:
    """AMOS labels for a CT case (0001) and an MR case (0507); predictions: CT perfect, MR with the
    spleen missing (liver, spleen, aorta labelled: Dice 1, 0, 1 -> mean 2/3)."""
    to_ds = LAYOUTS["amos"].canonical_to_dataset()
    gt = ground_truth()
    ds = np.zeros_like(gt)
    for cid, ds_id in to_ds.items():
        ds[gt == cid] = ds_id
    for cid in ("amos_0001", "amos_0507"):
        write(tmp_path / "amos" / "labelsTr" / f"{cid}.nii.gz", ds)
    write(tmp_path / "pred" / "amos_0001.nii.gz", gt)
    write(tmp_path / "pred" / "amos_0507.nii.gz", np.where(gt == 3, 0, gt).astype(np.uint8))
    return tmp_path / "amos", tmp_path / "pred"


def test_amos_ct_and_mr_are_scored_apart_and_never_averaged(tmp_path, capsys):
    gt, pred = _amos(tmp_path)
    s = evaluate(pred, gt, "amos", out=tmp_path / "e", quiet=True, organs="liver,spleen,aorta")
    assert s["mean_dice"] != s["mean_dice"]  # NaN: no CT+MR average
    assert s["by_modality"]["ct"]["mean_dice"] == 1.0 and s["by_modality"]["ct"]["cases"] == 1
    assert s["by_modality"]["mr"]["mean_dice"] == pytest.approx(2 / 3)
    assert s["by_modality"]["mr"]["modality"] == "mr"
    written = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert written["mean_dice"] is None and written["by_modality"]["ct"]["cases"] == 1
    assert json.loads((tmp_path / "e" / "mr" / "summary.json").read_text())["mean_dice"] == pytest.approx(
        2 / 3
    )
    rows = (tmp_path / "e" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("case,organ,dice") and len(rows) == 1 + 2 * 3
    assert (
        evaluate(pred, gt, "amos", quiet=True, organs="liver,spleen,aorta", modality="ct")["mean_dice"] == 1.0
    )
    mr = evaluate(pred, gt, "amos", quiet=True, organs="liver,spleen,aorta", modality="mr")
    assert mr["cases"] == 1 and mr["mean_dice"] == pytest.approx(2 / 3)
    argv = [
        "evaluate",
        "--pred",
        str(pred),
        "--gt",
        str(gt),
        "--dataset",
        "amos",
        "--organs",
        "liver,spleen,aorta",
    ]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "CT: 1 cases, mean Dice 1.0000" in printed and "MR: 1 cases, mean Dice 0.6667" in printed


def test_modality_needs_a_layout_that_says_it(tmp_path):
    gt_dir = tmp_path / "labels"
    write(gt_dir / "c1.nii.gz", ground_truth())
    write(tmp_path / "pred" / "c1.nii.gz", ground_truth())
    with pytest.raises(
        ValueError, match="--modality mr: the folder layout does not say the modality of 1 case"
    ):
        evaluate(tmp_path / "pred", gt_dir, "folder", quiet=True, modality="mr")
