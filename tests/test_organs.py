import numpy as np
import pytest

from tgated import organs as O
from tgated.data.layouts import LAYOUTS


def test_table_matches_design():
    assert len(O.ORGANS) == 13
    assert [o.id for o in O.ORGANS] == list(range(1, 14))
    assert O.get_organ("liver").nsd_tolerance_mm == 5
    assert O.get_organ("duodenum").nsd_tolerance_mm == 7
    assert O.get_organ(13).name == "left_kidney"
    # BTCV: liver 6, pancreas 11, no duodenum; AMOS: pancreas 10, duodenum 13.
    assert LAYOUTS["btcv"].label_ids["liver"] == 6
    assert LAYOUTS["btcv"].label_ids["pancreas"] == 11
    assert "duodenum" not in LAYOUTS["btcv"].labelled_organs()
    assert len(LAYOUTS["btcv"].labelled_organs()) == 12
    assert LAYOUTS["amos"].label_ids["duodenum"] == 13
    assert len(LAYOUTS["amos"].labelled_organs()) == 13


def test_label_maps_are_bijective_on_organs():
    for ds in ("flare22", "btcv", "amos"):
        m = LAYOUTS[ds].label_map()
        organ_ids = [v for k, v in m.items() if v != 0]
        assert len(organ_ids) == len(set(organ_ids)) == len(LAYOUTS[ds].labelled_organs())
        back = LAYOUTS[ds].canonical_to_dataset()
        assert all(m[ds_id] == cid for cid, ds_id in back.items())


def test_other_labels_are_background():
    m = LAYOUTS["btcv"].label_map()
    assert m[10] == 0  # portal and splenic veins
    a = LAYOUTS["amos"].label_map()
    assert a[14] == 0 and a[15] == 0  # bladder, prostate/uterus


def test_totalseg_maps():
    total = O.totalseg_label_map("total")
    assert total[5] == O.get_organ("liver").id
    assert total[52] == O.get_organ("aorta").id
    assert total[63] == O.get_organ("inferior_vena_cava").id
    mr = O.totalseg_label_map("total_mr")
    assert mr[23] == O.get_organ("aorta").id and mr[12] == O.get_organ("esophagus").id
    assert len(total) == len(mr) == 13
    with pytest.raises(ValueError, match="total_mr"):
        O.check_totalseg_task("total_v1")


def test_remap_labels_btcv_to_canonical():
    arr = np.array([[0, 6, 11], [10, 2, 13]], dtype=np.int16)
    out = O.remap_labels(arr, LAYOUTS["btcv"].label_map())
    liver, pancreas, rk, lag = (
        O.get_organ(n).id for n in ("liver", "pancreas", "right_kidney", "left_adrenal_gland")
    )
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, liver, pancreas], [0, rk, lag]]


def test_remap_labels_unknown_value_is_an_error():
    with pytest.raises(ValueError, match=r"lab.nii.gz: label values \[42\]"):
        O.remap_labels(np.array([0, 42]), LAYOUTS["btcv"].label_map(), source="lab.nii.gz")
    assert O.remap_labels(np.array([0, 42, 5]), O.totalseg_label_map("total"), strict=False).tolist() == [
        0,
        0,
        1,
    ]


def test_remap_labels_rejects_non_integer_floats():
    with pytest.raises(ValueError, match="non-integer"):
        O.remap_labels(np.array([0.0, 0.5]), LAYOUTS["flare22"].label_map())
    assert O.remap_labels(np.array([0.0, 3.0]), LAYOUTS["flare22"].label_map()).tolist() == [0, 3]


def test_unknown_organ_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'pancreas'"):
        O.get_organ("pancreaz")
    assert [o.name for o in O.parse_organs("spleen, liver")] == ["liver", "spleen"]
    assert O.parse_organs("right kidney")[0].name == "right_kidney"
    assert O.parse_organs(None) == O.ORGANS


def test_labels_json():
    lj = O.labels_json()
    assert lj["0"] == "background" and lj["1"] == "liver" and lj["13"] == "left_kidney" and len(lj) == 14
