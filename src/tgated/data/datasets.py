"""Case discovery through the layout registry, label harmonisation to canonical ids, and splits
(docs/architecture.md, Organs and dataset layouts).

Where each layout keeps its files, how case ids map to file names, which modality a case is and how
label values map to canonical ids are entries of :mod:`tgated.data.layouts`; this module finds the
cases of a dataset root by those entries. A **case id** is the image file's name without extension
and without a ``_0000`` channel suffix (totalseg: the subject folder's name); predictions are named
``<case id>.nii.gz``.

Two kinds of "missing" are kept apart: :attr:`Case.labelled` lists the organs the dataset labels
(anything else is *excluded*, never a negative); an organ in that list that has no voxels in a case
is a real negative.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tgated import organs as O
from tgated.data.layouts import (
    CHANNEL_SUFFIX,
    TOTALSEG_IMAGES,
    TOTALSEG_MASKS,
    TOTALSEG_MULTILABEL,
    Layout,
    get_layout,
)
from tgated.io.files import atomic_write_json, read_json, safe_name
from tgated.io.volumes import Volume, check_same_grid, read_volume, strip_suffix

logger = logging.getLogger(__name__)

NIFTI_GLOB = ("*.nii.gz", "*.nii")

# Names under which datasets (nnU-Net dataset.json) commonly call our organs.
_ALIASES: dict[str, str] = {
    **{o.name: o.name for o in O.ORGANS},
    **{o.prompt.replace(" ", "_"): o.name for o in O.ORGANS},
    **O.TOTALSEG_STRUCTURES,
    "gall_bladder": "gallbladder",
    "ivc": "inferior_vena_cava",
    "postcava": "inferior_vena_cava",
    "vena_cava_inferior": "inferior_vena_cava",
    "kidney_r": "right_kidney",
    "kidney_l": "left_kidney",
    "right_adrenal": "right_adrenal_gland",
    "left_adrenal": "left_adrenal_gland",
    "adrenal_right": "right_adrenal_gland",
    "adrenal_left": "left_adrenal_gland",
    "oesophagus": "esophagus",
}


@dataclass(frozen=True)
class Case:
    """One case of a dataset: where its files are and how its labels map to canonical ids."""

    case_id: str
    image: Path | None
    label: Path | None = None
    label_files: dict[str, Path] = field(default_factory=dict, hash=False)
    """totalseg per-structure layout: canonical organ name -> binary mask file."""
    layout: str = ""
    """Name of the dataset layout (:data:`tgated.data.layouts.LAYOUTS`) the case was found in."""
    modality: str | None = None
    """"ct", "mr", or None when the layout does not say."""
    label_map: dict[int, int] = field(default_factory=dict, hash=False)
    """Dataset label id -> canonical id (known non-organ ids map to background)."""
    labelled: tuple[str, ...] = ()
    """Canonical names of the organs labelled for this case (others are excluded, never negatives)."""
    strict_labels: bool = True
    """Label values outside ``label_map`` are errors (False for TotalSegmentator multilabel files)."""

    @property
    def has_labels(self) -> bool:
        return self.label is not None or bool(self.label_files)


def case_id_from_path(path: str | os.PathLike) -> str:
    """``FLARE22_Tr_0001_0000.nii.gz`` -> ``FLARE22_Tr_0001``; ``img0001.nii.gz`` -> ``img0001``."""
    name = strip_suffix(Path(path).name)
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def _nifti_files(folder: Path) -> list[Path]:
    files = {
        p
        for pattern in NIFTI_GLOB
        for p in folder.glob(pattern)
        if p.is_file() and not p.name.startswith(".")
    }
    return sorted(files)


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: {what} is not a folder")
    return path


def check_layout(layout: str) -> str:
    return get_layout(layout).name


def _modality_from_name(name: str) -> str | None:
    n = name.strip().lower()
    if n in ("ct", "cect", "ncct"):
        return "ct"
    if n in ("mr", "mri", "t1", "t2", "t1w", "t2w", "dwi", "adc", "flair") or n.startswith(
        ("mr", "t1", "t2")
    ):
        return "mr"
    return None


def _pair(
    images: list[Path],
    label_for: dict[str, Path],
    *,
    layout: str,
    need_labels: bool,
    make_case,
    label_dir: Path,
) -> list[Case]:
    cases = []
    missing = []
    for img in images:
        cid = case_id_from_path(img)
        lab = label_for.get(cid)
        if lab is None and need_labels:
            missing.append(img.name)
            continue
        cases.append(make_case(cid, img, lab))
    if missing:
        raise FileNotFoundError(
            f"{label_dir}: no label file for {len(missing)} image(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); expected the {layout} layout's label names — "
            "add the labels or remove those images"
        )
    return cases


def _orphan_check(label_ids: Iterable[str], image_ids: Iterable[str], label_dir: Path) -> None:
    orphans = sorted(set(label_ids) - set(image_ids))
    if orphans:
        raise FileNotFoundError(
            f"{label_dir}: {len(orphans)} label file(s) without an image ({', '.join(orphans[:5])}"
            f"{', ...' if len(orphans) > 5 else ''}); every label needs its image"
        )


def _case_maker(layout: Layout):
    """``make(case id, image, label) -> Case`` for a layout whose labels follow its table."""
    mapping = layout.label_map()
    labelled = layout.labelled_organs()

    def make(cid: str, img: Path | None, lab: Path | None) -> Case:
        return Case(
            cid, img, lab, layout=layout.name, modality=layout.modality_of(cid), label_map=mapping, labelled=labelled
        )

    return make


def _layout_images(img_dir: Path, layout: Layout) -> list[Path]:
    """The image files of a folder; with a channel suffix, files without it are ignored (logged)."""
    files = _nifti_files(img_dir)
    if not layout.channel_suffix:
        return files
    images = [p for p in files if strip_suffix(p.name).endswith(layout.channel_suffix)]
    others = [p.name for p in files if not strip_suffix(p.name).endswith(layout.channel_suffix)]
    if others:
        logger.warning(
            "%s: ignoring %d files without the %s channel suffix (e.g. %s)",
            img_dir,
            len(others),
            layout.channel_suffix,
            others[0],
        )
    return images


def _discover_folders(root: Path, layout: Layout, make, need_images: bool, need_labels: bool) -> list[Case]:
    """Cases of a layout that keeps images and labels in (image folder, label folder) pairs."""
    cases: list[Case] = []
    found = False
    for img_name, lab_name in layout.folders:
        img_dir, lab_dir = root / img_name, root / lab_name
        labels = (
            {layout.case_id_of_label(strip_suffix(p.name)): p for p in _nifti_files(lab_dir)}
            if lab_dir.is_dir()
            else {}
        )
        if not need_images:
            if lab_dir.is_dir():
                found = True
                cases += [make(cid, None, p) for cid, p in sorted(labels.items())]
            continue
        if not img_dir.is_dir():
            continue
        if need_labels and not lab_dir.is_dir():
            if img_name in layout.unlabelled_folders:
                continue
            _require_dir(lab_dir, f"{layout.name} label folder ({layout.labels})")
        found = True
        part = _pair(
            _layout_images(img_dir, layout),
            labels,
            layout=layout.name,
            need_labels=need_labels,
            make_case=make,
            label_dir=lab_dir,
        )
        if need_labels:
            _orphan_check(labels, [c.case_id for c in part], lab_dir)
        cases += part
    if not found:
        img_name, lab_name = layout.folders[0]
        if need_images:
            _require_dir(root / img_name, f"{layout.name} image folder ({layout.images})")
        _require_dir(root / lab_name, f"{layout.name} label folder ({layout.labels})")
    return cases


def nnunet_label_names(dataset_json: Path) -> tuple[dict[int, int], tuple[str, ...], str | None, str]:
    """Read an nnU-Net ``dataset.json``: (label map to canonical ids, labelled organs, modality, file ending).

    Labels whose names are not our organs map to background (and are not "labelled").
    """
    meta = read_json(dataset_json)
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f"{dataset_json}: no 'labels' entry; expected an nnU-Net dataset.json")
    raw = meta["labels"]
    pairs: list[tuple[str, int]] = []
    for k, v in raw.items():
        if isinstance(v, (list, tuple)):
            raise ValueError(
                f"{dataset_json}: label {k!r} is a region {v}; region-based labels are not supported"
            )
        if str(k).lstrip("-").isdigit():  # nnU-Net v1: {"0": "background", "1": "liver"}
            pairs.append((str(v), int(k)))
        else:  # v2: {"background": 0, "liver": 1}
            pairs.append((str(k), int(v)))
    mapping = {0: 0}
    labelled = []
    unknown = []
    for name, ds_id in pairs:
        if ds_id == 0:
            continue
        canon = _ALIASES.get(name.strip().lower().replace(" ", "_").replace("-", "_"))
        if canon is None:
            mapping[ds_id] = O.BACKGROUND
            unknown.append(name)
        else:
            mapping[ds_id] = O.ORGAN_BY_NAME[canon].id
            labelled.append(canon)
    if unknown:
        logger.info("%s: labels %s are not among our organs; read as background", dataset_json, unknown)
    channels = meta.get("channel_names") or meta.get("modality") or {}
    modality = _modality_from_name(str(channels.get("0", ""))) if isinstance(channels, dict) else None
    ending = str(meta.get("file_ending", ".nii.gz"))
    order = {n: i for i, n in enumerate(O.ORGAN_NAMES)}
    return mapping, tuple(sorted(set(labelled), key=order.__getitem__)), modality, ending


def _discover_nnunet(root: Path, layout: Layout, need_images: bool, need_labels: bool) -> list[Case]:
    ds_json = root / "dataset.json"
    if not ds_json.is_file():
        raise FileNotFoundError(f"{ds_json}: nnU-Net dataset.json does not exist; the nnunet layout needs it")
    mapping, labelled, modality, _ending = nnunet_label_names(ds_json)

    def make(cid: str, img: Path | None, lab: Path | None) -> Case:
        return Case(cid, img, lab, layout=layout.name, modality=modality, label_map=mapping, labelled=labelled)

    return _discover_folders(root, layout, make, need_images, need_labels)


def _discover_totalseg(
    root: Path, layout: Layout, need_images: bool, need_labels: bool, task: str | None
) -> list[Case]:
    if task is not None:
        O.check_totalseg_task(task)
    cases = []
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    order = {n: i for i, n in enumerate(O.ORGAN_NAMES)}
    image_names = {f"{stem}{ext}": mod for ext in (".nii.gz", ".nii") for mod, stem in TOTALSEG_IMAGES.items()}
    for subj in subjects:
        image = next((subj / n for n in image_names if (subj / n).is_file()), None)
        modality = None if image is None else image_names[image.name]
        if image is None:
            if need_images:
                continue
            modality = "mr" if task == "total_mr" else ("ct" if task == "total" else None)
        multi = subj / TOTALSEG_MULTILABEL
        seg_dir = subj / TOTALSEG_MASKS
        if task is not None:
            if not multi.is_file():
                if need_labels:
                    raise FileNotFoundError(
                        f"{multi}: multilabel segmentation does not exist; with --totalseg-task each case needs "
                        f"{TOTALSEG_MULTILABEL} (or omit the task to read segmentations/<structure>.nii.gz)"
                    )
                multi = None
            labelled = O.ORGAN_NAMES if multi is not None else ()
            mapping = O.totalseg_label_map(task)
            cases.append(
                Case(
                    subj.name,
                    image,
                    multi,
                    layout=layout.name,
                    modality=modality,
                    label_map={0: 0, **mapping},
                    labelled=labelled,
                    strict_labels=False,
                )
            )
            continue
        files = {}
        if seg_dir.is_dir():
            for structure, organ in O.TOTALSEG_STRUCTURES.items():
                for ext in (".nii.gz", ".nii"):
                    f = seg_dir / f"{structure}{ext}"
                    if f.is_file():
                        files[organ] = f
                        break
        if not files and need_labels:
            if multi.is_file():
                raise ValueError(
                    f"{multi}: a multilabel file needs an explicit TotalSegmentator task "
                    f"(--totalseg-task / data.totalseg_task: {', '.join(O.TOTALSEG_TASKS)}); ids differ between tasks"
                )
            raise FileNotFoundError(
                f"{seg_dir}: no <structure>.nii.gz masks of our organs; expected TotalSegmentator output"
            )
        labelled = tuple(sorted(files, key=order.__getitem__))
        cases.append(
            Case(
                subj.name,
                image,
                None,
                label_files=dict(sorted(files.items(), key=lambda kv: order[kv[0]])),
                layout=layout.name,
                modality=modality,
                label_map={0: 0, **{O.ORGAN_BY_NAME[n].id: O.ORGAN_BY_NAME[n].id for n in files}},
                labelled=labelled,
            )
        )
    return cases


def _discover_given_labels(
    root: Path, layout: Layout, labels_dir: Path | None, need_images: bool, need_labels: bool
) -> list[Case]:
    make = _case_maker(layout)
    if not need_images:
        # ``root`` is the label folder.
        return [make(case_id_from_path(p), None, p) for p in _nifti_files(root)]
    img_dir = root
    img_name, lab_name = layout.folders[0]
    if labels_dir is None and (root / img_name).is_dir():
        img_dir, labels_dir = root / img_name, root / lab_name
    if need_labels and labels_dir is None:
        raise ValueError(
            f"{root}: the {layout.name} layout needs a label folder (data.labels), or {img_name}/ and "
            f"{lab_name}/ inside it"
        )
    labels = {}
    if labels_dir is not None:
        if need_labels:
            _require_dir(labels_dir, "label folder")
        if labels_dir.is_dir():
            labels = {case_id_from_path(p): p for p in _nifti_files(labels_dir)}
    cases = _pair(
        _nifti_files(img_dir),
        labels,
        layout=layout.name,
        need_labels=need_labels,
        make_case=make,
        label_dir=labels_dir or root,
    )
    if need_labels and labels_dir is not None:
        _orphan_check(labels, [c.case_id for c in cases], labels_dir)
    return cases


def discover(
    root: str | os.PathLike,
    layout: str,
    *,
    labels: str | os.PathLike | None = None,
    totalseg_task: str | None = None,
    need_images: bool = True,
    need_labels: bool = True,
) -> list[Case]:
    """Find the cases of a dataset in ``layout`` under ``root``, sorted by case id.

    ``need_labels`` makes an image without its label an error; ``need_images=False`` searches
    labels only (evaluation). ``labels`` is the label folder of the ``folder`` layout.
    """
    spec = get_layout(layout)
    root_p = _require_dir(Path(root), f"{layout} dataset folder")
    lab = Path(labels) if labels else None
    if spec.label_source == "dataset.json":
        cases = _discover_nnunet(root_p, spec, need_images, need_labels)
    elif spec.label_source == "structures":
        cases = _discover_totalseg(root_p, spec, need_images, need_labels, totalseg_task or None)
    elif spec.labels_given:
        cases = _discover_given_labels(root_p, spec, lab, need_images, need_labels)
    else:
        cases = _discover_folders(root_p, spec, _case_maker(spec), need_images, need_labels)
    if not cases:
        raise FileNotFoundError(
            f"{root_p}: no cases found for the {layout} layout; see `tgated evaluate --help` / README"
        )
    for c in cases:  # case ids name output files: each must be a plain file name
        safe_name(c.case_id, what="case id", source=c.image or c.label or root_p)
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{root_p}: case ids occur more than once: {dupes[:5]}; case ids must be unique")
    return sorted(cases, key=lambda c: c.case_id)


def ground_truth_cases(gt: str | os.PathLike, layout: str, *, totalseg_task: str | None = None) -> list[Case]:
    """Label-only cases for evaluation: ``gt`` is the dataset root (the label folder for ``folder``)."""
    return discover(gt, layout, totalseg_task=totalseg_task, need_images=False, need_labels=True)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_label(case: Case, reference: Volume | None = None) -> Volume:
    """The case's label map in canonical ids and the canonical RAS frame (uint8).

    With ``reference`` (the image), the label's grid is checked against it; a label stored with other
    axis order or direction is aligned by physical position.
    """
    if case.label is not None:
        lab = read_volume(case.label, label=True)
        if reference is not None:
            check_same_grid(lab, reference, case=case.case_id)
        data = O.remap_labels(lab.data, case.label_map, strict=case.strict_labels, source=str(case.label))
        return lab.like(data)
    if case.label_files:
        out: Volume | None = None
        data = np.zeros((0, 0, 0), dtype=np.uint8)
        for organ, path in case.label_files.items():
            mask = read_volume(path, label=True)
            ref = reference if reference is not None else out
            if ref is not None:
                check_same_grid(mask, ref, case=case.case_id)
            if out is None:
                out = mask
                data = np.zeros(mask.shape, dtype=np.uint8)
            values = np.unique(mask.data)
            if not set(values.tolist()) <= {0, 1}:
                raise ValueError(f"{path}: binary mask holds values {values[:10].tolist()}; expected 0 and 1")
            data[mask.data > 0] = O.ORGAN_BY_NAME[organ].id
        if out is not None:
            return out.like(data)
    raise FileNotFoundError(f"case {case.case_id}: has no label file")


def load_case(case: Case, *, series_uid: str | None = None) -> tuple[Volume, Volume | None]:
    """(image, label-or-None) of a case, both canonical; the label is checked against the image's grid."""
    if case.image is None:
        raise FileNotFoundError(f"case {case.case_id}: has no image")
    image = read_volume(case.image, series_uid=series_uid)
    if image.modality is None and case.modality is not None:
        image.modality = case.modality
    label = load_label(case, image) if case.has_labels else None
    return image, label


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------

SPLIT_NAMES = ("train", "val", "test")


def default_split(
    case_ids: Sequence[str],
    *,
    seed: int = 42,
    sizes: tuple[int, int, int] = (30, 10, 10),
) -> dict[str, list[str]]:
    """The reference split: sorted ids, ``random.Random(seed).shuffle``, then train / val / test.

    With exactly ``sum(sizes)`` cases (FLARE22's 50) the counts are ``sizes``; other counts are scaled
    proportionally (at least one validation and one test case when ``sizes`` asks for them and there
    are three or more cases).
    """
    ids = sorted(case_ids)
    n = len(ids)
    total = sum(sizes)
    if n == 0 or total <= 0:
        raise ValueError(f"cannot split {n} cases with sizes {sizes}")
    if n == total:
        n_train, n_val, n_test = sizes
    else:
        n_val = round(n * sizes[1] / total)
        n_test = round(n * sizes[2] / total)
        if n >= 3:
            n_val = max(n_val, 1 if sizes[1] else 0)
            n_test = max(n_test, 1 if sizes[2] else 0)
        n_train = n - n_val - n_test
        if n_train < 1:
            raise ValueError(f"{n} cases are too few for a train/val/test split of {sizes}; need at least 3")
    random.Random(seed).shuffle(ids)
    return {
        "train": ids[:n_train],
        "val": ids[n_train : n_train + n_val],
        "test": ids[n_train + n_val : n_train + n_val + n_test],
    }


def write_splits(path: str | os.PathLike, splits: dict[str, list[str]]) -> None:
    atomic_write_json(path, {k: list(splits.get(k, [])) for k in SPLIT_NAMES})


def read_splits(path: str | os.PathLike, available: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Read a ``splits.json``; checks names, overlaps and (with ``available``) that every id exists."""
    p = Path(path)
    data = read_json(p)
    if not isinstance(data, dict) or not set(data) <= set(SPLIT_NAMES) or "train" not in data:
        raise ValueError(
            f"{p}: expected {{'train': [...], 'val': [...], 'test': [...]}}, got keys {list(data)[:5]}"
        )
    for k, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(x, (str, int)) for x in ids):
            raise ValueError(
                f"{p}: {k!r} is {type(ids).__name__} {str(ids)[:60]}; expected a list of case ids (strings)"
            )
    splits = {k: [str(x) for x in data.get(k, [])] for k in SPLIT_NAMES}
    seen: dict[str, str] = {}
    for k, ids in splits.items():
        for cid in ids:
            safe_name(cid, what=f"{k!r} entry", source=p)  # ids name output files
            if cid in seen:
                raise ValueError(f"{p}: case {cid!r} is in both {seen[cid]!r} and {k!r}")
            seen[cid] = k
    if available is not None:
        unknown = sorted(set(seen) - set(available))
        if unknown:
            raise ValueError(f"{p}: {len(unknown)} case ids are not in the dataset (e.g. {unknown[:5]})")
    return splits


# ---------------------------------------------------------------------------------------------
# case selection (predict / evaluate --run --split, --cases)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSelection:
    """The case ids a command is restricted to, and where they come from (for messages)."""

    ids: tuple[str, ...]
    source: str
    """E.g. ``the test split of RUN/splits.json`` or ``--cases``."""
    split: str | None = None
    run: Path | None = None


def run_splits(run: str | os.PathLike) -> dict[str, list[str]]:
    """The split a training run used (``RUN/splits.json``)."""
    path = Path(run) / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: does not exist; --run expects a run folder written by tgated train (it records its split there)"
        )
    return read_splits(path)


def _read_id_list(text: str) -> list[str]:
    ids = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        ids += [t for t in re.split(r"[,\s]+", line) if t]
    return ids


def select_cases(
    *,
    run: str | os.PathLike | None = None,
    split: str | None = None,
    cases: str | Sequence[str] | None = None,
) -> CaseSelection | None:
    """The cases named by ``--run RUN --split NAME`` (from ``RUN/splits.json``) or ``--cases``; None
    when neither is given.

    ``cases`` is a list of ids, a comma-separated string, or the path of a text file with ids
    separated by commas, spaces or new lines (``#`` starts a comment).
    """
    if split is not None and cases is not None:
        raise ValueError("--split and --cases both choose the cases; give one of them")
    if split is not None:
        if split not in SPLIT_NAMES:
            raise O.unknown_name("split", split, SPLIT_NAMES)
        if run is None:
            raise ValueError(
                f"--split {split}: needs --run RUN, the training run whose splits.json names the cases"
            )
        ids = run_splits(run)[split]
        if not ids:
            raise ValueError(f"{Path(run) / 'splits.json'}: the {split} split is empty; nothing to select")
        return CaseSelection(
            tuple(ids), f"the {split} split of {Path(run) / 'splits.json'}", split, Path(run)
        )
    if cases is None:
        return None
    if isinstance(cases, str):
        path = Path(cases)
        if path.is_file():
            ids, source = _read_id_list(path.read_text(encoding="utf-8")), f"--cases {path}"
        else:
            ids, source = _read_id_list(cases.replace(",", " ")), "--cases"
    else:
        ids, source = [str(c) for c in cases], "--cases"
    if not ids:
        raise ValueError(f"--cases {cases!r}: no case ids; expected ID,ID,... or a file with one id per line")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{source}: case ids listed more than once: {dupes[:5]}")
    for cid in ids:
        safe_name(cid, what="case id", source=source)
    return CaseSelection(tuple(ids), source, None, Path(run) if run is not None else None)
