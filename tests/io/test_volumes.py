import gzip
import itertools
import re

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from tests.conftest import lps_affine
from tgated.io.volumes import (
    check_same_grid,
    read_label,
    read_volume,
    volume_from_array,
    write_like,
    write_nifti,
)


def _store(canonical: np.ndarray, canon_affine: np.ndarray, codes: tuple[str, str, str]):
    """Store a canonical (RAS) array in another axis order / direction with an exact affine."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    data = apply_orientation(canonical, t)
    return data, canon_affine @ inv_ornt_aff(t, canonical.shape)


ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("A", "R", "I"), ("S", "L", "P")]


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_canonicalisation_is_exact_and_reversible(tmp_path, rng, codes):
    canon = rng.integers(-1000, 1000, size=(7, 5, 3)).astype(np.int16)
    canon_aff = np.diag([0.7, 0.9, 2.5, 1.0])
    canon_aff[:3, 3] = (-50.0, 20.0, 100.0)
    data, aff = _store(canon, canon_aff, codes)
    p = tmp_path / "img.nii.gz"
    write_nifti(p, data, aff)
    vol = read_volume(p)
    assert vol.axcodes == codes
    np.testing.assert_array_equal(vol.data, canon.astype(np.float32))
    np.testing.assert_allclose(vol.affine, canon_aff, atol=1e-5)
    assert vol.spacing == pytest.approx((0.7, 0.9, 2.5))
    # back to the original layout: same array, and a written label has the input's shape and affine
    np.testing.assert_array_equal(vol.to_original(vol.data), data)
    out = tmp_path / "pred.nii.gz"
    write_like(out, (vol.data > 0).astype(np.uint8), vol)
    img = nib.load(out)
    assert img.shape == data.shape
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), (data > 0).astype(np.uint8))


def test_slice_positions_increase_inferior_to_superior(tmp_path):
    canon_aff = np.diag([1.0, 1.0, 3.0, 1.0])
    canon_aff[2, 3] = -90.0
    data, aff = _store(np.zeros((2, 2, 4), np.int16), canon_aff, ("L", "P", "I"))
    p = tmp_path / "a.nii.gz"
    write_nifti(p, data, aff)
    np.testing.assert_allclose(read_volume(p).slice_positions(), [-90, -87, -84, -81])


def test_label_with_flipped_axis_is_aligned_by_position(tmp_path):
    img = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    aff = lps_affine()
    write_nifti(tmp_path / "img.nii.gz", img, aff)
    lab = (img % 3).astype(np.uint8)
    # same physical grid, y axis stored the other way round
    flipped = lab[:, ::-1, :]
    faff = aff.copy()
    faff[:3, 1] *= -1
    faff[:3, 3] = aff[:3, :3] @ [0, img.shape[1] - 1, 0] + aff[:3, 3]
    write_nifti(tmp_path / "lab.nii.gz", flipped, faff)
    vol = read_volume(tmp_path / "img.nii.gz")
    lv = read_label(tmp_path / "lab.nii.gz", vol)
    # voxel for voxel, label and image agree by physical position
    np.testing.assert_array_equal(lv.data, (vol.data.astype(np.int16) % 3))
    # pairing by array index would not
    assert not np.array_equal(flipped, lab)


def test_shifted_grid_is_an_error_naming_both_files(tmp_path):
    write_nifti(tmp_path / "img.nii.gz", np.zeros((4, 3, 2), np.int16), lps_affine())
    shifted = lps_affine(origin=(121.0, -40.0, -300.0))
    write_nifti(tmp_path / "lab.nii.gz", np.zeros((4, 3, 2), np.uint8), shifted)
    vol = read_volume(tmp_path / "img.nii.gz")
    with pytest.raises(ValueError, match=r"lab.nii.gz: geometry does not match .*img.nii.gz"):
        read_label(tmp_path / "lab.nii.gz", vol)
    write_nifti(tmp_path / "lab2.nii.gz", np.zeros((4, 3, 3), np.uint8), lps_affine())
    with pytest.raises(ValueError, match=r"shape \(4, 3, 3\)"):
        read_label(tmp_path / "lab2.nii.gz", vol)


def test_same_grid_tolerates_float32_header_rounding():
    a = volume_from_array(np.zeros((3, 3, 3)), lps_affine())
    aff = lps_affine().astype(np.float32).astype(np.float64)
    aff[:3, 3] += 1e-4
    b = volume_from_array(np.zeros((3, 3, 3)), aff)
    check_same_grid(a, b)


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64]
)
def test_every_dtype_reads_as_float32(tmp_path, dtype):
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype)
    write_nifti(tmp_path / "x.nii.gz", data, np.eye(4))
    vol = read_volume(tmp_path / "x.nii.gz")
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))


def test_scaled_integers_are_rescaled(tmp_path):
    img = nib.Nifti1Image(np.full((2, 2, 2), 10, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "s.nii.gz")
    assert float(read_volume(tmp_path / "s.nii.gz").data[0, 0, 0]) == -1004.0


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [((4, 5), "2 dimensions"), ((4, 5, 6, 2), "4 dimensions"), ((4, 0, 3), "zero-length axis")],
)
def test_bad_shapes(tmp_path, shape, fragment):
    p = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), p)
    with pytest.raises(ValueError, match=fragment) as exc:
        read_volume(p)
    assert "bad.nii.gz" in str(exc.value)


def test_single_volume_4d_is_squeezed_with_a_warning(tmp_path):
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.int16), np.eye(4)), p)
    with pytest.warns(UserWarning, match="squeezing"):
        vol = read_volume(p)
    assert vol.shape == (4, 5, 6)


def test_nan_voxels_are_an_error(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "n.nii.gz")
    with pytest.raises(ValueError, match="2 NaN/Inf voxels"):
        read_volume(tmp_path / "n.nii.gz")


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    with pytest.raises(ValueError, match="text.nii.gz: not a readable NIfTI"):
        read_volume(tmp_path / "text.nii.gz")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_volume(tmp_path / "a.txt")
    good = tmp_path / "good.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32), np.eye(4)),
        good,
    )
    blob = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="trunc.nii.gz.*(truncated|not a readable)"):
        read_volume(tmp_path / "trunc.nii.gz")


def test_to_original_carries_leading_axes():
    data, aff = _store(np.arange(24).reshape(2, 3, 4), np.eye(4), ("A", "L", "I"))
    vol = volume_from_array(data, aff)
    stack = np.stack([vol.data, vol.data * 2])
    back = vol.to_original(stack)
    np.testing.assert_array_equal(back[1], data * 2)


def test_all_orientations_round_trip():
    canon = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    for perm in itertools.permutations("RAS"):
        for flips in itertools.product([False, True], repeat=3):
            flip = {"R": "L", "A": "P", "S": "I"}
            codes = tuple(flip[c] if f else c for c, f in zip(perm, flips, strict=True))
            data, aff = _store(canon, np.eye(4), codes)
            vol = volume_from_array(data, aff)
            np.testing.assert_array_equal(vol.data, canon)
            np.testing.assert_array_equal(vol.to_original(vol.data), data)


def _with(affine, origin_shift=(0.0, 0.0, 0.0), rotation_rad=0.0):
    """``affine`` with its origin moved by ``origin_shift`` mm and its axes rotated about z (about the first voxel)."""
    out = affine.copy()
    c, s = np.cos(rotation_rad), np.sin(rotation_rad)
    out[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ out[:3, :3]
    out[:3, 3] += origin_shift
    return out


def test_header_float_noise_loads_with_a_warning_giving_the_size(tmp_path, caplog):
    write_nifti(tmp_path / "img.nii.gz", np.zeros((4, 3, 2), np.int16), lps_affine())
    write_nifti(tmp_path / "lab.nii.gz", np.zeros((4, 3, 2), np.uint8), _with(lps_affine(), (1e-3, 0, 0)))
    image = read_volume(tmp_path / "img.nii.gz")
    with caplog.at_level("WARNING", logger="tgated.io.volumes"):
        check_same_grid(read_volume(tmp_path / "lab.nii.gz", label=True), image, case="case07")
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("case case07: ") and "lab.nii.gz" in message and "img.nii.gz" in message
    # 1e-3 mm along x with 0.8 mm voxels: 1e-3 mm, 1.25e-3 voxel (float32 storage moves the 4th digit)
    mm, voxels = re.search(r"up to ([0-9.e-]+) mm apart, ([0-9.e-]+) voxel", message).groups()
    assert float(mm) == pytest.approx(1e-3, rel=2e-3) and float(voxels) == pytest.approx(1.25e-3, rel=2e-3)


def test_direction_noise_is_measured_at_the_far_corner(caplog):
    # axes rotated by 1e-4 rad about the first voxel: it stays put, while the far corner (3, 2, k),
    # 3.0 mm from it in-plane (2.4 mm along x, 1.8 along y), moves by 3e-4 mm
    a = volume_from_array(np.zeros((4, 3, 2)), lps_affine(), source="a")
    b = volume_from_array(np.zeros((4, 3, 2)), _with(lps_affine(), rotation_rad=1e-4), source="b")
    with caplog.at_level("WARNING", logger="tgated.io.volumes"):
        check_same_grid(b, a)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("b: header differs from a by float noise (voxel positions up to 0.0003 mm")


@pytest.mark.parametrize("shift_voxels", [1.0, 0.5, 0.1])
def test_a_grid_off_by_a_fraction_of_a_voxel_or_more_is_an_error(tmp_path, shift_voxels):
    spacing_x = float(np.linalg.norm(lps_affine()[:3, 0]))
    write_nifti(tmp_path / "img.nii.gz", np.zeros((4, 3, 2), np.int16), lps_affine())
    shifted = _with(lps_affine(), (shift_voxels * spacing_x, 0, 0))
    write_nifti(tmp_path / "lab.nii.gz", np.zeros((4, 3, 2), np.uint8), shifted)
    with pytest.raises(
        ValueError, match=rf"case c1: .*lab.nii.gz: geometry does not match .*{shift_voxels:g} voxel"
    ):
        check_same_grid(
            read_volume(tmp_path / "lab.nii.gz", label=True), read_volume(tmp_path / "img.nii.gz"), case="c1"
        )
