"""``--save-probabilities``: staged on disk slice by slice, written organ by organ, the same values as
the predictor's in-memory probabilities, and nothing left behind on failure."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from tests.conftest import lps_affine
from tests.models.conftest import even_odds, randomise_adapters, tiny_model_config
from tgated.data.slices import (
    apply_window,
    axial_slices,
    from_axial_slices,
    from_model_grid,
    intensity_window,
    to_model_grid,
)
from tgated.inference import probabilities as P
from tgated.inference.api import predict
from tgated.inference.probabilities import ProbabilityMaps, write_probabilities
from tgated.io.files import is_temporary
from tgated.io.volumes import read_volume, volume_from_array, write_nifti
from tgated.models.tgated import TGatedModel
from tgated.organs import ORGANS, get_organ

SHAPE = (37, 29, 11)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = TGatedModel.from_config(tiny_model_config())
    randomise_adapters(model)  # the neighbours change the output
    even_odds(model)  # probabilities spread over (0, 1), both sides of the threshold
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "model")


def _ct(path, shape=SHAPE, affine=None):
    rng = np.random.default_rng(4)
    data = (rng.normal(0, 300, shape) - 200).astype(np.int16)
    write_nifti(path, data, lps_affine() if affine is None else affine)
    return path


def _expected(model_dir, image, organs):
    """The probabilities as the predictor computes them, the whole stack in memory at once: window,
    resize, segment, sigmoid, back to the native grid, float16, the input's own layout."""
    model = TGatedModel.from_pretrained(model_dir).eval()
    volume = read_volume(image)
    pre = model.config.preprocess
    slices = axial_slices(apply_window(volume.data, intensity_window(volume.data, "ct", pre)))
    stack = to_model_grid(slices.unsqueeze(1).contiguous(), int(pre.image_size))
    with torch.no_grad():
        logits = model.segment_stack(stack, organs, positions_mm=volume.slice_positions(), batch_size=2)
    h, w = slices.shape[-2:]
    native = from_model_grid(logits.sigmoid(), (h, w)).to(torch.float16)  # (Z, O, H, W)
    return volume.to_original(from_axial_slices(native.transpose(0, 1)).contiguous().numpy())


def _left(folder):
    return sorted(p.name for p in folder.iterdir() if is_temporary(p))


def test_saved_probabilities_are_the_predictors_values(tmp_path, model_dir):
    image = _ct(tmp_path / "in" / "a.nii.gz")
    organs = ["liver", "spleen", "pancreas", "aorta"]
    out = tmp_path / "out"
    # 2 slices per batch (as in the reference): several writes per organ
    predict(
        model_dir, image, out, organs=organs, modality="ct", save_probabilities=True, batch_size=2, quiet=True
    )
    expected = _expected(model_dir, image, organs)
    with np.load(out / "a_probs.npz") as saved:
        assert saved.files == [*sorted(organs, key=lambda n: get_organ(n).id), "affine"]
        np.testing.assert_allclose(saved["affine"], lps_affine(), atol=1e-5)
        for name in organs:
            got = saved[name]
            assert got.dtype == np.float16 and got.shape == SHAPE
            np.testing.assert_array_equal(got, expected[organs.index(name)])  # bit for bit
    assert _left(out) == []
    recorded = json.loads((out / "provenance.json").read_text())["cases"]["a"]
    assert recorded["probabilities"] == "a_probs.npz"


def test_probability_maps_store_slices_in_any_order(tmp_path):
    organs = ORGANS[:3]
    x, y, z = 6, 5, 7
    rng = np.random.default_rng(0)
    canonical = rng.random((3, x, y, z), dtype=np.float32)
    axial = axial_slices(torch.from_numpy(canonical)).transpose(0, 1)  # (Z, O, H, W)
    with ProbabilityMaps(organs, (x, y, z), tmp_path / "case_probs.npz") as maps:
        (scratch,) = tmp_path.iterdir()
        assert is_temporary(scratch) and scratch.name.startswith(".case_probs.npz.tmp-")
        assert scratch.stat().st_size == 3 * z * y * x * 2
        for sel in ([4, 5, 6], [0, 2], [1], [3]):  # out of order, with gaps
            maps.put(sel, axial[sel])
        assert maps.shape == (3, x, y, z) and maps.dtype == np.float16 and len(maps) == 3
        expected = canonical.astype(np.float16)
        np.testing.assert_array_equal(maps.organ(1), expected[1])
        np.testing.assert_array_equal(np.asarray(maps), expected)
        assert np.asarray(maps, np.float32).dtype == np.float32
        with pytest.raises(ValueError, match=r"expected \(2, 3, 5, 6\) \(N, O, H, W\)"):
            maps.put([0, 1], axial[:2, :2])
        with pytest.raises(ValueError, match=r"outside 0..6"):
            maps.put([7], axial[:1])
    assert list(tmp_path.iterdir()) == []  # closed: the scratch file is gone
    with pytest.raises(ValueError, match="closed"):
        maps.organ(0)


def test_writing_holds_one_organ_at_a_time(tmp_path):
    """The archive is written from the scratch file organ by organ: the peak allocation (numpy's and
    the compressor's) stays below 2.5 organs' arrays (read back, laid out as the input, a chunk being
    compressed), where stacking the 13 organs (as ``savez`` of a dict needs) would be 13."""
    shape = (128, 128, 128)
    volume = volume_from_array(np.zeros(shape, np.float32), lps_affine())
    organ_bytes = np.prod(shape) * 2
    block = torch.rand(shape[2], len(ORGANS), shape[1], shape[0], generator=torch.Generator().manual_seed(0))
    with ProbabilityMaps(ORGANS, volume.shape, tmp_path / "c_probs.npz") as maps:
        maps.put(range(shape[2]), block)
        del block
        tracemalloc.start()
        try:
            write_probabilities(tmp_path / "c_probs.npz", maps, volume)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2.5 * organ_bytes, f"peak {peak / organ_bytes:.1f} organs' arrays"
        with np.load(tmp_path / "c_probs.npz") as saved:
            for i in (0, 7, 12):
                np.testing.assert_array_equal(saved[ORGANS[i].name], volume.to_original(maps.organ(i)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_probs.npz"]


@pytest.mark.parametrize("stage", ["segmenting", "writing"])
def test_interrupted_case_leaves_no_probabilities_and_no_scratch(tmp_path, model_dir, monkeypatch, stage):
    """Ctrl-C while the slices are staged or while the archive is written: no ``_probs.npz``, no
    scratch file, no temporaries; a new output folder is removed; a finished case stays as it was."""
    _ct(tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    predict(model_dir, tmp_path / "in", out, organs=["liver"], modality="ct", quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _ct(tmp_path / "in" / "b.nii.gz", shape=(20, 18, 6), affine=np.diag([1.0, 1.0, 2.5, 1.0]))
    calls = []
    target = "put" if stage == "segmenting" else "_write_member"

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    if target == "put":
        original = ProbabilityMaps.put
        monkeypatch.setattr(ProbabilityMaps, "put", interrupt)
    else:
        original = P._write_member
        monkeypatch.setattr(P, "_write_member", interrupt)
    for folder in (out, tmp_path / "new"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            predict(
                model_dir,
                tmp_path / "in",
                folder,
                organs=["liver", "spleen"],
                modality="ct",
                save_probabilities=True,
                batch_size=2,
                overwrite=True,
                quiet=True,
            )
        assert len(calls) == 2
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # case a: untouched


def test_not_enough_disk_space_is_an_error_before_segmenting(tmp_path, model_dir, monkeypatch, capsys):
    from collections import namedtuple

    from tgated.cli import main
    from tgated.io import files

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    segmented = []
    monkeypatch.setattr(TGatedModel, "iter_segment_stack", lambda *a, **k: segmented.append(1) or iter(()))
    image = _ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(model_dir), "--input", str(image), "--output", str(out)]
    assert main([*argv, "--save-probabilities", "--organs", "liver,spleen", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    need = 2 * np.prod(SHAPE) * 2 / 1e9
    assert f"a_probs.npz: cannot be written: staging it needs {need:.2f} GB of disk space in {out}" in err
    assert err.endswith("but 0.00 GB is free; free disk space or choose another output folder")
    assert segmented == [] and not out.exists()


def test_leftover_scratch_of_a_killed_run_is_removed(tmp_path, model_dir):
    image = _ct(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a_probs.npz.tmp-abcd1234.f16").write_bytes(b"\0" * 64)  # a run killed while segmenting
    predict(model_dir, image, out, organs=["liver"], modality="ct", save_probabilities=True, quiet=True)
    assert _left(out) == [] and (out / "a_probs.npz").is_file()
