"""``tgated predict`` and ``tgated.segment``: files in, the files of docs/architecture.md out.

Output folder contents:

* ``<case>.nii.gz`` — uint8 canonical organ ids, same shape, affine and axis order as the input image
  (for a DICOM series: the series' grid, written as NIfTI); with ``--output-type per-organ|both|seg-nrrd``
  also or instead ``<case>/<organ>.nii.gz`` or ``<case>.seg.nrrd``; ``--statistics`` adds
  ``<case>_statistics.json`` and ``statistics.csv``, ``--preview`` ``<case>_preview.png``
  (:mod:`tgated.inference.outputs`);
* ``labels.json`` — ``{"0": "background", "1": "liver", ...}`` for the organs predicted, and the same
  table with colours for 3D Slicer (``labels.ctbl``) and ITK-SNAP (``labels.txt``);
* ``provenance.json`` — tool version, model hash and config (incl. preprocessing), and per case: the
  input file, its SHA-256, modality, organs, and every file written with its SHA-256 (``files``);
* ``<case>_probs.npz`` with ``--save-probabilities`` — per-organ float16 probabilities (keys = organ
  names) in the same layout as the label map, and ``affine``; staged on disk while the case is
  segmented and written one organ at a time (:mod:`tgated.inference.probabilities`), so that they
  never fill the memory.

Before any work, every input's header is checked (:func:`tgated.io.volumes.probe_volume`: a readable
3-D image, the DICOM series choice) and so is the memory a case needs, so that such errors stop the run
before anything is written.

Every file is written atomically, and leftovers of an interrupted run (``.NAME.tmp-*``) are removed
when the file is written again. A case's provenance entry is written after all its files, and it
counts as finished when that entry records the same request: model hash, input checksum, organs,
DICOM series, explicit modality, and (with ``--save-probabilities``) its probabilities file. A
finished case whose requested files are all unchanged is skipped unless ``overwrite``. When some are
missing (new output options, a deleted file) they are derived, without segmenting again, from the
label map read back from an unchanged file of the case (the multilabel map, else the ``.seg.nrrd``,
else the complete per-organ masks: :func:`~tgated.inference.outputs.read_finished_labels`); only
when none is left is the case segmented again. A case segmented again loses the files of its earlier
prediction that this run does not write (:func:`~tgated.inference.outputs.remove_stale_outputs`). A case predicted by another model,
or killed before its provenance entry was written, is redone. Under ``torchrun`` each rank takes
every N-th case; ``provenance.json``, ``labels.json``, the colour tables and ``statistics.csv`` are
updated under a file lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgated.config import to_dict
from tgated.data.datasets import case_id_from_path
from tgated.inference.outputs import (
    COLOUR_TABLES,
    STATISTICS_CSV,
    OutputOptions,
    case_files,
    read_finished_labels,
    remove_stale_outputs,
    verified,
    write_case_outputs,
    write_colour_tables,
    write_statistics_csv,
)
from tgated.inference.probabilities import write_probabilities
from tgated.inference.provenance import LOCK_NAME, PROVENANCE_JSON, case_entries, locked, record_case
from tgated.io.files import (
    atomic_write_json,
    check_inputs_spared,
    is_temporary,
    remove_stale_temporaries,
    safe_join,
    sha256_file,
    sha256_path,
)
from tgated.io.volumes import (
    IMAGE_SUFFIXES,
    has_image_suffix,
    list_dicom_series,
    probe_volume,
    read_volume,
    volume_from_nifti,
)
from tgated.organs import LABELS_JSON, ORGAN_BY_ID, ORGAN_BY_NAME, labels_json, parse_organs
from tgated.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputCase:
    case_id: str
    path: Path
    """A NIfTI/ITK file or a DICOM series folder."""


def model_hash(model_dir: Path) -> str:
    """Identity of a saved model: SHA-256 of its ``config.json`` (which records the weights' SHA-256)."""
    return sha256_file(model_dir / "config.json")


def _model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if not p.exists():
        raise FileNotFoundError(f"--model {p}: does not exist; expected a run folder or a saved model folder")
    raise FileNotFoundError(
        f"--model {p}: no config.json in it or in {p / 'model'}; expected a run folder (tgated train --out) "
        "or a model folder written by save_pretrained"
    )


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and bool(list_dicom_series(path))


def find_inputs(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputCase]:
    """A file, a DICOM series folder, a folder of image files and/or DICOM series sub-folders, or a
    list of any of these."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise ValueError("--input: no inputs given")
        cases = [c for item in path for c in find_inputs(item)]
        _check_unique(cases, "the inputs")
        return sorted(cases, key=lambda c: c.case_id)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--input {p}: does not exist")
    if p.is_file():
        if not has_image_suffix(p):
            raise ValueError(
                f"--input {p}: unsupported file type; expected {', '.join(IMAGE_SUFFIXES)} or a DICOM folder"
            )
        return [InputCase(case_id_from_path(p), p)]
    files = sorted(
        f for f in p.iterdir() if f.is_file() and has_image_suffix(f) and not f.name.startswith(".")
    )
    hidden = sorted(
        f.name for f in p.iterdir() if f.name.startswith(".") and has_image_suffix(f) and not is_temporary(f)
    )
    if hidden:
        logger.warning(
            "%s: skipped %d hidden file(s) (%s%s); rename them without the leading dot to segment them",
            p,
            len(hidden),
            ", ".join(hidden[:5]),
            ", …" if len(hidden) > 5 else "",
        )
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not files and _is_dicom_dir(p):
        return [InputCase(p.name, p)]
    cases = [InputCase(case_id_from_path(f), f) for f in files]
    cases += [InputCase(d.name, d) for d in subdirs if _is_dicom_dir(d)]
    if not cases:
        raise FileNotFoundError(
            f"--input {p}: folder holds no images; expected {', '.join(IMAGE_SUFFIXES)} files or DICOM series"
        )
    _check_unique(cases, str(p))
    return sorted(cases, key=lambda c: c.case_id)


def _check_unique(cases: list[InputCase], where: str) -> None:
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"--input {where}: several inputs map to the same case id {dupes[:5]}; rename them")


def _write_labels_json(folder: Path, organs) -> None:
    """``labels.json`` and the colour tables (``labels.ctbl``, ``labels.txt``) for ``organs``, plus the
    organs of earlier runs' outputs in the same folder."""
    with locked(folder):
        remove_stale_temporaries(folder, [LABELS_JSON, *COLOUR_TABLES])
        ids = {o.id for o in organs}
        for entry in case_entries(folder).values():
            names = entry.get("organs")
            ids |= {ORGAN_BY_NAME[n].id for n in names or () if isinstance(n, str) and n in ORGAN_BY_NAME}
        chosen = [ORGAN_BY_ID[i] for i in sorted(ids)]
        atomic_write_json(folder / LABELS_JSON, labels_json(chosen))
        write_colour_tables(folder, chosen)


def _update_statistics_csv(folder: Path) -> None:
    with locked(folder):
        write_statistics_csv(folder, list(case_entries(folder).values()))


def _recorded_files(entry: dict[str, Any]) -> dict[str, Any]:
    """{file name: SHA-256} of a provenance entry (entries before ``files`` existed: the label map)."""
    files = entry.get("files")
    if isinstance(files, dict):
        return files
    out = entry.get("output")
    return {out: entry.get("output_sha256")} if isinstance(out, str) else {}


def _finished(folder: Path, case_id: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance entry of ``case_id`` when it records the same request (see the module
    docstring); else None. Which of its files are still unchanged is checked by the caller."""
    entry = case_entries(folder).get(case_id)
    if entry is None:
        return None
    for key in ("sha256", "model_hash", "organs", "series"):
        if entry.get(key) != request[key]:
            return None
    if request["modality"] in ("ct", "mr") and entry.get("modality") != request["modality"]:
        return None
    probs = request["probabilities"]
    if probs is not None and (entry.get("probabilities") != probs or not (folder / probs).is_file()):
        return None
    return entry


def _series_for(case: InputCase, series: str | None, dicom_cases: list[InputCase]) -> str | None:
    """The series UID to read for ``case``: ``--series`` where its folder holds that series."""
    if series is None or not case.path.is_dir():
        return None
    holders = [c for c in dicom_cases if series in list_dicom_series(c.path)]
    if not holders:
        raise ValueError(
            f"--series {series}: no input folder holds this DICOM series; series found: "
            + "; ".join(f"{c.path}: {', '.join(list_dicom_series(c.path))}" for c in dicom_cases)
        )
    return series if case in holders else None


def _probe_inputs(
    cases: list[InputCase], series: str | None, dicom: list[InputCase]
) -> dict[str, tuple[int, int, int]]:
    """Case id -> shape from the headers of ``cases`` (``dicom``: every DICOM input of the run, for
    ``--series``); raises before any work on a header-level problem."""
    if series is not None and not dicom:
        raise ValueError(f"--series {series}: applies to DICOM series folders, but no input is one; drop it")
    return {c.case_id: probe_volume(c.path, series_uid=_series_for(c, series, dicom)) for c in cases}


def _check_inputs_spared(
    given: str | os.PathLike | Sequence[str | os.PathLike],
    inputs: list[InputCase],
    out: Path,
    folder: Path,
    targets: dict[str, tuple[Path, Path]],
    options: OutputOptions,
) -> None:
    """Refuse an ``--output`` that is an input file or folder, lies in a DICOM series folder, or
    whose files would replace an input (symbolic links resolved)."""
    given_paths = list(given) if isinstance(given, (list, tuple)) else [given]
    extras = [
        folder / n for pair in targets.values() for n in case_files(pair[0].name, (), options).targets()
    ]
    check_inputs_spared(
        ("--output", out),
        [("--input", p) for p in given_paths] + [("--input", c.path) for c in inputs],
        writes=[p for pair in targets.values() for p in pair]
        + extras
        + [folder / n for n in (LABELS_JSON, PROVENANCE_JSON, LOCK_NAME, *COLOUR_TABLES, STATISTICS_CSV)],
        not_inside=[("--input", c.path) for c in inputs if c.path.is_dir()],
    )


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _run_dataset_images(run: Path) -> list[Path]:
    """The image files of the dataset a run was trained on (``RUN/config.yaml``'s ``data``)."""
    from tgated.config import ConfigError, load_config
    from tgated.data.datasets import discover

    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--run {run}: no config.yaml; expected a run folder written by tgated train")
    try:
        data = load_config(cfg_file).data
    except ConfigError as exc:
        raise ValueError(
            f"{cfg_file}: cannot be read to find the run's dataset ({exc}); give --input"
        ) from None
    cases = discover(
        data.root,
        data.layout,
        labels=data.labels or None,
        totalseg_task=data.totalseg_task or None,
        need_labels=False,
    )
    return [c.image for c in cases if c.image is not None]


def select_inputs(inputs: list[InputCase], selection, where: str) -> list[InputCase]:
    """The inputs whose case ids ``selection`` (:class:`~tgated.data.datasets.CaseSelection`) names;
    a selected id without an input is an error (a score on fewer cases than asked for is no score)."""
    by_id = {c.case_id: c for c in inputs}
    missing = [cid for cid in selection.ids if cid not in by_id]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} case(s) of {selection.source} are not among the inputs "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); inputs are e.g. "
            f"{', '.join(sorted(by_id)[:3])} — check --input"
        )
    return [by_id[cid] for cid in sorted(selection.ids)]


def run_of_model(model_dir: Path) -> Path | None:
    """The training run a saved model belongs to (``RUN/model`` next to ``RUN/splits.json``), if any."""
    run = model_dir.resolve().parent
    return run if (run / "splits.json").is_file() and model_dir.name == "model" else None


def predict(
    model: str | os.PathLike | None,
    input: str | os.PathLike | Sequence[str | os.PathLike] | None,
    output: str | os.PathLike,
    *,
    run: str | os.PathLike | None = None,
    split: str | None = None,
    cases: str | Sequence[str] | None = None,
    organs: str | list[str] | None = None,
    modality: str = "auto",
    device: str = "auto",
    save_probabilities: bool = False,
    overwrite: bool = False,
    series: str | None = None,
    batch_size: int = 16,
    quiet: bool = False,
    output_type: str = "multilabel",
    statistics: bool = False,
    preview: bool = False,
) -> list[Path]:
    """Segment a file, a DICOM series folder, a folder of them (or a list of any of these); returns the
    label files written.

    ``run``, ``split``, ``cases``: predict only some cases (see
    :func:`tgated.data.datasets.select_cases`): ``run`` + ``split`` takes the ids of that split of
    ``RUN/splits.json``, ``cases`` a list of ids; ``model`` defaults to ``run`` and ``input`` to the
    images of the dataset the run was trained on. The output's ``provenance.json`` names the run and
    its training cases, so that ``tgated evaluate`` can refuse to score them.

    ``output`` is a file name (``.nii.gz``) for a single input, else a folder. Problems that the
    inputs' headers show (not an image, not 3-D, DICOM series choice, ``series`` held by no input) and
    cases too large for the available memory raise before anything is written; a file found corrupt
    while reading stops the run with the cases before it complete and recorded (a re-run resumes).

    ``output_type`` (``multilabel``, ``per-organ``, ``both``, ``seg-nrrd``), ``statistics`` and
    ``preview`` choose each case's files (:mod:`tgated.inference.outputs`). Returns the multilabel
    files, or each case's first file when no multilabel map is written.
    """
    from tgated.data.datasets import select_cases
    from tgated.inference.predictor import Predictor

    if model is None and run is None:
        raise ValueError("--model: not given; name the model (a run or model folder), or give --run RUN")
    mdir = _model_dir(model if model is not None else run)
    selection = select_cases(run=run, split=split, cases=cases)
    if input is None:
        if run is None:
            raise ValueError(
                "--input: not given; name the images, or give --run RUN to predict its dataset's"
            )
        inputs = find_inputs(_run_dataset_images(Path(run)))
    else:
        inputs = find_inputs(input)
    if selection is not None:
        inputs = select_inputs(inputs, selection, f"--input {input}" if input is not None else f"--run {run}")
        logger.info("predicting %d case(s): %s", len(inputs), selection.source)
    out = Path(output)
    single_file = out.name.lower().endswith((".nii.gz", ".nii"))
    if single_file and len(inputs) > 1:
        raise ValueError(f"--output {out}: a file name, but --input holds {len(inputs)} cases; give a folder")
    folder = out.parent if single_file else out
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output {folder}: exists and is not a folder")
    if modality not in ("auto", "ct", "mr"):
        raise ValueError(f"--modality {modality!r}: expected 'auto', 'ct' or 'mr'")
    options = OutputOptions(output_type, statistics, preview)
    if single_file and not options.multilabel:
        raise ValueError(
            f"--output {out}: a label map file name, but --output-type {output_type} writes no multilabel "
            "map; give a folder"
        )
    organ_list = parse_organs(organs) if organs else None
    targets = {
        c.case_id: (
            out if single_file else safe_join(folder, f"{c.case_id}.nii.gz", what="case id", source=c.path),
            safe_join(folder, f"{c.case_id}_probs.npz", what="case id", source=c.path),
        )
        for c in inputs
    }
    _check_inputs_spared(
        input if input is not None else [c.path for c in inputs], inputs, out, folder, targets, options
    )
    rank, world = _dist_info()
    mine = inputs[rank::world]
    dicom = [c for c in inputs if c.path.is_dir()]
    shapes = _probe_inputs(mine, series, dicom)

    predictor = Predictor.from_path(mdir, device=device, batch_size=batch_size, quiet=quiet)
    chosen = predictor.organs_for(organ_list)
    for c in mine:  # fail before anything is written when a case cannot fit in memory
        predictor.check_memory(shapes[c.case_id], len(chosen), save_probabilities, source=str(c.path))
    mhash = model_hash(mdir)
    minfo = {"path": str(mdir.resolve()), "hash": mhash, "config": to_dict(predictor.model.config)}
    model_run = run_of_model(mdir)
    if model_run is not None:
        from tgated.data.datasets import run_splits

        minfo["run"] = str(model_run)
        minfo["train_cases"] = run_splits(model_run)["train"]
    layout = {c.case_id: case_files(targets[c.case_id][0].name, chosen, options) for c in mine}
    remove_stale_temporaries(  # this rank's cases only: another rank may be writing its own
        folder,
        [p.name for c in mine for p in targets[c.case_id]] + [n for f in layout.values() for n in f.targets()],
    )
    created = not folder.exists()
    try:
        written: list[Path] = []
        labels_written = False
        for case in progress(mine, desc="predict", unit="case", quiet=quiet or len(mine) < 2):
            probs_path = targets[case.case_id][1]
            files = layout[case.case_id]
            uid = _series_for(case, series, dicom)
            request = {
                "sha256": sha256_path(case.path),
                "model_hash": mhash,
                "organs": [o.name for o in chosen],
                "series": uid,
                "modality": modality,
                "probabilities": probs_path.name if save_probabilities else None,
            }
            entry = None if overwrite else _finished(folder, case.case_id, request)
            recorded = _recorded_files(entry) if entry else {}
            kept = {n: recorded[n] for n in recorded if verified(folder, recorded, [n])}
            done = [n for n in files.names() if n in kept]
            first = folder / (files.names()[0])
            if entry is not None and len(done) == len(files.names()):
                logger.info(
                    "%s: already predicted by this model; skipped (--overwrite redoes it)", case.case_id
                )
                written.append(first)
                continue
            volume = read_volume(case.path, series_uid=uid)
            probs_file = probs_path if save_probabilities else None
            label_file = targets[case.case_id][0].name
            labels = None
            if entry is not None:
                labels = read_finished_labels(folder, label_file, chosen, kept, volume)
            if labels is not None:
                # the label map of this request is finished: derive the missing files from it
                case_modality = entry.get("modality")
                missing = [n for n in files.names() if n not in done]
                logger.info("%s: already segmented; writing %s", case.case_id, ", ".join(missing))
            else:
                pred = predictor.predict_volume(
                    volume,
                    chosen,
                    modality,
                    keep_probabilities=save_probabilities,
                    probabilities_path=probs_file,
                )
                labels, case_modality, kept, done = pred.labels, pred.modality, {}, []
                try:  # the probabilities' scratch file is removed whatever happens
                    previous = case_entries(folder).get(case.case_id)
                    if previous is not None:  # files of the label map being replaced, not written again
                        remove_stale_outputs(folder, _recorded_files(previous), files.names())
                    if pred.probabilities is not None:
                        write_probabilities(probs_file, pred.probabilities, volume)
                finally:
                    if pred.probabilities is not None:
                        pred.probabilities.close()
            new = write_case_outputs(
                folder, files, volume, labels, chosen, case_id=case.case_id, modality=case_modality, done=done
            )
            all_files = {**kept, **new}
            label_name = label_file if label_file in all_files else None
            if not labels_written:  # nothing is created in the output folder before the first result
                _write_labels_json(folder, chosen)
                labels_written = True
            record_case(
                folder,
                minfo,
                case.case_id,
                {
                    **request,
                    "input": str(case.path.resolve()),
                    "modality": case_modality,
                    "modality_requested": modality,
                    "output": label_name,
                    "output_sha256": all_files.get(label_name) if label_name else None,
                    "output_type": output_type,
                    "files": all_files,
                    "probabilities": probs_file.name if probs_file else None,
                    "shape": list(volume.original_shape),
                    "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            )
            if files.statistics or (folder / STATISTICS_CSV).is_file():
                _update_statistics_csv(folder)
            logger.info("%s -> %s (%s)", case.path, first, str(case_modality).upper())
            written.append(first)
        if statistics:
            _update_statistics_csv(folder)
        return written
    except BaseException:
        if created and world == 1:  # a new output folder that holds no finished case is removed
            _remove_unfinished(folder)
        raise


def _remove_unfinished(folder: Path) -> None:
    """Remove ``folder`` when it holds only what a run writes before its first finished case."""
    if not folder.is_dir() or (folder / PROVENANCE_JSON).exists():
        return
    for name in (LABELS_JSON, LOCK_NAME, *COLOUR_TABLES):
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty


def segment(
    image,
    model,
    *,
    organs: str | list[str] | None = None,
    modality: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
    statistics: bool = False,
):
    """Segment one image and return a ``nibabel.Nifti1Image`` (uint8 canonical ids, the input's geometry);
    with ``statistics``, a tuple (that image, the statistics document of
    :func:`tgated.inference.statistics.case_statistics`: per organ volume in ml, voxels, intensity
    mean / sd / p5 / p95 in the input's units, slice range, largest component share).

    ``image``: a path (NIfTI, ITK file, DICOM series folder) or a nibabel image. ``model``: a run / model
    folder or a loaded :class:`~tgated.models.tgated.TGatedModel`.
    """
    import nibabel as nib

    from tgated.inference.predictor import Predictor
    from tgated.io.volumes import nifti_header_for

    if isinstance(model, (str, os.PathLike)):
        predictor = Predictor.from_path(_model_dir(model), device=device, batch_size=batch_size)
    else:
        predictor = Predictor(model, device=device, batch_size=batch_size)
    if isinstance(image, (str, os.PathLike)):
        volume = read_volume(image)
    elif isinstance(image, nib.spatialimages.SpatialImage):
        volume = volume_from_nifti(image)
    else:
        raise ValueError(f"image: expected a path or a nibabel image, got {type(image).__name__}")
    pred = predictor.predict_volume(volume, parse_organs(organs) if organs else None, modality)
    data = volume.to_original(pred.labels).astype(np.uint8)
    image_out = nib.Nifti1Image(
        data, volume.original_affine, header=nifti_header_for(volume, np.dtype(np.uint8))
    )
    if not statistics:
        return image_out
    from tgated.inference.statistics import case_statistics

    case_id = case_id_from_path(image) if isinstance(image, (str, os.PathLike)) else "image"
    stats = case_statistics(volume, pred.labels, pred.organs, case_id=case_id, modality=pred.modality)
    return image_out, stats
