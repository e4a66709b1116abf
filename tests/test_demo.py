"""``tgated demo --quick``: the newcomer's first command, end to end (what CI runs)."""

from __future__ import annotations

import json
import os

import pytest

from tgated.cli import main
from tgated.experiments import DEMO_ORGANS


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out

    # it says plainly what it is and how to run the real thing
    assert "TINY, RANDOMLY INITIALISED" in printed
    assert "configs/flare22_tgated.yaml" in printed and "GPU" in printed
    assert f"report: {out / 'report' / 'report.html'}" in printed

    for name in ("stage1", "baseline", "tgated"):
        run = out / "runs" / name
        assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
        # every training ran with one torch thread (the default), whatever this machine's core count
        assert json.loads((run / "environment.json").read_text())["torch_threads"] == 1
    for name in ("baseline", "tgated"):
        labels = json.loads((out / "predictions" / name / "phantom_test" / "labels.json").read_text())
        assert sorted(v for k, v in labels.items() if k != "0") == sorted(DEMO_ORGANS)
    base = json.loads((out / "evaluation" / "baseline" / "phantom_test" / "summary.json").read_text())
    tgated = json.loads((out / "evaluation" / "tgated" / "phantom_test" / "summary.json").read_text())
    assert set(base["organs"]) == set(tgated["organs"]) == set(DEMO_ORGANS)
    assert base["cases"] == tgated["cases"] == 3  # the held-out split of 10 phantoms
    # the models learned something (not the all-background collapse) ...
    assert base["organs"]["liver"]["dice"] > 0.4 and tgated["organs"]["liver"]["dice"] > 0.4
    # ... and T-Gated is not worse than the single-slice baseline by more than 0.02 mean Dice
    assert tgated["mean_dice"] >= base["mean_dice"] - 0.02
    assert f"mean Dice: baseline {base['mean_dice']:.3f}, T-Gated {tgated['mean_dice']:.3f}" in printed

    report = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "T-Gated" in report or "tgated" in report
    assert list((out / "report").rglob("*.png")), "the report has figures"
    if os.environ.get("TGATED_OFFLINE") != "1":
        real = json.loads((out / "evaluation" / "tgated" / "real_ct" / "summary.json").read_text())
        assert real["cases"] == 1 and set(real["organs"]) <= set(DEMO_ORGANS)

    # a second run into the same folder reuses every finished step and prints the same numbers
    kept = [out / "runs" / n / "checkpoints" / "last.pt" for n in ("baseline", "tgated")]
    kept += [out / "predictions" / n / "phantom_test" / "FLARE22_Tr_0001.nii.gz" for n in ("baseline", "tgated")]
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    again = capsys.readouterr().out
    assert again.split("report:")[0] == printed.split("report:")[0]
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # nothing retrained or re-predicted


def test_demo_refuses_zero_threads(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--threads", "0", "--quiet"]) != 0
    assert "--threads 0: expected at least 1" in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written
