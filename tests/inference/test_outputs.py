"""Statistics, previews, per-organ files, Slicer / ITK-SNAP files: values checked by hand and round trips."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import lps_affine
from tgated import organs as O
from tgated.inference.outputs import (
    OUTPUT_TYPES,
    itksnap_label_description,
    seg_nrrd_metadata,
    slicer_colour_table,
)
from tgated.inference.statistics import case_statistics, organ_statistics, statistics_csv
from tgated.io.volumes import read_label, read_volume, write_nifti

LIVER, SPLEEN, GALLBLADDER = O.get_organ("liver"), O.get_organ("spleen"), O.get_organ("gallbladder")


def _phantom(tmp_path, affine):
    """A CT-like image and a label map with organs of known size, stored with ``affine``:
    liver = a 10 x 8 x 4 box (320 voxels) in file slices 2-5; spleen = two blocks, 3 x 3 x 2 (18 voxels)
    and 2 x 2 x 1 (4 voxels), 26-disconnected; gallbladder absent."""
    rng = np.random.default_rng(3)
    shape = (24, 20, 9)
    image = rng.normal(40, 25, shape).round().astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[3:13, 4:12, 2:6] = LIVER.id
    labels[16:19, 2:5, 6:8] = SPLEEN.id
    labels[20:22, 15:17, 0:1] = SPLEEN.id
    write_nifti(tmp_path / "img.nii.gz", image, affine)
    write_nifti(tmp_path / "lab.nii.gz", labels, affine)
    return image, labels


@pytest.mark.parametrize(
    "affine",
    [lps_affine(), np.diag([0.7, 0.7, -2.5, 1.0])],  # LPS, and slices stored superior to inferior
    ids=["lps", "z-flipped"],
)
def test_statistics_of_known_organs(tmp_path, affine):
    image, labels = _phantom(tmp_path, affine)
    vol = read_volume(tmp_path / "img.nii.gz")
    lab = read_label(tmp_path / "lab.nii.gz", vol)  # canonical frame, as the predictor returns labels
    doc = case_statistics(vol, lab.data, [LIVER, SPLEEN, GALLBLADDER], case_id="img", modality="ct")

    # the header's spacing (NIfTI stores it in float32: 0.8 mm reads back as 0.800000011920929 mm)
    voxel_ml = (
        float(np.prod(np.asarray(nib.load(tmp_path / "img.nii.gz").header.get_zooms(), np.float64))) / 1000
    )
    assert voxel_ml == pytest.approx(abs(np.linalg.det(affine[:3, :3])) / 1000, rel=1e-6)
    assert doc["voxel_volume_ml"] == pytest.approx(voxel_ml, rel=1e-14)
    assert doc["intensity_unit"] == "HU" and doc["axial_axis"] == 2 and doc["shape"] == [24, 20, 9]
    liver, spleen, gb = (doc["organs"][n] for n in ("liver", "spleen", "gallbladder"))
    assert liver["voxels"] == 320 and spleen["voxels"] == 22
    for s in (liver, spleen):  # volume = count x voxel volume, exactly
        assert s["volume_ml"] == s["voxels"] * doc["voxel_volume_ml"]
    assert liver["volume_ml"] == pytest.approx(320 * voxel_ml, rel=1e-12)
    # intensities: numpy's on the same mask of the file's own array
    on_disk = nib.load(tmp_path / "img.nii.gz").get_fdata()
    mask = nib.load(tmp_path / "lab.nii.gz").get_fdata() == LIVER.id
    assert liver["mean"] == pytest.approx(np.mean(on_disk[mask]), rel=1e-12)
    assert liver["sd"] == pytest.approx(np.std(on_disk[mask]), rel=1e-12)
    assert [liver["p5"], liver["p95"]] == pytest.approx(np.percentile(on_disk[mask], [5, 95]), rel=1e-12)
    # slices counted along the file's axial axis (not the canonical one)
    assert liver["slices"] == [2, 5] and spleen["slices"] == [0, 7]
    assert liver["largest_component_share"] == 1.0
    assert spleen["largest_component_share"] == pytest.approx(18 / 22)
    assert gb == {
        "voxels": 0,
        "volume_ml": 0.0,
        "mean": None,
        "sd": None,
        "p5": None,
        "p95": None,
        "slices": None,
        "largest_component_share": None,
    }

    rows = list(csv.DictReader(statistics_csv([doc]).splitlines()))
    assert [r["organ"] for r in rows] == ["liver", "spleen", "gallbladder"]
    assert float(rows[0]["volume_ml"]) == liver["volume_ml"] and rows[0]["slice_last"] == "5"
    assert rows[2]["mean"] == "" and rows[2]["voxels"] == "0"


def test_largest_component_counts_diagonal_neighbours_as_connected():
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 1  # corner-touching: one 26-connected component
    labels[4, 4, 4] = 1  # separate
    stats = organ_statistics(np.zeros(labels.shape), labels, np.eye(4), [LIVER])["liver"]
    assert stats["voxels"] == 3 and stats["largest_component_share"] == pytest.approx(2 / 3)
    assert stats["volume_ml"] == 3 / 1000


def test_colour_table_is_complete_distinct_and_reused():
    assert set(O.ORGAN_COLOURS) == set(O.ORGAN_NAMES)
    assert len(set(O.ORGAN_COLOURS.values())) == O.NUM_ORGANS
    assert all(0 <= c <= 255 for rgb in O.ORGAN_COLOURS.values() for c in rgb)
    lut = O.colour_lookup(0.5)
    assert lut[0].tolist() == [0, 0, 0, 0] and lut[O.get_organ("aorta").id].tolist() == [
        230 / 255,
        26 / 255,
        26 / 255,
        0.5,
    ]


def test_slicer_and_itksnap_colour_tables():
    ctbl = slicer_colour_table([LIVER, SPLEEN]).splitlines()
    assert ctbl[0].startswith("# Color table file") and ctbl[1] == "# 3 values"
    assert ctbl[2:] == ["0 background 0 0 0 0", "1 liver 204 92 64 255", "3 spleen 140 51 166 255"]
    rows = [
        ln.split() for ln in itksnap_label_description([LIVER, SPLEEN]).splitlines() if not ln.startswith("#")
    ]
    assert rows == [
        ["0", "0", "0", "0", "0", "0", "0", '"Clear', 'Label"'],
        ["1", "204", "92", "64", "1", "1", "1", '"liver"'],
        ["3", "140", "51", "166", "1", "1", "1", '"spleen"'],
    ]


def test_seg_nrrd_segment_extents():
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 2:5, 3] = LIVER.id
    meta = seg_nrrd_metadata(labels, [LIVER, SPLEEN])
    assert meta["Segment0_Extent"] == "1 2 2 4 3 3"
    assert meta["Segment1_Extent"] == "0 -1 0 -1 0 -1"  # empty segment, as Slicer writes it
    assert meta["Segment1_LabelValue"] == "3" and meta["Segment1_Layer"] == "0"


def test_cli_output_type_choices_match_the_registry():
    from tgated.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    action = next(a for a in sub.choices["predict"]._actions if a.dest == "output_type")
    assert tuple(action.choices) == OUTPUT_TYPES


# ---- tgated predict with the extra outputs (tiny random model with even odds: every organ present) ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.models.conftest import even_odds, tiny_model_config
    from tgated.models.tgated import TGatedModel

    model = TGatedModel.from_config(tiny_model_config())
    even_odds(model)
    out = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(out)
    return out


def _ct(folder, name="ct", shape=(23, 17, 7), affine=None):
    rng = np.random.default_rng(5)
    data = (rng.normal(0, 300, shape) - 200).astype(np.int16)
    write_nifti(folder / f"{name}.nii.gz", data, lps_affine() if affine is None else affine)
    return data


def _predict(model_dir, src, out, *extra):
    from tgated.cli import main

    argv = [
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(src),
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]
    assert main(argv) == 0


def _no_segmentation(monkeypatch):
    from tgated.inference.predictor import Predictor

    def fail(*args, **kwargs):
        raise AssertionError("the case was segmented again")

    monkeypatch.setattr(Predictor, "predict_volume", fail)


@pytest.mark.slow
def test_predict_statistics_per_organ_preview_and_seg_nrrd(tmp_path, model_dir, monkeypatch):
    import matplotlib.image
    import SimpleITK as sitk

    from tgated.inference.preview import PREVIEW_SIZE

    image = _ct(tmp_path / "in")
    out = tmp_path / "out"
    _predict(model_dir, tmp_path / "in", out, "--output-type", "both", "--statistics", "--preview")

    ml = nib.load(out / "ct.nii.gz")
    labels = np.asarray(ml.dataobj)
    organs = [
        O.ORGAN_BY_NAME[n] for k, n in json.loads((out / "labels.json").read_text()).items() if k != "0"
    ]
    assert len(organs) == 13 and len(np.unique(labels)) > 3  # several organs present

    # per-organ files: uint8 0/1 in the input's geometry, and together exactly the multilabel map
    rebuilt = np.zeros_like(labels)
    for o in organs:
        img = nib.load(out / "ct" / f"{o.name}.nii.gz")
        mask = np.asarray(img.dataobj)
        assert img.get_data_dtype() == np.uint8 and set(np.unique(mask)) <= {0, 1}
        np.testing.assert_allclose(img.affine, ml.affine, atol=1e-6)
        assert not (rebuilt & mask).any()
        rebuilt[mask == 1] = o.id
    np.testing.assert_array_equal(rebuilt, labels)

    # statistics against the written label map and the input image
    doc = json.loads((out / "ct_statistics.json").read_text())
    voxel_ml = float(np.prod(np.asarray(ml.header.get_zooms(), np.float64))) / 1000
    assert doc["voxel_volume_ml"] == pytest.approx(voxel_ml, rel=1e-14)
    for o in organs:
        s, mask = doc["organs"][o.name], labels == o.id
        assert s["voxels"] == int(mask.sum()) and s["volume_ml"] == s["voxels"] * doc["voxel_volume_ml"]
        if mask.any():
            assert s["mean"] == pytest.approx(image[mask].astype(np.float64).mean(), rel=1e-12)
            z = np.nonzero(mask.any(axis=(0, 1)))[0]
            assert s["slices"] == [int(z[0]), int(z[-1])]
    rows = list(csv.DictReader((out / "statistics.csv").read_text().splitlines()))
    assert len(rows) == 13 and {r["case"] for r in rows} == {"ct"}

    # preview: a PNG of the documented size
    assert matplotlib.image.imread(out / "ct_preview.png").shape[:2] == PREVIEW_SIZE[::-1]

    # colour tables beside the label maps
    assert (out / "labels.ctbl").read_text() == slicer_colour_table(organs)
    assert (out / "labels.txt").read_text() == itksnap_label_description(organs)

    entry = json.loads((out / "provenance.json").read_text())["cases"]["ct"]
    assert set(entry["files"]) == {
        "ct.nii.gz",
        *(f"ct/{o.name}.nii.gz" for o in organs),
        "ct_statistics.json",
        "ct_preview.png",
    }

    # a re-run with another output type derives the new file from the finished label map
    _no_segmentation(monkeypatch)
    before = {p: (out / p).stat().st_mtime_ns for p in ("ct.nii.gz", "ct_statistics.json", "ct_preview.png")}
    _predict(model_dir, tmp_path / "in", out, "--output-type", "seg-nrrd", "--statistics", "--preview")
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before

    seg = sitk.ReadImage(str(out / "ct.seg.nrrd"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    for n, o in enumerate(organs):
        assert seg.GetMetaData(f"Segment{n}_Name") == o.name
        assert seg.GetMetaData(f"Segment{n}_LabelValue") == str(o.id)
        assert seg.GetMetaData(f"Segment{n}_Layer") == "0"
        colour = [float(c) for c in seg.GetMetaData(f"Segment{n}_Color").split()]
        assert colour == pytest.approx([c / 255 for c in O.ORGAN_COLOURS[o.name]], abs=1e-6)
    assert not seg.HasMetaDataKey(f"Segment{len(organs)}_Name")
    assert seg.GetMetaData("Segmentation_SourceRepresentation") == "Binary labelmap"
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(seg), (2, 1, 0)), labels)
    back = read_volume(out / "ct.seg.nrrd", label=True)  # geometry: the input's, through LPS and back
    np.testing.assert_allclose(back.original_affine, ml.affine, atol=1e-5)

    # everything present: nothing is written; a deleted preview comes back without segmenting
    (out / "ct_preview.png").unlink()
    _predict(model_dir, tmp_path / "in", out, "--output-type", "both", "--statistics", "--preview")
    assert (out / "ct_preview.png").is_file()
    assert (out / "ct.nii.gz").stat().st_mtime_ns == before["ct.nii.gz"]


@pytest.mark.slow
def test_failure_while_writing_extras_leaves_the_case_unrecorded(tmp_path, model_dir, monkeypatch):
    import tgated.inference.preview as preview

    _ct(tmp_path / "in")
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(preview, "write_preview", broken)
    with pytest.raises(OSError, match="disk full"):
        from tgated.inference.api import predict

        predict(model_dir, tmp_path / "in", out, statistics=True, preview=True, quiet=True)
    prov = json.loads((out / "provenance.json").read_text()) if (out / "provenance.json").exists() else {}
    assert "ct" not in prov.get("cases", {})  # not recorded: a re-run segments it again
    assert not list(out.glob(".*tmp-*")) and not (out / "ct_preview.png").exists()

    monkeypatch.undo()
    _predict(model_dir, tmp_path / "in", out, "--statistics", "--preview")
    entry = json.loads((out / "provenance.json").read_text())["cases"]["ct"]
    assert set(entry["files"]) == {"ct.nii.gz", "ct_statistics.json", "ct_preview.png"}


def test_output_type_errors(tmp_path, model_dir):
    from tgated.inference.api import predict

    _ct(tmp_path / "in")
    with pytest.raises(ValueError, match=r"--output-type 'nifti': expected one of multilabel, per-organ"):
        predict(model_dir, tmp_path / "in", tmp_path / "out", output_type="nifti")
    with pytest.raises(ValueError, match="writes no multilabel map; give a folder"):
        predict(model_dir, tmp_path / "in" / "ct.nii.gz", tmp_path / "x.nii.gz", output_type="per-organ")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_segment_returns_statistics(tmp_path, model_dir):
    import tgated

    image = _ct(tmp_path, affine=np.diag([1.2, 1.1, 4.0, 1.0]))
    label_image, stats = tgated.segment(
        tmp_path / "ct.nii.gz", model_dir, organs="liver,spleen", statistics=True
    )
    labels = np.asarray(label_image.dataobj)
    assert set(stats["organs"]) == {"liver", "spleen"} and stats["case"] == "ct"
    for name in ("liver", "spleen"):
        mask = labels == O.ORGAN_BY_NAME[name].id
        assert stats["organs"][name]["voxels"] == int(mask.sum()) > 0
        assert stats["organs"][name]["volume_ml"] == pytest.approx(
            mask.sum() * 1.2 * 1.1 * 4.0 / 1000, rel=1e-6
        )
        assert stats["organs"][name]["mean"] == pytest.approx(image[mask].mean(), rel=1e-12)
    assert isinstance(tgated.segment(tmp_path / "ct.nii.gz", model_dir, organs="liver"), nib.Nifti1Image)


def test_extra_files_never_replace_an_input(tmp_path, model_dir):
    import SimpleITK as sitk

    from tgated.inference.api import predict

    _ct(tmp_path, name="scan_0000")  # case id "scan"
    # another input (case id "scan.seg") that case scan's scan.seg.nrrd would replace
    sitk.WriteImage(sitk.Image(9, 8, 5, sitk.sitkInt16), str(tmp_path / "scan.seg.nrrd"))
    before = (tmp_path / "scan.seg.nrrd").read_bytes()
    inputs = [tmp_path / "scan_0000.nii.gz", tmp_path / "scan.seg.nrrd"]
    with pytest.raises(ValueError, match=r"scan\.seg\.nrrd would replace the input file"):
        predict(model_dir, inputs, tmp_path, output_type="seg-nrrd")
    assert (tmp_path / "scan.seg.nrrd").read_bytes() == before and not (tmp_path / "provenance.json").exists()


@pytest.mark.slow
def test_predict_with_extra_outputs_stays_light(tmp_path, model_dir):
    """No training or report code, and matplotlib only when a preview is drawn."""
    import subprocess
    import sys

    _ct(tmp_path / "in")
    code = (
        "import sys; from tgated.cli import main; "
        f"main(['predict', '--model', {str(model_dir)!r}, '--input', {str(tmp_path / 'in')!r}, "
        f"'--output', {str(tmp_path / 'out')!r}, '--quiet', '--statistics', '--output-type', 'both']); "
        "bad = [m for m in sys.modules if m.startswith(('tgated.training', 'tgated.report', 'matplotlib'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "out" / "ct_statistics.json").is_file()


@pytest.mark.examples
def test_readme_quotes_the_example_ct_liver_statistics(examples_root):
    """README's "Using the results" numbers are what the statistics code gives for the real example CT
    with TotalSegmentator's liver label (3 mm isotropic: 0.027 ml per voxel)."""
    from pathlib import Path

    from tgated.data.datasets import load_case
    from tgated.data.examples import example_cases

    case = next(c for c in example_cases(examples_root) if c.case_id == "example_ct")
    image, labels = load_case(case)
    liver = case_statistics(image, labels.data, [LIVER], case_id="example_ct", modality="ct")["organs"][
        "liver"
    ]
    assert liver["volume_ml"] == liver["voxels"] * 0.027
    mask = labels.data == LIVER.id
    assert liver["mean"] == pytest.approx(image.data[mask].astype(np.float64).mean(), rel=1e-12)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"**{liver['volume_ml']:.1f} ml** ({liver['voxels']:,} voxels".replace(",", " ") in readme
    assert f"**mean of {liver['mean']:.1f} HU** (sd {liver['sd']:.1f}" in readme
    assert f"slices {liver['slices'][0]}-{liver['slices'][1]} of 0-111" in readme


@pytest.mark.slow
@pytest.mark.parametrize("first", ["seg-nrrd", "per-organ"])
def test_label_map_is_read_back_from_seg_nrrd_or_per_organ_files(tmp_path, model_dir, monkeypatch, first):
    """A folder written without a multilabel map still completes new outputs without segmenting."""
    _ct(tmp_path / "in")
    out = tmp_path / "out"
    _predict(model_dir, tmp_path / "in", out, "--output-type", first)
    assert not (out / "ct.nii.gz").exists()
    _predict(model_dir, tmp_path / "in", tmp_path / "reference")  # the multilabel map, segmented

    _no_segmentation(monkeypatch)
    _predict(model_dir, tmp_path / "in", out, "--statistics")
    np.testing.assert_array_equal(
        np.asarray(nib.load(out / "ct.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "reference" / "ct.nii.gz").dataobj),
    )
    entry = json.loads((out / "provenance.json").read_text())["cases"]["ct"]
    assert {"ct.nii.gz", "ct_statistics.json"} <= set(entry["files"]) and entry["output"] == "ct.nii.gz"
    assert (first == "seg-nrrd") == ("ct.seg.nrrd" in entry["files"])  # earlier files stay recorded


@pytest.mark.slow
def test_segmenting_again_removes_the_files_of_the_replaced_label_map(tmp_path, model_dir):
    _ct(tmp_path / "in")
    _ct(tmp_path / "in", name="other", shape=(12, 11, 5))
    out = tmp_path / "out"
    _predict(model_dir, tmp_path / "in", out, "--statistics", "--preview", "--output-type", "both")
    (out / "ct" / "liver.nii.gz").write_bytes(b"edited by hand")  # changed since: left alone
    _predict(model_dir, tmp_path / "in" / "ct.nii.gz", out, "--overwrite")

    assert not (out / "ct_statistics.json").exists() and not (out / "ct_preview.png").exists()
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["liver.nii.gz"]
    assert (out / "other_statistics.json").is_file()  # another case's files are untouched
    rows = list(csv.DictReader((out / "statistics.csv").read_text().splitlines()))
    assert {r["case"] for r in rows} == {"other"}
    entry = json.loads((out / "provenance.json").read_text())["cases"]["ct"]
    assert set(entry["files"]) == {"ct.nii.gz"}
