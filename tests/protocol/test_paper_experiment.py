"""``tgated experiment paper --preset cpu-tiny`` end to end on phantom stand-ins of FLARE22, BTCV
(no duodenum) and AMOS (CT and MR case ids): every method × dataset, FLARE22 on its test split only,
AMOS CT and MR apart, and a second run that trains and predicts nothing."""

from __future__ import annotations

import json

import pytest

from tgated.cli import main
from tgated.experiments.paper import cross_domain_drop, table_markdown


def test_cross_domain_drop_is_the_mean_of_the_btcv_and_amos_ct_drops():
    scores = {
        "flare22": {"mean_dice": 0.704},
        "btcv": {"mean_dice": 0.5},
        "amos_ct": {"mean_dice": 0.6},
        "amos_mr": {"mean_dice": 0.1},  # MR is not part of the paper's averaged drop
    }
    # (0.704 - 0.5) / 0.704 = 0.289773, (0.704 - 0.6) / 0.704 = 0.147727; mean 0.21875
    assert cross_domain_drop(scores) == pytest.approx(0.21875)
    assert cross_domain_drop({**scores, "amos_ct": {"mean_dice": None}}) == pytest.approx(0.289773, abs=1e-6)
    assert cross_domain_drop({"flare22": {"mean_dice": 0.7}}) is None
    table = table_markdown(
        {
            "recipe": "reference",
            "preset": None,
            "methods": {"tgated": {**scores, "cross_domain_drop": 0.21875}},
        }
    )
    assert "| tgated | " in table and "21.9 %" in table and "AMOS MR" in table


@pytest.mark.slow
def test_paper_protocol_end_to_end_and_resumed(tmp_path, capsys):
    from tgated.data.phantom import write_dataset

    data = tmp_path / "data"
    write_dataset(data / "flare22", cases=5, size=48, seed=1, layout="flare22", quiet=True)
    write_dataset(data / "btcv", cases=2, size=48, seed=2, layout="btcv", quiet=True)
    write_dataset(data / "amos", cases=1, size=48, seed=3, layout="amos", modality="ct", quiet=True)
    write_dataset(data / "amos", cases=1, size=48, seed=4, layout="amos", modality="mr", quiet=True)
    out = tmp_path / "paper"
    argv = ["experiment", "paper", "--flare22", str(data / "flare22"), "--btcv", str(data / "btcv"),
            "--amos", str(data / "amos"), "--out", str(out), "--preset", "cpu-tiny", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "reference" and results["preset"] == "cpu-tiny" and results["skipped"] == []
    assert set(results["methods"]) == {"tgated", "baseline", "dynunet"}
    assert set(results["config_hashes"]) == {"tgated", "baseline", "dynunet"}
    for method, scores in results["methods"].items():
        test_ids = json.loads((out / "runs" / method / "splits.json").read_text())["test"]
        assert scores["flare22"]["n_cases"] == len(test_ids) == 1, method
        assert (
            scores["btcv"]["n_cases"] == 2
            and scores["amos_ct"]["n_cases"] == 1
            and scores["amos_mr"]["n_cases"] == 1
        )
        for d in ("flare22", "btcv", "amos_ct", "amos_mr"):
            assert 0.0 <= scores[d]["mean_dice"] <= 1.0
        assert "cross_domain_drop" in scores
        flare = json.loads((out / "evaluation" / method / "flare22" / "summary.json").read_text())
        assert flare["selection"].startswith("the test split of") and flare["cases"] == 1
        btcv = json.loads((out / "evaluation" / method / "btcv" / "summary.json").read_text())
        assert "duodenum" not in btcv["organs"]
        assert (
            json.loads((out / "evaluation" / method / "amos_mr" / "summary.json").read_text())["modality"]
            == "mr"
        )
    table = (out / "table.md").read_text()
    assert "| method | FLARE22 (test) | BTCV | AMOS CT | AMOS MR | cross-domain drop |" in table
    assert (out / "report" / "report.html").is_file()

    # a second run: nothing is trained, predicted or scored again
    watched = [p for m in results["methods"] for p in (out / "runs" / m / "log.csv", out / "predictions" / m / "amos_mr" / "amos_0501.nii.gz",
               out / "evaluation" / m / "btcv" / "summary.json")]  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    # another recipe into the same folder is refused instead of mixing runs
    capsys.readouterr()
    assert main([*argv, "--recipe", "ours", "--methods", "dynunet", "--set", "train.dynunet.lr=0.5"]) == 1
    assert "trained with another config" in capsys.readouterr().err
