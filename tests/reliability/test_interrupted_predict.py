"""Nothing lost, nothing half-written: ``tgated predict`` killed part-way, resumed, and redone on a
model change; which finished cases a re-run may skip (provenance)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.models.conftest import tiny_model_config
from tgated.cli import main
from tgated.inference.api import predict
from tgated.io.files import is_temporary
from tgated.io.volumes import write_nifti
from tgated.models.tgated import TGatedModel

REPO = Path(__file__).resolve().parents[2]
KILL_SHAPE = (160, 160, 40)  # about half a second per case with the tiny model on 2 CPU cores
SMALL_SHAPE = (20, 18, 6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    first = TGatedModel.from_config(tiny_model_config()).save_pretrained(root / "first")
    cfg = tiny_model_config()
    cfg.backbone.seed = 7
    second = TGatedModel.from_config(cfg).save_pretrained(root / "second")
    return first, second


def _inputs(folder: Path, n: int, shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(1)
    for i in range(n):
        data = (rng.normal(0, 300, shape) - 300).astype(np.int16)
        write_nifti(folder / f"case{i}.nii.gz", data, np.diag([1.2, 1.2, 3.0, 1.0]))
    return {f"case{i}": shape for i in range(n)}


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.nii.gz") if not is_temporary(p))


def _recorded(folder: Path) -> dict:
    p = folder / "provenance.json"
    return json.loads(p.read_text())["cases"] if p.is_file() else {}


def _argv(model: Path, inp: Path, out: Path) -> list[str]:
    return ["predict", "--model", str(model), "--input", str(inp), "--output", str(out), "--quiet"]


@pytest.mark.slow
def test_killed_predict_leaves_complete_files_and_resumes(tmp_path, models):
    first, second = models
    shapes = _inputs(tmp_path / "in", 6, KILL_SHAPE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgated", *_argv(first, tmp_path / "in", out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _recorded(out):  # a case is finished and recorded: kill in the middle of the next
                    break
            except (json.JSONDecodeError, KeyError):
                pytest.fail("provenance.json was read half-written")
            time.sleep(0.005)
        assert proc.poll() is None, "predict finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    # only complete files: every visible output is a readable NIfTI with its input's shape
    finished = _recorded(out)  # valid JSON
    assert 1 <= len(finished) < 6
    for f in _outputs(out):
        assert nib.load(f).get_fdata().shape == shapes[f.name[: -len(".nii.gz")]]
    assert json.loads((out / "labels.json").read_text())["1"] == "liver"
    stale = out / ".case5.nii.gz.tmp-interrupted.nii.gz"  # as a kill during a write leaves it
    stale.write_bytes(b"half a file")
    mtimes = {cid: (out / f"{cid}.nii.gz").stat().st_mtime_ns for cid in finished}

    # the re-run finishes the rest without redoing finished cases, and cleans its temporaries
    assert main(_argv(first, tmp_path / "in", out)) == 0
    assert [p.name for p in _outputs(out)] == [f"case{i}.nii.gz" for i in range(6)]
    assert set(_recorded(out)) == set(shapes)
    for cid, mtime in mtimes.items():
        assert (out / f"{cid}.nii.gz").stat().st_mtime_ns == mtime, f"{cid} was predicted again"
    assert not [p.name for p in out.iterdir() if is_temporary(p)]

    # another model redoes every case
    before = {p.name: p.stat().st_mtime_ns for p in _outputs(out)}
    assert main(_argv(second, tmp_path / "in", out)) == 0
    assert all(p.stat().st_mtime_ns != before[p.name] for p in _outputs(out))
    hashes = {e["model_hash"] for e in _recorded(out).values()}
    assert hashes == {json.loads((out / "provenance.json").read_text())["model"]["hash"]}


# ---------------------------------------------------------------------------------------------
# what a re-run may skip
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def done(tmp_path, models):
    """A folder predicted once with all organs; returns (input folder, output folder, mtime of case0)."""
    _inputs(tmp_path / "in", 2, SMALL_SHAPE)
    out = tmp_path / "out"
    predict(models[0], tmp_path / "in", out, quiet=True)
    return tmp_path / "in", out, (out / "case0.nii.gz").stat().st_mtime_ns


def _redone(out: Path, mtime: int) -> bool:
    return (out / "case0.nii.gz").stat().st_mtime_ns != mtime


def test_same_request_is_skipped(done, models):
    inp, out, mtime = done
    predict(models[0], inp, out, quiet=True, modality="ct")  # the modality it was predicted with
    assert not _redone(out, mtime)


def test_other_organs_are_predicted_again(done, models):
    inp, out, mtime = done
    predict(models[0], inp, out, organs="liver,spleen", quiet=True)
    assert _redone(out, mtime)
    assert set(np.unique(np.asanyarray(nib.load(out / "case0.nii.gz").dataobj))) <= {0, 1, 3}
    # labels.json still names every organ that an output in the folder may hold
    assert len(json.loads((out / "labels.json").read_text())) == 14


def test_modified_output_is_predicted_again(done, models):
    inp, out, mtime = done
    img = nib.load(out / "case0.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), out / "case0.nii.gz")
    mtime = (out / "case0.nii.gz").stat().st_mtime_ns
    predict(models[0], inp, out, quiet=True)
    assert _redone(out, mtime)


def test_probabilities_requested_later_are_written(done, models):
    inp, out, mtime = done
    predict(models[0], inp, out, save_probabilities=True, quiet=True)
    assert _redone(out, mtime) and (out / "case0_probs.npz").is_file()
    mtime = (out / "case0.nii.gz").stat().st_mtime_ns
    predict(models[0], inp, out, quiet=True)  # without the flag, existing outputs are enough
    assert not _redone(out, mtime)


def test_explicit_other_modality_is_predicted_again(done, models):
    inp, out, mtime = done
    predict(models[0], inp, out, modality="mr", quiet=True)
    assert _redone(out, mtime)
    assert _recorded(out)["case0"]["modality"] == "mr"


def test_output_written_but_not_recorded_is_predicted_again(done, models):
    """A kill between writing a label file and recording it leaves an unrecorded output."""
    inp, out, mtime = done
    prov = json.loads((out / "provenance.json").read_text())
    del prov["cases"]["case0"]
    (out / "provenance.json").write_text(json.dumps(prov))
    predict(models[0], inp, out, quiet=True)
    assert _redone(out, mtime)


def test_unreadable_provenance_redoes_cases_with_a_warning(done, models, caplog):
    inp, out, mtime = done
    (out / "provenance.json").write_text('{"cases": {"case0": ')  # as a non-atomic writer would leave it
    predict(models[0], inp, out, quiet=True)
    assert _redone(out, mtime) and "provenance.json is unreadable" in caplog.text
    assert set(_recorded(out)) == {"case0", "case1"}


def test_evaluate_warns_about_mixed_unrecorded_or_changed_predictions(done, models, caplog):
    from tgated.evaluation import check_provenance, prediction_files

    inp, out, _ = done
    preds = prediction_files(out)
    assert check_provenance(out, preds) == []
    predict(models[1], inp / "case0.nii.gz", out / "case0.nii.gz", quiet=True)  # one case, another model
    prov = json.loads((out / "provenance.json").read_text())
    first_model = prov["cases"].pop("case1")  # as if killed between writing and recording case1
    (out / "extra.nii.gz").write_bytes((out / "case1.nii.gz").read_bytes())
    prov["cases"]["extra"] = {**first_model, "output_sha256": "0" * 64}
    (out / "provenance.json").write_text(json.dumps(prov))
    warnings = check_provenance(out, prediction_files(out))
    assert len(warnings) == 3
    assert (
        "does not record 1 prediction(s) (case1); they were written by another tool or by an interrupted run"
        in warnings[0]
    )
    assert "the predictions come from 2 different models" in warnings[1]
    assert "1 prediction(s) changed after tgated predict wrote them (extra)" in warnings[2]
