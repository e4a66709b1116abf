import csv
import json
import math

import numpy as np
import pytest

from tests.conftest import lps_affine
from tgated.io.files import atomic_write_json
from tgated.io.volumes import write_nifti
from tgated.report import make_report
from tgated.report.tables import cross_domain_table, find_evaluations, markdown, organ_table


def _evaluation(folder, dataset, organs, rows, *, model=None, pred=None, gt=None):
    folder.mkdir(parents=True)
    summary = {
        "dataset": dataset,
        "protocol": "native",
        "cases": len({r[0] for r in rows}),
        "mean_dice": float(np.mean([v["dice"] for v in organs.values()])),
        "mean_nsd": float(np.mean([v["nsd"] for v in organs.values()])),
        "organs": organs,
    }
    if model:
        summary["model"] = {"hash": model}
    if pred:
        summary["pred"], summary["gt"] = str(pred), str(gt)
    atomic_write_json(folder / "summary.json", summary)
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "organ", "dice", "nsd", "hd95", "gt_voxels", "pred_voxels"])
        w.writerows(rows)


def _organs(liver, spleen):
    return {
        "liver": {"dice": liver, "nsd": liver, "hd95": 3.0, "n": 2},
        "spleen": {"dice": spleen, "nsd": spleen, "hd95": 4.0, "n": 2},
    }


def test_tables_difference_and_cross_domain(tmp_path):
    _evaluation(
        tmp_path / "base/flare22",
        "flare22",
        _organs(0.8, 0.6),
        [("a", "liver", 0.8, 0.8, 3, 10, 10)],
        model="m1",
    )
    _evaluation(
        tmp_path / "tg/flare22",
        "flare22",
        _organs(0.9, 0.7),
        [("a", "liver", 0.9, 0.9, 3, 10, 10)],
        model="m2",
    )
    _evaluation(
        tmp_path / "tg/btcv", "btcv", _organs(0.45, 0.35), [("a", "liver", 0.45, 0.4, 3, 10, 10)], model="m2"
    )
    evals = find_evaluations([tmp_path / "base", tmp_path / "tg"])
    assert [e.name for e in evals] == ["base/flare22", "tg/btcv", "tg/flare22"]
    header, rows = organ_table([evals[0], evals[2]])
    assert header[-1].startswith("Δ")
    liver = next(r for r in rows if r[0] == "liver")
    assert liver[1] == "0.800 (2)" and liver[2] == "0.900 (2)" and liver[3] == "0.100"
    assert rows[-1][-1] == "**0.100**"  # mean 0.7 -> 0.8
    # m2: the first listed evaluation (flare22) is the in-domain reference: drop = (0.8 - 0.4) / 0.8
    _, cross = cross_domain_table([evals[2], evals[1]])
    assert cross[0][3:] == ["0.800", "0.400", "50.0 %"]
    assert "| liver |" in markdown(header, rows)


def test_report_writes_html_plots_and_overlays(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    lab = np.zeros((12, 10, 6), np.uint8)
    lab[3:8, 2:6, 1:5] = 1
    write_nifti(gt_dir / "a.nii.gz", lab, lps_affine())
    write_nifti(pred_dir / "a.nii.gz", np.roll(lab, 1, axis=0), lps_affine())
    _evaluation(
        tmp_path / "ev",
        "folder",
        _organs(0.8, math.nan),
        [("a", "liver", 0.8, 0.8, 1.0, 80, 80)],
        pred=pred_dir,
        gt=gt_dir,
    )
    html_path = make_report([tmp_path / "ev"], tmp_path / "rep", notes=["tiny model"])
    text = html_path.read_text()
    assert "tiny model" in text and "<table>" in text and "overlay_ev_a.png" in text
    for name in (
        "comparison.md",
        "comparison.csv",
        "nsd.md",
        "dice_by_organ.png",
        "dice_by_case.png",
        "overlay_ev_a.png",
    ):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    assert (tmp_path / "rep" / "overlay_ev_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_ground_truth_shows_the_scored_organs_only(tmp_path, monkeypatch):
    """A model evaluated on a subset of organs: its overlay's ground truth holds that subset."""
    from tgated.report import figures

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    lab = np.zeros((12, 10, 6), np.uint8)
    lab[3:8, 2:6, 1:5] = 1  # liver (scored)
    lab[9:11, 2:6, 1:5] = 5  # aorta (not scored)
    write_nifti(gt_dir / "a.nii.gz", lab, lps_affine())
    write_nifti(pred_dir / "a.nii.gz", np.where(lab == 1, 1, 0).astype(np.uint8), lps_affine())
    _evaluation(
        tmp_path / "ev", "folder", _organs(1.0, math.nan), [("a", "liver", 1.0, 1.0, 0.0, 80, 80)],
        pred=pred_dir, gt=gt_dir,
    )  # fmt: skip
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    seen = {}
    monkeypatch.setattr(figures, "overlay", lambda image, gt, pred, path, **kw: seen.update(gt=gt) or path)
    for scored, expected in ((["liver"], {0, 1}), (None, {0, 1, 5})):
        summary["scored_organs"] = scored
        atomic_write_json(tmp_path / "ev" / "summary.json", summary)
        (e,) = find_evaluations([tmp_path / "ev"])
        assert figures.evaluation_overlays(e, tmp_path / "rep")
        assert set(np.unique(seen["gt"]).tolist()) == expected


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_evaluations([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        find_evaluations([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a tgated evaluation"):
        find_evaluations([tmp_path / "bad"])
