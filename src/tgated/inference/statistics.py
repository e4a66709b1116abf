"""Organ statistics of a label map on its image: volume, intensity, extent, fragmentation.

Per organ (``tgated predict --statistics``, ``tgated.segment(..., statistics=True)``):

* ``voxels``: voxel count; ``volume_ml`` = ``voxels`` × ``voxel_volume_ml``, where the voxel volume is
  |det| of the header's voxel-to-world matrix (the product of the spacings for an orthogonal grid), in
  ml (1 ml = 1000 mm³);
* ``mean``, ``sd`` (population, ddof = 0), ``p5``, ``p95`` (numpy's linear interpolation) of the
  input's intensity inside the organ, in the input's units (HU for CT, as stored for MR);
* ``slices``: the first and last slice (0-based, inclusive) holding the organ, counted along the
  input file's own axial axis (``axial_axis``: the voxel axis closest to inferior-superior), so
  that they match a viewer's slice numbers;
* ``largest_component_share``: voxels of the largest 26-connected component / ``voxels``; 1.0 for a
  compact organ, lower when the prediction is scattered (a quick plausibility signal).

An organ with no voxel has ``voxels`` 0, ``volume_ml`` 0.0 and ``null`` for the rest.

Files: ``<case>_statistics.json`` (:func:`case_statistics`) per case and ``statistics.csv``
(:data:`CSV_COLUMNS`, one row per case and organ) per output folder (:mod:`tgated.inference.outputs`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from tgated.io.volumes import Volume
from tgated.organs import Organ

CSV_COLUMNS = (
    "case",
    "organ",
    "voxels",
    "volume_ml",
    "mean",
    "sd",
    "p5",
    "p95",
    "slice_first",
    "slice_last",
    "largest_component_share",
)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml from a voxel-to-world (mm) affine."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis of an affine that runs closest to inferior-superior."""
    return int(next(i for i, c in enumerate(nib.aff2axcodes(affine)) if c in ("S", "I")))


def _largest_component_share(mask: np.ndarray) -> float:
    from scipy import ndimage

    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 1:
        return 1.0
    sizes = np.bincount(comps.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def organ_statistics(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, organs: Sequence[Organ]
) -> dict[str, dict[str, Any]]:
    """Statistics (module docstring) of each organ in ``labels`` (canonical ids), over ``image``.

    ``image`` and ``labels`` share one voxel layout, and ``affine`` maps it to world mm; pass the input
    file's own layout and affine so that slice numbers are the file's. Each organ is measured inside
    its bounding box (one pass over the label map finds them all).
    """
    from scipy import ndimage

    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} and label map shape {labels.shape} differ")
    labels = np.asarray(labels, dtype=np.uint8)
    voxel_ml = voxel_volume_ml(affine)
    axis = axial_axis(affine)
    other = tuple(i for i in range(3) if i != axis)
    boxes = ndimage.find_objects(labels)
    out: dict[str, dict[str, Any]] = {}
    for organ in organs:
        box = boxes[organ.id - 1] if organ.id <= len(boxes) else None
        if box is None:
            out[organ.name] = {"voxels": 0, "volume_ml": 0.0}
            out[organ.name].update(
                dict.fromkeys(("mean", "sd", "p5", "p95", "slices", "largest_component_share"))
            )
            continue
        mask = labels[box] == organ.id
        n = int(mask.sum())
        values = np.asarray(image[box][mask], dtype=np.float64)
        p5, p95 = np.percentile(values, [5, 95])
        present = np.nonzero(mask.any(axis=other))[0] + box[axis].start
        out[organ.name] = {
            "voxels": n,
            "volume_ml": n * voxel_ml,
            "mean": float(values.mean()),
            "sd": float(values.std()),
            "p5": float(p5),
            "p95": float(p95),
            "slices": [int(present[0]), int(present[-1])],
            "largest_component_share": _largest_component_share(mask),
        }
    return out


def intensity_unit(modality: str | None) -> str:
    return "HU" if modality == "ct" else "input units"


def case_statistics(
    volume: Volume,
    labels: np.ndarray,
    organs: Sequence[Organ],
    *,
    case_id: str,
    modality: str | None,
) -> dict[str, Any]:
    """The ``<case>_statistics.json`` document of a case: ``labels`` is the canonical-frame label map
    of ``volume`` (as the predictor returns it); statistics are computed in the input's own layout."""
    image = volume.to_original(volume.data)
    original = volume.to_original(np.asarray(labels))
    affine = volume.original_affine
    return {
        "case": case_id,
        "input": volume.source,
        "modality": modality,
        "intensity_unit": intensity_unit(modality),
        "shape": [int(s) for s in original.shape],
        "spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "voxel_volume_ml": voxel_volume_ml(affine),
        "axial_axis": axial_axis(affine),
        "connectivity": 26,
        "organs": organ_statistics(image, original, affine, organs),
    }


def statistics_csv(documents: Iterable[Mapping[str, Any]]) -> str:
    """``statistics.csv``: one row per case and organ (:data:`CSV_COLUMNS`); empty cells for the
    values of an organ with no voxel."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for doc in sorted(documents, key=lambda d: str(d.get("case"))):
        for organ, s in (doc.get("organs") or {}).items():
            first, last = s.get("slices") or (None, None)
            row = [doc.get("case"), organ, s.get("voxels"), s.get("volume_ml")]
            row += [s.get(k) for k in ("mean", "sd", "p5", "p95")]
            row += [first, last, s.get("largest_component_share")]
            writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()
