import json
import random

import numpy as np
import pytest

from tests.conftest import lps_affine
from tgated import organs as O
from tgated.data.datasets import (
    case_id_from_path,
    default_split,
    discover,
    ground_truth_cases,
    load_case,
    load_label,
    read_splits,
    write_splits,
)
from tgated.io.volumes import write_nifti

SHAPE = (6, 5, 4)


def _write_pair(img_path, lab_path, labels):
    write_nifti(img_path, np.zeros(SHAPE, np.int16), lps_affine())
    if lab_path is not None:
        write_nifti(lab_path, np.asarray(labels, np.uint8), lps_affine())


def _labels_with(values):
    lab = np.zeros(SHAPE, np.uint8)
    for i, v in enumerate(values):
        lab.flat[i * 3] = v
    return lab


def test_case_id_rule():
    assert case_id_from_path("images/FLARE22_Tr_0001_0000.nii.gz") == "FLARE22_Tr_0001"
    assert case_id_from_path("img0003.nii.gz") == "img0003"
    assert case_id_from_path("amos_0507.nii.gz") == "amos_0507"  # only _0000 is a channel suffix
    assert case_id_from_path("x.nii") == "x"


def test_flare22_layout(tmp_path):
    for i in (1, 2):
        _write_pair(
            tmp_path / f"images/FLARE22_Tr_000{i}_0000.nii.gz",
            tmp_path / f"labels/FLARE22_Tr_000{i}.nii.gz",
            _labels_with([1, 12, 13]),
        )
    cases = discover(tmp_path, "flare22")
    assert [c.case_id for c in cases] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert cases[0].modality == "ct" and len(cases[0].labelled) == 13
    _img, lab = load_case(cases[0])
    assert lab.data.dtype == np.uint8 and sorted(np.unique(lab.data).tolist()) == [0, 1, 12, 13]


def test_btcv_harmonised_to_canonical_ids(tmp_path):
    _write_pair(
        tmp_path / "img/img0001.nii.gz", tmp_path / "label/label0001.nii.gz", _labels_with([6, 11, 10, 1])
    )
    (case,) = discover(tmp_path, "btcv")
    assert case.case_id == "img0001" and "duodenum" not in case.labelled and len(case.labelled) == 12
    lab = load_label(case)
    found = set(np.unique(lab.data).tolist())
    # liver 6 -> 1, pancreas 11 -> 4, veins 10 -> background, spleen 1 -> 3
    assert found == {0, O.get_organ("liver").id, O.get_organ("pancreas").id, O.get_organ("spleen").id}


def test_btcv_label_value_outside_map_is_an_error(tmp_path):
    _write_pair(tmp_path / "img/img0001.nii.gz", tmp_path / "label/label0001.nii.gz", _labels_with([6, 14]))
    (case,) = discover(tmp_path, "btcv")
    with pytest.raises(ValueError, match=r"label0001.nii.gz: label values \[14\]"):
        load_label(case)


def test_amos_modality_from_case_number(tmp_path):
    for cid in ("amos_0005", "amos_0507"):
        _write_pair(
            tmp_path / f"imagesTr/{cid}.nii.gz", tmp_path / f"labelsTr/{cid}.nii.gz", _labels_with([13, 15])
        )
    _write_pair(
        tmp_path / "imagesVa/amos_0600.nii.gz", tmp_path / "labelsVa/amos_0600.nii.gz", _labels_with([14])
    )
    cases = {c.case_id: c for c in discover(tmp_path, "amos")}
    assert cases["amos_0005"].modality == "ct"
    assert cases["amos_0507"].modality == "mr" and cases["amos_0600"].modality == "mr"
    lab = load_label(cases["amos_0005"])
    assert set(np.unique(lab.data).tolist()) == {0, O.get_organ("duodenum").id}  # 15 (prostate) -> background


def test_nnunet_names_from_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "Liver": 1, "kidney_left": 2, "tumour": 3},
                "file_ending": ".nii.gz",
            }
        )
    )
    _write_pair(
        tmp_path / "imagesTr/p_001_0000.nii.gz", tmp_path / "labelsTr/p_001.nii.gz", _labels_with([1, 2, 3])
    )
    (case,) = discover(tmp_path, "nnunet")
    assert case.case_id == "p_001" and case.modality == "mr"
    assert case.labelled == ("liver", "left_kidney")
    lab = load_label(case)
    assert set(np.unique(lab.data).tolist()) == {0, 1, 13}


def test_totalseg_per_structure_and_multilabel(tmp_path):
    subj = tmp_path / "s0001"
    write_nifti(subj / "ct.nii.gz", np.zeros(SHAPE, np.int16), lps_affine())
    liver = np.zeros(SHAPE, np.uint8)
    liver[0, 0, 0] = 1
    aorta = np.zeros(SHAPE, np.uint8)
    aorta[1, 1, 1] = 1
    write_nifti(subj / "segmentations/liver.nii.gz", liver, lps_affine())
    write_nifti(subj / "segmentations/aorta.nii.gz", aorta, lps_affine())
    (case,) = discover(tmp_path, "totalseg")
    assert case.case_id == "s0001" and case.labelled == ("liver", "aorta")
    lab = load_label(case)
    assert lab.data[0, 0, 0] == 0  # stored LPS: voxel (0,0,0) of the file is the canonical corner (5, 4, 0)
    assert lab.data[5, 4, 0] == O.get_organ("liver").id and lab.data[4, 3, 1] == O.get_organ("aorta").id

    # a multilabel file needs an explicit task: ids differ between total and total_mr
    multi = _labels_with([5, 52, 90])
    write_nifti(subj / "segmentations.nii.gz", multi, lps_affine())
    (case,) = discover(tmp_path, "totalseg", totalseg_task="total")
    lab = load_label(case)
    assert set(np.unique(lab.data).tolist()) == {0, O.get_organ("liver").id, O.get_organ("aorta").id}
    (case_mr,) = discover(tmp_path, "totalseg", totalseg_task="total_mr")
    assert set(np.unique(load_label(case_mr).data).tolist()) == {0, O.get_organ("liver").id}


def test_folder_layout_and_ground_truth_only(tmp_path):
    _write_pair(tmp_path / "images/a.nii.gz", tmp_path / "labels/a.nii.gz", _labels_with([3]))
    (case,) = discover(tmp_path, "folder")
    assert case.case_id == "a" and case.modality is None
    (gt,) = ground_truth_cases(tmp_path / "labels", "folder")
    assert gt.image is None and gt.label.name == "a.nii.gz"


def test_missing_pairs_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nope", "flare22")
    _write_pair(tmp_path / "images/FLARE22_Tr_0001_0000.nii.gz", None, None)
    with pytest.raises(FileNotFoundError, match="labels"):
        discover(tmp_path, "flare22")
    (tmp_path / "labels").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no label file for 1 image\(s\) \(FLARE22_Tr_0001_0000.nii.gz"
    ):
        discover(tmp_path, "flare22")
    assert len(discover(tmp_path, "flare22", need_labels=False)) == 1
    write_nifti(tmp_path / "labels/FLARE22_Tr_0009.nii.gz", np.zeros(SHAPE, np.uint8), lps_affine())
    write_nifti(tmp_path / "labels/FLARE22_Tr_0001.nii.gz", np.zeros(SHAPE, np.uint8), lps_affine())
    with pytest.raises(FileNotFoundError, match="without an image.*FLARE22_Tr_0009"):
        discover(tmp_path, "flare22")
    with pytest.raises(ValueError, match="unknown dataset layout 'flare'.*Did you mean 'flare22'"):
        discover(tmp_path, "flare")


def test_image_label_shape_mismatch(tmp_path):
    write_nifti(tmp_path / "img/img0001.nii.gz", np.zeros(SHAPE, np.int16), lps_affine())
    write_nifti(tmp_path / "label/label0001.nii.gz", np.zeros((6, 5, 5), np.uint8), lps_affine())
    (case,) = discover(tmp_path, "btcv")
    with pytest.raises(ValueError, match="label0001.nii.gz: geometry does not match.*img0001.nii.gz"):
        load_case(case)


def test_default_split_reproduces_reference_recipe():
    ids = [f"FLARE22_Tr_{i:04d}" for i in range(1, 51)]
    split = default_split(list(reversed(ids)))
    expected = sorted(ids)
    random.Random(42).shuffle(expected)
    assert (
        split["train"] == expected[:30] and split["val"] == expected[30:40] and split["test"] == expected[40:]
    )
    small = default_split([f"c{i}" for i in range(8)])
    assert [len(small[k]) for k in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(i for ids in small.values() for i in ids) == [f"c{i}" for i in range(8)]


def test_splits_file_round_trip_and_validation(tmp_path):
    p = tmp_path / "splits.json"
    write_splits(p, {"train": ["a", "b"], "val": ["c"], "test": []})
    assert read_splits(p, ["a", "b", "c"]) == {"train": ["a", "b"], "val": ["c"], "test": []}
    with pytest.raises(ValueError, match="not in the dataset"):
        read_splits(p, ["a", "b"])
    p.write_text(json.dumps({"train": ["a"], "val": ["a"]}))
    with pytest.raises(ValueError, match="'a' is in both"):
        read_splits(p)


def test_label_header_noise_is_a_warning_naming_the_case_and_a_voxel_shift_an_error(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    write_nifti(tmp_path / "images" / "FLARE22_Tr_0001_0000.nii.gz", np.zeros(SHAPE, np.int16), lps_affine())
    noisy = lps_affine(origin=(120.0, -40.0 + 1e-3, -300.0))
    write_nifti(tmp_path / "labels" / "FLARE22_Tr_0001.nii.gz", _labels_with([1]), noisy)
    (case,) = discover(tmp_path, "flare22")
    with caplog.at_level("WARNING", logger="tgated.io.volumes"):
        _, label = load_case(case)
    assert int(label.data.sum()) == 1
    assert "case FLARE22_Tr_0001: " in caplog.text and "float noise" in caplog.text
    off = lps_affine(origin=(120.0, -40.0 - 0.9, -300.0))  # one voxel (0.9 mm) along y
    write_nifti(tmp_path / "labels" / "FLARE22_Tr_0001.nii.gz", _labels_with([1]), off)
    with pytest.raises(ValueError, match=r"case FLARE22_Tr_0001: .*geometry does not match.*1 voxel apart"):
        load_case(case)
