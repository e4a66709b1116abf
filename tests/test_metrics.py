"""tgated.metrics: hand-computed values, empty masks under every protocol, MONAI cross-checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from tgated import metrics as M
from tgated.organs import ORGAN_BY_NAME

NAN = float("nan")


def _mask_metrics(g, p, spacing, tol):
    """(Dice, NSD at ``tol``, HD95) of two masks through the public single-mask functions."""
    return M.dice(g, p), M.normalized_surface_dice(g, p, spacing, tol), M.hausdorff_distance(g, p, spacing)


def _isnan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _blob(rng: np.random.Generator, shape, threshold: float = 0.6, sigma=(3, 3, 1)) -> np.ndarray:
    """A random smooth 3-D blob (bool) for cross-checks."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise > threshold * noise.std()


# ---------------------------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------------------------


def test_dice_of_shifted_cube_is_one_half():
    g = np.zeros((6, 5, 4), bool)
    g[1:3, 1:3, 1:3] = True  # 8 voxels
    p = np.roll(g, 1, axis=0)  # overlap 4
    assert M.dice(g, p) == pytest.approx(2 * 4 / 16)
    assert M.dice(g, g) == 1.0
    assert _isnan(M.dice(np.zeros_like(g), np.zeros_like(g)))


def test_hd95_single_voxels_anisotropic_spacing():
    spacing = (0.8, 0.8, 3.0)
    g = np.zeros((9, 9, 9), bool)
    p = np.zeros_like(g)
    g[4, 4, 2] = True
    p[4, 4, 4] = True  # two slices up: 2 × 3.0 mm
    assert M.hausdorff_distance(g, p, spacing) == pytest.approx(6.0)
    p[:] = False
    p[5, 4, 2] = True  # one voxel along x: 0.8 mm
    assert M.hausdorff_distance(g, p, spacing) == pytest.approx(0.8)


def test_hd95_interpolates_the_95th_percentile_and_takes_the_larger_direction():
    spacing = (0.8, 0.8, 3.0)
    g = np.zeros((9, 9, 9), bool)
    p = np.zeros_like(g)
    g[4, 4, 4] = True
    p[4, 4, 5] = True  # 3.0 mm from G
    p[4, 6, 4] = True  # 1.6 mm from G
    # P→G distances {1.6, 3.0}: 95th percentile (linear) = 1.6 + 0.95·1.4; G→P: 1.6.
    assert M.hausdorff_distance(g, p, spacing) == pytest.approx(1.6 + 0.95 * 1.4)
    assert M.hausdorff_distance(g, p, spacing, percentile=0) == pytest.approx(1.6)


def test_hd95_uses_edge_voxels_only():
    # A filled 5×5×5 cube and the same cube: every interior voxel is ignored, distance 0.
    g = np.zeros((9, 9, 9), bool)
    g[2:7, 2:7, 2:7] = True
    assert M.hausdorff_distance(g, g, (1.0, 2.0, 3.0)) == 0.0
    # A cube grown by one voxel along z (3 mm): the grown face's edge voxels are 3 mm from G's.
    p = g.copy()
    p[2:7, 2:7, 7] = True
    d = M.hausdorff_distance(g, p, (1.0, 2.0, 3.0))
    assert d == pytest.approx(3.0)


def test_nsd_single_voxels_two_mm_apart():
    """DeepMind surface-distance's documented example: single voxels 2 mm apart, spacing (3, 2, 1)."""
    g = np.zeros((8, 8, 8), bool)
    p = np.zeros_like(g)
    g[3, 3, 2] = True
    p[3, 3, 4] = True
    spacing = (3.0, 2.0, 1.0)
    # The corners of G on its upper face are 1 mm from P's lower corners: half the surfel area.
    assert M.normalized_surface_dice(g, p, spacing, 1.0) == pytest.approx(0.5)
    assert M.normalized_surface_dice(g, p, spacing, 0.99) == pytest.approx(0.0)
    assert M.normalized_surface_dice(g, p, spacing, 2.0) == pytest.approx(1.0)
    assert M.dice(g, p) == 0.0


def test_surface_distances_of_identical_masks_are_zero():
    g = np.zeros((7, 7, 7), bool)
    g[1:5, 2:6, 3:5] = True
    sd = M.surface_distances(g, g, (0.7, 0.9, 2.5))
    assert len(sd.distances_gt_to_pred) > 0
    assert np.all(sd.distances_gt_to_pred == 0) and np.all(sd.distances_pred_to_gt == 0)
    np.testing.assert_allclose(sd.surfel_areas_gt.sum(), sd.surfel_areas_pred.sum())
    assert M.surface_dice_at_tolerance(sd, 0.0) == 1.0


# ---------------------------------------------------------------------------------------------
# empty masks under each protocol
# ---------------------------------------------------------------------------------------------

EMPTY_CASES = {
    # name: (gt has liver, pred has liver)
    "both_empty": (False, False),
    "gt_empty": (False, True),
    "pred_empty": (True, False),
}


def _liver_maps(gt_has: bool, pred_has: bool) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((10, 9, 6), np.uint8)
    pred = np.zeros_like(gt)
    gt[7:9, 7:9, 4:6] = 3  # spleen present in both: never disturbs liver's scores
    pred[7:9, 7:9, 4:6] = 3
    if gt_has:
        gt[2:5, 2:5, 1:4] = 1
    if pred_has:
        pred[3:6, 2:5, 1:4] = 1
    return gt, pred


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_masks_native(name):
    gt, pred = _liver_maps(*EMPTY_CASES[name])
    (s,) = M.native_case_scores(gt, pred, (0.8, 0.8, 3.0), ["liver"])
    if name == "both_empty":
        assert _isnan(s.dice) and _isnan(s.nsd) and _isnan(s.hd95)
        assert s.status == "both_empty"
    else:
        assert (s.dice, s.nsd) == (0.0, 0.0) and _isnan(s.hd95)
        assert s.status == ("false_positive" if name == "gt_empty" else "missed")
    assert (s.gt_voxels, s.pred_voxels) == (27 * EMPTY_CASES[name][0], 27 * EMPTY_CASES[name][1])
    # the mask-level function agrees
    d, nsd, hd = _mask_metrics(gt == 1, pred == 1, (0.8, 0.8, 3.0), 5.0)
    np.testing.assert_equal((d, nsd, hd), (s.dice, s.nsd, s.hd95))


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_masks_flare22(name):
    gt, pred = _liver_maps(*EMPTY_CASES[name])
    (s,) = M.flare22_case_scores(gt, pred, (0.8, 0.8, 3.0), ["liver"])
    expected = {"both_empty": 1.0, "gt_empty": 0.0, "pred_empty": 0.0}[name]
    assert (s.dice, s.nsd) == (expected, expected)
    assert _isnan(s.hd95)


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_masks_paper(name):
    gt, pred = _liver_maps(*EMPTY_CASES[name])
    (s,) = M.paper_case_scores(gt, pred, ["liver"])
    if name == "both_empty":
        assert _isnan(s.dice)
    else:
        assert s.dice == 0.0
    assert _isnan(s.nsd) and _isnan(s.hd95)


# ---------------------------------------------------------------------------------------------
# cross-checks against MONAI (and the protocols on non-trivial masks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_monai_on_random_anisotropic_masks(seed, monkeypatch):
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    monkeypatch.setattr(M, "_BLOCK", (4, 7, 32)[seed])
    rng = np.random.default_rng(seed)
    shape = (31, 26, 11)
    spacing = (0.8, 0.8, 3.0)
    g = _blob(rng, shape)
    p = g.copy()
    p = ndimage.binary_dilation(p, iterations=1) if seed % 2 else ndimage.binary_erosion(p)
    p ^= rng.random(shape) < 0.01  # scattered errors
    p[0, :, 3] = True  # a face on the volume border: cropping must treat the outside as background
    tol = (2.0, 3.0, 5.0)[seed]
    yt = torch.from_numpy(g)[None, None].float()
    yp = torch.from_numpy(p)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_dice = compute_dice(yp, yt, include_background=True).item()
        ref_nsd = compute_surface_dice(
            yp, yt, [tol], include_background=True, spacing=spacing, use_subvoxels=True
        ).item()
        ref_hd = compute_hausdorff_distance(
            yp, yt, include_background=True, percentile=95, spacing=spacing
        ).item()
    d, nsd, hd = _mask_metrics(g, p, spacing, tol)
    assert d == pytest.approx(ref_dice, abs=1e-6)
    assert nsd == pytest.approx(ref_nsd, abs=0.01)
    assert abs(nsd - ref_nsd) < 1e-5  # in fact equal up to MONAI's float32
    assert abs(hd - ref_hd) <= float(np.linalg.norm(spacing))
    assert hd == pytest.approx(ref_hd, abs=1e-4)


def _edt_reference(g: np.ndarray, p: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """NSD and HD95 the plain way: whole-volume codes by correlation and Euclidean distance transforms."""
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    table = M._surfel_area_table(tuple(spacing))

    def surfels(m):
        code = ndimage.correlate(np.pad(m.astype(np.uint8), 1), kernel, mode="constant")[1:, 1:, 1:]
        return (code != 0) & (code != 255), table[code]

    bg, ag = surfels(g)
    bp, ap = surfels(p)
    d_gp = ndimage.distance_transform_edt(~bp, sampling=spacing)[bg]
    d_pg = ndimage.distance_transform_edt(~bg, sampling=spacing)[bp]
    nsd = (ag[bg][d_gp <= tol].sum() + ap[bp][d_pg <= tol].sum()) / (ag[bg].sum() + ap[bp].sum())
    eg, ep = g & ~ndimage.binary_erosion(g), p & ~ndimage.binary_erosion(p)
    h_pg = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
    h_gp = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
    return float(nsd), float(max(np.percentile(h_pg, 95), np.percentile(h_gp, 95)))


@pytest.mark.parametrize("block", [3, 5, 32])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.0, 2.0), (0.8, 0.8, 3.0)])
def test_matches_a_distance_transform_reference_exactly(spacing, block, monkeypatch):
    """Ties at the tolerance are frequent with round spacings: the comparison must agree exactly.

    Small blocks make surfaces straddle block borders (real volumes use several 32³ blocks).
    """
    monkeypatch.setattr(M, "_BLOCK", block)
    rng = np.random.default_rng(7)
    shape = (22, 20, 14)
    g, p = _blob(rng, shape, 0.5), _blob(rng, shape, 0.5)
    p |= np.roll(g, 2, axis=2)
    for tol in (1.0, 2.0, 3.0):
        nsd, hd = _edt_reference(g, p, spacing, tol)
        assert M.normalized_surface_dice(g, p, spacing, tol) == pytest.approx(nsd, abs=1e-12)
        assert M.hausdorff_distance(g, p, spacing) == pytest.approx(hd, abs=1e-9)


def test_case_scores_crop_exactly_like_whole_volume_metrics(rng, monkeypatch):
    """Scoring label maps (cropped per organ) equals the mask functions on the whole volume."""
    monkeypatch.setattr(M, "_BLOCK", 6)
    shape = (30, 24, 12)
    spacing = (0.7, 0.9, 2.5)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for oid in (1, 3, 5):
        gt[_blob(rng, shape, 1.2)] = oid
        pred[_blob(rng, shape, 1.2)] = oid
    organs = ["liver", "spleen", "aorta", "pancreas"]  # pancreas: absent in both
    scores = M.native_case_scores(gt, pred, spacing, organs)
    assert [s.organ for s in scores] == ["liver", "spleen", "pancreas", "aorta"]  # canonical id order
    for s in scores:
        oid = ORGAN_BY_NAME[s.organ].id
        g, p = gt == oid, pred == oid
        if not g.any() and not p.any():
            assert s.status == "both_empty"
            continue
        assert s.dice == pytest.approx(M.dice(g, p))
        assert s.nsd == pytest.approx(
            M.surface_dice_at_tolerance(
                M.surface_distances(g, p, spacing), ORGAN_BY_NAME[s.organ].nsd_tolerance_mm
            )
        )
        assert s.hd95 == pytest.approx(M.hausdorff_distance(g, p, spacing))
        assert (s.gt_voxels, s.pred_voxels) == (int(g.sum()), int(p.sum()))


def _aorta_case():
    """Aorta labelled on slices 2..6 of the file's third axis; the prediction misses slice 6."""
    gt = np.zeros((12, 10, 9), np.uint8)
    gt[4:7, 4:7, 2:7] = 5
    gt[1:3, 1:4, 2:7] = 1  # liver with the same mistake
    pred = gt.copy()
    pred[:, :, 6] = 0
    return gt, pred


def test_flare22_z_crop_quirk_for_aorta_ivc_esophagus():
    gt, pred = _aorta_case()
    spacing = (0.8, 0.8, 3.0)
    scores = {s.organ: s for s in M.flare22_case_scores(gt, pred, spacing, ["aorta", "liver"])}
    # The script crops aorta to [:, :, z_lower:z_upper] = slices 2..5: the missed slice 6 falls out.
    assert scores["aorta"].dice == 1.0 and scores["aorta"].nsd == 1.0
    # Liver is not cropped: 4 of 5 slices → DSC 2·36/(45+36) = 0.8889 (rounded to 4 decimals).
    assert scores["liver"].dice == round(2 * 24 / (30 + 24), 4)
    assert scores["liver"].dice == 0.8889
    native = {s.organ: s for s in M.native_case_scores(gt, pred, spacing, ["aorta"])}
    assert native["aorta"].dice == pytest.approx(2 * 36 / (45 + 36))
    # The crop also removes prediction voxels beyond the GT's z-range.
    pred2 = gt.copy()
    pred2[4:7, 4:7, 7:9] = 5  # aorta predicted two slices too far up
    (s,) = M.flare22_case_scores(gt, pred2, spacing, ["aorta"])
    assert (s.dice, s.nsd) == (1.0, 1.0)
    assert s.pred_voxels == 45 + 18  # counts are on the whole volume


def test_flare22_rounds_and_single_slice_crop_is_nan():
    gt = np.zeros((8, 8, 6), np.uint8)
    gt[2:5, 2:5, 3] = 6  # IVC in a single slice: the script's crop [3:3] is empty
    (s,) = M.flare22_case_scores(gt, gt.copy(), (1.0, 1.0, 1.0), ["inferior_vena_cava"])
    assert _isnan(s.dice) and _isnan(s.nsd)
    g = np.zeros((8, 8, 6), np.uint8)
    g[1:4, 1:4, 1:4] = 3  # 27 voxels
    p = np.zeros_like(g)
    p[1:4, 1:4, 1:3] = 3  # 18 voxels
    (s,) = M.flare22_case_scores(g, p, (1.0, 1.0, 1.0), ["spleen"])
    assert s.dice == round(2 * 18 / 45, 4) == 0.8


def test_paper_protocol_on_a_non_square_slice():
    # canonical (X=20, Y=10, Z=3): each axial slice is 10 rows × 20 columns, padded to 20×20.
    gt = np.zeros((20, 10, 3), np.uint8)
    pred = np.zeros_like(gt)
    gt[:10] = 1
    pred[:11] = 1
    (s,) = M.paper_case_scores(gt, pred, ["liver"])
    # nearest-exact resize 20 → 352: source column c covers output columns j with
    # floor((j + 0.5)·20/352) = c; 10 columns → 176 output columns, 11 → 194; 10 rows → 176 rows.
    assert s.dice == pytest.approx(2 * 176 / (176 + 194))
    assert s.dice != pytest.approx(2 * 10 / 21)  # not the native Dice
    assert (s.gt_voxels, s.pred_voxels) == (10 * 10 * 3, 11 * 10 * 3)
    grid = M.to_paper_grid(gt)
    assert grid.shape == (3, 352, 352) and grid.dtype == np.uint8
    assert int((grid[0] == 1).sum()) == 176 * 176


def test_case_scores_dispatch_and_bad_input():
    gt, pred = _aorta_case()
    assert M.case_scores(gt, pred, (1, 1, 1), ["aorta"], "flare22")[0].dice == 1.0
    assert M.case_scores(gt, pred, (1, 1, 1), ["aorta"], "native")[0].dice < 1.0
    assert _isnan(M.case_scores(gt, pred, (1, 1, 1), ["aorta"], "paper")[0].nsd)
    with pytest.raises(ValueError, match="unknown evaluation protocol 'nsd'"):
        M.case_scores(gt, pred, (1, 1, 1), ["aorta"], "nsd")
    with pytest.raises(ValueError, match="unknown organ 'kidney'"):
        M.native_case_scores(gt, pred, (1, 1, 1), ["kidney"])
    with pytest.raises(ValueError, match="shape"):
        M.native_case_scores(gt, pred[:-1], (1, 1, 1), ["aorta"])
    with pytest.raises(ValueError, match="spacing"):
        M.native_case_scores(gt, pred, (1, 0, 1), ["aorta"])
    with pytest.raises(ValueError, match="integer label ids"):
        M.native_case_scores(gt.astype(np.float32), pred, (1, 1, 1), ["aorta"])
    with pytest.raises(ValueError, match="percentile"):
        M.hausdorff_distance(gt == 5, pred == 5, (1, 1, 1), percentile=101)


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def _row(case, organ, dice, nsd=NAN, hd=NAN, g=1, p=1):
    return {
        "case": case,
        "organ": organ,
        "dice": dice,
        "nsd": nsd,
        "hd95": hd,
        "gt_voxels": g,
        "pred_voxels": p,
    }


def test_summarise_skips_nan_reports_n_and_averages_organs_unweighted():
    rows = [
        _row("a", "spleen", 0.9, 0.8, 2.0),
        _row("b", "spleen", 0.7, 0.6, 4.0),
        _row("c", "spleen", NAN, NAN, NAN, g=0, p=0),  # both empty: kept, excluded from means
        _row("a", "liver", 0.0, 0.0, NAN, g=0, p=5),  # false positive
        _row("b", "liver", 0.0, 0.0, NAN, g=9, p=0),  # missed
        _row("c", "liver", 0.6, 0.5, 3.0),
    ]
    s = M.summarise(rows)
    assert list(s["organs"]) == ["liver", "spleen"]  # canonical order
    spleen, liver = s["organs"]["spleen"], s["organs"]["liver"]
    assert spleen["dice"] == pytest.approx(0.8) and spleen["n"] == 2 and spleen["n_both_empty"] == 1
    assert spleen["hd95"] == pytest.approx(3.0) and spleen["n_hd95"] == 2
    assert liver["dice"] == pytest.approx(0.2) and liver["n"] == 3 and liver["n_hd95"] == 1
    assert (liver["false_positive_cases"], liver["missed_cases"]) == (1, 1)
    assert s["mean_dice"] == pytest.approx((0.8 + 0.2) / 2)  # not the mean over 5 rows (0.44)
    assert s["mean_nsd"] == pytest.approx((0.7 + 0.5 / 3) / 2)
    assert s["cases"] == 3
    assert _isnan(M.summarise([_row("a", "liver", NAN, g=0, p=0)])["mean_dice"])


def test_cross_domain_drop():
    assert M.cross_domain_drop(0.8, 0.6) == pytest.approx(0.25)
    assert M.cross_domain_drop(0.8, 0.9) == pytest.approx(-0.125)
    assert _isnan(M.cross_domain_drop(0.0, 0.5))
    assert _isnan(M.cross_domain_drop(NAN, 0.5))
