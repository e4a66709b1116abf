"""Per-organ probabilities of a volume, staged on disk slice by slice and written organ by organ.

``tgated predict --save-probabilities`` writes ``<case>_probs.npz``: one float16 array per organ
(key: the organ's name) in the input's own voxel layout, and ``affine`` (the input's affine), the
archive that ``numpy.savez_compressed`` writes. For a 512 × 512 × 300 CT the 13 organs'
probabilities are 2 GB of float16, more than the volume and the model together, so they are never
held in memory as a whole:

* the predictor puts the native-resolution probabilities of each few slices into a
  :class:`ProbabilityMaps`, a scratch file (:class:`tgated.io.files.ScratchFile`) laid out as
  (organs, Z, H, W) float16 axial slices, next to the ``.npz`` they are for;
* :func:`write_probabilities` reads one organ at a time back, lays it out as the input
  (:meth:`tgated.io.volumes.Volume.to_original`) and streams it into the archive.

Memory: one organ's volume in float16, a few times (read back, laid out as the input) while it is
written.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tgated.data.slices import from_axial_slices
from tgated.io.files import ScratchFile, atomic_path
from tgated.io.volumes import Volume
from tgated.organs import Organ

WRITE_BYTES_PER_VOXEL = 2 * 3
"""Host memory per voxel while the probabilities are written: one organ's float16 values, read back,
turned to the canonical frame and laid out as the input."""


class ProbabilityMaps:
    """(O, X, Y, Z) float16 probabilities of ``organs`` on a volume's canonical grid ``shape``
    (X, Y, Z), held in a scratch file.

    ``path``: the file they will be written to (``<case>_probs.npz``); the scratch file is one of its
    hidden temporaries, in its folder (default: the system's temporary folder). :meth:`close` removes
    it; use the object as a context manager, or close it once the probabilities are written.
    ``np.asarray(maps)`` reads all of them (for small volumes); :meth:`organ` reads one.
    """

    dtype = np.dtype(np.float16)

    def __init__(
        self, organs: Sequence[Organ], shape: tuple[int, int, int], path: str | os.PathLike | None = None
    ) -> None:
        self.organs = tuple(organs)
        x, y, z = (int(v) for v in shape)
        self.shape = (len(self.organs), x, y, z)
        self._slice = y * x  # values per axial slice (H = Y, W = X)
        target = Path(path) if path is not None else Path(tempfile.gettempdir()) / "tgated_probs.npz"
        size = len(self.organs) * z * self._slice * self.dtype.itemsize
        self._file = ScratchFile(target, size, suffix=".f16")

    def __len__(self) -> int:
        return len(self.organs)

    def _offset(self, organ: int, z: int) -> int:
        return (organ * self.shape[3] + z) * self._slice * self.dtype.itemsize

    def put(self, z: Sequence[int], block: torch.Tensor | np.ndarray) -> None:
        """Store the (N, O, H, W) probabilities of axial slices ``z`` (N indices, in the block's
        order), rounded to float16 as :meth:`torch.Tensor.half` does."""
        z = [int(v) for v in z]
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(block)
        expect = (len(z), self.shape[0], self.shape[2], self.shape[1])
        if tuple(block.shape) != expect:
            raise ValueError(f"probabilities of shape {tuple(block.shape)}; expected {expect} (N, O, H, W)")
        if any(not 0 <= v < self.shape[3] for v in z):
            raise ValueError(f"slice indices {z} outside 0..{self.shape[3] - 1}")
        values = block.to(torch.float16).numpy()
        runs, first = [], 0  # runs of consecutive slices are contiguous in the file
        for i in range(1, len(z) + 1):
            if i == len(z) or z[i] != z[i - 1] + 1:
                runs.append((first, i))
                first = i
        for o in range(self.shape[0]):
            for a, b in runs:
                self._file.write(self._offset(o, z[a]), np.ascontiguousarray(values[a:b, o]))

    def organ(self, index: int) -> np.ndarray:
        """The (X, Y, Z) float16 probabilities of ``organs[index]``, canonical frame (a view of its
        axial slices, read from the scratch file)."""
        slices = np.empty((self.shape[3], self.shape[2], self.shape[1]), self.dtype)
        self._file.read_into(self._offset(index, 0), slices)
        return from_axial_slices(slices)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if not len(self):
            return np.empty(self.shape, dtype or self.dtype)
        out = np.stack([self.organ(i) for i in range(len(self))])
        return out if dtype is None else out.astype(dtype, copy=False)

    def close(self) -> None:
        """Remove the scratch file."""
        self._file.close()

    def __enter__(self) -> ProbabilityMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WRITE_CHUNK_BYTES = 1 << 20
"""Bytes handed to the compressor at once (``numpy.lib.format.write_array`` would copy the array twice)."""


def _write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    """``name.npy`` in ``archive``, byte for byte what ``numpy.savez_compressed`` writes for a
    C-ordered array (format 1.0 header, then the data), streamed in chunks without copies."""
    array = np.ascontiguousarray(array)
    with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(array))
        flat = memoryview(array.reshape(-1)).cast("B")
        for start in range(0, flat.nbytes, WRITE_CHUNK_BYTES):
            fh.write(flat[start : start + WRITE_CHUNK_BYTES])


def write_probabilities(path: str | os.PathLike, maps: ProbabilityMaps, volume: Volume) -> None:
    """``<case>_probs.npz``: one float16 array per organ (keys = organ names, in ``maps.organs``
    order) in ``volume``'s original layout, then ``affine`` (its original affine); written atomically,
    one organ in memory at a time."""
    with (
        atomic_path(path, suffix=".npz") as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive,
    ):
        for i, o in enumerate(maps.organs):
            _write_member(archive, o.name, volume.to_original(maps.organ(i)))
        _write_member(archive, "affine", volume.original_affine)


__all__ = ["WRITE_BYTES_PER_VOXEL", "ProbabilityMaps", "write_probabilities"]
