"""Real example scans through our I/O. Their labels are TotalSegmentator predictions, not expert
annotations: the checks below are sanity checks of orientation and intensity handling."""

import io
import tarfile

import nibabel as nib
import numpy as np
import pytest

from tgated import organs as O
from tgated.data import examples
from tgated.data.datasets import discover, load_case
from tgated.io.volumes import read_volume

pytestmark = pytest.mark.examples


def _organ_means(name, root):
    case = next(c for c in examples.example_cases(root.parent.parent) if c.case_id == name)
    image, label = load_case(case)
    means = {
        o.name: float(image.data[label.data == o.id].mean()) for o in O.ORGANS if (label.data == o.id).any()
    }
    return image, label, means


@pytest.mark.parametrize("name", ["example_ct", "example_ct_sm", "example_ct_dicom"])
def test_ct_liver_in_soft_tissue_range(examples_root, name):
    _, _, means = _organ_means(name, examples_root)
    assert 20 <= means["liver"] <= 120, means


def test_contrast_dicom_aorta_brighter_than_liver_and_label_flip_handled(examples_root):
    image, label, means = _organ_means("example_ct_dicom", examples_root)
    assert image.modality == "ct" and image.shape == (512, 512, 20)
    assert means["aorta"] > means["liver"] + 50, means
    # The label file stores y the other way round: pairing by array index would put the aorta label on
    # other tissue. Our reader aligns by physical position instead.
    raw_label = np.asanyarray(nib.load(examples_root / "example_seg_dicom.nii.gz").dataobj)
    aorta_ts = O.TOTALSEG_V2_IDS["total"]["aorta"]
    naive = image.to_original(image.data)[raw_label == aorta_ts].mean()
    assert naive < means["aorta"] - 50


def test_mr_organs_ranked_consistently_with_t1_contrast(examples_root):
    image, label, means = _organ_means("example_mr_sm", examples_root)
    assert image.axcodes == ("L", "P", "S")
    raw = read_volume(examples_root / "example_seg_mr.nii.gz", label=True).data
    body_non_structure = (raw == 0) & (
        image.data > 30
    )  # fat and other tissue TotalSegmentator does not label
    fat = float(np.median(image.data[body_non_structure]))
    assert means["liver"] > means["spleen"] * 1.5, means  # T1: liver brighter than spleen
    assert means["liver"] < 0.5 * fat and means["spleen"] < 0.5 * fat, (means, fat)


def test_examples_cover_our_organs(examples_root):
    _, label, _ = _organ_means("example_ct", examples_root)
    present = {O.ORGAN_BY_ID[i].name for i in np.unique(label.data) if i}
    assert {"liver", "spleen", "pancreas", "aorta", "left_kidney", "right_kidney", "duodenum"} <= present


def test_fetch_is_cached(examples_root, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(examples, "_download_sdist", boom)
    assert examples.fetch(examples_root.parent.parent) == examples_root


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        data = b"not the real thing"
        info = tarfile.TarInfo("totalsegmentator-2.18.0/LICENSE")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("TGATED_EXAMPLES_SDIST", str(fake))
    with pytest.raises(ValueError, match="does not match the pinned"):
        examples.fetch(tmp_path / "cache")
    assert not (tmp_path / "cache" / "examples").exists()


def test_export_folder_layout_in_canonical_ids(examples_root, tmp_path):
    out = examples.export_folder(tmp_path / "ex", ["example_mr_sm"], root=examples_root.parent.parent)
    (case,) = discover(out, "folder")
    image, label = load_case(case)
    original = nib.load(examples_root / "example_mr_sm.nii.gz")
    exported = nib.load(out / "images" / "example_mr_sm.nii.gz")
    np.testing.assert_allclose(exported.affine, original.affine, atol=1e-4)
    assert exported.shape == original.shape
    assert set(np.unique(label.data).tolist()) <= set(range(14))
    assert (label.data == O.get_organ("aorta").id).sum() == (
        read_volume(examples_root / "example_seg_mr.nii.gz", label=True).data
        == O.TOTALSEG_V2_IDS["total_mr"]["aorta"]
    ).sum()
