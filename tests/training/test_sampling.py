"""Training samples: positives / negatives, unlabelled organs, negative share, organ weights, flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgated.config import PreprocessConfig, TrainConfig
from tgated.models.tgated import plan_windows
from tgated.organs import ORGAN_BY_NAME
from tgated.training.augment import (
    LATERAL_PARTNER,
    Transform,
    apply_transform,
    draw_transform,
    sample_rng,
    target_organ,
)
from tgated.training.loop import _EpochBatches
from tgated.training.sampling import (
    TrainVolume,
    build_sample_index,
    epoch_samples,
    epoch_size,
    load_train_volume,
    preprocess_volume,
    resolve_organ_weights,
)

LIVER, R_KIDNEY, R_ADRENAL, DUODENUM, L_KIDNEY = 1, 2, 7, 12, 13
S = 16


def volume(labels: np.ndarray, labelled: tuple[int, ...], case_id: str = "v") -> TrainVolume:
    z = labels.shape[0]
    gen = torch.Generator().manual_seed(0)
    return TrainVolume(
        case_id=case_id,
        slices=torch.rand(z, 1, labels.shape[1], labels.shape[2], generator=gen).half(),
        labels=torch.as_tensor(labels, dtype=torch.uint8),
        positions_mm=np.arange(z, dtype=np.float64) * 2.5,
        labelled=labelled,
        modality="ct",
    )


def test_index_by_hand_and_unlabelled_organ_is_never_a_sample():
    lab = np.zeros((3, S, S), np.uint8)
    lab[0, 2:4, 2:4] = LIVER
    lab[1, 2:4, 2:4] = LIVER
    lab[1, 8:9, 8:9] = DUODENUM  # voxels of an organ this dataset does not label: ignored
    lab[2, 5:7, 5:7] = R_KIDNEY
    vol = volume(lab, labelled=(LIVER, R_KIDNEY))
    index = build_sample_index([vol], organs=[LIVER, R_KIDNEY, DUODENUM, L_KIDNEY])
    assert sorted(map(tuple, index.pos.tolist())) == [(0, 0, LIVER), (0, 1, LIVER), (0, 2, R_KIDNEY)]
    assert sorted(map(tuple, index.neg.tolist())) == [(0, 0, R_KIDNEY), (0, 1, R_KIDNEY), (0, 2, LIVER)]
    # the model does not segment the right kidney: it is no sample either
    only_liver = build_sample_index([vol], organs=[LIVER])
    assert set(only_liver.pos[:, 2].tolist()) | set(only_liver.neg[:, 2].tolist()) == {LIVER}


def test_btcv_case_has_no_duodenum_samples_but_flare22_does(tmp_path):
    from tgated.data.datasets import discover
    from tgated.data.phantom import write_dataset

    pre = PreprocessConfig(image_size=32)
    write_dataset(tmp_path / "btcv", cases=1, size=32, layout="btcv", quiet=True)
    write_dataset(tmp_path / "flare", cases=1, size=32, layout="flare22", quiet=True)
    btcv = load_train_volume(discover(tmp_path / "btcv", "btcv")[0], pre)
    flare = load_train_volume(discover(tmp_path / "flare", "flare22")[0], pre)
    assert DUODENUM not in btcv.labelled and DUODENUM in flare.labelled
    all_ids = list(range(1, 14))
    b, f = build_sample_index([btcv], all_ids), build_sample_index([flare], all_ids)
    assert DUODENUM in f.pos[:, 2] and DUODENUM in f.neg[:, 2]  # the same anatomy has duodenum samples
    assert DUODENUM not in b.pos[:, 2] and DUODENUM not in b.neg[:, 2]
    assert len(b.neg) > 0
    # same geometry: labels on the model grid, slices inferior -> superior
    assert btcv.slices.shape == flare.slices.shape and btcv.slices.dtype == torch.float16
    assert np.all(np.diff(btcv.positions_mm) > 0)


def test_preprocess_labels_nearest_and_intensity_window():
    image = np.full((8, 4, 2), -1000.0, np.float32)
    image[:, :, 1] = 75.0  # HU inside the default window [-125, 275] -> 0.5
    label = np.zeros((8, 4, 2), np.uint8)
    label[2:4, 1:3, 1] = ORGAN_BY_NAME["spleen"].id
    vol = preprocess_volume(
        image,
        label,
        np.array([0.0, 3.0]),
        case_id="c",
        modality="ct",
        labelled=(3,),
        pre=PreprocessConfig(image_size=16),
    )
    assert vol.slices.shape == (2, 1, 16, 16) and vol.labels.shape == (2, 16, 16)
    assert set(np.unique(vol.labels.numpy()).tolist()) == {0, 3}  # nearest: no blended ids
    centre = vol.slices[1, 0, 8, 8].item()
    assert centre == pytest.approx(0.5, abs=1e-3)
    assert vol.slices[0].max().item() == 0.0  # air clipped to 0


def test_negative_share_is_exact_and_order_is_deterministic():
    lab = np.zeros((10, S, S), np.uint8)
    lab[:5, :4, :4] = LIVER
    index = build_sample_index([volume(lab, (LIVER, R_KIDNEY))], organs=[LIVER, R_KIDNEY])
    order = epoch_samples(index, 1000, 0.1, seed=[0, 0], epoch=0)
    assert len(order) == 1000 and int(order[:, 3].sum()) == 100
    negatives = {tuple(r) for r in index.neg.tolist()}
    assert all(tuple(r[:3]) in negatives for r in order[order[:, 3] == 1].tolist())
    assert all(tuple(r[:3]) not in negatives for r in order[order[:, 3] == 0].tolist())
    assert np.array_equal(order, epoch_samples(index, 1000, 0.1, seed=[0, 0], epoch=0))
    assert not np.array_equal(order, epoch_samples(index, 1000, 0.1, seed=[0, 0], epoch=1))
    # one pass: every positive once plus 10 % negatives
    assert epoch_size(index, 0.1) == round(len(index.pos) / 0.9)


def test_label_free_negatives_are_slices_without_any_label():
    """``negatives: label_free``: only slices holding no labelled voxel are negatives (paired with
    every organ the case labels), where ``organ_absent`` also takes slices that hold another organ."""
    lab = np.zeros((4, S, S), np.uint8)
    lab[0, 2:4, 2:4] = LIVER
    lab[1, 2:4, 2:4] = LIVER
    lab[1, 6:8, 6:8] = R_KIDNEY
    lab[3, 9:10, 9:10] = DUODENUM  # an organ the case does not label: slice 3 is not label-free
    vol = volume(lab, labelled=(LIVER, R_KIDNEY))
    absent = build_sample_index([vol], organs=[LIVER, R_KIDNEY], negatives="organ_absent")
    free = build_sample_index([vol], organs=[LIVER, R_KIDNEY], negatives="label_free")
    assert sorted(map(tuple, absent.neg.tolist())) == [
        (0, 0, R_KIDNEY), (0, 2, LIVER), (0, 2, R_KIDNEY), (0, 3, LIVER), (0, 3, R_KIDNEY)
    ]
    assert sorted(map(tuple, free.neg.tolist())) == [(0, 2, LIVER), (0, 2, R_KIDNEY)]
    assert np.array_equal(free.pos, absent.pos) and absent.neg_weight is None
    # organ weights w_o · P_o: liver 1 · 2, right kidney 1 · 1 (one negative pair each)
    pairs = zip(free.neg[:, 2].tolist(), free.neg_weight.tolist(), strict=True)
    assert sorted(pairs) == [(LIVER, 2.0), (R_KIDNEY, 1.0)]
    with pytest.raises(ValueError, match=r"train.negatives='none': expected one of organ_absent, label_free"):
        build_sample_index([vol], organs=[LIVER], negatives="none")


def test_label_free_negatives_follow_the_weighted_positive_counts():
    """The published pairing: organ o's share of the negatives is w_o · P_o / Σ w_p · P_p, however
    many label-free slices there are; the negative share of the draws is exact."""
    lab = np.zeros((30, S, S), np.uint8)
    lab[:12, 1:3, 1:3] = LIVER  # P_liver = 12
    lab[:4, 8:9, 8:9] = R_ADRENAL  # P_adrenal = 4, weight 8 -> 32
    vol = volume(lab, (LIVER, R_ADRENAL))  # slices 12-29 are label-free
    index = build_sample_index([vol], [LIVER, R_ADRENAL], {"right_adrenal_gland": 8}, negatives="label_free")
    assert len(index.neg) == 2 * 18
    order = epoch_samples(index, 40000, 0.25, seed=[1, 2], epoch=0)
    neg = order[order[:, 3] == 1]
    assert len(neg) == 10000
    assert set(neg[:, 1].tolist()) <= set(range(12, 30))
    share = float((neg[:, 2] == R_ADRENAL).mean())
    # expected 32 / 44 = 0.727; binomial sd over 10000 draws is 0.0045
    assert abs(share - 32 / 44) < 5 * 0.0045
    # every label-free slice is drawn (evenly within an organ)
    assert len(set(neg[neg[:, 2] == LIVER][:, 1].tolist())) == 18


def test_organ_weights_are_respected_statistically():
    lab = np.zeros((40, S, S), np.uint8)
    lab[:, 1:3, 1:3] = LIVER
    lab[:, 8:9, 8:9] = R_ADRENAL  # both organs on all 40 slices: equal positive counts
    index = build_sample_index(
        [volume(lab, (LIVER, R_ADRENAL))], [LIVER, R_ADRENAL], {"right_adrenal_gland": 8}
    )
    order = epoch_samples(index, 18000, 0.0, seed=[0, 3], epoch=0)
    n_adrenal = int((order[:, 2] == R_ADRENAL).sum())
    n_liver = int((order[:, 2] == LIVER).sum())
    # expected 16000 : 2000; binomial sd of the adrenal count is 42
    assert n_adrenal + n_liver == 18000
    assert abs(n_adrenal - 16000) < 5 * 42
    assert 7.0 < n_adrenal / n_liver < 9.2


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [({"livre": 2.0}, "Did you mean 'liver'"), ({"liver": -1.0}, "expected a finite weight >= 0")],
)
def test_bad_organ_weights_are_errors(weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve_organ_weights(weights)


def test_lateral_partners_and_target_choice():
    assert LATERAL_PARTNER[R_KIDNEY] == L_KIDNEY and LATERAL_PARTNER[L_KIDNEY] == R_KIDNEY
    assert target_organ(R_KIDNEY, True, {R_KIDNEY, L_KIDNEY}) == (L_KIDNEY, True)
    assert target_organ(LIVER, True, {LIVER}) == (LIVER, True)
    assert target_organ(R_KIDNEY, False, {R_KIDNEY, L_KIDNEY}) == (R_KIDNEY, False)
    # the partner is not labelled: the sample is not flipped
    assert target_organ(R_KIDNEY, True, {R_KIDNEY}) == (R_KIDNEY, False)
    # the published rule: lateral organs are never flipped, the others keep their own label
    assert target_organ(R_KIDNEY, True, {R_KIDNEY, L_KIDNEY}, "skip") == (R_KIDNEY, False)
    assert target_organ(R_ADRENAL, True, {R_ADRENAL}, "skip") == (R_ADRENAL, False)
    assert target_organ(LIVER, True, {LIVER}, "skip") == (LIVER, True)
    assert target_organ(LIVER, False, {LIVER}, "skip") == (LIVER, False)
    with pytest.raises(ValueError, match="train.flip_lateral='mirror'"):
        target_organ(LIVER, True, {LIVER}, "mirror")


def test_skip_flip_rule_in_the_batches():
    """``flip_lateral: skip`` with flips always drawn: the kidney samples are the unflipped windows and
    masks, a liver sample is mirrored with its own mask."""
    lab = np.zeros((3, S, S), np.uint8)
    lab[1, 4:9, 1:4] = R_KIDNEY
    lab[1, 6:8, 10:15] = L_KIDNEY
    lab[1, 10:14, 3:9] = LIVER
    vol = volume(lab, (LIVER, R_KIDNEY, L_KIDNEY))
    plan = plan_windows(3, 3)
    cfg = TrainConfig(augment=True, flip_lr=1.0, flip_lateral="skip", rotate_deg=0.0, scale=0.0, intensity=0.0)
    order = np.array([[0, 1, R_KIDNEY, 0], [0, 1, L_KIDNEY, 0], [0, 1, LIVER, 0]])
    batch = _EpochBatches(order, [vol], [plan], None, cfg, [0, 0], 0, 3, 0, 1)[0]
    window = vol.slices[[0, 1, 2]].float()
    for i, organ in enumerate((R_KIDNEY, L_KIDNEY)):
        assert torch.equal(batch["masks"][i], torch.as_tensor(lab[1] == organ).float())
        assert torch.equal(batch["inputs"][i], window)
    assert torch.equal(batch["masks"][2], torch.as_tensor(lab[1] == LIVER).float().flip(-1))
    assert torch.equal(batch["inputs"][2], window.flip(-1))


def test_flip_swaps_left_and_right_kidney_in_the_batches():
    """A flipped 'right kidney' sample's target is the mirrored left-kidney label, and the window is
    mirrored the same way (all K slices)."""
    lab = np.zeros((3, S, S), np.uint8)
    lab[1, 4:9, 1:4] = R_KIDNEY  # patient's right = low column index (radiological view)
    lab[1, 6:8, 10:15] = L_KIDNEY  # another shape, so a plain flip of the right kidney cannot pass
    vol = volume(lab, (R_KIDNEY, L_KIDNEY))
    plan = plan_windows(3, 3)
    assert plan.index.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]] and plan.lo.tolist() == [0, 1, 2]
    cfg = TrainConfig(augment=True, flip_lr=1.0, rotate_deg=0.0, scale=0.0, intensity=0.0)
    order = np.array([[0, 1, R_KIDNEY, 0], [0, 1, L_KIDNEY, 0]])
    batch = _EpochBatches(order, [vol], [plan], None, cfg, [0, 0], 0, 2, 0, 1)[0]
    left = torch.as_tensor(lab[1] == L_KIDNEY).float()
    right = torch.as_tensor(lab[1] == R_KIDNEY).float()
    assert torch.equal(batch["masks"][0], left.flip(-1))
    assert torch.equal(batch["masks"][1], right.flip(-1))
    assert batch["organs"].tolist() == [R_KIDNEY, L_KIDNEY]  # the prompt stays the organ sampled
    expected = vol.slices[[0, 1, 2]].float().flip(-1)
    assert torch.equal(batch["inputs"][0], expected)
    # without flips, the target is the organ's own label
    cfg0 = TrainConfig(augment=False)
    plain = _EpochBatches(order, [vol], [plan], None, cfg0, [0, 0], 0, 2, 0, 1)[0]
    assert torch.equal(plain["masks"][0], right) and torch.equal(
        plain["inputs"][0], vol.slices[[0, 1, 2]].float()
    )


def test_geometric_transform_is_shared_by_all_slices_and_the_mask():
    mask = torch.zeros(32, 32)
    mask[6:14, 10:26] = 1
    window = mask.expand(3, 1, 32, 32).clone()
    t = Transform(angle_deg=25.0, zoom=1.15, gain=0.0, bias=0.0)
    w, m = apply_transform(window, mask, t)
    assert torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(m, mask)
    agree = ((w[0, 0] > 0.5) == (m > 0.5)).float().mean().item()
    assert agree > 0.97
    # intensity jitter: the same affine map for all slices, clipped to [0, 1]
    w2, _ = apply_transform(torch.full((3, 1, 4, 4), 0.5), torch.zeros(4, 4), Transform(gain=0.2, bias=-0.05))
    assert torch.allclose(w2, torch.full_like(w2, 0.5 * 1.2 - 0.05))


def test_per_sample_randomness_depends_on_epoch_and_sample_only():
    cfg = TrainConfig(flip_lr=0.5)
    a = draw_transform(cfg, sample_rng([0, 0], 2, 17))
    assert a == draw_transform(cfg, sample_rng([0, 0], 2, 17))
    draws = {draw_transform(cfg, sample_rng([0, 0], 2, i)) for i in range(20)}
    assert len(draws) == 20
    assert all(abs(d.angle_deg) <= 10 and 0.9 <= d.zoom <= 1.1 for d in draws)
    assert draw_transform(TrainConfig(augment=False), sample_rng([0, 0], 2, 17)) == Transform()
