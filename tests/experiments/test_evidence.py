"""tgated experiment evidence: the analysis on hand-made scores, and the pipeline end to end (--quick)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tgated.experiments.evidence import (
    RECIPE,
    analyse,
    error_anatomy,
    mean_dice,
    results_markdown,
    run_name,
    slice_dice,
    window_reach,
    z_runs,
)


def test_z_runs_and_slice_dice() -> None:
    assert z_runs(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)) == 3
    assert (
        z_runs(np.array([1, 1], bool)) == 1
        and z_runs(np.zeros(4, bool)) == 0
        and z_runs(np.array([], bool)) == 0
    )
    g = np.zeros((2, 2, 3), bool)
    p = np.zeros((2, 2, 3), bool)
    g[0, 0, 0] = g[0, 1, 0] = True  # slice 0: |G| = 2, |P| = 1, overlap 1 -> 2/3
    p[0, 0, 0] = True
    p[1, 1, 2] = True  # slice 2: false positive only -> 0; slice 1: both empty -> None
    assert slice_dice(g, p) == [round(2 / 3, 4), None, 0.0]


def test_error_anatomy_by_hand() -> None:
    g = np.zeros((3, 3, 8), bool)
    p = np.zeros((3, 3, 8), bool)
    g[0, 0, 3] = g[0, 1, 3] = True  # the organ: slices 3 and 4, 5 voxels
    g[1, 1, 4] = g[1, 2, 4] = g[2, 2, 4] = True
    p[0, 0, 3] = p[1, 0, 3] = True  # slice 3: 1 hit, 1 false positive, 1 false negative (in-plane)
    # slice 4: nothing predicted -> its 3 voxels are missed
    p[0, 0, 5] = p[0, 1, 5] = True  # 1 slice beyond the organ: within reach 2
    p[0, 0, 7] = p[1, 1, 7] = p[2, 2, 7] = True  # 3 slices beyond: out of reach
    e = error_anatomy(g, p, reach=2)
    assert {k: e[k] for k in ("in_slice", "missed", "off_near", "off_far")} == {
        "in_slice": 2,
        "missed": 3,
        "off_near": 2,
        "off_far": 3,
    }
    assert e["dice_z_oracle"] == pytest.approx(2 * 1 / (2 + 5))  # Dice itself: 2 * 1 / (7 + 5)
    assert error_anatomy(g, p, reach=3)["off_near"] == 5  # slice 7 is now within reach


def test_window_reach_in_slices() -> None:
    from tgated.config import ModelConfig

    assert window_reach(ModelConfig(context=5), 2.5) == 2  # index mode: K // 2 slices, any spacing
    physical = ModelConfig(context=5, context_mode="physical", context_step_mm=20.0)
    assert window_reach(physical, 2.5) == 16 and window_reach(physical, 5.0) == 8  # 40 mm
    assert window_reach(ModelConfig(context=1), 1.0) == 0


def test_mean_dice_is_the_mean_over_organs_of_case_means() -> None:
    rows = {"a": {"liver": 1.0, "spleen": 0.0}, "b": {"liver": 0.5}}
    mean, organs = mean_dice(rows)
    assert organs == {"liver": 0.75, "spleen": 0.0}
    assert mean == pytest.approx(0.375)


def _scores(tg: list[float], base: list[float], ctx1: list[float], centre: list[float]) -> dict:
    """Two seeds, two cases, one organ: case Dice given per seed as [case a, case b]."""
    out = {}
    for s in range(2):
        for name, vals in (("tgated", tg), ("baseline", base), ("context1", ctx1)):
            v = vals[s]
            entry = {
                "real": {"a": {"liver": v}, "b": {"liver": v - 0.1}},
                "z_fragments": {"a": {"liver": 1 if name != "tgated" else 0}},
                "z_profiles": {},
                "z_errors": {
                    "a": {
                        "liver": {
                            "in_slice": 4,
                            "missed": 0,
                            "off_near": 2,
                            "off_far": 2,
                            "dice_z_oracle": 0.9,
                        }
                    }
                },
                "train_seconds": 60.0,
            }
            if name == "tgated":
                entry["centre"] = {"a": {"liver": centre[s]}, "b": {"liver": centre[s] - 0.1}}
                entry["adapter_stats"] = {"gate_open_l3": 0.2, "temporal_share_l3": 0.3}
            out[run_name(name, s)] = entry
    return out


def test_analysis_paired_differences_and_decision_rule() -> None:
    scores = _scores(tg=[0.80, 0.82], base=[0.70, 0.71], ctx1=[0.79, 0.80], centre=[0.60, 0.62])
    res = analyse(scores, {}, n_seeds=2)
    # mean Dice per seed = mean of cases (v, v - 0.1) = v - 0.05
    assert res["variants"]["tgated"]["per_seed"] == [0.75, 0.77]
    vb = res["comparisons"]["tgated_vs_baseline"]
    assert vb["paired_seed_difference"]["mean"] == pytest.approx(0.105)
    assert vb["paired_seed_difference"]["sd"] == pytest.approx(np.std([0.10, 0.11], ddof=1), abs=1e-4)
    assert vb["meets_decision_rule"] is True and vb["organs_helped"] == ["liver"]
    assert vb["paired_case_difference"]["cases_better"] == 2
    vc = res["comparisons"]["tgated_vs_context1"]
    assert vc["paired_seed_difference"]["mean"] == pytest.approx(0.015)
    assert vc["meets_decision_rule"] is False  # 0.015 < 0.03
    assert "NOT" in res["verdict"]
    assert res["context_ablation"]["drop"]["mean"] == pytest.approx(0.2)
    assert res["variants"]["baseline"]["extra_z_fragments_per_organ"] == 1.0
    assert res["variants"]["tgated"]["extra_z_fragments_per_organ"] == 0.0
    md = results_markdown(res)
    assert "| liver | 0.655 ± 0.007 | 0.745 ± 0.007 | 0.760 ± 0.014 | +0.105 | +0.015 |" in md
    assert "not met" in md and "Gate opening" in md
    errors = res["variants"]["baseline"]["errors"]
    assert errors["share"] == {"in_slice": 0.5, "missed": 0.0, "off_near": 0.25, "off_far": 0.25}
    assert errors["mean_dice_z_oracle"]["mean"] == pytest.approx(0.9)
    assert errors["organs"]["liver"] == {"share": errors["share"], "dice_z_oracle": 0.9}
    assert "| baseline | 0.50 | 0.00 | 0.25 | 0.25 | 0.655 ± 0.007 | 0.900 ± 0.000 |" in md
    assert "| T-Gated K=5 |" in md  # the recipe's K when the protocol does not say
    assert "| T-Gated K=9 |" in results_markdown({**res, "protocol": {"context": 9}})


def test_a_gain_within_the_seed_spread_is_no_gain() -> None:
    scores = _scores(tg=[0.90, 0.70], base=[0.70, 0.80], ctx1=[0.70, 0.80], centre=[0.8, 0.7])
    res = analyse(scores, {}, n_seeds=2)
    d = res["comparisons"]["tgated_vs_baseline"]["paired_seed_difference"]
    assert d["mean"] == pytest.approx(0.05) and d["sd"] > 0.1
    assert res["comparisons"]["tgated_vs_baseline"]["meets_decision_rule"] is False


def test_every_variant_is_scheduled_once() -> None:
    from tgated.experiments.evidence import LONGEST_FIRST, VARIANTS

    assert sorted(LONGEST_FIRST) == sorted(VARIANTS) and len(LONGEST_FIRST) == len(set(LONGEST_FIRST))


def test_the_repository_config_is_the_packaged_recipe() -> None:
    repo = Path(__file__).resolve().parents[2] / "configs" / "cpu_evidence.yaml"
    assert repo.read_bytes() == RECIPE.read_bytes()


@pytest.mark.slow
def test_quick_evidence_end_to_end(tmp_path, capsys) -> None:
    from tgated.cli import main

    out = tmp_path / "ev"
    assert main(["experiment", "evidence", "--quick", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"tgated", "baseline", "context1"}
    assert res["protocol"]["seeds"] == 2 and res["protocol"]["split_sizes"] == [4, 1, 3]
    scores = json.loads((out / "scores" / "tgated_s0.json").read_text())
    assert len(scores["real"]) == 3 and len(scores["centre"]) == 3  # the 3 held-out cases
    assert "centre" not in json.loads((out / "scores" / "baseline_s0.json").read_text())
    assert (out / "runs" / "stage1" / "model" / "config.json").is_file()
    assert "Verdict" in capsys.readouterr().out
    env = res["environment"]
    assert env["run"] == "stage1" and env["packages"]["torch"] == torch.__version__ and env["differs"] == {}
    assert env["torch_threads"] == 1  # by default every training runs with one thread, on any machine
    assert f"torch {torch.__version__}" in (out / "results.md").read_text()
    assert f"{env['cpu']} ({torch.backends.cpu.get_cpu_capability()}), " in (out / "results.md").read_text()
    stamp = (out / "results.json").stat().st_mtime_ns
    assert (
        main(["experiment", "evidence", "--quick", "--out", str(out), "--quiet"]) == 0
    )  # resumes: no training
    assert (out / "results.json").stat().st_mtime_ns > stamp
    for run in (out / "runs").iterdir():
        if run.name != "stage1":
            assert len((run / "log.csv").read_text().strip().splitlines()) == 2
    # the same folder with another number of phantoms is refused, naming both
    assert main(["experiment", "evidence", "--quick", "--cases", "9", "--out", str(out), "--quiet"]) == 1
    assert "8 phantoms" in capsys.readouterr().err


def test_parallel_jobs_and_another_dataset_give_the_sequential_numbers(tmp_path) -> None:
    """--jobs 2 (each training in its own process, one thread) on --data (the sequential run's own
    phantoms, read as a user's dataset) reproduces the in-process one-thread run value for value."""
    import shutil

    from tgated.experiments.evidence import run_evidence

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the in-process run sets one thread and gives this back
    try:
        seq = run_evidence(tmp_path / "seq", quick=True, jobs=1, quiet=True)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert seq["environment"]["torch_threads"] == 1
    data = tmp_path / "user_data"
    shutil.copytree(tmp_path / "seq" / "data", data)
    par = run_evidence(tmp_path / "par", quick=True, data=data, jobs=2, threads=1, quiet=True)
    assert not (tmp_path / "par" / "data").exists()  # no phantoms written
    assert par["protocol"]["data"] == str(data) and par["protocol"]["data_seed"] is None
    assert seq["protocol"]["data"] == "8 fresh phantoms" and par["protocol"]["cases"] == 8
    for name in ("tgated_s1", "baseline_s0", "context1_s1"):
        a = json.loads((tmp_path / "seq" / "scores" / f"{name}.json").read_text())
        b = json.loads((tmp_path / "par" / "scores" / f"{name}.json").read_text())
        assert a.pop("train_seconds") > 0 and b.pop("train_seconds") > 0
        assert a == b

    def untimed(variants: dict) -> dict:
        return {k: {f: x for f, x in v.items() if f != "train_seconds"} for k, v in variants.items()}

    assert untimed(seq["variants"]) == untimed(par["variants"])
    assert seq["comparisons"] == par["comparisons"] and seq["context_ablation"] == par["context_ablation"]
    assert par["environment"]["torch_threads"] == 1 and seq["environment"]["differs"] == {}
    first = (tmp_path / "par" / "results.json").stat().st_mtime_ns
    assert run_evidence(tmp_path / "par", quick=True, data=data, jobs=2, threads=1, quiet=True)["variants"]
    assert (tmp_path / "par" / "results.json").stat().st_mtime_ns > first  # resumed: scored runs kept
    logs = {r.name: len((r / "log.csv").read_text().splitlines()) for r in (tmp_path / "par" / "runs").iterdir()}
    assert len(logs) == 7 and set(logs.values()) == {2}  # stage 1 and six runs, one epoch each: none trained again
    # runs trained on one dataset are not resumed on another
    other = tmp_path / "other_data"
    shutil.copytree(data, other)
    with pytest.raises(ValueError, match=r"par: its runs were trained on 8 cases of .*user_data, not on the 8 cases of .*other_data"):
        run_evidence(tmp_path / "par", quick=True, data=other, quiet=True)
    with pytest.raises(ValueError, match=r"seq: its runs were trained on 8 phantoms, seed 1000, not on"):
        run_evidence(tmp_path / "seq", quick=True, data=other, quiet=True)


def test_evidence_refuses_bad_sizes_and_datasets(tmp_path) -> None:
    from tgated.data.phantom import write_dataset
    from tgated.experiments.evidence import run_evidence

    data = tmp_path / "d"
    write_dataset(data, cases=5, seed=3, layout="flare22", modality="ct", size=32, quiet=True)
    with pytest.raises(ValueError, match=r"d holds 5 cases: the recipe trains on 4 and validates on 1 cases"):
        run_evidence(tmp_path / "o", quick=True, data=data, quiet=True)
    with pytest.raises(ValueError, match="--cases counts the phantoms"):
        run_evidence(tmp_path / "o", quick=True, data=data, cases=9, quiet=True)
    with pytest.raises(ValueError, match="--jobs 0: expected at least 1"):
        run_evidence(tmp_path / "o", quick=True, jobs=0, quiet=True)
    with pytest.raises(ValueError, match="--threads 0: expected at least 1"):
        run_evidence(tmp_path / "o", quick=True, threads=0, quiet=True)
    legacy = tmp_path / "legacy"  # a folder from before DATA_SOURCE: its phantoms' stamp alone
    (legacy / "data").mkdir(parents=True)
    (legacy / "data" / "DONE").write_text("8 phantoms, seed 1000\n")
    with pytest.raises(ValueError, match=r"legacy: its runs were trained on 8 phantoms, seed 1000, not on the 9"):
        run_evidence(legacy, quick=True, cases=9, quiet=True)
    assert not (legacy / "DATA_SOURCE").exists()
    next((data / "labels").iterdir()).unlink()
    with pytest.raises((ValueError, FileNotFoundError), match="label"):
        run_evidence(tmp_path / "o", quick=True, data=data, quiet=True)
    assert not (tmp_path / "o").exists()  # nothing written
