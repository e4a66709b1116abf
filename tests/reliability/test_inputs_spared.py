"""No command writes over its inputs: an output that is (or resolves to) an input file or folder, or
whose files would replace an input, is refused before any work with exit 1, naming both paths, and
the input is left byte for byte as it was."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import lps_affine
from tests.models.conftest import tiny_model_config
from tests.training.conftest import FAST, TINY_CONFIG
from tgated.cli import main
from tgated.io.files import check_inputs_spared, sha256_file
from tgated.io.volumes import write_nifti
from tgated.models.tgated import TGatedModel

SHAPE = (12, 10, 5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return TGatedModel.from_config(tiny_model_config()).save_pretrained(
        tmp_path_factory.mktemp("m") / "model"
    )


def _image(path: Path) -> Path:
    data = (np.random.default_rng(0).normal(0, 300, SHAPE) - 300).astype(np.int16)
    write_nifti(path, data, lps_affine())
    return path


def _predict(model_dir: Path, inp: Path, out: Path) -> list[str]:
    return ["predict", "--model", str(model_dir), "--input", str(inp), "--output", str(out), "--quiet"]


def _last_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err, "nothing on stderr"
    return err.splitlines()[-1]


def _snapshot(folder: Path) -> dict[str, str]:
    """Name -> checksum of every file below ``folder`` (symbolic links as their target's name)."""
    return {
        str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else sha256_file(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


# ---------------------------------------------------------------------------------------------
# tgated predict
# ---------------------------------------------------------------------------------------------


def test_predict_output_equal_to_the_input_file_is_refused(tmp_path, model_dir, capsys):
    img = _image(tmp_path / "o1" / "case.nii.gz")
    before = sha256_file(img)
    assert main(_predict(model_dir, img, img)) == 1
    line = _last_line(capsys)
    assert line == (
        f"tgated predict: error: --output {img}: is the input file --input {img}; writing there would "
        "destroy the input — choose another --output"
    )
    assert sha256_file(img) == before
    assert sorted(p.name for p in img.parent.iterdir()) == ["case.nii.gz"]  # no labels.json, no lock


def test_predict_output_folder_equal_to_the_input_folder_is_refused(tmp_path, model_dir, capsys):
    folder = tmp_path / "o4"
    img = _image(folder / "case.nii.gz")
    _image(folder / "other_0000.nii.gz")
    before = _snapshot(folder)
    assert main(_predict(model_dir, folder, folder)) == 1
    assert _last_line(capsys) == (
        f"tgated predict: error: --output {folder}: is the input folder --input {folder}; writing there "
        "would destroy the input — choose another --output"
    )
    assert _snapshot(folder) == before
    assert sha256_file(img) == before["case.nii.gz"]


def test_predict_output_folder_holding_the_input_file_is_refused(tmp_path, model_dir, capsys):
    """``--input o1/case.nii.gz --output o1``: o1/case.nii.gz would be the label map."""
    img = _image(tmp_path / "o1" / "case.nii.gz")
    before = sha256_file(img)
    assert main(_predict(model_dir, img, img.parent)) == 1
    line = _last_line(capsys)
    assert f"the output file {img} would replace the input file --input {img}" in line, line
    assert sha256_file(img) == before and sorted(p.name for p in img.parent.iterdir()) == ["case.nii.gz"]


def test_predict_output_symlink_to_the_input_is_refused(tmp_path, model_dir, capsys):
    img = _image(tmp_path / "data" / "case.nii.gz")
    before = sha256_file(img)
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "pred.nii.gz"
    link.symlink_to(img)
    assert main(_predict(model_dir, img, link)) == 1
    line = _last_line(capsys)
    assert f"--output {link} (resolves to {img.resolve()}): is the input file --input {img}" in line, line
    assert sha256_file(img) == before and link.is_symlink()


def test_predict_output_folder_symlink_to_the_input_folder_is_refused(tmp_path, model_dir, capsys):
    data = tmp_path / "data"
    _image(data / "case.nii.gz")
    before = _snapshot(data)
    (tmp_path / "preds").symlink_to(data, target_is_directory=True)
    assert main(_predict(model_dir, data, tmp_path / "preds")) == 1
    assert "is the input folder --input" in _last_line(capsys)
    assert _snapshot(data) == before


def test_predict_output_hard_link_of_the_input_is_refused(tmp_path, model_dir, capsys):
    img = _image(tmp_path / "case.nii.gz")
    os.link(img, tmp_path / "pred.nii.gz")
    assert main(_predict(model_dir, img, tmp_path / "pred.nii.gz")) == 1
    assert "is the input file --input" in _last_line(capsys)


def test_predict_output_next_to_the_input_under_another_name_still_works(tmp_path, model_dir):
    """The check refuses overwrites, not neighbours: ``img_0000.nii.gz`` -> ``img.nii.gz`` beside it."""
    img = _image(tmp_path / "d" / "img_0000.nii.gz")
    before = sha256_file(img)
    assert main(_predict(model_dir, img, img.parent)) == 0
    assert (img.parent / "img.nii.gz").is_file() and sha256_file(img) == before


# ---------------------------------------------------------------------------------------------
# the check itself: DICOM folders, folders inside outputs
# ---------------------------------------------------------------------------------------------


def test_output_inside_an_input_series_folder_is_refused(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    with pytest.raises(ValueError, match=r"--output .*/series/preds: lies inside the input folder --input"):
        check_inputs_spared(
            ("--output", series / "preds"), [("--input", series)], not_inside=[("--input", series)]
        )
    check_inputs_spared(("--output", tmp_path / "preds"), [("--input", series)], not_inside=[("--input", series)])


def test_input_inside_the_output_is_refused_only_where_asked(tmp_path):
    root = tmp_path / "run" / "data"
    root.mkdir(parents=True)
    check_inputs_spared(("--out", tmp_path / "run"), [("data.root", root)])  # evaluate-style: allowed
    with pytest.raises(ValueError, match=r"--out .*/run: holds the input data.root .*/run/data"):
        check_inputs_spared(("--out", tmp_path / "run"), [("data.root", root)], not_containing=[("data.root", root)])


def test_relative_and_dotted_paths_are_the_same_file(tmp_path, monkeypatch):
    img = _image(tmp_path / "a" / "case.nii.gz")
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(ValueError, match="is the input file --input"):
        check_inputs_spared(("--output", "../a/./case.nii.gz"), [("--input", "case.nii.gz")])
    with pytest.raises(ValueError, match="would replace the input file"):
        check_inputs_spared(("--output", "."), [("--input", img)], writes=[Path("case.nii.gz")])


# ---------------------------------------------------------------------------------------------
# tgated evaluate and tgated train
# ---------------------------------------------------------------------------------------------


def _labels(folder: Path, n: int = 2) -> Path:
    for i in range(n):
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:8, 2:7, 1:4] = 1
        write_nifti(folder / f"case{i}.nii.gz", lab, lps_affine())
    return folder


@pytest.mark.parametrize("which", ["pred", "gt"])
def test_evaluate_out_equal_to_an_input_folder_is_refused(tmp_path, capsys, which):
    gt, pred = _labels(tmp_path / "gt"), _labels(tmp_path / "pred")
    before = _snapshot(tmp_path)
    out = gt if which == "gt" else pred
    argv = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--dataset", "folder", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 1
    assert _last_line(capsys) == (
        f"tgated evaluate: error: --out {out}: is the input folder --{which} {out}; writing there would "
        "destroy the input — choose another --out"
    )
    assert _snapshot(tmp_path) == before


def test_evaluate_summary_symlinked_to_a_label_is_refused(tmp_path, capsys):
    gt, pred = _labels(tmp_path / "gt"), _labels(tmp_path / "pred")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").symlink_to(gt / "case1.nii.gz")
    before = _snapshot(gt)
    argv = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--dataset", "folder", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 1
    line = _last_line(capsys)
    assert f"the output file {out / 'summary.json'} would replace the input file --gt {gt / 'case1.nii.gz'}" in line
    assert _snapshot(gt) == before and not (out / "metrics.csv").exists()


def test_evaluate_out_holding_the_predictions_works(tmp_path):
    gt, pred = _labels(tmp_path / "gt"), _labels(tmp_path / "run" / "pred")
    argv = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--dataset", "folder", "--out", str(tmp_path / "run")]
    assert main([*argv, "--quiet"]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()


def _train(root: Path, out: Path) -> list[str]:
    sets = [f"data.root={root}", *FAST]
    return ["train", str(TINY_CONFIG), "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("resume", [False, True])
def test_train_out_equal_to_the_data_root_is_refused(tmp_path, capsys, resume):
    from tgated.data.phantom import write_dataset

    root = tmp_path / "data"
    write_dataset(root, cases=1, size=32, seed=0, layout="flare22", quiet=True)
    before = _snapshot(root)
    assert main(_train(root, root) + (["--resume"] if resume else [])) == 1
    assert _last_line(capsys) == (
        f"tgated train: error: --out {root}: is the input folder data.root {root}; writing there would "
        "destroy the input — choose another --out"
    )
    assert _snapshot(root) == before


def test_train_out_holding_the_data_root_is_refused(tmp_path, capsys):
    root = tmp_path / "run" / "model"
    root.mkdir(parents=True)
    assert main(_train(root, tmp_path / "run")) == 1
    assert _last_line(capsys) == (
        f"tgated train: error: --out {tmp_path / 'run'}: holds the input data.root {root}, which the files "
        "written there could replace; choose another --out"
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]
