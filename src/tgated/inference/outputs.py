"""The files ``tgated predict`` writes for each case besides the probabilities, and the colour tables.

Per case (``<stem>`` = the case id, or the output file's name without extension for a single input):

===========================  ==================================  ===============================================
option                       file                                content
===========================  ==================================  ===============================================
``--output-type multilabel`` ``<stem>.nii.gz``                   uint8 canonical ids, the input's geometry
(default) or ``both``
``--output-type per-organ``  ``<stem>/<organ>.nii.gz``           one uint8 0/1 mask per requested organ (empty
or ``both``                                                      ones too), the input's geometry
``--output-type seg-nrrd``   ``<stem>.seg.nrrd``                 3D Slicer segmentation (:func:`write_seg_nrrd`)
``--statistics``             ``<stem>_statistics.json``          :mod:`tgated.inference.statistics`; the folder
                                                                 also gets ``statistics.csv``
``--preview``                ``<stem>_preview.png``              :mod:`tgated.inference.preview`
===========================  ==================================  ===============================================

Per folder, beside ``labels.json``: ``labels.ctbl`` (3D Slicer colour table) and ``labels.txt``
(ITK-SNAP label description), both with the organ colours of :data:`tgated.organs.ORGAN_COLOURS`, so
that a label map opens in either viewer with names and colours.

Every file is written atomically (the per-organ folder as a whole, through
:func:`tgated.io.files.replace_dir`), and each case's files are recorded with their SHA-256 in the
folder's provenance once all of them are written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgated.io.files import atomic_write_json, atomic_write_text, read_json, replace_dir, sha256_file
from tgated.io.volumes import Volume, read_label, strip_suffix, write_itk_like, write_like
from tgated.organs import ORGAN_COLOURS, Organ, organ_rgb

OUTPUT_TYPES: tuple[str, ...] = ("multilabel", "per-organ", "both", "seg-nrrd")
SLICER_COLOUR_TABLE = "labels.ctbl"
ITKSNAP_LABELS = "labels.txt"
COLOUR_TABLES = (SLICER_COLOUR_TABLE, ITKSNAP_LABELS)
STATISTICS_SUFFIX = "_statistics.json"
STATISTICS_CSV = "statistics.csv"
PREVIEW_SUFFIX = "_preview.png"


@dataclass(frozen=True)
class OutputOptions:
    """Which files a case gets (see the module docstring)."""

    output_type: str = "multilabel"
    statistics: bool = False
    preview: bool = False

    def __post_init__(self) -> None:
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"--output-type {self.output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")

    @property
    def multilabel(self) -> bool:
        return self.output_type in ("multilabel", "both")

    @property
    def per_organ(self) -> bool:
        return self.output_type in ("per-organ", "both")


@dataclass(frozen=True)
class CaseFiles:
    """Names (relative to the output folder) of one case's files; ``None`` / empty: not requested."""

    labels: str | None
    per_organ_dir: str | None
    per_organ: tuple[str, ...]
    seg_nrrd: str | None
    statistics: str | None
    preview: str | None

    def names(self) -> list[str]:
        """Every file of the case, in writing order."""
        single = [self.labels, *self.per_organ, self.seg_nrrd, self.statistics, self.preview]
        return [n for n in single if n]

    def targets(self) -> list[str]:
        """The top-level names written (for removing leftovers of interrupted writes)."""
        return [
            n for n in (self.labels, self.per_organ_dir, self.seg_nrrd, self.statistics, self.preview) if n
        ]


def case_files(label_file: str, organs: Sequence[Organ], options: OutputOptions) -> CaseFiles:
    """The files of a case whose multilabel map is (or would be) ``label_file`` (``<stem>.nii.gz``)."""
    stem = strip_suffix(label_file)
    return CaseFiles(
        labels=label_file if options.multilabel else None,
        per_organ_dir=stem if options.per_organ else None,
        per_organ=tuple(f"{stem}/{o.name}.nii.gz" for o in organs) if options.per_organ else (),
        seg_nrrd=f"{stem}.seg.nrrd" if options.output_type == "seg-nrrd" else None,
        statistics=f"{stem}{STATISTICS_SUFFIX}" if options.statistics else None,
        preview=f"{stem}{PREVIEW_SUFFIX}" if options.preview else None,
    )


def verified(folder: Path, recorded: Mapping[str, Any], names: Iterable[str]) -> bool:
    """True when every file of ``names`` exists with the SHA-256 recorded for it."""
    return all(
        isinstance(recorded.get(n), str) and (folder / n).is_file() and sha256_file(folder / n) == recorded[n]
        for n in names
    )


def read_finished_labels(
    folder: Path, label_file: str, organs: Sequence[Organ], kept: Mapping[str, Any], volume: Volume
) -> np.ndarray | None:
    """The canonical label map of a finished case, read back from an unchanged file it wrote (``kept``:
    the names verified against provenance): the multilabel map ``label_file``, else its ``.seg.nrrd``,
    else the complete set of per-organ masks; None when none of them is there."""
    stem = strip_suffix(label_file)
    for name in (label_file, f"{stem}.seg.nrrd"):
        if name in kept:
            return read_label(folder / name, volume).data.astype(np.uint8, copy=False)
    masks = [f"{stem}/{o.name}.nii.gz" for o in organs]
    if not organs or not all(m in kept for m in masks):
        return None
    labels = np.zeros(volume.shape, np.uint8)
    for o, m in zip(organs, masks, strict=True):
        labels[read_label(folder / m, volume).data > 0] = o.id
    return labels


def remove_stale_outputs(folder: Path, recorded: Mapping[str, Any], keep: Iterable[str]) -> list[str]:
    """Delete the files an earlier prediction of a case recorded (``recorded``: name -> SHA-256) that
    are not in ``keep``, when they are still exactly as written (a file changed since is left alone);
    they describe a label map that has just been replaced. Returns the names removed."""
    keep = set(keep)
    removed = []
    for name in sorted(set(recorded) - keep):
        if verified(folder, recorded, [name]):
            (folder / name).unlink()
            removed.append(name)
    for parent in sorted({(folder / n).parent for n in removed} - {folder}):
        with contextlib.suppress(OSError):
            parent.rmdir()  # a per-organ folder left empty
    return removed


# ---- writers ---------------------------------------------------------------------------------------


def write_per_organ(folder: Path, volume: Volume, labels: np.ndarray, organs: Sequence[Organ]) -> None:
    """``folder/<organ>.nii.gz`` (uint8 0/1, ``volume``'s original geometry) for each organ; the folder
    is replaced as a whole."""

    def write(tmp: Path) -> None:
        for o in organs:
            write_like(tmp / f"{o.name}.nii.gz", labels == o.id, volume)

    replace_dir(folder, write)


def _extent(mask: np.ndarray) -> str:
    """Slicer's ``SegmentN_Extent``: min/max voxel index along I, J, K ("0 -1 0 -1 0 -1" when empty)."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    parts = []
    for axis in range(3):
        present = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        parts += [int(present[0]), int(present[-1])]
    return " ".join(str(p) for p in parts)


def seg_nrrd_metadata(labels_original: np.ndarray, organs: Sequence[Organ]) -> dict[str, str]:
    """The 3D Slicer segmentation fields of a non-overlapping label map (one layer, label value =
    canonical id, one segment per organ; names and colours from :mod:`tgated.organs`), as described
    in Slicer's developer guide (Segmentations: "Segmentation labelmap file format (.seg.nrrd)")."""
    meta = {
        "Segmentation_MasterRepresentation": "Binary labelmap",  # Slicer < 5.4 reads this name
        "Segmentation_SourceRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for n, o in enumerate(organs):
        meta.update(
            {
                f"Segment{n}_ID": o.name,
                f"Segment{n}_Name": o.name,
                f"Segment{n}_NameAutoGenerated": "0",
                f"Segment{n}_Color": " ".join(f"{c:.6f}" for c in organ_rgb(o)),
                f"Segment{n}_ColorAutoGenerated": "0",
                f"Segment{n}_Extent": _extent(labels_original == o.id),
                f"Segment{n}_Layer": "0",
                f"Segment{n}_LabelValue": str(o.id),
                f"Segment{n}_Tags": "",
            }
        )
    return meta


def write_seg_nrrd(path: Path, volume: Volume, labels: np.ndarray, organs: Sequence[Organ]) -> None:
    """``<stem>.seg.nrrd``: the label map (canonical ids, ``volume``'s original grid, uint8) with the
    Slicer segment fields of :func:`seg_nrrd_metadata`, written by SimpleITK."""
    original = volume.to_original(np.asarray(labels))
    write_itk_like(path, labels, volume, seg_nrrd_metadata(original, organs))


def slicer_colour_table(organs: Sequence[Organ]) -> str:
    """A 3D Slicer discrete colour table (``.ctbl``): ``index name R G B A`` (0-255)."""
    lines = [
        f"# Color table file {SLICER_COLOUR_TABLE}",
        f"# {len(organs) + 1} values",
        "0 background 0 0 0 0",
    ]
    lines += [f"{o.id} {o.name} {' '.join(str(c) for c in ORGAN_COLOURS[o.name])} 255" for o in organs]
    return "\n".join(lines) + "\n"


def itksnap_label_description(organs: Sequence[Organ]) -> str:
    """An ITK-SNAP label description file: ``IDX R G B A VIS MSH "LABEL"`` (A in 0-1)."""
    header = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
        f'{0:>5} {0:>5} {0:>4} {0:>4} {0:>8} {0:>2} {0:>2}    "Clear Label"',
    ]
    rows = [
        f'{o.id:>5} {r:>5} {g:>4} {b:>4} {1:>8} {1:>2} {1:>2}    "{o.name}"'
        for o in organs
        for r, g, b in [ORGAN_COLOURS[o.name]]
    ]
    return "\n".join(header + rows) + "\n"


def write_colour_tables(folder: Path, organs: Sequence[Organ]) -> None:
    """``labels.ctbl`` and ``labels.txt`` for ``organs`` (call under the folder's lock)."""
    atomic_write_text(folder / SLICER_COLOUR_TABLE, slicer_colour_table(organs))
    atomic_write_text(folder / ITKSNAP_LABELS, itksnap_label_description(organs))


def write_case_outputs(
    folder: Path,
    files: CaseFiles,
    volume: Volume,
    labels: np.ndarray,
    organs: Sequence[Organ],
    *,
    case_id: str,
    modality: str | None,
    done: Iterable[str] = (),
) -> dict[str, str]:
    """Write the files of ``files`` that are not in ``done`` from the canonical label map ``labels`` of
    ``volume``; returns {name: SHA-256} of the files written."""
    from tgated.inference.statistics import case_statistics

    done = set(done)
    written: list[str] = []
    if files.labels and files.labels not in done:
        write_like(folder / files.labels, labels, volume)
        written.append(files.labels)
    if files.per_organ_dir and not set(files.per_organ) <= done:
        write_per_organ(folder / files.per_organ_dir, volume, labels, organs)
        written += files.per_organ
    if files.seg_nrrd and files.seg_nrrd not in done:
        write_seg_nrrd(folder / files.seg_nrrd, volume, labels, organs)
        written.append(files.seg_nrrd)
    if files.statistics and files.statistics not in done:
        doc = case_statistics(volume, labels, organs, case_id=case_id, modality=modality)
        atomic_write_json(folder / files.statistics, doc)
        written.append(files.statistics)
    if files.preview and files.preview not in done:
        from tgated.inference.preview import write_preview

        title = f"{case_id} ({modality.upper() if modality else 'unknown modality'})"
        write_preview(folder / files.preview, volume, labels, organs, title=title, modality=modality)
        written.append(files.preview)
    return {n: sha256_file(folder / n) for n in written}


def statistics_documents(folder: Path, entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The statistics documents that provenance ``entries`` record (in their ``files``) and that are
    still on disk."""
    docs = []
    names = [
        n
        for entry in entries
        if isinstance(entry, Mapping) and isinstance(entry.get("files"), Mapping)
        for n in entry["files"]
        if isinstance(n, str) and n.endswith(STATISTICS_SUFFIX)
    ]
    for name in names:
        if (folder / name).is_file():
            try:
                doc = read_json(folder / name)
            except ValueError:
                continue
            if isinstance(doc, dict):
                docs.append(doc)
    return docs


def write_statistics_csv(folder: Path, entries: Iterable[Mapping[str, Any]]) -> None:
    """``statistics.csv`` of every case with statistics in the folder (call under the folder's lock)."""
    from tgated.inference.statistics import statistics_csv

    atomic_write_text(folder / STATISTICS_CSV, statistics_csv(statistics_documents(folder, entries)))


__all__ = [
    "COLOUR_TABLES",
    "OUTPUT_TYPES",
    "CaseFiles",
    "OutputOptions",
    "case_files",
    "write_case_outputs",
    "write_colour_tables",
    "write_seg_nrrd",
    "write_statistics_csv",
]
