import json

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import lps_affine
from tests.models.conftest import tiny_model_config
from tgated import organs as O
from tgated.cli import main
from tgated.io.volumes import read_volume, write_like, write_nifti
from tgated.models.tgated import TGatedModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model"
    TGatedModel.from_config(tiny_model_config()).save_pretrained(out)
    return out


def _volumes(folder):
    rng = np.random.default_rng(0)
    shapes = {"a": (23, 17, 7), "b_0000": (16, 16, 5)}
    affines = {"a": lps_affine(), "b_0000": np.diag([1.5, 1.5, 5.0, 1.0])}
    for name, shape in shapes.items():
        write_nifti(
            folder / f"{name}.nii.gz", (rng.normal(0, 300, shape) - 300).astype(np.int16), affines[name]
        )
    return shapes, affines


def test_predict_folder_geometry_files_and_skip(tmp_path, model_dir, capsys):
    shapes, affines = _volumes(tmp_path / "in")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    for name, case in (("a", "a"), ("b_0000", "b")):  # case id drops the _0000 channel suffix
        img = nib.load(out / f"{case}.nii.gz")
        assert img.shape == shapes[name] and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, affines[name], atol=1e-5)
    assert json.loads((out / "labels.json").read_text()) == O.labels_json()
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["cases"]) == {"a", "b"} and prov["model"]["config"]["preprocess"]["image_size"] == 64
    assert len(prov["cases"]["a"]["sha256"]) == 64 and prov["cases"]["a"]["modality"] == "ct"

    # same model again: nothing is redone
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv[:-1]) == 0
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime
    assert "already predicted by this model" in capsys.readouterr().err
    # --overwrite redoes
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "a.nii.gz").stat().st_mtime_ns != mtime


def test_changed_model_redoes_cases(tmp_path, model_dir):
    _volumes(tmp_path / "in")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--model",
                str(model_dir),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    first = json.loads((out / "provenance.json").read_text())["cases"]["a"]["model_hash"]
    other = tmp_path / "other"
    cfg = tiny_model_config()
    cfg.backbone.seed = 5
    TGatedModel.from_config(cfg).save_pretrained(other)
    assert (
        main(
            [
                "predict",
                "--model",
                str(other),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    second = json.loads((out / "provenance.json").read_text())["cases"]["a"]["model_hash"]
    assert first != second


def test_single_file_with_probabilities_and_organ_subset(tmp_path, model_dir):
    _volumes(tmp_path / "in")
    out = tmp_path / "res" / "seg.nii.gz"
    argv = [
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in" / "a.nii.gz"),
        "--output",
        str(out),
        "--organs",
        "liver,spleen",
        "--save-probabilities",
        "--modality",
        "ct",
        "--quiet",
    ]
    assert main(argv) == 0
    lab = np.asanyarray(nib.load(out).dataobj)
    assert set(np.unique(lab).tolist()) <= {0, 1, 3}
    probs = np.load(tmp_path / "res" / "a_probs.npz")
    assert set(probs.files) == {"liver", "spleen", "affine"}
    assert probs["liver"].shape == lab.shape and probs["liver"].dtype == np.float16
    assert json.loads((tmp_path / "res" / "labels.json").read_text()) == {
        "0": "background",
        "1": "liver",
        "3": "spleen",
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--input", "EMPTY"], "holds no images"),
        (["--input", "MISSING"], "does not exist"),
        (["--model", "MISSING"], "does not exist"),
        (["--organs", "livr"], "Did you mean 'liver'"),
        (["--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_bad_predict_input_one_line_error(tmp_path, model_dir, capsys, args, fragment):
    (tmp_path / "empty").mkdir()
    _volumes(tmp_path / "in")
    base = {"--model": str(model_dir), "--input": str(tmp_path / "in"), "--output": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = {"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "missing")}.get(
            value, value
        )
    argv = ["predict", *[x for kv in base.items() for x in kv], "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


@pytest.mark.examples
def test_real_ct_and_dicom_predictions_keep_input_geometry_and_evaluate(tmp_path, model_dir, examples_root):
    out = tmp_path / "pred"
    for name in ("example_ct_sm.nii.gz", "example_ct_dicom"):
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(model_dir),
                    "--input",
                    str(examples_root / name),
                    "--output",
                    str(out / (name.split(".")[0] + ".nii.gz")),
                    "--quiet",
                ]
            )
            == 0
        )
    ct = nib.load(examples_root / "example_ct_sm.nii.gz")
    pred = nib.load(out / "example_ct_sm.nii.gz")
    assert pred.shape == ct.shape
    np.testing.assert_allclose(pred.affine, ct.affine, atol=1e-4)
    series = read_volume(examples_root / "example_ct_dicom")
    dpred = nib.load(out / "example_ct_dicom.nii.gz")
    assert dpred.shape == series.original_shape == (512, 512, 20)
    np.testing.assert_allclose(dpred.affine, series.original_affine, atol=1e-4)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["cases"]["example_ct_dicom"]["modality"] == "ct"  # from the DICOM Modality tag

    # ground truth in canonical ids, stored in the label file's own (y-flipped) orientation
    gt = tmp_path / "gt"
    for name, seg in (
        ("example_ct_sm", "example_seg.nii.gz"),
        ("example_ct_dicom", "example_seg_dicom.nii.gz"),
    ):
        lab = read_volume(examples_root / seg, label=True)
        write_like(
            gt / f"{name}.nii.gz", O.remap_labels(lab.data, O.totalseg_label_map("total"), strict=False), lab
        )
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(out),
                "--gt",
                str(gt),
                "--dataset",
                "folder",
                "--out",
                str(tmp_path / "ev"),
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == 2


@pytest.mark.slow
def test_predict_under_torchrun_splits_the_cases(tmp_path, model_dir):
    """Two processes under torchrun: each case predicted exactly once, by its rank, with the same
    result as one process; provenance.json (updated under a file lock) records every case."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    names = [f"case{i}" for i in range(5)]
    for name in names:
        data = (rng.normal(0, 300, (24, 20, 6)) - 300).astype(np.int16)
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", data, lps_affine())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    cmd += ["tgated", "predict", "--model", str(model_dir), "--input", str(tmp_path / "in")]
    cmd += ["--output", str(tmp_path / "ddp"), "--device", "cpu", "--save-probabilities", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = ["predict", "--model", str(model_dir), "--input", str(tmp_path / "in")]
    assert main([*single, "--output", str(tmp_path / "one"), "--device", "cpu", "--save-probabilities", "--quiet"]) == 0

    prov = json.loads((tmp_path / "ddp" / "provenance.json").read_text())
    assert sorted(prov["cases"]) == names
    for name in names:
        a = np.asarray(nib.load(tmp_path / "ddp" / f"{name}.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "one" / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(a, b)
        pa, pb = np.load(tmp_path / "ddp" / f"{name}_probs.npz"), np.load(tmp_path / "one" / f"{name}_probs.npz")
        assert sorted(pa.files) == sorted(pb.files) and "liver" in pa.files
        for key in pa.files:
            np.testing.assert_allclose(pa[key].astype(np.float32), pb[key].astype(np.float32), atol=2e-3)
    assert json.loads((tmp_path / "ddp" / "labels.json").read_text()) == O.labels_json()
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
