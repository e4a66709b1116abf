"""The bad-input matrix: each check fires, with a one-line error that names the file, the value found
and what was expected, exit code 1 and no output; warnings for inputs that still work.

Checks tested elsewhere (one place per check): unreadable / truncated / 2-D / 4-D / zero-length /
NaN files and image dtypes, image-label geometry (tests/io/test_volumes.py); label values outside a
dataset's map, missing pairs (tests/data/test_datasets.py, tests/test_organs.py); unknown organs and
prompts (tests/test_organs.py, tests/models/test_tgated.py, tests/inference/); config keys and types
(tests/test_config.py); DICOM series (tests/io/test_dicom.py).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import lps_affine
from tests.models.conftest import tiny_model_config
from tgated import organs as O
from tgated.cli import main
from tgated.data.datasets import discover, read_splits
from tgated.data.layouts import LAYOUTS
from tgated.inference import predictor as P
from tgated.inference.predictor import Predictor, estimate_memory_gb, resolve_modality
from tgated.io.volumes import read_volume, volume_from_array, volume_from_nifti, write_nifti
from tgated.models.tgated import TGatedModel

SHAPE = (12, 10, 5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return TGatedModel.from_config(tiny_model_config()).save_pretrained(
        tmp_path_factory.mktemp("m") / "model"
    )


@pytest.fixture(scope="module")
def model(model_dir):
    return TGatedModel.from_pretrained(model_dir)


def _ct(shape=SHAPE, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, 300, shape) - 300).astype(np.int16)


def _predict(model_dir, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tgated "), err
    return err


# ---------------------------------------------------------------------------------------------
# bad image files given to tgated predict: exit 1, one line, nothing written
# ---------------------------------------------------------------------------------------------


def _bad_file(path: Path, kind: str) -> None:
    if kind == "not NIfTI":
        path.write_bytes(gzip.compress(b"<html>404 not found</html>" * 20))
    elif kind == "truncated":
        write_nifti(path, _ct((40, 40, 40)), np.eye(4))
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "2-D":
        nib.save(nib.Nifti1Image(np.zeros((12, 10), np.int16), np.eye(4)), path)
    elif kind == "4-D":
        nib.save(nib.Nifti1Image(np.zeros((12, 10, 5, 3), np.int16), np.eye(4)), path)
    elif kind == "zero-length axis":
        nib.save(nib.Nifti1Image(np.zeros((12, 0, 5), np.int16), np.eye(4)), path)
    elif kind == "NaN":
        data = _ct().astype(np.float32)
        data[3, 4, 2] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    elif kind == "complex":
        nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.complex64), np.eye(4)), path)
    elif kind == "float64 overflow":
        data = np.zeros(SHAPE, np.float64)
        data[0, 0, 0] = 1e300
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)


BAD = [
    # (kind, message fragment, found before any output folder is created)
    ("not NIfTI", "not a readable NIfTI file", True),
    ("truncated", "truncated or corrupt", False),
    ("2-D", "has 2 dimensions (12, 10); expected 3 (x, y, z) — is this a single slice?", True),
    ("4-D", "has 4 dimensions (12, 10, 5, 3); expected 3 (x, y, z) — split multi-volume", True),
    ("zero-length axis", "zero-length axis (12, 0, 5); expected a non-empty 3-D volume", True),
    ("NaN", "holds 1 NaN/Inf voxels; expected finite values", False),
    ("complex", "unsupported data type complex64; expected one intensity per voxel", True),
    ("float64 overflow", "values up to 1e+300, beyond float32", False),
]


@pytest.mark.parametrize(("kind", "fragment", "early"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_in_a_folder(tmp_path, model_dir, capsys, kind, fragment, early):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _bad_file(inp / "a_bad.nii.gz", kind)  # sorted first
    write_nifti(inp / "b_good.nii.gz", _ct(), lps_affine())
    assert main(_predict(model_dir, inp, out)) == 1
    err = _one_line(capsys)
    assert err.startswith("tgated predict: error: ") and "a_bad.nii.gz" in err and fragment in err, err
    # header-level problems stop the run before any work; data-level ones (found while reading the
    # first case) before the output folder exists, which is created with the first finished case
    assert not out.exists()
    if early:
        assert "segmenting" not in err


def test_single_volume_4d_image_is_squeezed_with_a_warning(tmp_path, model_dir):
    data = _ct()[..., None]
    nib.save(nib.Nifti1Image(data, lps_affine()), tmp_path / "v.nii.gz")
    with pytest.warns(UserWarning, match=r"v.nii.gz: image has shape \(12, 10, 5, 1\); squeezing"):
        assert main(_predict(model_dir, tmp_path / "v.nii.gz", tmp_path / "p.nii.gz")) == 0
    assert nib.load(tmp_path / "p.nii.gz").shape == SHAPE  # the prediction is 3-D


# ---------------------------------------------------------------------------------------------
# dtypes of every width
# ---------------------------------------------------------------------------------------------

LABEL_DTYPES = [
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.uint64,
    np.int64,
    np.float32,
    np.float64,
]


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_label_maps_of_every_dtype_keep_their_values(tmp_path, dtype):
    lab = np.zeros(SHAPE, dtype)
    lab[1:4, 2:5, 1:3] = 6  # BTCV liver
    lab[7:9, 1:3, 2:4] = 11  # BTCV pancreas
    write_nifti(tmp_path / "l.nii.gz", lab, lps_affine())
    vol = read_volume(tmp_path / "l.nii.gz", label=True)
    canon = O.remap_labels(vol.data, LAYOUTS["btcv"].label_map(), source="l.nii.gz")
    np.testing.assert_array_equal(vol.to_original(canon), np.where(lab == 6, 1, np.where(lab == 11, 4, 0)))


def test_uint64_image_reads_as_float32(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.uint64).reshape(SHAPE) * 3
    write_nifti(tmp_path / "u.nii.gz", data, np.eye(4))
    np.testing.assert_array_equal(read_volume(tmp_path / "u.nii.gz").data, data.astype(np.float32))


def test_colour_image_is_an_error(tmp_path):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(ValueError, match=r"rgb.nii.gz: image has unsupported data type .*convert colour"):
        read_volume(tmp_path / "rgb.nii.gz")


# ---------------------------------------------------------------------------------------------
# geometry that works but is worth a warning
# ---------------------------------------------------------------------------------------------


def _rotated(degrees: float, spacing=(0.8, 0.8, 2.0)) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    return aff


@pytest.mark.parametrize(
    ("affine", "fragment"),
    [
        (_rotated(20.0), "oblique acquisition, voxel axes rotated 20.0° from the patient axes"),
        (
            _rotated(0.0, (0.7, 0.7, 7.0)),
            "extreme anisotropy, slice thickness 7 mm vs in-plane spacing 0.7 × 0.7 mm (ratio 10.0)",
        ),
        (_rotated(0.0, (2.0, 2.0, 12.0)), "slice thickness 12 mm vs in-plane spacing 2 × 2 mm (ratio 6.0)"),
        (_rotated(3.0, (0.8, 0.8, 5.0)), None),
    ],
    ids=["oblique 20°", "ratio 10", "12 mm slices", "3° and ratio 6.25: fine"],
)
def test_geometry_warnings(tmp_path, caplog, affine, fragment):
    write_nifti(tmp_path / "g.nii.gz", _ct(), affine)
    with caplog.at_level(logging.WARNING, logger="tgated"):
        read_volume(tmp_path / "g.nii.gz")
        read_volume(tmp_path / "g.nii.gz", label=True)  # label maps follow their image: no warning
    messages = [r.getMessage() for r in caplog.records]
    if fragment is None:
        assert not messages
    else:
        assert len(messages) == 1 and "g.nii.gz: " in messages[0] and fragment in messages[0], messages


def test_geometry_warning_for_in_memory_images(caplog):
    with caplog.at_level(logging.WARNING, logger="tgated"):
        volume_from_nifti(nib.Nifti1Image(_ct(), _rotated(30.0)), source="<array>")
    assert "<array>: oblique acquisition, voxel axes rotated 30.0°" in caplog.text


# ---------------------------------------------------------------------------------------------
# modality
# ---------------------------------------------------------------------------------------------


def test_mr_volume_sent_to_a_ct_model_is_a_warning(model, caplog):
    mr = volume_from_array(np.abs(_ct()).astype(np.float32) + 50, lps_affine(), source="mr_case.nii.gz")
    ct = volume_from_array(_ct().astype(np.float32), lps_affine(), source="ct_case.nii.gz")
    assert model.config.preprocess.modality == "ct"
    with caplog.at_level(logging.WARNING, logger="tgated"):
        Predictor(model, batch_size=4).predict_volume(ct)
        assert not caplog.records
        pred = Predictor(model, batch_size=4).predict_volume(mr)
    assert pred.modality == "mr"
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "mr_case.nii.gz: the volume is MR (from intensity statistics, 0.5th"
    )
    assert "the model was trained on CT; this is a zero-shot cross-modality prediction" in record.getMessage()
    with pytest.raises(ValueError, match="unknown modality 'pet'; expected 'auto', 'ct' or 'mr'"):
        resolve_modality(ct, "pet")


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def test_volume_memory_estimate_by_hand():
    # 100 × 100 × 10 voxels: the float32 image + 3 uint8 copies = 7 B; probabilities are staged on disk
    # and written one organ at a time: 2 B × 3 per voxel, whatever the number of organs
    assert estimate_memory_gb((100, 100, 10), 13, False) == pytest.approx(1e5 * 7 / 1e9)
    assert estimate_memory_gb((100, 100, 10), 13, True) == pytest.approx(1e5 * 13 / 1e9)
    assert estimate_memory_gb((100, 100, 10), 2, True) == pytest.approx(1e5 * 13 / 1e9)


def test_work_memory_grows_with_the_batch(model):
    small = Predictor(model, batch_size=1).memory_estimate((512, 512, 300), 13)
    large = Predictor(model, batch_size=32).memory_estimate((512, 512, 300), 13)
    assert small.volume_gb == large.volume_gb and large.work_gb > small.work_gb > 0
    assert small.host_gb == pytest.approx(small.volume_gb + small.work_gb)  # on CPU both are host memory
    assert P.available_memory_gb() > 0


def test_too_large_for_memory_fails_early(model):
    pred = Predictor(model, batch_size=8)
    est = pred.memory_estimate((512, 512, 2000), 13, True)
    lean = pred.memory_estimate((512, 512, 2000), 13, False, batch_size=1)
    available = round(lean.volume_gb / 2, 1)  # not even the volume's own arrays fit
    assert lean.work_gb < available  # but one slice at a time would: the volume is the problem
    with pytest.raises(ValueError) as exc:
        pred.check_memory((512, 512, 2000), 13, True, source="big.nii.gz", available_gb=available)
    msg = str(exc.value)
    assert msg.startswith(
        f"big.nii.gz: segmenting (512, 512, 2000) voxels × 13 organs needs about {est.host_gb:.1f} GB"
    )
    assert msg.endswith(
        f"only {available:.1f} GB is available; the volume's arrays and probabilities alone need about "
        f"{est.volume_gb:.1f} GB: crop or downsample the volume, leave out --save-probabilities (or use a "
        "machine with more memory)"
    )
    pred.check_memory((512, 512, 2000), 13, True, available_gb=est.host_gb + 1)  # fits: no error


def test_memory_advice_is_the_fix_that_fits(model):
    """The advice names the largest batch size that fits, else dropping the probabilities; when one
    slice alone is too much, the model's input size (an absurd image_size is not a volume to crop)."""
    pred = Predictor(model, batch_size=16)
    shape = (512, 512, 300)

    def host(batch, keep=False):
        return pred.memory_estimate(shape, 13, keep, batch_size=batch).host_gb

    between = (host(4) + host(5)) / 2  # room for 4 slices per pass, not 5
    with pytest.raises(ValueError, match=r"GB is available; use --batch-size 4 \(or less\)$"):
        pred.check_memory(shape, 13, available_gb=between)
    room = (host(16) + host(1, keep=True)) / 2  # all 16 slices without probabilities, not 1 with them
    assert host(16) < room < host(1, keep=True)
    with pytest.raises(ValueError, match=r"available; leave out --save-probabilities$"):
        pred.check_memory(shape, 13, True, available_gb=room)
    big = Predictor(model, batch_size=16)
    big.model.config.preprocess.image_size = 2048  # the estimate reads the size from the config
    try:
        one = big.memory_estimate(shape, 13, batch_size=1)
        with pytest.raises(ValueError, match=r"even one slice at a time needs about .* input size 2048 × 2048"):
            big.check_memory(shape, 13, available_gb=one.work_gb / 2)
    finally:
        big.model.config.preprocess.image_size = 64


def test_predict_fails_before_writing_when_memory_is_short(tmp_path, model_dir, capsys, monkeypatch):
    write_nifti(tmp_path / "in" / "a.nii.gz", _ct(), lps_affine())
    monkeypatch.setattr(P, "available_memory_gb", lambda: 1e-6)
    assert main(_predict(model_dir, tmp_path / "in", tmp_path / "out", "--save-probabilities")) == 1
    err = _one_line(capsys)
    assert "a.nii.gz: segmenting (12, 10, 5) voxels × 13 organs needs about" in err
    assert "only 0.0 GB is available; even one slice at a time needs about" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "ran out of GPU memory",
        ),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
            "ran out of host memory",
        ),
        (MemoryError(), "ran out of host memory"),
    ],
    ids=["cuda", "torch cpu", "numpy"],
)
def test_out_of_memory_becomes_a_batch_size_hint(model, monkeypatch, error, fragment):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(model, "iter_segment_stack", boom)
    vol = volume_from_array(_ct().astype(np.float32), lps_affine(), source="oom.nii.gz")
    with pytest.raises(
        ValueError,
        match=rf"oom.nii.gz: {fragment} on cpu with batches of 4 slices × 13 organs .*smaller --batch-size",
    ):
        Predictor(model, batch_size=4).predict_volume(vol)


def test_other_runtime_errors_are_not_mistaken_for_memory(model, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model, "iter_segment_stack", boom)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Predictor(model, batch_size=4).predict_volume(
            volume_from_array(_ct().astype(np.float32), lps_affine())
        )


def test_batch_size_must_be_positive(tmp_path, model_dir, capsys):
    write_nifti(tmp_path / "a.nii.gz", _ct(), lps_affine())
    assert main(_predict(model_dir, tmp_path / "a.nii.gz", tmp_path / "out", "--batch-size", "0")) == 1
    assert "--batch-size 0: expected a positive number" in _one_line(capsys)


# ---------------------------------------------------------------------------------------------
# datasets and evaluation
# ---------------------------------------------------------------------------------------------


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no cases found for the flare22 layout"):
        discover(tmp_path, "flare22")


def test_all_zero_ground_truth_is_legal_for_evaluation(tmp_path, capsys):
    """Every organ absent in ground truth and prediction: scored as both-empty, exit 0."""
    write_nifti(tmp_path / "gt" / "c.nii.gz", np.zeros(SHAPE, np.uint8), lps_affine())
    write_nifti(tmp_path / "pred" / "c.nii.gz", np.zeros(SHAPE, np.uint8), lps_affine())
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--dataset", "folder"]
    assert main([*argv, "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["mean_dice"] is None and summary["n_both_empty"] == 13
    assert "1 cases, mean Dice nan" in capsys.readouterr().out


def test_case_id_that_cannot_name_a_file(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    write_nifti(tmp_path / "imagesTr" / "_0000.nii.gz", _ct(), lps_affine())  # case id ''
    with pytest.raises(ValueError, match=r"_0000.nii.gz: case id '' is empty; expected a plain file name"):
        discover(tmp_path, "nnunet", need_labels=False)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("../outside", "contains a path separator"),
        ("/etc/passwd", "contains a path separator"),
        ("..", "is a relative folder reference"),
        (".hidden", "starts with a dot"),
        ("a\nb", "contains control characters"),
    ],
)
def test_split_entries_that_would_escape_the_output_folder(tmp_path, entry, problem):
    p = tmp_path / "splits.json"
    p.write_text(json.dumps({"train": ["ok", entry], "val": [], "test": []}))
    with pytest.raises(ValueError, match=rf"splits.json: 'train' entry .* {problem}"):
        read_splits(p)


def test_split_of_the_wrong_type(tmp_path):
    p = tmp_path / "splits.json"
    p.write_text(json.dumps({"train": "case1,case2"}))
    with pytest.raises(ValueError, match=r"'train' is str case1,case2; expected a list of case ids"):
        read_splits(p)


def test_available_memory_respects_a_container_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert P.available_memory_gb(meminfo, tmp_path / "no_cgroup") == pytest.approx(8.192)
    cg = tmp_path / "cgroup"
    cg.mkdir()
    (cg / "memory.max").write_text("4000000000\n")
    (cg / "memory.current").write_text("3500000000\n")
    (cg / "memory.stat").write_text("anon 2400000000\nfile 1000000000\n")
    # 4.0 GB limit − 3.5 GB used + 1.0 GB reclaimable page cache
    assert P.available_memory_gb(meminfo, cg) == pytest.approx(1.5)
    (cg / "memory.max").write_text("max\n")  # no limit
    assert P.available_memory_gb(meminfo, cg) == pytest.approx(8.192)
