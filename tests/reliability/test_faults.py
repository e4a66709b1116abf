"""Faults that need more than a bad file: an alias bomb under resource limits, SIGTERM, a planted
lock-file link, qform/sform disagreement, library warnings, hidden inputs, pickled checkpoints and
one-voxel axes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import lps_affine
from tests.models.conftest import tiny_model_config
from tests.reliability.test_cli_matrix import alias_bomb
from tgated.cli import main
from tgated.models.tgated import TGatedModel

SHAPE = (12, 10, 5)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return TGatedModel.from_config(tiny_model_config()).save_pretrained(tmp_path_factory.mktemp("m") / "model")


def _image(path: Path, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.random.default_rng(0).normal(0, 300, SHAPE) - 300).astype(np.int16)
    nib.save(nib.Nifti1Image(data, lps_affine() if affine is None else affine), path)
    return path


def _predict(model_dir: Path, inp: Path, out: Path) -> list[str]:
    return ["predict", "--model", str(model_dir), "--input", str(inp), "--output", str(out), "--quiet"]


# ---------------------------------------------------------------------------------------------
# the alias bomb under a CPU-time and memory limit
# ---------------------------------------------------------------------------------------------

LIMITED = textwrap.dedent(
    """
    import resource, sys
    import tgated.cli, tgated.models.tgated, tgated.training  # heavy imports first: the limits are for the command
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime) + 1 + 1  # whole seconds: at most 1 s more (+1 rounding)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 100 * 2**20, vm + 100 * 2**20))  # 100 MB more
    sys.exit(tgated.cli.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "train"])
def test_alias_bomb_is_refused_within_one_cpu_second_and_100_mb(tmp_path, command):
    """The 2.4 kB config that expands to 387 million values is refused by a process that may use at
    most one more CPU second and 100 MB more address space than its imports took (the limits end it
    otherwise: SIGXCPU, MemoryError)."""
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(alias_bomb())
    assert 2300 <= cfg.stat().st_size <= 2500
    argv = [str(cfg)] if command == "info" else [str(cfg), "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, command, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tgated {command}: error: {cfg}: line 8: aliases (*name) expand to more than 10,000 values; expected a "
        "config of at most that size — write the values out instead of nesting aliases"
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# SIGTERM, lock files, hidden inputs
# ---------------------------------------------------------------------------------------------


def test_sigterm_is_handled_like_ctrl_c(tmp_path, model_dir, capsys, monkeypatch):
    from tgated.inference.predictor import Predictor

    inp = tmp_path / "in"
    _image(inp / "a.nii.gz")
    _image(inp / "b.nii.gz")
    real = Predictor.predict_volume
    calls = []

    def terminated_on_the_second_case(self, volume, *args, **kwargs):
        calls.append(volume.source)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_volume", terminated_on_the_second_case)
    assert main(_predict(model_dir, inp, tmp_path / "out")) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tgated predict: terminated (SIGTERM); finished cases are kept: run the same command again to finish the rest"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "a.nii.gz" in out and "b.nii.gz" not in out and not [n for n in out if ".tmp-" in n]
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert list(prov["cases"]) == ["a"]


def test_planted_lock_link_is_refused_and_nothing_is_created_outside(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere" / "victim"
    outside.parent.mkdir()
    (out / ".provenance.lock").symlink_to(outside)
    assert main(_predict(model_dir, _image(tmp_path / "a.nii.gz"), out)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tgated predict: error: {out}/.provenance.lock: is a symbolic link; expected the lock file tgated "
        "creates there — delete the link"
    )
    assert not outside.exists()


def test_hidden_inputs_are_logged_once(tmp_path, model_dir, capsys):
    inp = tmp_path / "in"
    _image(inp / "a.nii.gz")
    _image(inp / ".b.nii.gz")
    _image(inp / "._c.nii.gz")
    (inp / ".a.nii.gz.tmp-x1y2z3.nii.gz").write_bytes(b"")  # a leftover of ours: not reported
    assert main(_predict(model_dir, inp, tmp_path / "out")) == 0
    hidden = [line for line in capsys.readouterr().err.splitlines() if "hidden" in line]
    assert hidden == [
        f"{inp}: skipped 2 hidden file(s) (._c.nii.gz, .b.nii.gz); rename them without the leading dot to segment them"
    ]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz"]


# ---------------------------------------------------------------------------------------------
# NIfTI headers: qform vs sform, library warnings, one-voxel axes
# ---------------------------------------------------------------------------------------------


def test_qform_sform_disagreement_warns_and_the_output_keeps_both(tmp_path, model_dir, capsys):
    sform = lps_affine()
    qform = np.diag([-1.0, 1.0, 1.0, 1.0]) @ sform  # a left-right flip
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16) - 500, sform)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    nib.save(img, tmp_path / "a.nii.gz")
    assert main(_predict(model_dir, tmp_path / "a.nii.gz", tmp_path / "p.nii.gz")) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "qform" in line] == [
        f"{tmp_path}/a.nii.gz: the header's qform and sform disagree (orientation RPS vs LPS); using the sform "
        "(sform_code 2), as nibabel and ITK do — check which is right; outputs keep both forms as they are"
    ]
    out = nib.load(tmp_path / "p.nii.gz").header
    np.testing.assert_allclose(out.get_sform(), sform, atol=1e-5)
    np.testing.assert_allclose(out.get_qform(), qform, atol=1e-5)
    assert (int(out["sform_code"]), int(out["qform_code"])) == (2, 1)


def test_agreeing_forms_give_no_warning(tmp_path, caplog):
    from tgated.io.volumes import read_volume

    _image(tmp_path / "a.nii.gz")
    with caplog.at_level(logging.WARNING):
        read_volume(tmp_path / "a.nii.gz")
    assert not [r for r in caplog.records if "qform" in r.getMessage()]


def test_library_warnings_are_reemitted_naming_the_file(tmp_path, caplog, monkeypatch):
    from tgated.io import volumes

    path = _image(tmp_path / "a.nii.gz")
    real = nib.load

    def noisy(filename, *args, **kwargs):
        warnings.warn("pixdim[0] (qfac) should be 1 (default) or -1", UserWarning, stacklevel=2)
        os.write(2, b"WARNING: In /itk/gdcmImageIO.cxx, line 12\nGDCMImageIO (0x1): Unknown tag\n")
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(volumes.nib, "load", noisy)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing escapes as a Python warning
        volumes.read_volume(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: pixdim[0] (qfac) should be 1 (default) or -1",
        f"{path}: GDCMImageIO (0x1): Unknown tag",
    ]


@pytest.mark.parametrize("affine", [np.eye(4), lps_affine(), np.diag([-1.0, -1.0, -1.0, 1.0])], ids=["RAS", "LPS", "LPI"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 4), (2, 3, 1)])
def test_one_voxel_axes_are_segmented(tmp_path, model_dir, shape, affine):
    """Flipped axes of length one used to reach torch as negative strides."""
    data = np.random.default_rng(1).integers(-500, 500, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    assert main(_predict(model_dir, tmp_path / "v.nii.gz", tmp_path / "p.nii.gz")) == 0
    out = nib.load(tmp_path / "p.nii.gz")
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, affine)


# ---------------------------------------------------------------------------------------------
# checkpoints holding pickled objects
# ---------------------------------------------------------------------------------------------


class NotATensor:
    pass


def test_pickled_checkpoint_is_refused_without_torchs_unsafe_advice(tmp_path):
    from tgated.training.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"format": "tgated-checkpoint", "state": {"x": NotATensor()}}, path)
    with pytest.raises(ValueError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: holds pickled Python objects besides tensors and plain values")
    assert "could run code" in message and "weights_only" not in message
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"garbage\.pt: not a readable checkpoint \(damaged data or not a torch file\)") as exc:
        load_checkpoint(tmp_path / "garbage.pt")
    assert "weights_only" not in str(exc.value)
