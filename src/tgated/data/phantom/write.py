"""Phantom datasets on disk: synthetic cases written in a dataset layout (:mod:`tgated.data.layouts`),
each in its own storage orientation, with the dataset's own label ids.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from tgated.data.layouts import NIFTI, TOTALSEG_IMAGES, TOTALSEG_MASKS, Layout, get_layout
from tgated.data.phantom.render import MIN_SIZE, Phantom, check_int, check_modality, make_phantom
from tgated.organs import ORGAN_BY_NAME, ORGANS, TOTALSEG_STRUCTURES

logger = logging.getLogger(__name__)


def _case_files(layout: Layout, out: Path, index: int, modality: str) -> tuple[str, Path, dict[str, Path]]:
    """(case id, image path, {label key: path}) of case ``index`` (0-based) in ``layout``."""
    cid = layout.phantom_case_id(index, modality)
    if layout.label_source == "structures":
        folder = out / cid
        image = folder / f"{TOTALSEG_IMAGES[modality]}{NIFTI}"
        return cid, image, {s: folder / TOTALSEG_MASKS / f"{s}{NIFTI}" for s in TOTALSEG_STRUCTURES}
    img_dir, lab_dir = layout.folders[0]
    return cid, out / img_dir / layout.image_name(cid), {"labels": out / lab_dir / layout.label_name(cid)}


def _dataset_labels(layout: Layout, phantom: Phantom) -> dict[str, np.ndarray]:
    """The label arrays (canonical frame) a layout stores for one case, by label key."""
    lab = phantom.labels
    if layout.label_source == "structures":
        return {s: (lab == ORGAN_BY_NAME[name].id).astype(np.uint8) for s, name in TOTALSEG_STRUCTURES.items()}
    lut = np.zeros(256, dtype=np.uint8)
    for canon, ds in layout.canonical_to_dataset().items():
        lut[canon] = ds
    out = lut[lab]
    others = phantom.other_labels()
    for ds_id, name in layout.other_labels.items():
        if name in others:
            out[others[name]] = ds_id
    return {"labels": out}


def write_dataset(
    out: str | os.PathLike,
    *,
    cases: int,
    seed: int = 0,
    layout: str = "flare22",
    modality: str = "ct",
    size: int = 128,
    overwrite: bool = False,
    quiet: bool = False,
) -> list[str]:
    """Write ``cases`` synthetic cases in a dataset layout; returns the case ids written.

    ``layout`` is a name of :data:`tgated.data.layouts.LAYOUTS`: files are named and labels written
    as that dataset does (its own label ids; BTCV's portal/splenic vein as its id 10; MR cases of
    AMOS numbered above its MR threshold; nnU-Net with a ``dataset.json``; TotalSegmentator one
    binary mask per structure); case ids are the layout's :meth:`~tgated.data.layouts.Layout.phantom_case_id`.
    Images are int16 (HU for CT), labels uint8; each case is stored in its own orientation (:data:`ORIENTATIONS`) with a
    non-trivial origin. Case ``i`` is ``make_phantom(seed, case=i, ...)`` whatever ``cases`` is.

    Existing case files are an error unless ``overwrite``.
    """
    from tgated.io.files import atomic_write_json
    from tgated.io.volumes import reorient, write_nifti
    from tgated.progress import progress

    cases = check_int("cases", cases, 1, "write at least one case")
    seed = check_int("seed", seed, 0, "use a non-negative random seed")
    size = check_int("size", size, MIN_SIZE, f"use an in-plane size of at least {MIN_SIZE} voxels")
    spec = get_layout(layout)
    modality = check_modality(modality)
    if spec.mr_above is not None and modality == "ct" and cases > spec.mr_above:
        raise ValueError(
            f"{spec.name} layout: {cases} CT cases would need ids above {spec.mr_above}, which {spec.name} "
            f"reserves for MR; write at most {spec.mr_above} CT cases"
        )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder; expected an output folder")
    plan = [_case_files(spec, root, i, modality) for i in range(cases)]
    extra = [root / "dataset.json"] if spec.label_source == "dataset.json" else []
    if not overwrite:
        targets = [p for _, image, labels in plan for p in (image, *labels.values())] + extra
        existing = [p for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"{existing[0]}: already exists ({len(existing)} of the {len(targets)} files to write do); "
                "pass overwrite=True (--overwrite) to replace them, or choose another output folder"
            )
    written: list[str] = []
    for i, (cid, image_path, label_paths) in enumerate(progress(plan, desc="phantoms", unit="case", quiet=quiet)):
        ph = make_phantom(seed, case=i, modality=modality, size=size)
        img = ph.image.astype(np.int16)
        data, aff = reorient(img, ph.affine, ph.orientation)
        write_nifti(image_path, data, aff)
        for key, arr in _dataset_labels(spec, ph).items():
            lab, _ = reorient(arr.astype(np.uint8), ph.affine, ph.orientation)
            write_nifti(label_paths[key], lab, aff)
        written.append(cid)
    if spec.label_source == "dataset.json":
        atomic_write_json(
            root / "dataset.json",
            {
                "name": "phantom",
                "channel_names": {"0": "CT" if modality == "ct" else "MRI"},
                "labels": {"background": 0, **{o.name: o.id for o in ORGANS}},
                "numTraining": cases,
                "file_ending": ".nii.gz",
            },
        )
    logger.info("wrote %d %s phantom case(s) in the %s layout to %s", cases, modality.upper(), layout, root)
    return written

