"""Property-based tests (hypothesis): metric identities on random masks and spacings, and NIfTI
round trips on random valid geometry (axis order, flips, rotations, spacings, origins, dtypes,
header forms). Small arrays and modest ``max_examples`` keep the whole file at a few seconds."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

from tgated import metrics as M
from tgated.io.volumes import read_volume, write_like

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

shapes = st.tuples(*(st.integers(2, 7) for _ in range(3)))
spacings = st.tuples(*(st.floats(0.3, 5.0, allow_nan=False) for _ in range(3)))


@st.composite
def mask_pairs(draw, nonempty: bool = True):
    """Two masks on one grid: random voxels (density 5-70 %) or a box, each non-empty if asked."""
    shape = draw(shapes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = []
    for _ in range(2):
        if draw(st.booleans()):
            m = rng.random(shape) < draw(st.floats(0.05, 0.7))
        else:
            lo = [int(rng.integers(0, n)) for n in shape]
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape, strict=True)]
            m = np.zeros(shape, bool)
            m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        if nonempty and not m.any():
            m.flat[int(rng.integers(m.size))] = True
        out.append(m)
    return out[0], out[1]


def _all(g, p, spacing, tol):
    return M.dice(g, p), M.normalized_surface_dice(g, p, spacing, tol), M.hausdorff_distance(g, p, spacing)


@FAST
@given(mask_pairs(), spacings, st.floats(0.5, 6.0))
def test_metrics_are_symmetric_and_bounded(pair, spacing, tol):
    g, p = pair
    d, nsd, hd = _all(g, p, spacing, tol)
    d2, nsd2, hd2 = _all(p, g, spacing, tol)
    assert d == d2 and hd == hd2
    assert nsd == pytest.approx(nsd2, abs=1e-12)
    assert 0.0 <= d <= 1.0 and 0.0 <= nsd <= 1.0 + 1e-12 and hd >= 0.0
    assert hd <= M.hausdorff_distance(g, p, spacing, percentile=100) + 1e-9


@FAST
@given(mask_pairs(), spacings)
def test_dice_counts_identity(pair, spacing):
    g, p = pair
    both, n_g, n_p = int((g & p).sum()), int(g.sum()), int(p.sum())
    assert M.dice(g, p) == pytest.approx(2 * both / (n_g + n_p), rel=1e-12)
    assert (M.dice(g, p) == 1.0) == np.array_equal(g, p)


@FAST
@given(mask_pairs(), spacings, st.floats(0.5, 6.0))
def test_identical_masks_are_perfect(pair, spacing, tol):
    g, _ = pair
    assert _all(g, g.copy(), spacing, tol) == (1.0, 1.0, 0.0)


@FAST
@given(mask_pairs(), spacings, st.floats(0.5, 6.0), st.tuples(*(st.integers(0, 4) for _ in range(3))))
def test_translating_both_masks_by_whole_voxels_changes_nothing(pair, spacing, tol, shift):
    g, p = pair
    pad = [(s, 4 - s) for s in shift]  # the same grid, both masks moved by `shift` voxels
    moved = _all(np.pad(g, pad), np.pad(p, pad), spacing, tol)
    base = _all(g, p, spacing, tol)
    assert moved[0] == base[0] and moved[2] == pytest.approx(base[2], abs=1e-9)
    assert moved[1] == pytest.approx(base[1], abs=1e-12)


@FAST
@given(
    mask_pairs(), spacings, st.floats(0.5, 6.0), st.permutations([0, 1, 2]), st.tuples(*[st.booleans()] * 3)
)
def test_axis_order_and_direction_do_not_matter(pair, spacing, tol, perm, flips):
    g, p = pair
    axes = tuple(i for i, f in enumerate(flips) if f)

    def move(m):
        return np.transpose(np.flip(m, axes) if axes else m, perm)

    moved = _all(move(g), move(p), tuple(spacing[i] for i in perm), tol)
    base = _all(g, p, spacing, tol)
    assert moved[0] == base[0]
    assert moved[1] == pytest.approx(base[1], abs=1e-9) and moved[2] == pytest.approx(base[2], rel=1e-9)


@FAST
@given(mask_pairs(), spacings, st.floats(0.5, 6.0), st.floats(0.25, 4.0))
def test_scaling_spacing_scales_distances(pair, spacing, tol, k):
    g, p = pair
    scaled = tuple(s * k for s in spacing)
    assert M.hausdorff_distance(g, p, scaled) == pytest.approx(
        k * M.hausdorff_distance(g, p, spacing), rel=1e-9
    )
    # NSD compares distances with τ: scaling both leaves it unchanged, except for distances that
    # sit exactly on τ, which rounding may put on either side
    a, b = M.normalized_surface_dice(g, p, scaled, tol * k), M.normalized_surface_dice(g, p, spacing, tol)
    dist = M.surface_distances(g, p, spacing)
    on_edge = any(
        np.isclose(x, tol, rtol=1e-9).any() for x in (dist.distances_gt_to_pred, dist.distances_pred_to_gt)
    )
    assert on_edge or a == pytest.approx(b, abs=1e-12)


@FAST
@given(mask_pairs(), spacings, st.floats(0.2, 4.0), st.floats(0.0, 4.0))
def test_nsd_grows_with_the_tolerance(pair, spacing, tol, extra):
    g, p = pair
    assert (
        M.normalized_surface_dice(g, p, spacing, tol)
        <= M.normalized_surface_dice(g, p, spacing, tol + extra) + 1e-12
    )


@FAST
@given(mask_pairs(), spacings, st.floats(0.5, 6.0))
def test_one_empty_mask(pair, spacing, tol):
    g, _ = pair
    empty = np.zeros_like(g)
    for a, b in ((g, empty), (empty, g)):
        d, nsd, hd = _all(a, b, spacing, tol)
        assert d == 0.0 and nsd == 0.0 and np.isnan(hd)
    assert all(np.isnan(v) for v in _all(empty, empty, spacing, tol))


# ---------------------------------------------------------------------------------------------
# NIfTI geometry round trips
# ---------------------------------------------------------------------------------------------

FLIP = {"R": "L", "A": "P", "S": "I"}
DTYPES = [
    np.uint8,
    np.int8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float32,
    np.float64,
]


@st.composite
def geometries(draw):
    shape = draw(shapes)
    codes = tuple(FLIP[c] if draw(st.booleans()) else c for c in draw(st.permutations("RAS")))
    spacing = draw(spacings)
    origin = draw(st.tuples(*(st.floats(-500, 500, allow_nan=False) for _ in range(3))))
    angle = draw(st.sampled_from([0.0, 0.0, 4.0, 25.0]))  # degrees about a random axis
    axis = draw(st.integers(0, 2))
    dtype = draw(st.sampled_from(DTYPES))
    form = draw(st.sampled_from(["both", "sform", "qform"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, codes, spacing, origin, angle, axis, dtype, form, seed


def _affine(shape, codes, spacing, origin, angle, axis):
    """An affine whose voxel axes follow ``codes`` (before the rotation) with the given zooms."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    canon = np.diag([*spacing, 1.0])
    canon[:3, 3] = origin
    aff = canon @ inv_ornt_aff(t, shape)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(4)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot @ aff


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometries())
def test_nifti_write_read_write_keeps_shape_affine_and_data(tmp_path_factory, geom):
    shape, codes, spacing, origin, angle, axis, dtype, form, seed = geom
    folder = tmp_path_factory.mktemp("g")
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    lo, hi = (max(int(info.min), -1000), min(int(info.max), 3000)) if info else (-1000, 3000)
    data = np.random.default_rng(seed).integers(lo, hi + 1, size=shape).astype(dtype)
    aff = _affine(shape, codes, spacing, origin, angle, axis)
    img = nib.Nifti1Image(data, aff, dtype=dtype)
    img.set_sform(aff if form != "qform" else None, code=1 if form != "qform" else 0)
    img.set_qform(aff if form != "sform" else None, code=1 if form != "sform" else 0)
    nib.save(img, folder / "in.nii.gz")
    stored = nib.load(folder / "in.nii.gz")

    logging.disable(logging.WARNING)  # oblique geometries log a warning; not the subject here
    try:
        vol = read_volume(folder / "in.nii.gz")
        lab = read_volume(folder / "in.nii.gz", label=True)
    finally:
        logging.disable(logging.NOTSET)
    np.testing.assert_array_equal(vol.data, lab.data.astype(np.float32))
    assert lab.data.dtype == dtype
    # every canonical voxel sits where its original voxel was: same world position, same value
    ijk = np.array([[0, 0, 0], [s - 1 for s in shape], [shape[0] // 2, 1, shape[2] - 1]])
    world = (stored.affine @ np.c_[ijk, np.ones(3)].T).T
    canon_ijk = np.rint((np.linalg.inv(vol.affine) @ world.T).T[:, :3]).astype(int)
    for (a, b, c), (x, y, z) in zip(ijk, canon_ijk, strict=True):
        assert lab.data[x, y, z] == data[a, b, c]
    assert sorted(vol.spacing) == pytest.approx(sorted(spacing), rel=1e-5)
    axial = vol.affine[:3, 2] / np.linalg.norm(vol.affine[:3, 2])
    assert abs(axial[2]) == max(abs(axial)) and axial[2] > 0  # slices run inferior → superior

    # write back in the original layout (twice) and read the files
    write_like(folder / "out1.nii.gz", lab.data, lab, dtype=dtype)
    again = read_volume(folder / "out1.nii.gz", label=True)
    write_like(folder / "out2.nii.gz", again.data, again, dtype=dtype)
    for name in ("out1.nii.gz", "out2.nii.gz"):
        out = nib.load(folder / name)
        assert out.shape == shape and out.get_data_dtype() == dtype
        np.testing.assert_allclose(out.affine, stored.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), data)
