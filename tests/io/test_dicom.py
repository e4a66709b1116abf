"""DICOM series: several series in one folder, --series, non-axial acquisitions, Modality tag,
missing slices, header probing. Series are written with SimpleITK into tmp_path."""

from __future__ import annotations

import json
import locale
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.models.conftest import tiny_model_config
from tgated.cli import main
from tgated.io.volumes import list_dicom_series, probe_volume, read_volume
from tgated.models.tgated import TGatedModel

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# LPS directions as SimpleITK stores them (row-major 3×3, columns = voxel axes): rows of each
# slice run posterior, columns inferior, slices towards the patient's right.
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def write_series(
    folder: Path,
    array: np.ndarray,
    uid: str,
    *,
    direction=AXIAL,
    spacing=(0.8, 0.9, 2.5),
    origin=(-30.0, 20.0, 100.0),
    modality: str = "CT",
    prefix: str = "",
    skip: tuple[int, ...] = (),
) -> sitk.Image:
    """Write ``array`` (z, y, x as SimpleITK orders it) as one file per slice; returns the 3-D image.

    GDCM's writer switches the process locale to "C" (which would make later ``read_text()`` calls
    decode ASCII): the locale is restored afterwards.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(folder, array, uid, direction, spacing, origin, modality, prefix, skip)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder, array, uid, direction, spacing, origin, modality, prefix, skip) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = direction
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(array.shape[0]):
        if k in skip:
            continue
        s = image[:, :, k]
        for tag, value in (
            ("0008|0060", modality),
            ("0020|000e", uid),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|0037", orientation),
            ("0020|0013", str(k + 1)),
            ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL"),
            ("0008|0018", f"{uid}.{k + 1}"),
        ):
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(s)
    return image


def _ramp(shape=(6, 5, 4), offset=0) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) * 7 - 500 + offset).astype(np.int16)


UID_A = "1.2.826.0.1.3680043.2.1125.101"
UID_B = "1.2.826.0.1.3680043.2.1125.202"


@pytest.fixture
def two_series(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, _ramp(), UID_A, prefix="a")
    write_series(folder, _ramp(offset=3000), UID_B, prefix="b", modality="MR")
    return folder


def test_several_series_are_listed_and_one_is_chosen(two_series):
    assert set(list_dicom_series(two_series)) == {UID_A, UID_B}
    with pytest.raises(ValueError, match=r"holds 2 DICOM series: .*(101|202).*(202|101).*--series UID"):
        read_volume(two_series)
    a = read_volume(two_series, series_uid=UID_A)
    b = read_volume(two_series, series_uid=UID_B)
    assert a.shape == b.shape == (4, 5, 6)
    np.testing.assert_array_equal(b.data - a.data, 3000)
    assert (a.modality, b.modality) == ("ct", "mr")  # from the Modality tag
    with pytest.raises(ValueError, match=r"no DICOM series '1\.2\.3'.*series found: .*--series"):
        read_volume(two_series, series_uid="1.2.3")


def test_sagittal_series_is_read_into_the_axial_frame(tmp_path):
    """Every voxel lands where its physical position says: checked against SimpleITK's own geometry."""
    array = (
        np.random.default_rng(0).integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)
    )  # 7 sagittal slices
    image = write_series(tmp_path / "sag", array, UID_A, direction=SAGITTAL, spacing=(0.7, 0.8, 3.0))
    vol = read_volume(tmp_path / "sag")
    # sagittal slices stack along the patient's left-right axis: the first canonical axis
    assert vol.shape == (7, 5, 6)
    assert vol.spacing == pytest.approx((3.0, 0.7, 0.8))
    inv = np.linalg.inv(vol.affine)
    for idx in np.ndindex(5, 6, 7):  # SimpleITK index (x, y, z)
        lps = np.array(image.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx)))
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        i, j, k = np.rint(inv @ ras)[:3].astype(int)
        assert vol.data[i, j, k] == array[idx[2], idx[1], idx[0]]
    # and back: the original layout is the series' own voxel order
    np.testing.assert_array_equal(vol.to_original(vol.data), np.transpose(array, (2, 1, 0)))


def test_missing_slice_is_a_warning(tmp_path, caplog):
    write_series(tmp_path / "gap", _ramp(shape=(6, 4, 4)), UID_A, skip=(3,))
    with caplog.at_level(logging.WARNING):
        read_volume(tmp_path / "gap")
    assert "gap: DICOM slice positions are not evenly spaced (steps 2.5-5 mm" in caplog.text


def test_probe_reads_headers_only(two_series, tmp_path):
    assert probe_volume(two_series, series_uid=UID_B) == (4, 5, 6)
    with pytest.raises(ValueError, match="holds 2 DICOM series"):
        probe_volume(two_series)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no DICOM series"):
        probe_volume(tmp_path / "empty")


@pytest.mark.examples
def test_real_series_probe_matches_read(examples_root):
    series = examples_root / "example_ct_dicom"
    vol = read_volume(series)
    assert probe_volume(series) == vol.original_shape == (512, 512, 20)
    assert vol.modality == "ct"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return TGatedModel.from_config(tiny_model_config()).save_pretrained(
        tmp_path_factory.mktemp("m") / "model"
    )


def test_predict_series_flag(two_series, tmp_path, model_dir, capsys):
    base = ["predict", "--model", str(model_dir), "--input", str(two_series), "--quiet"]
    assert main([*base, "--output", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and UID_A in err and UID_B in err and "--series" in err
    assert not (tmp_path / "none").exists()  # the error came before anything was written

    assert main([*base, "--output", str(tmp_path / "b"), "--series", UID_B]) == 0
    assert (tmp_path / "b" / "study.nii.gz").is_file()

    nifti = tmp_path / "x.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(_ramp()), str(nifti))
    argv = ["predict", "--model", str(model_dir), "--input", str(nifti), "--output", str(tmp_path / "c")]
    assert main([*argv, "--series", UID_A, "--quiet"]) == 1
    assert "applies to DICOM series folders, but no input is one" in capsys.readouterr().err


def test_series_flag_applies_to_the_folder_that_holds_it(two_series, tmp_path, model_dir, monkeypatch):
    """Several DICOM folders: --series picks in the folder holding it; the others are read as they are,
    also on a torchrun rank whose share of the cases does not include that folder."""
    study = tmp_path / "all"
    study.mkdir()
    two_series.rename(study / "s1")
    write_series(study / "s2", _ramp(), "1.2.826.0.1.3680043.2.1125.303")
    argv = ["predict", "--model", str(model_dir), "--input", str(study), "--series", UID_B, "--quiet"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--output", str(tmp_path / "rank1")]) == 0
    assert sorted(p.name for p in (tmp_path / "rank1").glob("*.nii.gz")) == ["s2.nii.gz"]
    monkeypatch.setenv("RANK", "0")
    assert main([*argv, "--output", str(tmp_path / "rank1")]) == 0
    prov = json.loads((tmp_path / "rank1" / "provenance.json").read_text())["cases"]
    assert (prov["s1"]["series"], prov["s2"]["series"]) == (UID_B, None)
