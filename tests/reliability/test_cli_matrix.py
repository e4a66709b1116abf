"""The CLI over a matrix of bad inputs to predict, evaluate, train and info: every one ends with exit
code 1 and a last stderr line ``tgated CMD: error: ...`` that names the file (or flag), the value and
what was expected — never a traceback, never a partial output.

Each case builds its inputs in a fresh folder and returns the command line; the expected last line
is matched as a regular expression (``{tmp}`` stands for the case's folder).
"""

from __future__ import annotations

import errno
import gzip
import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import lps_affine
from tests.models.conftest import tiny_model_config
from tests.training.conftest import FAST, TINY_CONFIG
from tgated.cli import main
from tgated.io.volumes import write_nifti
from tgated.models.tgated import TGatedModel

SHAPE = (12, 10, 5)


@dataclass(frozen=True)
class Env:
    tmp: Path
    model: Path
    """A saved tiny model (never modified: cases copy it)."""
    data: Path
    """A dataset root (empty)."""


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("matrix")
    model = TGatedModel.from_config(tiny_model_config(organs=["liver", "spleen"])).save_pretrained(base / "model")
    (base / "data").mkdir()  # every train case fails on its config, before the data are read
    return model, base / "data"


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def _ct(shape=SHAPE) -> np.ndarray:
    return (np.random.default_rng(0).normal(0, 300, shape) - 300).astype(np.int16)


def _image(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_ct() if data is None else data, lps_affine() if affine is None else affine), path)
    return path


def _predict(env: Env, inp: Path, *extra: str, model: Path | None = None, out: Path | None = None) -> list[str]:
    out = env.tmp / "out" if out is None else out
    return ["predict", "--model", str(model or env.model), "--input", str(inp), "--output", str(out), *extra]


def _bad_image(make: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        path = env.tmp / "in" / "bad.nii.gz"
        path.parent.mkdir(parents=True)
        make(path)
        return _predict(env, path.parent)

    return build


def _truncated(p: Path) -> None:
    write_nifti(p, _ct((40, 40, 40)), np.eye(4))
    p.write_bytes(p.read_bytes()[:5000])


def _patched_header(p: Path, *fields: tuple[str, int, tuple]) -> None:
    """Write a valid image to ``p``, then overwrite raw header fields (struct format, offset, values)
    as a damaged or hand-made file would have them."""
    plain = p.with_name("tmp.nii")
    nib.save(nib.Nifti1Image(_ct(), np.eye(4)), plain)
    raw = bytearray(plain.read_bytes())
    for fmt, offset, values in fields:
        struct.pack_into(fmt, raw, offset, *values)
    p.write_bytes(gzip.compress(bytes(raw)))
    plain.unlink()


def _negative_dim(p: Path) -> None:
    _patched_header(p, ("<h", 44, (-5,)))  # dim[2]


def _with_nan(p: Path) -> None:
    data = _ct().astype(np.float32)
    data[3, 4, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)


def _float64_huge(p: Path) -> None:
    data = np.zeros(SHAPE, np.float64)
    data[0, 0, 0] = 1e300
    nib.save(nib.Nifti1Image(data, np.eye(4)), p)


def _affine(rows: np.ndarray) -> Callable[[Path], None]:
    """An image whose sform (the affine nibabel reads) is ``rows`` (3 × 4), qform unset."""
    return lambda p: _patched_header(p, ("<hh", 252, (0, 1)), ("<12f", 280, tuple(np.ravel(rows))))


def _tampered(edit: Callable[[dict], None] | None = None, text: str | None = None) -> Callable[[Env], list[str]]:
    """predict with a copy of the model whose config.json was edited (``edit``) or replaced (``text``)."""

    def build(env: Env) -> list[str]:
        model = env.tmp / "model"
        shutil.copytree(env.model, model)
        if text is not None:
            (model / "config.json").write_text(text)
        else:
            meta = json.loads((model / "config.json").read_text())
            edit(meta)
            (model / "config.json").write_text(json.dumps(meta))
        return _predict(env, _image(env.tmp / "in" / "a.nii.gz"), model=model)

    return build


def _set(section: str, key: str, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        node = meta["model"]
        for part in section.split(".") if section else []:
            node = node[part]
        node[key] = value

    return edit


def _top(key: str, value) -> Callable[[dict], None]:
    return lambda meta: meta.__setitem__(key, value)


def _train(*sets: str, config: Path | None = None, out: str = "run") -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        args = [f"data.root={env.data}", *FAST, *sets]
        run = env.data if out == "DATA" else env.tmp / out
        return ["train", str(config or TINY_CONFIG), "--out", str(run), *[x for s in args for x in ("--set", s)]]

    return build


def _yaml(command: str, text: str | bytes) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        path = env.tmp / "cfg.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        if command == "info":
            return ["info", str(path)]
        return ["train", str(path), "--out", str(env.tmp / "run"), "--set", f"data.root={env.data}"]

    return build


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """About 2.4 kB of YAML whose aliases expand to width**levels (9**9 ≈ 387 million) values."""
    lines = ["name: bomb", "data:", "  split_sizes:", "    - &a0 [" + ", ".join(["1"] * width) + "]"]
    lines += [f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    text = "\n".join(lines) + "\n"
    while len(text) < 2400:  # the size of the bomb that was reported
        text += "# each level repeats the previous one nine times\n"
    return text


def _evaluate(*, pred: str = "pred", gt: str = "gt", out: str = "eval", extra=(), setup=None):
    def build(env: Env) -> list[str]:
        for folder in ("pred", "gt"):
            for i in range(2):
                lab = np.zeros(SHAPE, np.uint8)
                lab[2:8, 2:7, 1:4] = 1
                write_nifti(env.tmp / folder / f"case{i}.nii.gz", lab, lps_affine())
        if setup:
            setup(env.tmp)
        paths = {k: str(env.tmp / v) for k, v in (("pred", pred), ("gt", gt), ("out", out))}
        return [
            "evaluate", "--pred", paths["pred"], "--gt", paths["gt"], "--dataset", "folder",
            "--out", paths["out"], *extra,
        ]  # fmt: skip

    return build


def _write(rel: str, data=None, affine=None):
    return lambda tmp: write_nifti(tmp / rel, np.zeros(SHAPE, np.uint8) if data is None else data,
                                   lps_affine() if affine is None else affine)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the matrix: (id, builder, last-line pattern)
# ---------------------------------------------------------------------------------------------

P, E, T, INFO = "tgated predict: error: ", "tgated evaluate: error: ", "tgated train: error: ", "tgated info: error: "
CFG = r"{tmp}/model/config\.json: "

MATRIX: list[tuple[str, Callable[[Env], list[str]], str]] = [
    # -- predict: image files
    ("html as nii", _bad_image(lambda p: p.write_bytes(gzip.compress(b"<html>404</html>" * 20))),
     P + r"{tmp}/in/bad\.nii\.gz: not a readable NIfTI file"),
    ("truncated", _bad_image(_truncated), P + r"{tmp}/in/bad\.nii\.gz: the file is truncated or corrupt"),
    ("2-D", _bad_image(lambda p: nib.save(nib.Nifti1Image(np.zeros((12, 10), np.int16), np.eye(4)), p)),
     P + r".*bad\.nii\.gz: image has 2 dimensions \(12, 10\); expected 3 \(x, y, z\) — is this a single slice\?"),
    ("4-D", _bad_image(lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), p)),
     P + r".*bad\.nii\.gz: image has 4 dimensions \(4, 4, 4, 3\); expected 3"),
    ("zero-length axis", _bad_image(lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.int16), np.eye(4)), p)),
     P + r".*bad\.nii\.gz: image has a zero-length axis \(4, 0, 4\)"),
    ("negative dim", _bad_image(_negative_dim),
     P + r".*bad\.nii\.gz: the header gives image size \(12, -5, 5\) with a negative axis length; expected positive"),
    ("NaN voxels", _bad_image(_with_nan), P + r".*bad\.nii\.gz: image holds 1 NaN/Inf voxels; expected finite"),
    ("complex", _bad_image(lambda p: nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.complex64), np.eye(4)), p)),
     P + r".*bad\.nii\.gz: image has unsupported data type complex64"),
    ("float64 1e300", _bad_image(_float64_huge),
     P + r".*bad\.nii\.gz: image holds values up to 1e\+300, beyond float32's 3\.4e\+38; expected intensities"),
    ("singular affine", _bad_image(_affine(np.diag([1.0, 0.0, 1.0, 1.0])[:3])),
     P + r".*bad\.nii\.gz: the header's affine is singular \(voxel sizes \[1\.0, 0\.0, 1\.0\]\); expected positive"),
    ("NaN affine", _bad_image(_affine(np.full((3, 4), np.nan))), P + r".*bad\.nii\.gz: the header's affine holds NaN/Inf"),
    ("png input", lambda env: _predict(env, (env.tmp / "x.png").resolve()) if (env.tmp / "x.png").write_bytes(b"x") else [],
     P + r"--input {tmp}/x\.png: unsupported file type; expected \.nii\.gz"),
    ("missing input", lambda env: _predict(env, env.tmp / "nope"), P + r"--input {tmp}/nope: does not exist"),
    ("empty folder", lambda env: _predict(env, Path(shutil.os.makedirs(env.tmp / "e") or env.tmp / "e")),
     P + r"--input {tmp}/e: folder holds no images"),
    ("same case id twice", lambda env: _predict(env, _image(env.tmp / "i" / "a.nii.gz").parent)
     if _image(env.tmp / "i" / "a_0000.nii.gz") else [], P + r"--input {tmp}/i: several inputs map to the same case id \['a'\]"),
    ("output is the input", lambda env: _predict(env, p := _image(env.tmp / "c.nii.gz"), out=p),
     P + r"--output {tmp}/c\.nii\.gz: is the input file --input {tmp}/c\.nii\.gz; writing there would destroy"),
    ("output is the input folder", lambda env: _predict(env, d := _image(env.tmp / "d" / "c.nii.gz").parent, out=d),
     P + r"--output {tmp}/d: is the input folder --input {tmp}/d; writing there would destroy the input"),
    ("file output, two inputs", lambda env: _predict(env, _image(env.tmp / "two" / "b.nii.gz").parent, out=env.tmp / "o.nii.gz")
     if _image(env.tmp / "two" / "a.nii.gz") else [], P + r"--output {tmp}/o\.nii\.gz: a file name, but --input holds 2 cases"),
    ("output is a file", lambda env: _predict(env, _image(env.tmp / "a.nii.gz"), out=env.tmp / "f")
     if (env.tmp / "f").write_text("x") else [], P + r"--output {tmp}/f: exists and is not a folder"),
    ("248-character case id", lambda env: _predict(env, _image(env.tmp / ("c" * 248 + ".nii.gz"))),
     P + r".*: case id 'c{200}.*' is 255 bytes long, more than the 229 that leave room"),
    ("unknown organ", lambda env: _predict(env, _image(env.tmp / "a.nii.gz"), "--organs", "livr"),
     P + r"unknown organ 'livr'; expected one of: liver, .* Did you mean 'liver'\?"),
    ("organ not trained", lambda env: _predict(env, _image(env.tmp / "a.nii.gz"), "--organs", "pancreas"),
     P + r"organs \['pancreas'\] were not trained by this model; it segments: liver, spleen"),
    ("--series with NIfTI", lambda env: _predict(env, _image(env.tmp / "a.nii.gz"), "--series", "1.2.3"),
     P + r"--series 1\.2\.3: applies to DICOM series folders, but no input is one; drop it"),
    ("--batch-size 0", lambda env: _predict(env, _image(env.tmp / "a.nii.gz"), "--batch-size", "0"),
     P + r"--batch-size 0: expected a positive number of slices per forward pass"),
    ("missing model", lambda env: _predict(env, _image(env.tmp / "a.nii.gz"), model=env.tmp / "m"),
     P + r"--model {tmp}/m: does not exist; expected a run folder or a saved model folder"),
    # -- predict: a tampered or hand-edited model config.json
    ("ct_window NaN", _tampered(_set("preprocess", "ct_window", [float("nan"), 275.0])),
     P + CFG + r"model\.preprocess\.ct_window=\[nan, 275\.0\]: expected two finite HU values \[low, high\] with low < high"),
    ("ct_window reversed", _tampered(_set("preprocess", "ct_window", [275, -125])),
     P + CFG + r"model\.preprocess\.ct_window=\[275\.0, -125\.0\]: expected two finite HU values"),
    ("std 0", _tampered(_set("preprocess", "std", [0, 0.26, 0.27])),
     P + CFG + r"model\.preprocess\.std=\[0\.0, 0\.26, 0\.27\]: expected three positive numbers"),
    ("organs []", _tampered(_set("", "organs", [])),
     P + CFG + r"model\.organs=\[\]: expected the organs the model was trained for"),
    ("organ twice", _tampered(_set("", "organs", ["liver", "liver"])),
     P + CFG + r"model\.organs=\['liver', 'liver'\]: expected each organ once \(repeated: liver\)"),
    ("heads 7", _tampered(_set("adapter_config", "heads", 7)),
     P + CFG + r"model\.adapter_config\.heads=7: expected a divisor of adapter_config\.dim=32 \(e\.g\. 8\)"),
    ("image_size 100000", _tampered(_set("preprocess", "image_size", 100000)),
     P + CFG + r"model\.preprocess\.image_size=100000: expected an input size in pixels \(CLIPSeg: 352\) in 16\.\.2048"),
    ("context 4", _tampered(_set("", "context", 4)), P + CFG + r"model\.context=4: expected an odd number of slices"),
    ("threshold 1.5", _tampered(_set("preprocess", "background_threshold", 1.5)),
     P + CFG + r"model\.preprocess\.background_threshold=1\.5: expected a probability in \(0, 1\)"),
    ("weights_sha256 null", _tampered(_top("weights_sha256", None)),
     P + CFG + r"weights_sha256=None: expected the weights' SHA-256 \(64 hexadecimal digits\)"),
    ("weights_sha256 other", _tampered(_top("weights_sha256", "0" * 64)),
     P + r"{tmp}/model/model\.safetensors: SHA-256 .* does not match the 0000000000000000… recorded in"),
    ("config.json 100k deep", _tampered(text='{"model_type": "tgated", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     P + CFG + r"JSON nested too deeply to read"),
    ("config.json not JSON", _tampered(text="{not json"), P + CFG + r"not valid JSON"),
    # -- evaluate
    ("--pred missing", _evaluate(pred="nope"), E + r"{tmp}/nope: prediction folder does not exist"),
    ("--out is --pred", _evaluate(out="pred"), E + r"--out {tmp}/pred: is the input folder --pred {tmp}/pred"),
    ("--out is --gt", _evaluate(out="gt"), E + r"--out {tmp}/gt: is the input folder --gt {tmp}/gt"),
    ("prediction without ground truth", _evaluate(setup=_write("pred/zz.nii.gz")),
     E + r"{tmp}/pred: 1 prediction\(s\) have no ground truth in {tmp}/gt \(zz\.nii\.gz\)"),
    ("prediction on another grid", _evaluate(setup=_write("pred/case1.nii.gz", affine=lps_affine(origin=(0, 0, 0)))),
     E + r"case case1: {tmp}/pred/case1\.nii\.gz: geometry does not match {tmp}/gt/case1\.nii\.gz"),
    ("--totalseg-task with folder", _evaluate(extra=("--totalseg-task", "total")),
     E + r"--totalseg-task 'total' applies to the totalseg dataset only, not 'folder'; drop it"),
    ("unknown organ to score", _evaluate(extra=("--organs", "spleeen")), E + r"unknown organ 'spleeen'"),
    # -- train
    ("alias bomb", _yaml("train", alias_bomb()),
     T + r"{tmp}/cfg\.yaml: line 8: aliases \(\*name\) expand to more than 10,000 values"),
    ("duplicate key", _yaml("train", "train:\n  epochs: 2\n  epochs: 3\n"),
     T + r"{tmp}/cfg\.yaml: line 3: duplicate key 'epochs' \(first on line 2\); expected each key once"),
    ("50,000 levels deep", _yaml("train", "a: " + "[" * 50_000 + "]" * 50_000 + "\n"),
     T + r"{tmp}/cfg\.yaml: line 1: nested more than 32 levels deep"),
    ("not UTF-8", _yaml("train", b"name: \xff\xfe\n"), T + r"{tmp}/cfg\.yaml: not a valid YAML file .*expected UTF-8"),
    ("2 MB config", _yaml("train", "# " + "x" * (2 << 20) + "\n"), T + r"{tmp}/cfg\.yaml: larger than 1,048,576 bytes"),
    ("long value quoted short", _yaml("train", "data:\n  layout: " + "x" * 100_000 + "\n"),
     T + r"{tmp}/cfg\.yaml: config key 'data\.layout': got 'x{50,250}\.\.\.x*'; expected one of 'flare22'"),
    ("unknown key", _train("train.epoch=3"), T + r".*unknown config key 'train\.epoch'.* Did you mean 'epochs'\?"),
    ("split_sizes negative", _train("data.split_sizes=[-1,1,1]"),
     T + r".*tiny_cpu\.yaml: data\.split_sizes=\[-1, 1, 1\]: expected case counts \[train, val, test\] >= 0"),
    ("image_size 1e6", _train("model.preprocess.image_size=1000000"),
     T + r".*tiny_cpu\.yaml: model\.preprocess\.image_size=1000000: expected an input size in pixels"),
    ("train heads 7", _train("model.adapter_config.heads=7"),
     T + r".*tiny_cpu\.yaml: model\.adapter_config\.heads=7: expected a divisor of adapter_config\.dim="),
    ("epochs 0", _train("train.epochs=0"), T + r".*tiny_cpu\.yaml: train\.epochs=0: expected an integer >= 1"),
    ("--out is the data root", _train(out="DATA"), T + r"--out .*: is the input folder data\.root .*; writing there"),
    ("--set without =", lambda env: ["train", str(TINY_CONFIG), "--out", str(env.tmp / "r"), "--set", "train.epochs"],
     T + r".*override 'train\.epochs': expected key=value"),
    ("missing config", lambda env: ["train", str(env.tmp / "no.yaml"), "--out", str(env.tmp / "r")],
     T + r"config file '{tmp}/no\.yaml' does not exist"),
    # -- info
    ("info alias bomb", _yaml("info", alias_bomb()), INFO + r"{tmp}/cfg\.yaml: line 8: aliases \(\*name\) expand"),
    ("info duplicate key", _yaml("info", "model:\n  context: 3\n  context: 5\n"),
     INFO + r"{tmp}/cfg\.yaml: line 3: duplicate key 'context' \(first on line 2\)"),
    ("info heads 7", _yaml("info", "model:\n  adapter_config:\n    heads: 7\n"),
     INFO + r"{tmp}/cfg\.yaml: model\.adapter_config\.heads=7: expected a divisor of adapter_config\.dim=256"),
    ("info std negative", _yaml("info", "model:\n  preprocess:\n    std: [-1, 1, 1]\n"),
     INFO + r"{tmp}/cfg\.yaml: model\.preprocess\.std=\[-1\.0, 1\.0, 1\.0\]: expected three positive numbers"),
    ("info context even", _yaml("info", "model:\n  context: 4\n"), INFO + r"{tmp}/cfg\.yaml: model\.context=4: expected an odd"),
    ("info missing file", lambda env: ["info", str(env.tmp / "none.yaml")],
     INFO + r"config file '{tmp}/none\.yaml' does not exist"),
]  # fmt: skip


def test_the_matrix_is_large_and_distinct():
    ids = [m[0] for m in MATRIX]
    assert len(ids) == len(set(ids)) >= 40
    assert {m[2].split(":")[0] for m in MATRIX} == {f"tgated {c}" for c in ("predict", "evaluate", "train", "info")}


@pytest.mark.parametrize(("build", "expected"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_bad_input(tmp_path, shared, capsys, build, expected):
    env = Env(tmp_path, *shared)
    argv = build(env)
    before = _listing(tmp_path)
    code = main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 1, last
    pattern = expected.replace("{tmp}", re.escape(str(tmp_path)))
    assert re.fullmatch(pattern + r".*", last), f"\n{last[:2000]}\ndoes not match\n{pattern}"
    assert len(last) < 2500
    assert _listing(tmp_path) == before, "the failed command left files behind"


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# faults that need a hand in the process: disk full, too little memory
# ---------------------------------------------------------------------------------------------


def test_disk_full_names_the_file_and_leaves_no_output_folder(tmp_path, shared, capsys, monkeypatch):
    env = Env(tmp_path, *shared)
    argv = _predict(env, _image(tmp_path / "in" / "a.nii.gz"))

    def full(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    assert main([*argv, "--quiet"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"tgated predict: error: {tmp_path}/out/a.nii.gz: cannot be written (No space left on device); free disk "
        "space or choose another output folder"
    )
    assert not (tmp_path / "out").exists()


def test_memory_too_short_for_the_models_input_size(tmp_path, shared, capsys, monkeypatch):
    from tgated.inference import predictor as P

    env = Env(tmp_path, *shared)
    monkeypatch.setattr(P, "available_memory_gb", lambda: 1e-4)
    assert main([*_predict(env, _image(tmp_path / "a.nii.gz")), "--quiet"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"tgated predict: error: {re.escape(str(tmp_path))}/a\.nii\.gz: segmenting \(12, 10, 5\) voxels × 2 organs "
        r"needs about .* GB is available; even one slice at a time needs about .* GB at the model's input size "
        r"64 × 64 \(model\.preprocess\.image_size\).*",
        last,
    ), last
    assert not (tmp_path / "out").exists()
