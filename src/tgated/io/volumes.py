"""Read and write NIfTI files and DICOM series in one canonical frame, keeping the original geometry.

Canonical frame: RAS+ voxel axes as nibabel names them (the first axis increases towards the
patient's Right, the second towards Anterior, the third towards Superior), so axial slices lie along
the last axis, ordered from inferior to superior. Reorientation to this frame is an exact
permutation / flip of the voxel array (no interpolation); :meth:`Volume.to_original` undoes it, so a
prediction written back has exactly the input's shape, affine and axis order.

Every error names the file, the value found and what was expected.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
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
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Two grids are "the same" when their voxel-to-world transforms put every voxel of one within these
# distances of the same voxel of the other (checked at the grid's corners, where a difference in
# origin, spacing or direction is largest).
GRID_EXACT_MM = 2e-4
"""Below this (mm) two headers are equal up to float32 storage (a few ulps of a coordinate of 500 mm)."""
GRID_NOISE_VOXELS = 0.05
"""Up to this fraction of a voxel the headers differ by float noise, as in public datasets whose label
files were written by another tool: accepted with a warning that names the case and the size."""

# Geometry that still works but deserves a warning (see :func:`geometry_warnings`).
OBLIQUE_WARN_DEG = 5.0
"""Voxel axes rotated more than this from the nearest patient axes: an oblique acquisition."""
ANISOTROPY_WARN_RATIO = 8.0
"""Slice thickness above this many times the in-plane spacing: extreme anisotropy."""
THICK_SLICE_WARN_MM = 10.0
"""Slices thicker than this (mm): adjacent-slice context spans a large distance."""
DICOM_SPACING_RTOL = 0.01
"""Relative deviation of DICOM slice steps from their median above which the series is non-uniform."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
        lead = array.shape[:-3]
        if not lead:  # one array: one copy
            return reorient(array, self.affine, self.axcodes)[0]
        flat = array.reshape((-1, *self.shape))
        out = np.stack([reorient(a, self.affine, self.axcodes)[0] for a in flat]) if flat.shape[0] else flat
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


def reorient(
    data: np.ndarray, affine: np.ndarray, axcodes: Sequence[str] = ("R", "A", "S")
) -> tuple[np.ndarray, np.ndarray]:
    """Lay ``data`` (on the voxel grid of ``affine``) out with its axes pointing along ``axcodes``
    (default: the canonical RAS frame): an exact permutation / flip of the array, no interpolation.

    Returns the array and its new affine (the same voxels at the same world positions). This is the
    package's one reorientation: reading into the canonical frame, writing back to a file's own
    layout (:meth:`Volume.to_original`) and storing phantoms in varied orientations all use it.
    """
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes)))
    out = np.ascontiguousarray(apply_orientation(data, transform))
    if any(st < 0 for st in out.strides):  # a flipped axis of length 1 counts as contiguous
        out = out.copy()
    return out, np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(transform, data.shape)


def _check_shape(shape: tuple[int, ...], source: str, kind: str) -> tuple[int, ...]:
    """The 3-D shape a file's array shape stands for (trailing singleton axes dropped), or an error."""
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(
            f"{source}: the header gives {kind} size {shape} with a negative axis length; expected positive "
            "sizes — the header is corrupt, convert or download the file again"
        )
    if 0 in shape:
        raise ValueError(f"{source}: {kind} has a zero-length axis {shape}; expected a non-empty 3-D volume")
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape = shape[:3]
    if len(shape) == 2:
        raise ValueError(
            f"{source}: {kind} has 2 dimensions {shape}; expected 3 (x, y, z) — is this a single slice?"
        )
    if len(shape) != 3:
        raise ValueError(
            f"{source}: {kind} has {len(shape)} dimensions {shape}; expected 3 (x, y, z) — "
            "split multi-volume (4-D) files into one file per volume"
        )
    return shape


def _check_dtype(dtype: np.dtype, source: str, kind: str) -> None:
    if dtype.kind not in "biuf":  # complex, RGB (structured), strings
        raise ValueError(
            f"{source}: {kind} has unsupported data type {dtype}; expected one intensity per voxel "
            "(integers or floats) — convert colour or complex images first"
        )


def _check_array(data: np.ndarray, source: str, *, label: bool) -> np.ndarray:
    kind = "label map" if label else "image"
    shape = _check_shape(data.shape, source, kind)
    if data.ndim > 3:
        # A 4-D file with one volume (x, y, z, 1): squeezed to 3-D.
        warnings.warn(
            f"{source}: {kind} has shape {data.shape}; squeezing the trailing singleton axes to 3-D",
            stacklevel=3,
        )
        data = data.reshape(shape)
    _check_dtype(data.dtype, source, kind)
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


def _load_nifti(path: Path):
    """``nib.load`` with every way a broken file fails turned into one ValueError naming the file."""
    try:
        return nib.load(str(path))
    except (
        nib.filebasedimages.ImageFileError,
        EOFError,
        OSError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        OverflowError,
        MemoryError,
    ) as exc:
        raise ValueError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def third_party_warnings(source: str | os.PathLike) -> Iterator[None]:
    """Re-emit the warnings that libraries (nibabel, SimpleITK / GDCM) give while reading ``source``
    as log warnings that name it; ITK writes its warnings to the process's standard error, which
    is collected for the duration."""
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        native = stack.enter_context(_native_stderr())
        yield
    seen: set[str] = set()
    for text in [str(w.message) for w in caught] + native:
        text = " ".join(text.split())
        if text and text not in seen:
            seen.add(text)
            logger.warning("%s: %s", source, text[:500])


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 (ITK's output window) while active."""
    lines: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:
        yield lines
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(1 << 16).decode("utf-8", "replace")
            # ITK's warnings span several lines: "WARNING: In <file>, line N" then the message
            lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: In ")]


def form_disagreement(img: nib.spatialimages.SpatialImage, source: str | os.PathLike) -> str | None:
    """A warning when a NIfTI header's qform and sform both apply but describe different grids
    (e.g. a left-right flip): nibabel and ITK use the sform, other tools may use the qform."""
    hdr = img.header
    if not isinstance(hdr, nib.Nifti1Header):
        return None
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    if not qcode or not scode or qform is None or sform is None:
        return None
    shape = tuple(int(n) for n in img.shape[:3])
    mm = grid_difference(shape, qform, shape, sform)[0]
    if mm <= GRID_EXACT_MM:
        return None
    q_codes, s_codes = "".join(nib.aff2axcodes(qform)), "".join(nib.aff2axcodes(sform))
    if q_codes != s_codes:
        what = f"orientation {q_codes} vs {s_codes}"
    else:
        what = f"voxel positions up to {mm:.3g} mm apart"
    return (
        f"{source}: the header's qform and sform disagree ({what}); using the sform (sform_code {int(scode)}), "
        "as nibabel and ITK do — check which is right; outputs keep both forms as they are"
    )


def _read_nifti(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    with third_party_warnings(path):
        return _read_nifti_quietly(path, label)


def _read_nifti_quietly(path: Path, label: bool) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header | None]:
    img = _load_nifti(path)
    kind = "label map" if label else "image"
    _check_shape(img.shape, str(path), kind)
    _check_dtype(img.get_data_dtype(), str(path), kind)
    form_warning = form_disagreement(img, path)
    if form_warning:
        logger.warning(form_warning)
    try:
        if label:
            data = np.asanyarray(img.dataobj)
            slope, inter = img.dataobj.slope, img.dataobj.inter
            if (slope is not None and slope != 1) or (inter is not None and inter != 0):
                data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            raw = img.dataobj
            if raw.dtype.kind == "f" and raw.dtype.itemsize > 4:
                wide = np.asarray(raw)
                _check_float32_range(wide, str(path))
                data = wide.astype(np.float32)
            else:
                data = np.asarray(raw, dtype=np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise ValueError(
            f"{path}: the file is truncated or corrupt ({type(exc).__name__}: {exc}); expected a complete NIfTI "
            "file — copy or download it again"
        ) from None
    header = img.header.copy() if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) else None
    return np.asarray(data), np.asarray(img.affine, dtype=np.float64), header


def _check_float32_range(data: np.ndarray, source: str) -> None:
    """Images are processed as float32: wider floats must fit (NaN/Inf are reported later)."""
    finite = data[np.isfinite(data)]
    if finite.size and float(np.abs(finite).max()) > _FLOAT32_MAX:
        raise ValueError(
            f"{source}: image holds values up to {float(np.abs(finite).max()):.3g}, beyond float32's "
            f"{_FLOAT32_MAX:.3g}; expected intensities (HU for CT) — fix the conversion that produced this file"
        )


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


def choose_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> tuple[str, list[str]]:
    """(series instance UID, sorted files) of the series to read from a DICOM folder.

    A folder with several series needs ``series_uid`` (``--series``); the error lists them all.
    """
    folder = Path(folder)
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
        raise ValueError(
            f"{folder}: no DICOM series {series_uid!r}; series found: {', '.join(series)} — "
            "pass one of them to --series"
        )
    return series_uid, series[series_uid]


def _check_dicom_spacing(reader, n_files: int, folder: Path) -> None:
    """Warn when the slice positions (0020,0032) of a series are not evenly spaced (missing slices)."""
    try:
        pos = np.array(
            [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n_files)]
        )
        rows = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]).reshape(2, 3)
    except (RuntimeError, ValueError):
        return  # positions or orientation not available: nothing to check
    if pos.shape != (n_files, 3) or n_files < 3:
        return
    normal = np.cross(rows[0], rows[1])
    steps = np.diff(np.sort(pos @ normal))
    median = float(np.median(steps))
    if median <= 0:
        return
    worst = float(np.abs(steps - median).max())
    if worst > DICOM_SPACING_RTOL * median:
        logger.warning(
            "%s: DICOM slice positions are not evenly spaced (steps %.3g-%.3g mm, median %.3g mm); the "
            "volume is read with uniform spacing — missing slices? Check the series is complete",
            folder,
            float(steps.min()),
            float(steps.max()),
            median,
        )


def _read_dicom(
    folder: Path, series_uid: str | None, label: bool
) -> tuple[np.ndarray, np.ndarray, str | None]:
    import SimpleITK as sitk

    _uid, files = choose_dicom_series(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with third_party_warnings(folder):
            image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(
            f"{folder}: could not read the DICOM series ({str(exc).strip().splitlines()[-1]})"
        ) from None
    _check_dicom_spacing(reader, len(files), folder)
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
        with third_party_warnings(path):
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
    vol = volume_from_array(data, affine, source=str(p), modality=modality, header=header)
    if not label:
        for message in geometry_warnings(vol):
            logger.warning(message)
    return vol


def probe_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> tuple[int, int, int]:
    """The 3-D shape of an image file or DICOM series from its header(s) only, with the checks that
    need no voxel data: the file exists and is a readable image, 3-D (or 4-D with one volume), no
    zero-length axis, and (DICOM) the series choice.

    Cheap enough to run over a whole input folder before any work starts, so that such errors stop
    a run before anything is written. Truncated data and NaN voxels are found by :func:`read_volume`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: image does not exist")
    if p.is_dir():
        import SimpleITK as sitk

        _uid, files = choose_dicom_series(p, series_uid)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            with _native_stderr():  # reported once, when the image is read
                reader.ReadImageInformation()
        except RuntimeError as exc:
            raise ValueError(
                f"{files[0]}: not a readable DICOM file ({str(exc).strip().splitlines()[-1]})"
            ) from None
        size = reader.GetSize()
        return _check_shape((size[0], size[1], len(files)), str(p), "image")  # type: ignore[return-value]
    if p.name.lower().endswith(NIFTI_SUFFIXES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once, when the file is read
            img = _load_nifti(p)
        shape, dtype = img.shape, img.get_data_dtype()
        _check_dtype(dtype, str(p), "image")
        shape = _check_shape(shape, str(p), "image")
        _check_affine(np.asarray(img.affine, dtype=np.float64), str(p))
        return shape  # type: ignore[return-value]
    if p.name.lower().endswith(ITK_SUFFIXES):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            with _native_stderr():  # reported once, when the image is read
                reader.ReadImageInformation()
        except RuntimeError as exc:
            raise ValueError(f"{p}: not a readable image ({str(exc).strip().splitlines()[-1]})") from None
        return _check_shape(tuple(reader.GetSize()), str(p), "image")  # type: ignore[return-value]
    raise ValueError(
        f"{p}: unsupported file type; expected {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder"
    )


def volume_from_array(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    source: str = "<array>",
    modality: str | None = None,
    header: nib.Nifti1Header | None = None,
) -> Volume:
    """Wrap an array in its original layout and its RAS affine as a canonical :class:`Volume`."""
    canon, canon_affine = reorient(np.asarray(data), np.asarray(affine, dtype=np.float64))
    return Volume(
        data=canon,
        affine=canon_affine,
        source=source,
        original_shape=tuple(int(s) for s in data.shape),
        original_affine=np.asarray(affine, dtype=np.float64),
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
    vol = volume_from_array(data, affine, source=source, header=header)
    if not label:
        for message in geometry_warnings(vol):
            logger.warning(message)
    return vol


def grid_difference(a_shape, a_affine, b_shape, b_affine) -> tuple[float, float]:
    """How far grid ``a`` lies from grid ``b`` (same shape): the largest distance between the two
    positions of a voxel, in mm and in voxels of ``b``, over the grid's corners (an affine map's largest
    difference on a box is at a corner). Infinite for different shapes."""
    if tuple(a_shape) != tuple(b_shape):
        return math.inf, math.inf
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, a_shape[0] - 1)
            for j in (0, a_shape[1] - 1)
            for k in (0, a_shape[2] - 1)
        ]
    ).T
    world_a = np.asarray(a_affine, dtype=np.float64) @ corners
    world_b = np.asarray(b_affine, dtype=np.float64) @ corners
    mm = float(np.max(np.linalg.norm(world_a[:3] - world_b[:3], axis=0)))
    try:
        in_b = np.linalg.inv(np.asarray(b_affine, dtype=np.float64)) @ world_a
    except np.linalg.LinAlgError:
        return mm, math.inf
    voxels = float(np.max(np.abs(in_b[:3] - corners[:3])))
    return mm, voxels


def same_grid(a_shape, a_affine, b_shape, b_affine) -> bool:
    """True when two (canonical) grids coincide in shape and voxel-to-world transform up to float32
    storage (:data:`GRID_EXACT_MM`)."""
    return grid_difference(a_shape, a_affine, b_shape, b_affine)[0] <= GRID_EXACT_MM


def describe_grid(vol: Volume) -> str:
    origin = vol.original_affine[:3, 3]
    return (
        f"shape {vol.original_shape}, spacing {tuple(round(s, 4) for s in vol.spacing)} mm, "
        f"orientation {''.join(vol.axcodes)}, origin {tuple(round(float(o), 2) for o in origin)}"
    )


def check_same_grid(vol: Volume, reference: Volume, case: str | None = None) -> None:
    """Raise unless ``vol`` covers ``reference``'s voxel grid (up to axis order and direction).

    Both are in the canonical frame, so a label stored with flipped or permuted axes relative to its
    image passes and is then aligned voxel for voxel by physical position, never by array index.
    Headers that differ by float noise (every voxel within :data:`GRID_NOISE_VOXELS` of a voxel of
    its position in ``reference``) are accepted with a warning naming ``case`` and the difference;
    anything more (a shifted, rescaled or rotated grid) is an error.
    """
    mm, voxels = grid_difference(vol.shape, vol.affine, reference.shape, reference.affine)
    if mm <= GRID_EXACT_MM:
        return
    if voxels <= GRID_NOISE_VOXELS:
        logger.warning(
            "%s%s: header differs from %s by float noise (voxel positions up to %.3g mm apart, %.3g "
            "voxel); accepted as the same grid",
            f"case {case}: " if case else "",
            vol.source,
            reference.source,
            mm,
            voxels,
        )
        return
    far = f" (voxel positions up to {mm:.3g} mm, {voxels:.3g} voxel apart)" if math.isfinite(mm) else ""
    raise ValueError(
        f"{f'case {case}: ' if case else ''}{vol.source}: geometry does not match {reference.source}{far}: "
        f"{describe_grid(vol)} vs {describe_grid(reference)}; expected the same voxel grid (resample one "
        "onto the other first)"
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
    img = nib.Nifti1Image(
        data, np.asarray(affine, dtype=np.float64), header=header, dtype=None if header else data.dtype
    )
    img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    img.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    if isinstance(header, nib.Nifti1Header):
        # the header of the input this file is "like": where its sform is this grid, its qform is kept
        # as it was, even when it disagrees (form_disagreement warned about it on reading)
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        if qcode and scode and qform is not None and np.allclose(sform, affine, atol=1e-6, rtol=0):
            img.set_qform(qform, code=int(qcode))
    suffix = ".nii.gz" if p.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(p, suffix=suffix) as tmp:
        nib.save(img, str(tmp))


def write_like(path: str | os.PathLike, canonical: np.ndarray, reference: Volume, dtype=np.uint8) -> None:
    """Write a canonical-frame array in ``reference``'s original layout, shape and affine."""
    data = reference.to_original(np.asarray(canonical)).astype(dtype, copy=False)
    write_nifti(path, data, reference.original_affine, header=nifti_header_for(reference, np.dtype(dtype)))


def write_itk_like(
    path: str | os.PathLike,
    canonical: np.ndarray,
    reference: Volume,
    metadata: dict[str, str] | None = None,
    dtype=np.uint8,
) -> None:
    """Write a canonical-frame array with SimpleITK (format from the suffix: ``.nrrd``, ``.mha``) in
    ``reference``'s original layout and geometry (LPS direction, origin and spacing from its affine),
    with ``metadata`` as the header's key/value fields; compressed, atomically."""
    import SimpleITK as sitk

    data = reference.to_original(np.asarray(canonical)).astype(dtype, copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    lps = _LPS_TO_RAS @ np.asarray(reference.original_affine, dtype=np.float64)  # its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    name = Path(path).name.lower()
    suffix = next((s for s in ITK_SUFFIXES if name.endswith(s)), "")
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def axial_spacing_ratio(vol: Volume) -> float:
    """Slice thickness divided by in-plane spacing (extreme anisotropy check)."""
    sx, sy, sz = vol.spacing
    return sz / min(sx, sy)


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and the patient axis closest to it (0 = not oblique)."""
    return float(np.degrees(np.max(np.abs(nib.affines.obliquity(np.asarray(affine, dtype=np.float64))))))


def geometry_warnings(vol: Volume) -> list[str]:
    """Geometry an image can be segmented with, but that deserves a warning (one message each).

    * Oblique acquisition (voxel axes rotated more than :data:`OBLIQUE_WARN_DEG` from the patient
      axes): the volume is used in the closest canonical frame (exact permutation / flips, no
      resampling), so "axial" slices are tilted by that angle.
    * Extreme anisotropy (slices thicker than :data:`ANISOTROPY_WARN_RATIO` × the in-plane spacing,
      or than :data:`THICK_SLICE_WARN_MM`): a window of adjacent slices spans a large distance.
    """
    out = []
    angle = obliquity_deg(vol.affine)
    if angle > OBLIQUE_WARN_DEG:
        out.append(
            f"{vol.source}: oblique acquisition, voxel axes rotated {angle:.1f}° from the patient axes "
            f"(orientation {''.join(vol.axcodes)}); it is segmented in the closest axial frame, so slices are "
            f"tilted by {angle:.1f}° — resample to an axial grid first if that matters"
        )
    sx, sy, sz = vol.spacing
    ratio = axial_spacing_ratio(vol)
    if ratio > ANISOTROPY_WARN_RATIO or sz > THICK_SLICE_WARN_MM:
        out.append(
            f"{vol.source}: extreme anisotropy, slice thickness {sz:.3g} mm vs in-plane spacing "
            f"{sx:.3g} × {sy:.3g} mm (ratio {ratio:.1f}); adjacent-slice context spans "
            f"{sz:.3g} mm per neighbour — expect lower accuracy than on thin slices"
        )
    return out
