"""Organ names, prompts, NSD tolerances and TotalSegmentator's structure ids: the single source of truth.

The canonical organ space is FLARE22's order; every model output, prediction file and metric uses
these ids. Each dataset layout's label ids (:mod:`tgated.data.layouts`) and TotalSegmentator's
(here) are translated into canonical ids on reading (:func:`remap_labels`). Two kinds of
"missing" are kept apart everywhere:

* an organ a dataset does **not label** (BTCV has no duodenum) is *excluded*: never a negative,
  never a false positive;
* an organ the dataset labels but that is **absent in a case** is a real negative.

This module imports nothing of ours, and numpy only when labels are remapped (the CLI reads it).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

BACKGROUND = 0


@dataclass(frozen=True)
class Organ:
    id: int
    name: str
    prompt: str
    nsd_tolerance_mm: float


ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "liver", 5.0),
    Organ(2, "right_kidney", "right kidney", 3.0),
    Organ(3, "spleen", "spleen", 3.0),
    Organ(4, "pancreas", "pancreas", 5.0),
    Organ(5, "aorta", "aorta", 2.0),
    Organ(6, "inferior_vena_cava", "inferior vena cava", 2.0),
    Organ(7, "right_adrenal_gland", "right adrenal gland", 2.0),
    Organ(8, "left_adrenal_gland", "left adrenal gland", 2.0),
    Organ(9, "gallbladder", "gallbladder", 2.0),
    Organ(10, "esophagus", "esophagus", 3.0),
    Organ(11, "stomach", "stomach", 5.0),
    Organ(12, "duodenum", "duodenum", 7.0),
    Organ(13, "left_kidney", "left kidney", 3.0),
)

ORGAN_NAMES: tuple[str, ...] = tuple(o.name for o in ORGANS)
ORGAN_BY_NAME: dict[str, Organ] = {o.name: o for o in ORGANS}
ORGAN_BY_ID: dict[int, Organ] = {o.id: o for o in ORGANS}
NUM_ORGANS = len(ORGANS)

# Display colours (red, green, blue; 0-255), one per organ: the single colour table used by previews,
# report overlays, the 3D Slicer / ITK-SNAP colour tables and ``.seg.nrrd`` segments. Chosen so that
# neighbours (liver / right kidney / gallbladder, spleen / left kidney, aorta / IVC) stand apart.
ORGAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "liver": (204, 92, 64),
    "right_kidney": (242, 191, 26),
    "spleen": (140, 51, 166),
    "pancreas": (242, 140, 179),
    "aorta": (230, 26, 26),
    "inferior_vena_cava": (51, 89, 217),
    "right_adrenal_gland": (26, 191, 191),
    "left_adrenal_gland": (38, 153, 115),
    "gallbladder": (102, 204, 51),
    "esophagus": (242, 128, 13),
    "stomach": (153, 115, 77),
    "duodenum": (179, 179, 242),
    "left_kidney": (89, 38, 115),
}


def organ_rgb(organ: Organ | str | int) -> tuple[float, float, float]:
    """An organ's display colour as (red, green, blue) in 0-1 (matplotlib, 3D Slicer segments)."""
    o = organ if isinstance(organ, Organ) else get_organ(organ)
    return tuple(c / 255.0 for c in ORGAN_COLOURS[o.name])  # type: ignore[return-value]


def colour_lookup(alpha: float = 1.0) -> np.ndarray:
    """RGBA lookup table (256 × 4, 0-1) indexed by canonical label id: ``colour_lookup()[labels]``
    colours a label map; background and unknown ids are transparent."""
    import numpy as np

    lut = np.zeros((256, 4))
    for o in ORGANS:
        lut[o.id, :3] = organ_rgb(o)
        lut[o.id, 3] = alpha
    return lut


# Left/right pairs: a left-right flip of an image must swap these labels.
LATERAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("right_kidney", "left_kidney"),
    ("right_adrenal_gland", "left_adrenal_gland"),
)

# TotalSegmentator v2 structure names for our organs, and their ids in the multilabel files of
# the tasks ``total`` and ``total_mr``. Version 1 ids differ: the task and version are explicit.
TOTALSEG_STRUCTURES: dict[str, str] = {
    "spleen": "spleen",
    "kidney_right": "right_kidney",
    "kidney_left": "left_kidney",
    "gallbladder": "gallbladder",
    "liver": "liver",
    "stomach": "stomach",
    "pancreas": "pancreas",
    "adrenal_gland_right": "right_adrenal_gland",
    "adrenal_gland_left": "left_adrenal_gland",
    "esophagus": "esophagus",
    "duodenum": "duodenum",
    "aorta": "aorta",
    "inferior_vena_cava": "inferior_vena_cava",
}

TOTALSEG_V2_IDS: dict[str, dict[str, int]] = {
    "total": {
        "spleen": 1,
        "kidney_right": 2,
        "kidney_left": 3,
        "gallbladder": 4,
        "liver": 5,
        "stomach": 6,
        "pancreas": 7,
        "adrenal_gland_right": 8,
        "adrenal_gland_left": 9,
        "esophagus": 15,
        "duodenum": 19,
        "aorta": 52,
        "inferior_vena_cava": 63,
    },
    "total_mr": {
        "spleen": 1,
        "kidney_right": 2,
        "kidney_left": 3,
        "gallbladder": 4,
        "liver": 5,
        "stomach": 6,
        "pancreas": 7,
        "adrenal_gland_right": 8,
        "adrenal_gland_left": 9,
        "esophagus": 12,
        "duodenum": 14,
        "aorta": 23,
        "inferior_vena_cava": 24,
    },
}
TOTALSEG_TASKS: tuple[str, ...] = tuple(TOTALSEG_V2_IDS)


def unknown_name(kind: str, value: str, valid: Iterable[str]) -> ValueError:
    """The error for an unknown name: lists the valid ones and suggests the closest."""
    valid = list(valid)
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {value!r}; expected one of: {', '.join(valid)}.{hint}")


def get_organ(name_or_id: str | int) -> Organ:
    """Return an organ by canonical name, prompt or id; unknown names list the valid ones."""
    if isinstance(name_or_id, numbers.Integral):
        if int(name_or_id) in ORGAN_BY_ID:
            return ORGAN_BY_ID[int(name_or_id)]
        raise ValueError(f"unknown organ id {name_or_id}; expected 1-{NUM_ORGANS}")
    key = str(name_or_id).strip().lower().replace(" ", "_").replace("-", "_")
    if key in ORGAN_BY_NAME:
        return ORGAN_BY_NAME[key]
    raise unknown_name("organ", str(name_or_id), ORGAN_NAMES)


def parse_organs(spec: str | Iterable[str] | None) -> tuple[Organ, ...]:
    """Organs from ``"liver,spleen"`` or a list of names; ``None``/``"all"`` gives all 13 in id order."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return ORGANS
    names = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    organs = sorted({get_organ(n) for n in names}, key=lambda o: o.id)
    return tuple(organs)


def check_totalseg_task(task: str) -> str:
    if task not in TOTALSEG_V2_IDS:
        raise unknown_name("TotalSegmentator task", task, TOTALSEG_TASKS)
    return task


def totalseg_label_map(task: str) -> dict[int, int]:
    """TotalSegmentator v2 multilabel id -> canonical id; every other structure is background."""
    ids = TOTALSEG_V2_IDS[check_totalseg_task(task)]
    return {ts_id: ORGAN_BY_NAME[TOTALSEG_STRUCTURES[s]].id for s, ts_id in ids.items()}


def remap_labels(
    labels: np.ndarray,
    mapping: Mapping[int, int],
    *,
    strict: bool = True,
    source: str = "label map",
) -> np.ndarray:
    """Translate label ids through ``mapping`` into a uint8 array.

    With ``strict``, a value not in ``mapping`` is an error naming ``source`` and the values found;
    otherwise such values become background (used for multilabel files with many other structures).
    """
    import numpy as np

    arr = np.asarray(labels)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr, equal_nan=False):
            raise ValueError(
                f"{source}: label map holds non-integer values (e.g. {arr[rounded != arr].flat[0]!r}); "
                "expected integer label ids — is this an image rather than a segmentation?"
            )
        arr = rounded
    values = np.unique(arr).astype(np.int64)
    unknown = [int(v) for v in values if int(v) not in mapping]
    if unknown and strict:
        raise ValueError(
            f"{source}: label values {unknown[:10]} are not in the dataset's label map "
            f"(known: {sorted(mapping)}); check the --dataset / layout, or the TotalSegmentator task"
        )
    lut_size = int(max(values.max(initial=0), max(mapping, default=0))) + 1
    if values.min(initial=0) < 0:
        raise ValueError(f"{source}: negative label value {int(values.min())}; expected ids >= 0")
    lut = np.zeros(lut_size, dtype=np.uint8)
    for src, dst in mapping.items():
        if 0 <= src < lut_size:
            lut[src] = dst
    return lut[arr.astype(np.int64)]


LABELS_JSON = "labels.json"
"""File name of the label table written next to predictions."""


def labels_json(organs: Iterable[Organ] = ORGANS) -> dict[str, str]:
    """The ``labels.json`` written next to predictions: {"0": "background", "1": "liver", ...}."""
    out = {"0": "background"}
    out.update({str(o.id): o.name for o in organs})
    return out
