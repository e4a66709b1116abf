"""Synthetic phantoms: determinism, anatomy, intensities, dataset layouts, read-back, CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tgated.cli import main
from tgated.data.layouts import LAYOUTS
from tgated.data.phantom import (
    ORIENTATIONS,
    TISSUES,
    Phantom,
    make_phantom,
    write_dataset,
)
from tgated.io.volumes import read_volume
from tgated.organs import ORGANS, TOTALSEG_STRUCTURES

ID = {o.name: o.id for o in ORGANS}


@pytest.fixture(scope="module")
def ct() -> Phantom:
    return make_phantom(7, case=0, modality="ct", size=96)


@pytest.fixture(scope="module")
def mr() -> Phantom:
    return make_phantom(7, case=0, modality="mr", size=64)


def _world_centroid(ph: Phantom, organ: str) -> np.ndarray:
    """Centroid of an organ in RAS world mm."""
    idx = np.argwhere(ph.labels == ID[organ]).mean(axis=0)
    return ph.affine[:3, :3] @ idx + ph.affine[:3, 3]


def _median(ph: Phantom, mask: np.ndarray) -> float:
    """Median intensity inside ``mask`` away from its in-plane border (no partial volume), when it
    has such an interior; else over the whole mask."""
    interior = ndimage.binary_erosion(mask, structure=np.ones((3, 3, 1), bool))
    return float(np.median(ph.image[interior if interior.sum() >= 8 else mask]))


def _organ(ph: Phantom, name: str) -> float:
    return _median(ph, ph.labels == ID[name])


def _tissue(ph: Phantom, name: str) -> float:
    return _median(ph, ph.tissue == TISSUES.index(name))


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays_and_other_cases_differ():
    a = make_phantom(3, case=1, size=48)
    b = make_phantom(3, case=1, size=48)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert np.array_equal(a.affine, b.affine)
    other = make_phantom(3, case=2, size=48)
    assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    m1, m2 = make_phantom(3, case=1, size=48, modality="mr"), make_phantom(3, case=1, size=48, modality="mr")
    assert m1.image.tobytes() == m2.image.tobytes()


def test_arrays_types_and_geometry(ct):
    assert ct.image.dtype == np.float32 and ct.labels.dtype == np.uint8
    assert ct.image.shape == ct.labels.shape == ct.tissue.shape
    assert ct.image.shape[:2] == (96, 96)
    assert np.array_equal(ct.image, np.rint(ct.image))  # integer HU: int16 storage is lossless
    sx, sy, sz = ct.spacing
    assert sx == sy and 350.0 <= sx * 96 <= 520.0  # field of view of an abdominal CT
    assert np.allclose(ct.affine[:3, :3], np.diag([sx, sy, sz]))  # canonical RAS
    assert abs(ct.affine[2, 3]) > 100.0  # a table position, not a zero origin
    assert ct.image.min() >= -1024 and ct.image.max() <= 3071


def test_all_thirteen_organs_present(ct):
    counts = {o.name: int((ct.labels == o.id).sum()) for o in ORGANS}
    assert all(n > 0 for n in counts.values()), counts
    assert set(np.unique(ct.labels)) == {0, *ID.values()}


def test_ct_intensities_plausible_and_ordered(ct):
    median = {o.name: _organ(ct, o.name) for o in ORGANS}
    expected = {
        "liver": (55, 115),
        "spleen": (85, 135),
        "right_kidney": (90, 215),  # cortex 160-200, medulla darker in a corticomedullary phase
        "left_kidney": (90, 215),
        "aorta": (140, 250),
        "inferior_vena_cava": (110, 220),
        "pancreas": (35, 105),
        "gallbladder": (-10, 40),
        "duodenum": (-40, 90),  # wall and fluid, sometimes gas; the oesophagus may hold air too
    }
    for organ, (lo, hi) in expected.items():
        assert lo <= median[organ] <= hi, (organ, median[organ])
    fat, muscle = _tissue(ct, "visceral_fat"), _tissue(ct, "muscle")
    bone, air = _tissue(ct, "cortical_bone"), _tissue(ct, "air")
    assert -130 <= fat <= -70 and 30 <= muscle <= 70 and air < -950
    assert bone > median["aorta"] > median["spleen"] > median["liver"] > muscle > fat > air
    assert bone >= 300
    assert median["gallbladder"] < median["liver"] < median["right_kidney"]


def test_anatomical_relations(ct):
    c = {name: _world_centroid(ct, name) for name in ID}
    x, y, z = 0, 1, 2  # RAS: +x = patient's right, +y = anterior, +z = superior
    assert c["liver"][x] > c["aorta"][x] > c["spleen"][x]
    assert c["right_kidney"][x] > c["aorta"][x] > c["left_kidney"][x]
    assert c["right_kidney"][z] < c["left_kidney"][z]
    assert c["inferior_vena_cava"][x] > c["aorta"][x]
    assert c["spleen"][y] < c["stomach"][y]  # spleen posterior
    assert c["pancreas"][y] > c["aorta"][y]  # pancreas crosses in front of the aorta
    assert c["gallbladder"][x] > c["aorta"][x] and c["gallbladder"][y] > c["inferior_vena_cava"][y]
    assert c["right_adrenal_gland"][z] > c["right_kidney"][z]
    assert c["left_adrenal_gland"][z] > c["left_kidney"][z]
    top = ct.labels[:, :, -1]
    assert (top == ID["esophagus"]).any() and (top == ID["aorta"]).any()  # oesophagus at the top
    eso = np.argwhere(top == ID["esophagus"]).mean(axis=0)
    aorta = np.argwhere(top == ID["aorta"]).mean(axis=0)
    assert eso[1] > aorta[1]  # anterior to the aorta


def test_adrenals_are_small(ct):
    for side in ("right", "left"):
        adrenal = (ct.labels == ID[f"{side}_adrenal_gland"]).sum()
        kidney = (ct.labels == ID[f"{side}_kidney"]).sum()
        assert 0 < adrenal < 0.15 * kidney


def test_organs_appear_and_vanish_along_z(ct):
    nz = ct.labels.shape[2]
    for organ in ("gallbladder", "right_adrenal_gland", "left_adrenal_gland"):
        present = np.nonzero((ct.labels == ID[organ]).any(axis=(0, 1)))[0]
        assert present[0] > 0 and present[-1] < nz - 1, organ  # starts and ends inside the volume
        assert present[-1] - present[0] + 1 < 0.5 * nz


def test_pancreas_and_duodenum_intensities_overlap(ct):
    pan = ct.image[ct.labels == ID["pancreas"]]
    duo = ct.image[ct.labels == ID["duodenum"]]
    p25, p75 = np.percentile(pan, [25, 75])
    d25, d75 = np.percentile(duo, [25, 75])
    assert p25 < d75 and d25 < p75  # interquartile ranges overlap
    # no single HU threshold separates them well
    values = np.concatenate([pan, duo])
    is_pan = np.concatenate([np.ones(pan.size, bool), np.zeros(duo.size, bool)])
    best = max(
        max(np.mean((values > t) == is_pan), np.mean((values <= t) == is_pan))
        for t in np.percentile(values, np.arange(5, 96, 5))
    )
    assert best < 0.85


def test_mr_relative_intensities(mr):
    assert mr.modality == "mr" and mr.image.min() >= 0 and mr.image.max() < 2500
    fat, bile = _tissue(mr, "visceral_fat"), _tissue(mr, "bile")
    liver, spleen = _organ(mr, "liver"), _organ(mr, "spleen")
    assert fat > liver > spleen > bile


def test_slice_spacing_and_field_of_view_vary_across_cases():
    spacings = [make_phantom(11, case=i, size=32).spacing for i in range(8)]
    sz = [s[2] for s in spacings]
    assert all(1.5 <= v <= 5.0 for v in sz) and len(set(sz)) >= 3
    fov = [s[0] * 32 for s in spacings]
    assert all(350.0 <= f <= 520.0 for f in fov) and max(fov) - min(fov) > 20.0


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def _case_files(layout: str, k: int, modality: str = "ct") -> tuple[str, list[str]]:
    """(image file, label files) of case number k (1-based), relative to the dataset root."""
    return {
        "flare22": (f"images/FLARE22_Tr_{k:04d}_0000.nii.gz", [f"labels/FLARE22_Tr_{k:04d}.nii.gz"]),
        "btcv": (f"img/img{k:04d}.nii.gz", [f"label/label{k:04d}.nii.gz"]),
        "amos": (f"imagesTr/amos_{k:04d}.nii.gz", [f"labelsTr/amos_{k:04d}.nii.gz"]),
        "nnunet": (f"imagesTr/phantom_{k:03d}_0000.nii.gz", [f"labelsTr/phantom_{k:03d}.nii.gz"]),
        "totalseg": (f"s{k:04d}/ct.nii.gz", [f"s{k:04d}/segmentations/{s}.nii.gz" for s in TOTALSEG_STRUCTURES]),
        "folder": (f"images/phantom_{k:04d}.nii.gz", [f"labels/phantom_{k:04d}.nii.gz"]),
    }[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_files_and_label_ids(tmp_path, layout):
    ids = write_dataset(tmp_path, cases=2, seed=4, layout=layout, size=32, quiet=True)
    expected = [f for k in (1, 2) for f in (_case_files(layout, k)[0], *_case_files(layout, k)[1])]
    expected += ["dataset.json"] if layout == "nnunet" else []
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(expected)
    assert len(ids) == 2 and len(set(ids)) == 2
    image_file, label_files = _case_files(layout, 2)
    assert nib.load(tmp_path / image_file).get_data_dtype() == np.int16
    ph = make_phantom(4, case=1, size=32)
    if layout == "totalseg":
        for path, (structure, organ) in zip(label_files, TOTALSEG_STRUCTURES.items(), strict=True):
            vol = read_volume(tmp_path / path, label=True)
            assert vol.data.dtype == np.uint8
            assert np.array_equal(vol.data, (ph.labels == ID[organ]).astype(np.uint8)), structure
        return
    lab = read_volume(tmp_path / label_files[0], label=True).data
    assert lab.dtype == np.uint8
    if layout in ("flare22", "nnunet", "folder"):  # canonical ids
        assert np.array_equal(lab, ph.labels)
    else:
        ds = LAYOUTS[layout].label_ids
        for organ, oid in ID.items():
            assert np.all(lab[ph.labels == oid] == ds.get(organ, 0)), organ
        assert set(np.unique(lab)) <= {0, *ds.values(), 10}
        if layout == "btcv":  # no duodenum; portal / splenic vein as 10
            assert "duodenum" not in ds and np.all(lab[ph.labels == ID["duodenum"]] == 0)
            assert (lab == 10).any()
            assert np.array_equal(lab == 10, ph.other_labels()["portal_and_splenic_vein"])
        else:
            assert lab[ph.labels == ID["duodenum"]].min() == ds["duodenum"] == 13
    if layout == "nnunet":
        meta = json.loads((tmp_path / "dataset.json").read_text())
        assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2
        assert meta["file_ending"] == ".nii.gz"
        assert meta["labels"] == {"background": 0, **ID}


def test_amos_mr_cases_are_numbered_above_500(tmp_path):
    ids = write_dataset(tmp_path, cases=2, layout="amos", modality="mr", size=32, quiet=True)
    assert ids == ["amos_0501", "amos_0502"]
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == ["amos_0501.nii.gz", "amos_0502.nii.gz"]
    img = read_volume(tmp_path / "imagesTr" / "amos_0501.nii.gz")
    assert img.data.min() >= 0  # MR intensities, no HU scale


def test_totalseg_mr_image_name(tmp_path):
    write_dataset(tmp_path, cases=1, layout="totalseg", modality="mr", size=32, quiet=True)
    assert (tmp_path / "s0001" / "mri.nii.gz").is_file() and not (tmp_path / "s0001" / "ct.nii.gz").exists()


def test_read_back_gives_the_canonical_arrays_in_varied_orientations(tmp_path):
    ids = write_dataset(tmp_path, cases=4, seed=2, layout="flare22", size=32, quiet=True)
    codes = set()
    for i, cid in enumerate(ids):
        ph = make_phantom(2, case=i, size=32)
        path = tmp_path / "images" / f"{cid}_0000.nii.gz"
        codes.add("".join(nib.aff2axcodes(nib.load(path).affine)))
        assert "".join(nib.aff2axcodes(nib.load(path).affine)) == ph.orientation
        img = read_volume(path)
        lab = read_volume(tmp_path / "labels" / f"{cid}.nii.gz", label=True)
        assert np.array_equal(img.data, ph.image)
        assert np.array_equal(lab.data, ph.labels)
        assert np.allclose(img.affine, ph.affine) and np.allclose(lab.affine, ph.affine)
    assert codes <= set(ORIENTATIONS) and codes - {"RAS"}  # at least one case is stored flipped


def test_case_content_does_not_depend_on_the_number_of_cases(tmp_path):
    write_dataset(tmp_path / "one", cases=1, seed=9, layout="folder", size=32, quiet=True)
    write_dataset(tmp_path / "three", cases=3, seed=9, layout="folder", size=32, quiet=True)
    a = nib.load(tmp_path / "one" / "images" / "phantom_0001.nii.gz")
    b = nib.load(tmp_path / "three" / "images" / "phantom_0001.nii.gz")
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.array_equal(a.affine, b.affine)


def test_existing_files_are_kept_unless_overwrite(tmp_path):
    write_dataset(tmp_path, cases=1, layout="btcv", size=32, quiet=True)
    before = (tmp_path / "img" / "img0001.nii.gz").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="img0001.nii.gz"):
        write_dataset(tmp_path, cases=1, layout="btcv", size=32, quiet=True)
    assert (tmp_path / "img" / "img0001.nii.gz").stat().st_mtime_ns == before
    assert write_dataset(tmp_path, cases=1, layout="btcv", size=32, overwrite=True, quiet=True) == ["img0001"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cases": 0}, "cases must be >= 1"),
        ({"cases": 1, "size": 16}, "size must be >= 32"),
        ({"cases": 1, "layout": "nifti"}, "flare22, btcv, amos, nnunet, totalseg, folder"),
        ({"cases": 1, "modality": "pet"}, "expected one of: ct, mr"),
        ({"cases": 1, "seed": -1}, "seed must be >= 0"),
        ({"cases": 1.5}, "cases must be an integer"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_make_phantom_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size must be >= 32"):
        make_phantom(0, size=31)
    with pytest.raises(ValueError, match="modality"):
        make_phantom(0, modality="xray")
    with pytest.raises(ValueError, match="slice_spacing"):
        make_phantom(0, size=32, slice_spacing=0.0)


def test_output_path_that_is_a_file_is_an_error(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_dataset(target, cases=1, size=32, quiet=True)


def test_cli_phantom_command(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["phantom", str(out), "--cases", "2", "--size", "32", "--layout", "nnunet", "--quiet"]) == 0
    assert (out / "imagesTr" / "phantom_002_0000.nii.gz").is_file() and (out / "dataset.json").is_file()
    assert main(["phantom", str(out), "--cases", "1", "--size", "32", "--layout", "nnunet", "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "x"), "--cases", "0", "--quiet"]) == 1
