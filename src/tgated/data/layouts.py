"""The dataset layout registry: one entry per layout, read by everything that knows about layouts.

A layout says where a dataset keeps its images and labels, how a case id maps to file names and
back, which modality a case is, and how the dataset's label values map to canonical organ ids.
Discovery (:mod:`tgated.data.datasets`), the phantom writer (:mod:`tgated.data.phantom`),
``tgated evaluate --dataset``, the config's ``data.layout`` and the CLI's choices all read
:data:`LAYOUTS`; adding a dataset is one entry here (plus its discovery rule when its folder
structure is new).

The file names of each layout are in its entry below (and tabled in the README).

A **case id** is the image file's name without extension and without a ``_0000`` channel suffix
(totalseg: the subject folder's name); predictions are named ``<case id>.nii.gz``.

This module is plain data and imports no numpy, so the CLI can read it for ``--help``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from tgated.organs import BACKGROUND, ORGAN_BY_NAME, ORGAN_NAMES, ORGANS, unknown_name

NIFTI = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
"""nnU-Net-style channel suffix of image file names; never part of a case id."""

_CANONICAL_IDS: dict[str, int] = {o.name: o.id for o in ORGANS}


@dataclass(frozen=True)
class Layout:
    """One dataset layout (see the module docstring for the file names of each)."""

    name: str
    images: str
    """Where the images are, for messages and ``--help`` (e.g. ``images/FLARE22_Tr_XXXX_0000.nii.gz``)."""
    labels: str
    """Where the labels are, for messages and ``--help``."""
    folders: tuple[tuple[str, str], ...] = ()
    """(image folder, label folder) pairs under the dataset root, searched in order."""
    unlabelled_folders: tuple[str, ...] = ()
    """Image folders that may come without their label folder (AMOS's test images)."""
    channel_suffix: str = ""
    """Image file stem = case id + this (nnU-Net's ``_0000``)."""
    prefixes: tuple[str, str] = ("", "")
    """(case id prefix, label file prefix): BTCV's ``img0001`` is labelled by ``label0001``."""
    phantom_case: str = "phantom_{k:04d}"
    """Case id of the k-th synthetic case (k from 1) that ``tgated phantom`` writes."""
    modality: Literal["ct", "mr"] | None = None
    """Modality of every case; None: decided per case (:attr:`mr_above`) or by the dataset."""
    mr_above: int | None = None
    """Cases numbered above this are MR, the others CT (AMOS22's rule)."""
    label_source: Literal["table", "dataset.json", "structures"] = "table"
    """``table``: :attr:`label_ids`; ``dataset.json``: nnU-Net label names; ``structures``: one
    TotalSegmentator mask per structure (or a multilabel file read with an explicit task)."""
    label_ids: dict[str, int] = field(default_factory=lambda: dict(_CANONICAL_IDS), hash=False)
    """The dataset's label id of each organ it labels (by canonical name); organs missing here are
    not labelled by the dataset (excluded, never negatives)."""
    other_labels: dict[int, str] = field(default_factory=dict, hash=False)
    """Known label ids without a canonical organ: read as background, never a target."""
    labels_given: bool = False
    """The label folder is named by the user (``data.labels``, ``evaluate --gt``); images lie in the
    dataset root, or in the first of :attr:`folders` with its labels beside them."""

    # -- file names -----------------------------------------------------------------------------

    def image_name(self, case_id: str) -> str:
        """Image file name of a case (``FLARE22_Tr_0001`` -> ``FLARE22_Tr_0001_0000.nii.gz``)."""
        return f"{case_id}{self.channel_suffix}{NIFTI}"

    def label_name(self, case_id: str) -> str:
        """Label file name of a case (btcv: ``img0001`` -> ``label0001.nii.gz``)."""
        image_prefix, label_prefix = self.prefixes
        if image_prefix and case_id.startswith(image_prefix):
            case_id = label_prefix + case_id[len(image_prefix) :]
        return f"{case_id}{NIFTI}"

    def case_id_of_label(self, stem: str) -> str:
        """Case id of a label file's stem (btcv: ``label0001`` -> ``img0001``)."""
        image_prefix, label_prefix = self.prefixes
        if label_prefix and stem.startswith(label_prefix):
            return image_prefix + stem[len(label_prefix) :]
        return stem

    def phantom_case_id(self, index: int, modality: str) -> str:
        """Case id of synthetic case ``index`` (from 0); MR cases are numbered above :attr:`mr_above`."""
        k = index + 1 + (self.mr_above if self.mr_above is not None and modality == "mr" else 0)
        return self.phantom_case.format(k=k)

    # -- modality -------------------------------------------------------------------------------

    def modality_of(self, case_id: str) -> str | None:
        """``ct`` / ``mr`` by the layout's rule, or None when the layout does not say."""
        if self.mr_above is not None:
            digits = re.findall(r"\d+", case_id)
            return "mr" if digits and int(digits[-1]) > self.mr_above else "ct"
        return self.modality

    # -- labels ---------------------------------------------------------------------------------

    def labelled_organs(self) -> tuple[str, ...]:
        """Canonical names of the organs the dataset labels, in canonical id order."""
        return tuple(n for n in ORGAN_NAMES if n in self.label_ids)

    def label_map(self) -> dict[int, int]:
        """Dataset label id -> canonical id, known non-organ ids mapped to background."""
        mapping = {BACKGROUND: BACKGROUND}
        mapping.update({ds_id: ORGAN_BY_NAME[name].id for name, ds_id in self.label_ids.items()})
        mapping.update(dict.fromkeys(self.other_labels, BACKGROUND))
        return mapping

    def canonical_to_dataset(self) -> dict[int, int]:
        """Canonical id -> dataset label id for the organs the dataset labels."""
        return {ORGAN_BY_NAME[name].id: ds_id for name, ds_id in self.label_ids.items()}


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "flare22",
            images="images/FLARE22_Tr_XXXX_0000.nii.gz",
            labels="labels/FLARE22_Tr_XXXX.nii.gz",
            folders=(("images", "labels"),),
            channel_suffix=CHANNEL_SUFFIX,
            phantom_case="FLARE22_Tr_{k:04d}",
            modality="ct",
        ),
        Layout(
            "btcv",
            images="img/imgXXXX.nii.gz",
            labels="label/labelXXXX.nii.gz",
            folders=(("img", "label"),),
            prefixes=("img", "label"),
            phantom_case="img{k:04d}",
            modality="ct",
            label_ids={
                "liver": 6,
                "right_kidney": 2,
                "spleen": 1,
                "pancreas": 11,
                "aorta": 8,
                "inferior_vena_cava": 9,
                "right_adrenal_gland": 12,
                "left_adrenal_gland": 13,
                "gallbladder": 4,
                "esophagus": 5,
                "stomach": 7,
                "left_kidney": 3,
            },
            other_labels={10: "portal_and_splenic_vein"},
        ),
        Layout(
            "amos",
            images="imagesTr|imagesVa/amos_XXXX.nii.gz",
            labels="labelsTr|labelsVa/amos_XXXX.nii.gz",
            folders=(("imagesTr", "labelsTr"), ("imagesVa", "labelsVa"), ("imagesTs", "labelsTs")),
            unlabelled_folders=("imagesTs",),
            phantom_case="amos_{k:04d}",
            mr_above=500,
            label_ids={
                "liver": 6,
                "right_kidney": 2,
                "spleen": 1,
                "pancreas": 10,
                "aorta": 8,
                "inferior_vena_cava": 9,
                "right_adrenal_gland": 11,
                "left_adrenal_gland": 12,
                "gallbladder": 4,
                "esophagus": 5,
                "stomach": 7,
                "duodenum": 13,
                "left_kidney": 3,
            },
            other_labels={14: "bladder", 15: "prostate_uterus"},
        ),
        Layout(
            "nnunet",
            images="imagesTr/NAME_0000.nii.gz",
            labels="labelsTr/NAME.nii.gz; label names from dataset.json",
            folders=(("imagesTr", "labelsTr"),),
            channel_suffix=CHANNEL_SUFFIX,
            phantom_case="phantom_{k:03d}",
            label_source="dataset.json",
        ),
        Layout(
            "totalseg",
            images="sXXXX/ct.nii.gz or sXXXX/mri.nii.gz",
            labels="sXXXX/segmentations/<structure>.nii.gz, or sXXXX/segmentations.nii.gz with a task",
            phantom_case="s{k:04d}",
            label_source="structures",
        ),
        Layout(
            "folder",
            images="NAME.nii.gz (or images/NAME.nii.gz)",
            labels="same-named files in a second folder (or labels/), canonical ids",
            folders=(("images", "labels"),),
            labels_given=True,
        ),
    )
}
LAYOUT_NAMES: tuple[str, ...] = tuple(LAYOUTS)

TOTALSEG_IMAGES: dict[str, str] = {"ct": "ct", "mr": "mri"}
"""TotalSegmentator subject folders: image file stem by modality (``sXXXX/ct.nii.gz``)."""
TOTALSEG_MASKS = "segmentations"
"""TotalSegmentator subject folders: the folder of per-structure masks."""
TOTALSEG_MULTILABEL = f"{TOTALSEG_MASKS}{NIFTI}"
"""TotalSegmentator subject folders: the multilabel file (read with an explicit task)."""


def get_layout(name: str) -> Layout:
    """The registered layout called ``name``; an unknown name lists the valid ones."""
    if name not in LAYOUTS:
        raise unknown_name("dataset layout", name, LAYOUT_NAMES)
    return LAYOUTS[name]
