"""Read and write NIfTI files and DICOM series in one canonical frame, keeping the original geometry.

Canonical frame: RAS+ voxel axes as nibabel names them (the first axis increases towards the
patient's Right, the second towards Anterior, the third towards Superior), so axial slices lie along
the last axis, ordered from inferior to superior. Reorientation to this frame is an exact
permutation / flip of the voxel array (no interpolation); :meth:`Volume.to_original` undoes it, so a
prediction written back has exactly the input's shape, affine and axis order.

Every error names the file, the value found and what was expected.
"""

from __future__ import annotations

import gzip
import logging
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from tgated.io.files import atomic_path

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
CANONICAL = axcodes2ornt(("R", "A", "S"))
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Two grids are "the same" when their affines agree to these tolerances.
LINEAR_ATOL = 1e-4  # mm per voxel (direction × spacing entries)
TRANSLATION_ATOL = 1e-2  # mm (origin)


@dataclass
class Volume:
    """A 3-D volume in the canonical RAS frame, with what is needed to go back to the original.

    ``data`` is float32 for images (HU for CT) and an integer array for label maps.
    """

    data: np.ndarray
    affine: np.ndarray
    source: str
    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    to_canonical: np.ndarray = field(repr=False)
    """nibabel orientation transform from the original voxel axes to the canonical ones."""
    modality: str | None = None
    """Modality from the file when it says so (DICOM tag 0008,0060: "ct" / "mr"), else None."""
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, ...]:
        """Orientation codes of the original file (e.g. ('L', 'P', 'S'))."""
        return tuple(nib.aff2axcodes(self.original_affine))

    def slice_positions(self) -> np.ndarray:
        """Physical position (mm) of each axial slice along the superior axis, increasing."""
        k = np.arange(self.shape[2], dtype=np.float64)
        return self.affine[2, 3] + k * self.affine[2, 2]

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Bring an array in this volume's canonical frame back to the original voxel layout.

        Extra leading axes (e.g. organs × x × y × z) are carried along.
        """
        if tuple(array.shape[-3:]) != self.shape:
            raise ValueError(
                f"array of shape {array.shape} does not match the volume's canonical shape {self.shape}"
            )
        back = ornt_transform(CANONICAL, io_orientation(self.original_affine))
        lead = array.shape[:-3]
        flat = array.reshape((-1, *self.shape))
        out = np.stack([apply_orientation(a, back) for a in flat]) if flat.shape[0] else flat
        return out.reshape(lead + tuple(out.shape[-3:]))

    def like(self, data: np.ndarray, source: str | None = None) -> Volume:
        """A volume with the same geometry and other canonical data."""
        if tuple(data.shape) != self.shape:
            raise ValueError(f"data of shape {data.shape} does not match {self.shape}")
        return Volume(
            data=data,
            affine=self.affine,
            source=source or self.source,
            original_shape=self.original_shape,
            original_affine=self.original_affine,
            to_canonical=self.to_canonical,
            modality=self.modality,
            header=self.header,
        )


def has_image_suffix(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image extension (``a.nii.gz`` -> ``a``)."""
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def canonicalize(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient ``data`` to RAS by permutation / flips; returns (data, affine, transform)."""
    ornt = io_orientation(affine)
    transform = ornt_transform(ornt, CANONICAL)
    canon = apply_orientation(data, transform)
    canon_affine = affine @ inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(canon), canon_affine, transform


def _check_array(data: np.ndarray, source: str, *, label: bool) -> np.ndarray:
    kind = "label map" if label else "image"
    if data.size == 0:
        raise ValueError(f"{source}: {kind} has a zero-length axis {data.shape}; expected a non-empty 3-D volume")
    # Squeeze trailing singleton axes (x, y, z, 1): a 4-D file with one volume.
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        warnings.warn(
            f"{source}: {kind} has shape {data.shape}; squeezing the trailing singleton axes to 3-D",
            stacklevel=3,
        )
        data = data.reshape(data.shape[:3])
    if data.ndim == 2:
        raise ValueError(
            f"{source}: {kind} has 2 dimensions {data.shape}; expected 3 (x, y, z) — is this a single slice?"
        )
    if data.ndim != 3:
        raise ValueError(
            f"{source}: {kind} has {data.ndim} dimensions {data.shape}; expected 3 (x, y, z) — "
            "split multi-volume (4-D) files into one file per volume"
        )
    if min(data.shape) == 0:
        raise ValueError(
            f"{source}: {kind} has a zero-length axis {data.shape}; expected a non-empty 3-D volume"
        )
    if data.dtype.kind == "c" or data.dtype.kind not in "biuf":
        raise ValueError(
            f"{source}: {kind} has unsupported data type {data.dtype}; expected integers or floats"
        )
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad:
            raise ValueError(
                f"{source}: {kind} holds {n_bad} NaN/Inf voxels; expected finite values — "
                "fix the conversion that produced this file"
            )
    return data


def _check_affine(affine: np.ndarray, source: str) -> None:
    if not np.all(np.isfinite(affine)):
        raise ValueError(
            f"{source}: the header's affine holds NaN/Inf; expected a valid voxel-to-world transform"
        )
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(zooms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(
            f"{source}: the header's affine is singular (voxel sizes {np.round(zooms, 4).tolist()}); "
            "expected positive voxel sizes"
        )


def _read_nifti(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    try:
        img = nib.load(str(path))
    except (
        nib.filebasedimages.ImageFileError,
        EOFError,
        OSError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
    ) as exc:
        raise ValueError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if 0 in img.shape:
        kind = "label map" if label else "image"
        raise ValueError(f"{path}: {kind} has a zero-length axis {img.shape}; expected a non-empty 3-D volume")
    try:
        if label:
            data = np.asanyarray(img.dataobj)
            slope, inter = img.dataobj.slope, img.dataobj.inter
            if (slope is not None and slope != 1) or (inter is not None and inter != 0):
                data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            raw = img.dataobj
            data = np.asarray(raw, dtype=np.float32) if raw.dtype != np.float64 else np.asarray(raw)
            if data.dtype != np.float32:
                data = data.astype(np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise ValueError(
            f"{path}: the file is truncated or corrupt ({type(exc).__name__}: {exc}); expected a complete NIfTI "
            "file — copy or download it again"
        ) from None
    header = img.header.copy() if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) else None
    return np.asarray(data), np.asarray(img.affine, dtype=np.float64), header


def _sitk_to_array_affine(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        size = image.GetSize()
        raise ValueError(f"image has {image.GetDimension()} dimensions {size}; expected 3")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected 1"
        )
    data = sitk.GetArrayFromImage(image)  # (z, y, x)
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = np.array(image.GetOrigin(), dtype=np.float64)
    return data, _LPS_TO_RAS @ lps


def list_dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Series instance UID -> sorted file names of each DICOM series in ``folder``."""
    import SimpleITK as sitk

    folder = str(folder)
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(folder) or ()
    return {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in uids}


def _read_dicom(
    folder: Path, series_uid: str | None, label: bool
) -> tuple[np.ndarray, np.ndarray, str | None]:
    import SimpleITK as sitk

    series = list_dicom_series(folder)
    if not series:
        raise ValueError(
            f"{folder}: folder holds no DICOM series; expected a DICOM series folder or a NIfTI file"
        )
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
            raise ValueError(
                f"{folder}: folder holds {len(series)} DICOM series: {listing}; choose one with --series UID"
            )
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise ValueError(f"{folder}: no DICOM series {series_uid!r}; series found: {', '.join(series)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[series_uid])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(
            f"{folder}: could not read the DICOM series ({str(exc).strip().splitlines()[-1]})"
        ) from None
    modality = None
    try:
        tag = reader.GetMetaData(0, "0008|0060").strip().lower()
        modality = {"ct": "ct", "mr": "mr"}.get(tag)
    except RuntimeError:
        pass
    try:
        data, affine = _sitk_to_array_affine(image)
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
    if not label:
        data = data.astype(np.float32)
    return data, affine, modality


def _read_itk(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        data, affine = _sitk_to_array_affine(image)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not label:
        data = data.astype(np.float32)
    return data, affine


def read_volume(path: str | os.PathLike, *, label: bool = False, series_uid: str | None = None) -> Volume:
    """Read a NIfTI / ITK file or a DICOM series folder into the canonical frame.

    Images come back as float32 (scaled by the header's slope/intercept); label maps keep their
    integer values (``label=True``).
    """
    p = Path(path)
    kind = "label map" if label else "image"
    if not p.exists():
        raise FileNotFoundError(f"{p}: {kind} does not exist")
    modality = None
    header = None
    if p.is_dir():
        data, affine, modality = _read_dicom(p, series_uid, label)
    elif p.name.lower().endswith(NIFTI_SUFFIXES):
        data, affine, header = _read_nifti(p, label)
    elif p.name.lower().endswith(ITK_SUFFIXES):
        data, affine = _read_itk(p, label)
    else:
        raise ValueError(
            f"{p}: unsupported file type; expected {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder"
        )
    data = _check_array(data, str(p), label=label)
    _check_affine(affine, str(p))
    return volume_from_array(data, affine, source=str(p), modality=modality, header=header)


def volume_from_array(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    source: str = "<array>",
    modality: str | None = None,
    header: nib.Nifti1Header | None = None,
) -> Volume:
    """Wrap an array in its original layout and its RAS affine as a canonical :class:`Volume`."""
    canon, canon_affine, transform = canonicalize(np.asarray(data), np.asarray(affine, dtype=np.float64))
    return Volume(
        data=canon,
        affine=canon_affine,
        source=source,
        original_shape=tuple(int(s) for s in data.shape),
        original_affine=np.asarray(affine, dtype=np.float64),
        to_canonical=transform,
        modality=modality,
        header=header,
    )


def volume_from_nifti(
    img: nib.spatialimages.SpatialImage, *, label: bool = False, source: str = "<image>"
) -> Volume:
    """A :class:`Volume` from an in-memory nibabel image (Python API)."""
    data = np.asanyarray(img.dataobj) if label else np.asarray(img.get_fdata(dtype=np.float32))
    data = _check_array(np.asarray(data), source, label=label)
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(affine, source)
    header = img.header.copy() if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) else None
    return volume_from_array(data, affine, source=source, header=header)


def same_grid(a_shape, a_affine, b_shape, b_affine) -> bool:
    """True when two (canonical) grids coincide in shape and voxel-to-world transform."""
    return (
        tuple(a_shape) == tuple(b_shape)
        and np.allclose(a_affine[:3, :3], b_affine[:3, :3], atol=LINEAR_ATOL, rtol=0)
        and np.allclose(a_affine[:3, 3], b_affine[:3, 3], atol=TRANSLATION_ATOL, rtol=0)
    )


def describe_grid(vol: Volume) -> str:
    origin = vol.original_affine[:3, 3]
    return (
        f"shape {vol.original_shape}, spacing {tuple(round(s, 4) for s in vol.spacing)} mm, "
        f"orientation {''.join(vol.axcodes)}, origin {tuple(round(float(o), 2) for o in origin)}"
    )


def check_same_grid(vol: Volume, reference: Volume) -> None:
    """Raise unless ``vol`` covers ``reference``'s voxel grid (up to axis order and direction).

    Both are in the canonical frame, so a label stored with flipped or permuted axes relative to its
    image passes and is then aligned voxel for voxel by physical position, never by array index.
    """
    if not same_grid(vol.shape, vol.affine, reference.shape, reference.affine):
        raise ValueError(
            f"{vol.source}: geometry does not match {reference.source}: {describe_grid(vol)} vs "
            f"{describe_grid(reference)}; expected the same voxel grid (resample one onto the other first)"
        )


def read_label(path: str | os.PathLike, reference: Volume) -> Volume:
    """Read a label map and check it lies on ``reference``'s grid; returned in the canonical frame."""
    lab = read_volume(path, label=True)
    check_same_grid(lab, reference)
    return lab


def nifti_header_for(volume: Volume, dtype: np.dtype) -> nib.Nifti1Header:
    """A header for a file on ``volume``'s original grid (keeps qform/sform codes of a NIfTI input)."""
    hdr = nib.Nifti1Header() if volume.header is None else nib.Nifti1Header.from_header(volume.header)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0) if np.dtype(dtype).kind == "f" else hdr.set_slope_inter(np.nan, np.nan)
    return hdr


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header=None) -> None:
    """Write a NIfTI file atomically (temporary file + rename)."""
    p = Path(path)
    data = np.asarray(data)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header, dtype=None if header else data.dtype)
    img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    img.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(p, suffix=suffix) as tmp:
        nib.save(img, str(tmp))


def write_like(path: str | os.PathLike, canonical: np.ndarray, reference: Volume, dtype=np.uint8) -> None:
    """Write a canonical-frame array in ``reference``'s original layout, shape and affine."""
    data = reference.to_original(np.asarray(canonical)).astype(dtype, copy=False)
    write_nifti(path, data, reference.original_affine, header=nifti_header_for(reference, np.dtype(dtype)))


def axial_spacing_ratio(vol: Volume) -> float:
    """Slice thickness divided by in-plane spacing (extreme anisotropy check)."""
    sx, sy, sz = vol.spacing
    return sz / min(sx, sy)
