"""tgated.evaluate and ``tgated evaluate``: matching, geometry, organs, outputs, protocols."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from tgated import metrics as M
from tgated.cli import main
from tgated.data.layouts import LAYOUTS
from tgated.evaluation import evaluate
from tgated.io.volumes import read_volume, write_nifti
from tgated.organs import ORGAN_NAMES, remap_labels

SHAPE = (23, 19, 9)  # odd sizes, canonical (x, y, z)
SUMMARY_KEYS = {
    "dataset",
    "protocol",
    "cases",
    "mean_dice",
    "mean_nsd",
    "mean_hd95",
    "organs",
    "n_both_empty",
    "false_positive_cases",
    "missed_cases",
    "unpredicted_cases",
    "selection",
    "modality",
    "scored_organs",
    "pred",
    "gt",
    "totalseg_task",
    "tool_version",
}
ORGAN_KEYS = {
    "dice",
    "nsd",
    "hd95",
    "n",
    "n_nsd",
    "n_hd95",
    "n_both_empty",
    "false_positive_cases",
    "missed_cases",
}


def canon_affine(spacing=(0.8, 0.9, 3.0), origin=(-20.0, 35.0, -110.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def store(canonical: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """A canonical (RAS) array stored with axis codes ``codes``, on the same physical grid."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    return apply_orientation(canonical, t), affine @ inv_ornt_aff(t, canonical.shape)


def write(path: Path, canonical: np.ndarray, codes: str = "LPS", affine: np.ndarray | None = None) -> Path:
    data, aff = store(canonical, canon_affine() if affine is None else affine, codes)
    write_nifti(path, np.ascontiguousarray(data).astype(np.uint8), aff)
    return path


def ground_truth(seed: int = 0) -> np.ndarray:
    """Canonical label map: liver, spleen, aorta (along z); the other organs absent."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:10, 3:12, 1:7] = 1
    lab[14:20, 4:10, 2:6] = 3
    lab[11:13, 12:14, 0:8] = 5
    if seed:
        lab[2 + seed : 5 + seed, 14:17, 3:5] = 9  # gallbladder in some cases
    return lab


def imperfect(gt: np.ndarray) -> np.ndarray:
    pred = np.zeros_like(gt)
    pred[np.roll(gt == 1, 1, axis=0)] = 1  # liver shifted by one voxel
    spleen = gt == 3
    spleen[14, :, :] = False  # spleen misses a plane
    pred[spleen] = 3
    pred[gt == 5] = 5
    pred[0:2, 0:2, 0:2] = 4  # a false-positive pancreas
    return pred


def folder_dataset(tmp_path: Path, n: int = 2, pred_codes: str = "LPS") -> tuple[Path, Path]:
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    for i in range(n):
        gt = ground_truth(i)
        write(gt_dir / f"case{i:02d}.nii.gz", gt, "LPS")
        write(pred_dir / f"case{i:02d}.nii.gz", gt, pred_codes)
    return gt_dir, pred_dir


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------------------------
# outputs and perfect predictions
# ---------------------------------------------------------------------------------------------


def test_perfect_prediction_outputs(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=2)
    out = tmp_path / "eval"
    summary = evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", out=out, quiet=True)

    header, rows = read_rows(out / "metrics.csv")
    assert header == ["case", "organ", "dice", "nsd", "hd95", "gt_voxels", "pred_voxels"]
    assert len(rows) == 2 * 13  # every labelled organ, absent ones included (NaN rows)
    assert [r["organ"] for r in rows[:13]] == list(ORGAN_NAMES)
    liver = next(r for r in rows if r["case"] == "case00" and r["organ"] == "liver")
    assert (float(liver["dice"]), float(liver["nsd"]), float(liver["hd95"])) == (1.0, 1.0, 0.0)
    assert int(liver["gt_voxels"]) == int(liver["pred_voxels"]) == 8 * 9 * 6
    pancreas = next(r for r in rows if r["organ"] == "pancreas")
    assert pancreas["dice"] == pancreas["nsd"] == pancreas["hd95"] == "nan"

    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == SUMMARY_KEYS
    assert (on_disk["dataset"], on_disk["protocol"], on_disk["cases"]) == ("folder", "native", 2)
    assert on_disk["mean_dice"] == 1.0 and on_disk["mean_nsd"] == 1.0 and on_disk["mean_hd95"] == 0.0
    assert set(on_disk["organs"]["liver"]) == ORGAN_KEYS
    assert on_disk["organs"]["liver"]["n"] == 2
    assert on_disk["organs"]["gallbladder"]["n"] == 1  # only case01 has one
    assert on_disk["organs"]["pancreas"] == {
        "dice": None,
        "nsd": None,
        "hd95": None,
        "n": 0,
        "n_nsd": 0,
        "n_hd95": 0,
        "n_both_empty": 2,
        "false_positive_cases": 0,
        "missed_cases": 0,
    }
    assert summary["mean_dice"] == 1.0 and math.isnan(summary["organs"]["pancreas"]["dice"])


def test_model_from_provenance_is_copied(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    (pred_dir / "provenance.json").write_text(json.dumps({"model": {"hash": "abc123", "name": "tgated"}}))
    (pred_dir / "labels.json").write_text("{}")  # non-NIfTI files in the folder are ignored
    summary = evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)
    assert summary["model"] == {"hash": "abc123", "name": "tgated"}


def test_only_the_predicted_organs_are_scored(tmp_path, capsys):
    """A model trained for a subset of organs is scored on that subset (its labels.json), not
    penalised with Dice 0 for organs it was never asked to segment — unless --organs all."""
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    gt = ground_truth()
    write(gt_dir / "case00.nii.gz", gt)
    pred = gt.copy()
    pred[gt == 5] = 0  # no aorta: the model does not segment it
    pred[np.roll(gt == 3, 2, axis=0) & (gt == 0)] = 3  # spleen shifted by two planes
    write(pred_dir / "case00.nii.gz", pred)
    (pred_dir / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "3": "spleen"}))

    summary = evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", out=tmp_path / "e", quiet=True)
    assert summary["scored_organs"] == ["liver", "spleen"]
    assert set(summary["organs"]) == {"liver", "spleen"}
    _, rows = read_rows(tmp_path / "e" / "metrics.csv")
    assert [r["organ"] for r in rows] == ["liver", "spleen"]
    g, p = gt == 3, pred == 3
    expected_spleen = 2 * (g & p).sum() / (g.sum() + p.sum())
    assert summary["organs"]["spleen"]["dice"] == pytest.approx(expected_spleen)
    assert summary["mean_dice"] == pytest.approx((1.0 + expected_spleen) / 2)

    everything = evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", organs="all", quiet=True)
    assert everything["scored_organs"] is None
    assert everything["organs"]["aorta"]["dice"] == 0.0 and everything["organs"]["aorta"]["missed_cases"] == 1
    assert everything["mean_dice"] == pytest.approx((1.0 + expected_spleen + 0.0) / 3)

    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--dataset", "folder",
                 "--organs", "aorta", "--out", str(tmp_path / "e2"), "--quiet"]) == 0  # fmt: skip
    assert set(json.loads((tmp_path / "e2" / "summary.json").read_text())["organs"]) == {"aorta"}

    (pred_dir / "labels.json").write_text(json.dumps({"0": "background", "1": "kidneys"}))
    with pytest.raises(ValueError, match=r"labels\.json.*kidneys.*--organs"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes", ["RAS", "LAS", "SLP"])
def test_prediction_in_another_orientation_scores_the_same(tmp_path, codes):
    gt = ground_truth()
    pred = imperfect(gt)
    write(tmp_path / "gt" / "c1.nii.gz", gt, "LPS")
    spacing = read_volume(tmp_path / "gt" / "c1.nii.gz").spacing  # float32 in the header
    ref = M.native_case_scores(gt, pred, spacing, ORGAN_NAMES)
    write(tmp_path / "pred" / "c1.nii.gz", pred, codes)  # flipped / permuted axes, same physical grid
    evaluate(pred=tmp_path / "pred", gt=tmp_path / "gt", dataset="folder", out=tmp_path / "e", quiet=True)
    _, rows = read_rows(tmp_path / "e" / "metrics.csv")
    for r, s in zip(rows, ref, strict=True):
        assert r["organ"] == s.organ
        np.testing.assert_allclose(
            [float(r["dice"]), float(r["nsd"]), float(r["hd95"])], [s.dice, s.nsd, s.hd95], rtol=1e-12
        )
    liver = next(s for s in ref if s.organ == "liver")
    # shifted by one 0.8 mm voxel: within liver's 5 mm NSD tolerance
    assert liver.dice == pytest.approx(2 * 7 / 16) and liver.nsd == 1.0 and liver.hd95 == pytest.approx(0.8)


def test_prediction_on_a_shifted_grid_is_an_error_naming_both_files(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    shifted = canon_affine(origin=(-20.0, 35.0, -105.0))  # 5 mm along z
    write(pred_dir / "case00.nii.gz", ground_truth(), "LPS", affine=shifted)
    with pytest.raises(ValueError) as exc:
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)
    msg = str(exc.value)
    assert str(pred_dir / "case00.nii.gz") in msg and str(gt_dir / "case00.nii.gz") in msg
    assert "geometry does not match" in msg


def test_prediction_with_another_shape_is_an_error(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    write(pred_dir / "case00.nii.gz", ground_truth()[:-1], "LPS")
    with pytest.raises(ValueError, match="case00.nii.gz: geometry does not match"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)


# ---------------------------------------------------------------------------------------------
# matching and bad input
# ---------------------------------------------------------------------------------------------


def test_prediction_without_ground_truth_is_an_error(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    write(pred_dir / "stranger.nii.gz", ground_truth(), "LPS")
    with pytest.raises(
        ValueError, match=r"1 prediction\(s\) have no ground truth .*stranger\.nii\.gz.*case00"
    ):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)


def test_no_prediction_files_is_an_error(tmp_path):
    gt_dir, _ = folder_dataset(tmp_path, n=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no prediction files"):
        evaluate(pred=tmp_path / "empty", gt=gt_dir, dataset="folder", quiet=True)
    with pytest.raises(FileNotFoundError, match="prediction folder does not exist"):
        evaluate(pred=tmp_path / "nowhere", gt=gt_dir, dataset="folder", quiet=True)


def test_ground_truth_without_prediction_is_listed_not_scored(tmp_path, caplog):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=3)
    (pred_dir / "case01.nii.gz").unlink()
    summary = evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", out=tmp_path / "e", quiet=True)
    assert summary["cases"] == 2 and summary["unpredicted_cases"] == ["case01"]
    assert "case01" in caplog.text
    _, rows = read_rows(tmp_path / "e" / "metrics.csv")
    assert {r["case"] for r in rows} == {"case00", "case02"}


def test_label_values_outside_canonical_ids_are_an_error(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    bad = ground_truth()
    bad[0, 0, 0] = 14
    write(pred_dir / "case00.nii.gz", bad, "LPS")
    with pytest.raises(
        ValueError, match=r"case00\.nii\.gz: prediction holds label values \[14\] outside 0\.\.13"
    ):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)
    data, aff = store(ground_truth().astype(np.float32) * 0.5, canon_affine(), "LPS")
    write_nifti(pred_dir / "case00.nii.gz", data, aff)
    with pytest.raises(ValueError, match="non-integer values"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)


def test_unreadable_prediction_and_bad_names_are_errors(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    (pred_dir / "case00.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="case00.nii.gz: not a readable NIfTI"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)
    with pytest.raises(ValueError, match="unknown dataset layout 'btvc'"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="btvc", quiet=True)
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", protocol="official", quiet=True)
    with pytest.raises(ValueError, match="totalseg dataset only"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", totalseg_task="total", quiet=True)


def test_two_predictions_for_one_case_are_an_error(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    write(pred_dir / "case00.nii", ground_truth(), "LPS")
    with pytest.raises(ValueError, match="two predictions for case 'case00'"):
        evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)


# ---------------------------------------------------------------------------------------------
# datasets and protocols
# ---------------------------------------------------------------------------------------------


def test_btcv_leaves_duodenum_out(tmp_path):
    gt = ground_truth(1)
    ds = np.zeros_like(gt)
    for cid, ds_id in LAYOUTS["btcv"].canonical_to_dataset().items():
        ds[gt == cid] = ds_id
    ds[0:3, 15:18, 6:8] = 10  # portal / splenic vein: background for evaluation
    write(tmp_path / "btcv" / "label" / "label0001.nii.gz", ds, "LPS")
    pred = gt.copy()
    pred[18:21, 15:18, 6:8] = 12  # a "duodenum" prediction is not a false positive on BTCV
    write(tmp_path / "pred" / "img0001.nii.gz", pred, "RAS")
    summary = evaluate(
        pred=tmp_path / "pred", gt=tmp_path / "btcv", dataset="btcv", out=tmp_path / "e", quiet=True
    )
    _, rows = read_rows(tmp_path / "e" / "metrics.csv")
    assert len(LAYOUTS["btcv"].label_ids) == 12
    assert [r["organ"] for r in rows] == [n for n in ORGAN_NAMES if n != "duodenum"]
    assert "duodenum" not in summary["organs"]
    assert summary["false_positive_cases"] == 0
    for name in ("liver", "spleen", "aorta", "gallbladder"):
        assert summary["organs"][name]["dice"] == 1.0


def test_flare22_protocol_works_on_the_label_files_axes(tmp_path):
    """The FLARE22 z-crop runs along the GT file's third array axis, whatever the orientation."""
    gt = ground_truth()
    # Stored as "ASL": the file's third axis runs along canonical x, reversed.
    write(tmp_path / "gt" / "c1.nii.gz", gt, "ASL")
    # The prediction misses the aorta plane at the GT file's last index along that axis (= lowest x).
    pred = gt.copy()
    xs = np.nonzero((gt == 5).any(axis=(1, 2)))[0]
    pred[xs[0]][pred[xs[0]] == 5] = 0
    write(tmp_path / "pred" / "c1.nii.gz", pred, "RAS")
    summary = evaluate(
        pred=tmp_path / "pred", gt=tmp_path / "gt", dataset="folder", protocol="flare22", quiet=True
    )
    aorta = summary["organs"]["aorta"]
    assert (aorta["dice"], aorta["nsd"]) == (1.0, 1.0)  # the missed plane is outside the script's crop
    assert summary["organs"]["pancreas"]["dice"] == 1.0  # both empty → 1 under FLARE22
    # Same numbers as the script's recipe on the raw file arrays with the header's zooms.
    img = nib.load(tmp_path / "gt" / "c1.nii.gz")
    raw_gt = np.uint8(img.get_fdata())
    raw_pred = np.uint8(
        apply_orientation(pred, ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple("ASL"))))
    )
    expected = {
        s.organ: s for s in M.flare22_case_scores(raw_gt, raw_pred, img.header.get_zooms(), ORGAN_NAMES)
    }
    for name, entry in summary["organs"].items():
        assert entry["dice"] == expected[name].dice and entry["nsd"] == expected[name].nsd
    native = evaluate(pred=tmp_path / "pred", gt=tmp_path / "gt", dataset="folder", quiet=True)
    assert native["organs"]["aorta"]["dice"] < 1.0


def test_paper_protocol_writes_null_nsd(tmp_path):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    write(pred_dir / "case00.nii.gz", imperfect(ground_truth()), "LPS")
    summary = evaluate(
        pred=pred_dir, gt=gt_dir, dataset="folder", protocol="paper", out=tmp_path / "e", quiet=True
    )
    on_disk = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert on_disk["protocol"] == "paper" and on_disk["mean_nsd"] is None
    assert on_disk["organs"]["liver"]["nsd"] is None and on_disk["organs"]["liver"]["hd95"] is None
    assert 0.5 < on_disk["organs"]["liver"]["dice"] < 1.0
    assert math.isnan(summary["mean_nsd"])


@pytest.mark.slow
def test_worker_processes_give_the_same_output(tmp_path):
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    for i in range(4):
        gt = ground_truth(i)
        write(gt_dir / f"case{i:02d}.nii.gz", gt, "LPS")
        write(pred_dir / f"case{i:02d}.nii.gz", imperfect(gt), "RAS")
    kw = {"pred": pred_dir, "gt": gt_dir, "dataset": "folder", "protocol": "paper", "quiet": True}
    evaluate(**kw, out=tmp_path / "one", workers=1)
    evaluate(**kw, out=tmp_path / "two", workers=2)
    assert (tmp_path / "one" / "metrics.csv").read_text() == (tmp_path / "two" / "metrics.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "n_organs"), [("btcv", 12), ("amos", 13)])
def test_phantom_dataset_end_to_end(tmp_path, layout, n_organs):
    """Phantom dataset → its labels in canonical ids (organs.py) as predictions → evaluate: all Dice 1."""
    phantom = pytest.importorskip("tgated.data.phantom")
    root, pred_dir = tmp_path / layout, tmp_path / "pred"
    ids = phantom.write_dataset(root, cases=2, seed=3, layout=layout, size=48, quiet=True)
    label_files = sorted((root / ("label" if layout == "btcv" else "labelsTr")).glob("*.nii.gz"))
    assert len(label_files) == 2
    for cid, path in zip(ids, label_files, strict=True):
        raw = read_volume(path, label=True)  # canonical frame: written back as RAS, unlike the labels
        canonical = remap_labels(raw.data, LAYOUTS[layout].label_map(), source=str(path))
        write_nifti(pred_dir / f"{cid}.nii.gz", canonical, raw.affine)
    summary = evaluate(pred=pred_dir, gt=root, dataset=layout, out=tmp_path / "e", quiet=True)
    assert summary["cases"] == 2
    assert list(summary["organs"]) == list(LAYOUTS[layout].labelled_organs())
    assert len(summary["organs"]) == n_organs and ("duodenum" in summary["organs"]) == (layout == "amos")
    for name, entry in summary["organs"].items():
        assert (entry["dice"], entry["nsd"], entry["hd95"]) == (1.0, 1.0, 0.0), name
        assert entry["n"] == 2, name


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_evaluate(tmp_path, capsys):
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    args = ["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--dataset", "folder"]
    assert main([*args, "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["mean_dice"] == 1.0
    capsys.readouterr()
    assert (
        main([*args[:2], str(tmp_path / "nowhere"), *args[3:], "--out", str(tmp_path / "f"), "--quiet"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("tgated evaluate: error:") and "prediction folder does not exist" in err
    assert not (tmp_path / "f").exists()


def test_package_level_evaluate_is_the_function(tmp_path):
    """``tgated.evaluate`` is a plain function, also after its module tgated.evaluation was imported."""
    import importlib
    import types

    import tgated

    importlib.import_module("tgated.evaluation")
    assert isinstance(tgated.evaluate, types.FunctionType)
    gt_dir, pred_dir = folder_dataset(tmp_path, n=1)
    summary = tgated.evaluate(pred=pred_dir, gt=gt_dir, dataset="folder", quiet=True)
    assert summary["mean_dice"] == 1.0 and summary["cases"] == 1
    assert tgated.train.__module__ == "tgated.training.loop"
