"""Score a folder of predictions against a dataset's ground truth: ``metrics.csv`` + ``summary.json``.

:func:`evaluate` is ``tgated evaluate`` and ``tgated.evaluate``; this module is named ``evaluation`` so
that the package attribute ``tgated.evaluate`` is always that function.

See docs/architecture.md (Metrics, Files). Predictions are ``<case id>.nii.gz`` label maps in
canonical organ ids (0 = background, 1-13 as in :mod:`tgated.organs`), matched to the ground-truth cases that
:func:`tgated.data.datasets.ground_truth_cases` finds for the layout (``--gt`` is the dataset root,
or the label folder for the ``folder`` layout).

* Matching: a prediction without a ground-truth case, or no matched case at all, is an error that
  lists the files. Ground-truth cases without a prediction are not scored; they are logged and listed
  in ``summary.json`` under ``unpredicted_cases`` (so that a test split can be scored against a full
  dataset root).
* Geometry: both label maps are compared in the canonical frame. A prediction on the ground truth's
  physical grid but stored with another axis order or direction is reoriented exactly; any other
  mismatch (shape, spacing, origin, oblique direction) is an error naming both files. Spacing comes
  from the ground truth's header.
* Organs: those the dataset labels for the case (:attr:`Case.labelled`); others are excluded, never
  scored (BTCV has no duodenum, so duodenum never appears in BTCV metrics). Of these, only the
  organs the predictions were made for: ``organs`` when given, else the organs of the prediction
  folder's ``labels.json`` (written by ``tgated predict``; a model trained for four organs is scored
  on those four), else all 13. ``organs="all"`` scores every labelled organ, an organ that was never
  predicted then counting as missed (Dice 0).
* Protocols: see :mod:`tgated.metrics` (``native``, ``flare22``, ``paper``).

``metrics.csv`` has the columns ``case,organ,dice,nsd,hd95,gt_voxels,pred_voxels`` (one row per case
and scored organ; floats at full precision, NaN written as ``nan``); ``summary.json`` holds
``dataset``, ``protocol``, ``cases``, ``mean_dice``, ``mean_nsd``, ``organs`` ({name: {dice, nsd,
hd95, n, ...}}) and a few more keys documented in :func:`evaluate` (NaN written as ``null``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgated import __version__
from tgated.data.datasets import Case, case_id_from_path, ground_truth_cases, load_label
from tgated.data.layouts import get_layout
from tgated.inference.provenance import PROVENANCE_JSON, case_entries, model_entry, read_provenance
from tgated.io.files import (
    atomic_write_json,
    atomic_write_text,
    check_inputs_spared,
    is_temporary,
    read_json,
    sha256_file,
)
from tgated.io.volumes import NIFTI_SUFFIXES, Volume, check_same_grid, read_volume
from tgated.metrics import (
    CSV_COLUMNS,
    OrganScore,
    case_scores,
    summarise,
)
from tgated.organs import LABELS_JSON, NUM_ORGANS, parse_organs
from tgated.progress import progress
from tgated.protocols import FILE_AXES_PROTOCOLS, check_protocol

logger = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"
MAX_WORKERS = 4
"""Upper bound on worker processes: each holds two full volumes (about 1 GB for 512×512×200)."""
MIN_CASES_PER_WORKER = 4
"""Below this many cases per worker, start-up costs more than it saves: cases are scored in-process."""


@dataclass(frozen=True)
class _Job:
    case: Case
    prediction: Path
    protocol: str
    organs: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _listing(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def prediction_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Case id -> prediction file for the ``<case id>.nii.gz`` (or ``.nii``) files of a folder.

    Hidden files, leftovers of interrupted writes and non-NIfTI files (``labels.json``,
    ``provenance.json``, ``*_probs.npz``) are ignored; two files for one case id are an error.
    """
    p = Path(folder)
    if not p.exists():
        raise FileNotFoundError(f"{p}: prediction folder does not exist")
    if not p.is_dir():
        raise NotADirectoryError(
            f"{p}: prediction path is not a folder; expected a folder of <case>.nii.gz files"
        )
    found: dict[str, Path] = {}
    for f in sorted(p.iterdir()):
        if not f.is_file() or f.name.startswith(".") or is_temporary(f):
            continue
        if not f.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        cid = case_id_from_path(f)
        if cid in found:
            raise ValueError(
                f"{p}: two predictions for case {cid!r} ({found[cid].name}, {f.name}); keep one of them"
            )
        found[cid] = f
    if not found:
        raise ValueError(
            f"{p}: no prediction files; expected <case id>.nii.gz label maps (see `tgated predict`)"
        )
    return found


def _check_prediction(vol: Volume) -> np.ndarray:
    """The prediction's labels as uint8; values must be canonical ids 0..13."""
    data = vol.data
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        bad = rounded != data
        if bad.any():
            raise ValueError(
                f"{vol.source}: prediction holds non-integer values (e.g. {data[bad].flat[0]!r}); expected "
                f"integer organ ids 0..{NUM_ORGANS} — is this a probability map or an image?"
            )
        data = rounded
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > NUM_ORGANS:
        outside = np.unique(data[(data < 0) | (data > NUM_ORGANS)])[:10]
        raise ValueError(
            f"{vol.source}: prediction holds label values {[int(v) for v in outside]} outside 0..{NUM_ORGANS}; "
            "expected canonical organ ids (0 = background, 1-13 as in labels.json) — convert dataset ids first"
        )
    return data.astype(np.uint8, copy=False)


def _file_spacing(vol: Volume) -> tuple[float, float, float]:
    """Voxel size (mm) along the file's own array axes, from its header (``get_zooms()``) when it has one."""
    if vol.header is not None:
        zooms = vol.header.get_zooms()[:3]
        if len(zooms) == 3 and all(z > 0 for z in zooms):
            return tuple(float(z) for z in zooms)  # type: ignore[return-value]
    return tuple(float(v) for v in np.linalg.norm(vol.original_affine[:3, :3], axis=0))  # type: ignore[return-value]


def check_provenance(pred_dir: Path, predictions: dict[str, Path]) -> list[str]:
    """Warnings about the prediction folder's ``provenance.json`` (written by ``tgated predict``), logged
    and returned: predictions of several models mixed in one folder, predictions it does not record
    (another tool, or a run killed between writing and recording), and predictions changed since.
    A folder without ``provenance.json`` gets no warning; scores never depend on it.
    """
    path = pred_dir / PROVENANCE_JSON
    cases = case_entries(pred_dir)
    if not cases:
        return []
    out = []
    entries = {cid: cases.get(cid) for cid in predictions}
    missing = sorted(cid for cid, e in entries.items() if e is None)
    if missing:
        out.append(
            f"{path}: does not record {len(missing)} prediction(s) ({_listing(missing)}); they were written by "
            "another tool or by an interrupted run — re-run tgated predict on that folder to be sure"
        )
    recorded = {cid: e for cid, e in entries.items() if e is not None}
    models = sorted({str(e.get("model_hash")) for e in recorded.values()})
    if len(models) > 1:
        out.append(
            f"{path}: the predictions come from {len(models)} different models "
            f"({', '.join(m[:12] for m in models)}); scores mix them — predict again with one model"
        )
    changed = sorted(
        cid
        for cid, e in recorded.items()
        if isinstance(e.get("output_sha256"), str) and e["output_sha256"] != sha256_file(predictions[cid])
    )
    if changed:
        out.append(
            f"{path}: {len(changed)} prediction(s) changed after tgated predict wrote them ({_listing(changed)})"
        )
    for message in out:
        logger.warning(message)
    return out


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------


def score_case_files(
    case: Case,
    prediction: str | os.PathLike,
    protocol: str = "native",
    organs: Sequence[str] | None = None,
) -> list[OrganScore]:
    """Scores of one case's prediction file against its ground truth: the organs the case labels
    (of ``organs``, when given)."""
    check_protocol(protocol)
    gt = load_label(case)
    pred_vol = read_volume(prediction, label=True)
    check_same_grid(pred_vol, gt, case=case.case_id)
    pred = _check_prediction(pred_vol)
    scored = [o for o in case.labelled if organs is None or o in organs]
    if protocol in FILE_AXES_PROTOCOLS:
        scores = case_scores(gt.to_original(gt.data), gt.to_original(pred), _file_spacing(gt), scored, protocol)
    else:
        scores = case_scores(gt.data, pred, gt.spacing, scored, protocol)
    for s in scores:
        if protocol in FILE_AXES_PROTOCOLS and s.gt_voxels and math.isnan(s.dice):
            logger.warning(
                "%s: %s lies in a single slice; the FLARE22 z-crop leaves nothing to score (NaN)",
                case.case_id,
                s.organ,
            )
    return scores


def _run_job(job: _Job) -> list[OrganScore]:
    return score_case_files(job.case, job.prediction, job.protocol, job.organs)


def predicted_organs(pred: Path, organs: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The organ names to score (None = every labelled organ): ``organs`` (``"all"``, a comma list or
    a list of names), else those of ``pred/labels.json``."""
    if organs is not None:
        chosen = parse_organs(organs)  # "all" -> all 13
        return None if len(chosen) == NUM_ORGANS else tuple(o.name for o in chosen)
    path = pred / LABELS_JSON
    if not path.is_file():
        return None
    try:
        table = read_json(path)
        names = [v for k, v in table.items() if k != "0"] if isinstance(table, dict) else None
        listed = parse_organs(names) if names else ()
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"{path}: not a labels.json of tgated predict ({exc}); fix it or pass --organs (or --organs all)"
        ) from None
    return tuple(o.name for o in listed) if 0 < len(listed) < NUM_ORGANS else None


def _auto_workers(n_jobs: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS, n_jobs // MIN_CASES_PER_WORKER))


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def _csv_value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def metrics_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """``metrics.csv`` content: the header :data:`tgated.metrics.CSV_COLUMNS`, then one line per row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([_csv_value(r[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# which cases: selection, modality, training cases
# ---------------------------------------------------------------------------------------------


def _check_selection(
    selection, predictions: dict[str, Path], by_id: dict[str, Case], pred: Path, gt: Path
) -> None:
    no_gt = [cid for cid in selection.ids if cid not in by_id]
    if no_gt:
        raise ValueError(
            f"{gt}: {len(no_gt)} case(s) of {selection.source} have no ground truth ({_listing(no_gt)}); "
            f"ground-truth case ids are e.g. {_listing(sorted(by_id), 3)} — check --gt / --dataset"
        )
    no_pred = [cid for cid in selection.ids if cid not in predictions]
    if no_pred:
        raise ValueError(
            f"{pred}: {len(no_pred)} case(s) of {selection.source} have no prediction ({_listing(no_pred)}); "
            "predict them first (tgated predict takes the same --run/--split/--cases)"
        )
    left_out = len(predictions) - len(selection.ids)
    if left_out:
        logger.info(
            "scoring the %d case(s) of %s; %d other prediction(s) left out",
            len(selection.ids),
            selection.source,
            left_out,
        )


def _of_modality(gt_cases: list[Case], modality: str, dataset: str, gt: Path) -> list[Case]:
    unknown = [c.case_id for c in gt_cases if c.modality is None]
    if unknown:
        raise ValueError(
            f"--modality {modality}: the {dataset} layout does not say the modality of {len(unknown)} case(s) "
            f"in {gt} ({_listing(unknown)}); drop --modality, or select the cases with --cases"
        )
    return [c for c in gt_cases if c.modality == modality]


def training_cases(pred_dir: Path) -> tuple[str | None, list[str]]:
    """(run, its training case ids) of the run whose model made the predictions in ``pred_dir``, from
    ``provenance.json`` (``model.run`` and ``model.train_cases``, written by ``tgated predict``; a
    run folder that still exists is read again); (None, []) when the provenance names no run."""
    from tgated.data.datasets import run_splits

    model = read_provenance(pred_dir).get("model")
    if not isinstance(model, dict) or not isinstance(model.get("run"), str):
        return None, []
    run = model["run"]
    recorded = model.get("train_cases")
    ids = [str(c) for c in recorded] if isinstance(recorded, list) else []
    if (Path(run) / "splits.json").is_file():
        ids = sorted(set(ids) | set(run_splits(run)["train"]))
    return run, ids


def _check_training_cases(pred_dir: Path, scored: list[str], allow: bool) -> None:
    run, train = training_cases(pred_dir)
    leaked = sorted(set(scored) & set(train))
    if not leaked:
        return
    message = (
        f"{pred_dir}: {len(leaked)} scored case(s) are in the training split of the run that made the "
        f"predictions ({run}): {_listing(leaked)}"
    )
    if not allow:
        raise ValueError(
            f"{message}; a score on training cases is not a test score — select the cases with "
            f"--run {run} --split test (or --cases), or pass --allow-train-cases to score them anyway"
        )
    logger.warning("%s; scored anyway (--allow-train-cases)", message)


def _evaluate_by_modality(
    pred,
    gt,
    dataset,
    protocol,
    out,
    totalseg_task,
    quiet,
    ids,
    *,
    organs,
    workers,
    allow_train_cases,
    selection,
) -> dict[str, Any]:
    """CT and MR cases scored apart (``out/ct``, ``out/mr``), never averaged together."""
    logger.warning(
        "%s holds CT and MR cases; they are scored separately (out/ct, out/mr) and never averaged together "
        "— pass --modality ct|mr to score one",
        Path(gt),
    )
    parts: dict[str, dict[str, Any]] = {}
    for mod in ("ct", "mr"):
        parts[mod] = evaluate(
            pred,
            gt,
            dataset,
            protocol,
            None if out is None else Path(out) / mod,
            totalseg_task,
            quiet,
            organs=organs,
            workers=workers,
            cases=list(ids),
            modality=mod,
            allow_train_cases=allow_train_cases,
        )
    summary = {
        "dataset": dataset,
        "protocol": protocol,
        "cases": sum(p["cases"] for p in parts.values()),
        "mean_dice": math.nan,
        "mean_nsd": math.nan,
        "mean_hd95": math.nan,
        "organs": {},
        "by_modality": parts,
        "selection": selection.source if selection is not None else None,
        "modality": None,
        "pred": str(Path(pred)),
        "gt": str(Path(gt)),
        "totalseg_task": totalseg_task,
        "tool_version": __version__,
    }
    if out is not None:
        out_dir = Path(out)
        rows = "".join(
            (out_dir / mod / METRICS_CSV).read_text(encoding="utf-8").split("\n", 1)[1] for mod in parts
        )
        atomic_write_text(out_dir / METRICS_CSV, ",".join(CSV_COLUMNS) + "\n" + rows)
        atomic_write_json(out_dir / SUMMARY_JSON, _json_safe(summary))
    return summary


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def evaluate(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    dataset: str,
    protocol: str = "native",
    out: str | os.PathLike | None = None,
    totalseg_task: str | None = None,
    quiet: bool = False,
    *,
    organs: str | Sequence[str] | None = None,
    workers: int | None = None,
    run: str | os.PathLike | None = None,
    split: str | None = None,
    cases: str | Sequence[str] | None = None,
    modality: str | None = None,
    allow_train_cases: bool = False,
) -> dict[str, Any]:
    """Score the predictions in ``pred`` against the ground truth of ``dataset`` found under ``gt``.

    Args:
        pred: folder of ``<case id>.nii.gz`` label maps in canonical organ ids.
        gt: dataset root for a named layout (flare22, btcv, amos, nnunet, totalseg), the label folder
            for ``folder``.
        dataset: the ground truth's layout.
        protocol: ``native`` (default), ``flare22`` or ``paper`` (see :mod:`tgated.metrics`).
        out: folder for ``metrics.csv`` and ``summary.json`` (written atomically); None writes nothing.
        totalseg_task: ``total`` or ``total_mr`` for TotalSegmentator multilabel ground truth.
        quiet: no progress bar.
        organs: organs to score (names or a comma list; ``"all"`` = every organ the dataset labels);
            default: those of ``pred/labels.json``, else all.
        workers: worker processes (default: one per CPU up to 4 when there are at least 4 cases per
            worker, else in-process). Output order does not depend on it.
        run, split, cases: score only these cases (:func:`tgated.data.datasets.select_cases`): the
            ``split`` of ``RUN/splits.json``, or a list of ids (a comma list or a file of ids). Each
            must have a prediction; other predictions in ``pred`` are left out.
        modality: ``ct`` or ``mr``: score only the cases of that modality (by the layout's rule, e.g.
            AMOS ids above 500 are MR). Without it, cases of both modalities are never averaged
            together: each is scored on its own (``out/ct``, ``out/mr``) and the summary holds both
            under ``by_modality``, its own means left undefined.
        allow_train_cases: score cases of the training split of the run that made the predictions
            (named by ``pred/provenance.json``); without it that is an error, so that a test score
            never includes a training case.

    Returns:
        The summary written to ``summary.json``: ``dataset``, ``protocol``, ``cases`` (number scored),
        ``mean_dice``, ``mean_nsd``, ``mean_hd95``, ``organs`` ({name: {dice, nsd, hd95, n, n_nsd,
        n_hd95, n_both_empty, false_positive_cases, missed_cases}}), the totals ``n_both_empty``,
        ``false_positive_cases`` and ``missed_cases``, ``unpredicted_cases`` (ground-truth case ids
        without a prediction), ``selection`` (where the chosen cases came from, or null),
        ``modality`` (``ct``, ``mr``, or null when the cases do not say or mix both), ``pred``,
        ``gt``, ``totalseg_task``, ``tool_version``, and ``model`` ({hash, name} from the prediction
        folder's ``provenance.json``, when present). Undefined values are NaN here and ``null`` in
        ``summary.json``.
    """
    from tgated.data.datasets import select_cases

    spec = get_layout(dataset)
    check_protocol(protocol)
    if totalseg_task is not None and spec.label_source != "structures":
        raise ValueError(
            f"--totalseg-task {totalseg_task!r} applies to the totalseg dataset only, not {dataset!r}; drop it"
        )
    if modality not in (None, "ct", "mr"):
        raise ValueError(f"--modality {modality!r}: expected 'ct' or 'mr'")
    selection = select_cases(run=run, split=split, cases=cases)
    predictions = prediction_files(pred)
    gt_cases = ground_truth_cases(gt, dataset, totalseg_task=totalseg_task)
    by_id = {c.case_id: c for c in gt_cases}
    if selection is not None:
        _check_selection(selection, predictions, by_id, Path(pred), Path(gt))
        predictions = {cid: predictions[cid] for cid in selection.ids}
        gt_cases = [c for c in gt_cases if c.case_id in predictions]
    orphans = sorted(cid for cid in predictions if cid not in by_id)
    if orphans:
        raise ValueError(
            f"{Path(pred)}: {len(orphans)} prediction(s) have no ground truth in {Path(gt)} "
            f"({_listing([predictions[c].name for c in orphans])}); ground-truth case ids are e.g. "
            f"{_listing(sorted(by_id), 3)} — check --dataset / --gt, or name predictions <case id>.nii.gz"
        )
    if modality is not None:
        gt_cases = _of_modality(gt_cases, modality, dataset, Path(gt))
        predictions = {c.case_id: predictions[c.case_id] for c in gt_cases if c.case_id in predictions}
    if out is not None:
        check_inputs_spared(
            ("--out", out),
            [("--pred", pred), ("--gt", gt)]
            + [("--pred", f) for f in predictions.values()]
            + [("--gt", f) for c in gt_cases for f in (c.label, *c.label_files.values()) if f is not None],
            writes=[Path(out) / METRICS_CSV, Path(out) / SUMMARY_JSON],
        )
    matched = [c for c in gt_cases if c.case_id in predictions]
    if not matched:
        raise ValueError(
            f"{Path(pred)}: no prediction matches a ground-truth case of {Path(gt)}"
            + (f" of modality {modality}" if modality else "")
        )
    _check_training_cases(Path(pred), [c.case_id for c in matched], allow_train_cases)
    mixed = sorted({c.modality for c in matched if c.modality is not None})
    if modality is None and len(mixed) > 1:
        return _evaluate_by_modality(
            pred,
            gt,
            dataset,
            protocol,
            out,
            totalseg_task,
            quiet,
            [c.case_id for c in matched],
            organs=organs,
            workers=workers,
            allow_train_cases=allow_train_cases,
            selection=selection,
        )
    check_provenance(Path(pred), predictions)
    unpredicted = [c.case_id for c in gt_cases if c.case_id not in predictions]
    if unpredicted:
        logger.warning(
            "%d ground-truth case(s) have no prediction and are not scored: %s",
            len(unpredicted),
            _listing(unpredicted),
        )

    chosen = predicted_organs(Path(pred), organs)
    if chosen is not None:
        logger.info("scoring the predicted organs only: %s", ", ".join(chosen))
    jobs = [_Job(c, predictions[c.case_id], protocol, chosen) for c in matched]
    n_workers = _auto_workers(len(jobs)) if workers is None else max(1, int(workers))
    n_workers = min(n_workers, len(jobs))
    logger.info(
        "evaluating %d case(s) of %s (%s protocol)%s",
        len(jobs),
        dataset,
        protocol,
        f" with {n_workers} worker processes" if n_workers > 1 else "",
    )
    rows: list[dict[str, Any]] = []
    bar = progress(total=len(jobs), desc="evaluate", unit="case", quiet=quiet)
    try:
        if n_workers > 1:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method)) as pool:
                for job, scores in zip(jobs, pool.map(_run_job, jobs), strict=True):
                    rows += [s.row(job.case.case_id) for s in scores]
                    bar.update()
        else:
            for job in jobs:
                rows += [s.row(job.case.case_id) for s in _run_job(job)]
                bar.update()
    finally:
        bar.close()
    if not rows:
        raise ValueError(
            f"{Path(gt)}: the {dataset} ground truth labels none of our organs; nothing to score "
            "(check the label names in dataset.json / the TotalSegmentator masks)"
        )

    agg = summarise(rows)
    organs: dict[str, dict[str, Any]] = agg["organs"]  # type: ignore[assignment]
    summary: dict[str, Any] = {
        "dataset": dataset,
        "protocol": protocol,
        "cases": len(jobs),
        "mean_dice": agg["mean_dice"],
        "mean_nsd": agg["mean_nsd"],
        "mean_hd95": agg["mean_hd95"],
        "organs": organs,
        "n_both_empty": sum(int(o["n_both_empty"]) for o in organs.values()),
        "false_positive_cases": sum(int(o["false_positive_cases"]) for o in organs.values()),
        "missed_cases": sum(int(o["missed_cases"]) for o in organs.values()),
        "unpredicted_cases": unpredicted,
        "selection": selection.source if selection is not None else None,
        "modality": mixed[0] if len(mixed) == 1 else None,
        "scored_organs": list(chosen) if chosen is not None else None,
        "pred": str(Path(pred)),
        "gt": str(Path(gt)),
        "totalseg_task": totalseg_task,
        "tool_version": __version__,
    }
    model = model_entry(Path(pred))
    if model is not None:
        summary["model"] = model
    if out is not None:
        out_dir = Path(out)
        atomic_write_text(out_dir / METRICS_CSV, metrics_csv_text(rows))
        atomic_write_json(out_dir / SUMMARY_JSON, _json_safe(summary))
        logger.info("wrote %s and %s", out_dir / METRICS_CSV, out_dir / SUMMARY_JSON)
    return summary
