"""``tgated experiment evidence``: is the adjacent-slice context used, and does it help?

The protocol is fixed before any run (docs/evidence.md reports its results):

* **Data**: fresh synthetic phantoms (:func:`tgated.data.phantom.write_dataset`, seed
  :data:`DATA_SEED`), FLARE22 layout, at the recipe's image size; the recipe's split takes its
  training and validation cases first and every remaining case is held out (``cases`` = 26: 12
  train, 2 validation, 12 test).
* **Recipe**: ``configs/cpu_evidence.yaml`` (shipped inside the package as
  :data:`RECIPE`): a single-slice CLIPSeg trained once with its backbone (stage 1, the stand-in for
  CLIPSeg's pre-training), then every variant fine-tuned from it with the backbone frozen.
* **Variants** (:data:`VARIANTS`), identical but for one setting: ``tgated`` (K = 5), ``baseline``
  (``adapter: none``, the paper's single-slice baseline) and ``context1`` (the adapter with K = 1:
  the same capacity without neighbours). **Seeds** 0 … n−1 set the adapter initialisation, the
  sample order and dropout; stage 1 is shared.
* **Metric**: 3-D Dice per organ per held-out case (both masks empty: not counted; one empty: 0);
  a model's mean Dice is the mean over organs of the per-organ means over cases. Reported: per
  variant mean ± sd over seeds; per seed the paired difference T-Gated − control, its mean ± sd;
  per case the difference of the seed-averaged case Dice, with a Wilcoxon signed-rank test; per
  organ the mean difference.
* **Is context used?** Each T-Gated model is scored again with every window's neighbours replaced
  by its centre slice (:func:`tgated.models.tgated.plan_windows`, ``neighbours="centre"``), and its
  gate opening and temporal share are read from ``log.csv``.
* **Stability along z**: per organ, the number of separate runs of slices the prediction covers,
  against the ground truth's (extra fragments = predictions that switch off and on along z), and
  per-slice Dice profiles of a few cases.
* **Where the errors are** (what context could fix at most): each organ's wrong voxels split into
  false positives on slices without the organ, within the recipe's window reach of the organ
  (:func:`window_reach`) or farther, false negatives on slices the prediction misses entirely,
  and the rest (both present on the slice: in-plane errors); and the Dice the prediction would
  have with its off-organ slices blanked (a z-extent oracle), the most that perfect slice-level
  decisions add.
* **Decision rule**: T-Gated helps when its mean Dice exceeds both controls' by ≥ 0.03 **and** by
  more than twice the seed standard deviation of the paired difference.

**Another dataset** (``data``): any FLARE22-layout dataset with a label for every case (another
generator's phantoms, a real CT collection) instead of the fresh phantoms; its sorted case ids are
split by ``data.split_seed`` with the recipe's training and validation counts, and every other case
is held out.

**Trainings side by side** (``jobs``, ``threads``): stage 1, then every variant × seed trained and
scored, ``jobs`` at a time (default: as many as the usable cores, on the CPU), each with ``threads``
torch threads (default 1), longest first. A training's numbers depend on its thread count, not on
what runs beside it, so the defaults give the one-thread-per-training numbers of docs/evidence.md on
any machine with the same libraries and processor, in the least time its cores allow.

Everything is resumable: a second call reuses the phantoms, finished runs and finished scores.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgated.config import ExperimentConfig, ModelConfig, load_config
from tgated.io.files import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).with_name("cpu_evidence.yaml")
"""The evidence recipe; ``configs/cpu_evidence.yaml`` in the repository is the same file."""
VARIANTS: dict[str, list[str]] = {
    "tgated": [],
    "baseline": ["model.adapter=none"],
    "context1": ["model.context=1"],
}
"""Each variant's overrides of the recipe (the recipe itself is T-Gated)."""
CONTROLS = ("baseline", "context1")
LONGEST_FIRST = ("tgated", "context1", "baseline")
"""The variants by training time (K slices through the adapter, one slice, no adapter)."""
DATA_SEED = 1000
MIN_GAIN = 0.03
"""The decision rule's smallest mean-Dice gain over each control."""
Z_PROFILE_CASES = 3


@dataclass(frozen=True)
class EvidenceSize:
    cases: int
    seeds: int
    overrides: tuple[str, ...] = ()


FULL = EvidenceSize(cases=26, seeds=3)
QUICK = EvidenceSize(
    cases=8,
    seeds=2,
    overrides=(
        "data.split_sizes=[4,1,3]",
        "model.preprocess.image_size=64",
        "train.epochs=1",
        "train.steps_per_epoch=6",
        "pretrain.overrides=[model.adapter=none,model.train_backbone=true,train.epochs=1,train.steps_per_epoch=6]",
    ),
)
"""A pipeline check in about a minute (what the tests run); its numbers mean nothing."""


def recipe_config(out: Path, overrides: list[str], *, data: Path | None = None) -> ExperimentConfig:
    """The recipe with its stage-1 folder inside ``out`` and its data there too (or at ``data``),
    plus ``overrides``."""
    return load_config(
        RECIPE,
        [f"data.root={data or out / 'data'}", f"model.init_from={out / 'runs' / 'stage1'}", *overrides],
    )


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def run_evidence(
    out: str | os.PathLike = "tgated_evidence",
    *,
    seeds: int | None = None,
    cases: int | None = None,
    data: str | os.PathLike | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
    device: str = "cpu",
    jobs: int | None = None,
    threads: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the evidence experiment into ``out`` (resumable); returns ``results.json``'s content.

    ``seeds`` (default 3) and ``cases`` (default 26 phantoms) change the protocol's size; ``data``
    runs it on an existing FLARE22-layout dataset instead of fresh phantoms; ``quick`` is a
    one-minute pipeline check; ``overrides`` (``key=value``) change the recipe for every variant;
    ``jobs`` trainings run at a time (default: the usable cores) with ``threads`` torch threads each
    (module docstring).
    """
    from tgated.data.datasets import discover
    from tgated.training.loop import ensure_init_model
    from tgated.training.runs import default_jobs, side_by_side

    size = QUICK if quick else FULL
    n_seeds = int(seeds if seeds is not None else size.seeds)
    if n_seeds < 1:
        raise ValueError(f"--seeds {n_seeds}: expected at least 1")
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs {jobs}: expected at least 1")
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected at least 1")
    if data is not None and cases is not None:
        raise ValueError(
            f"--cases {cases} with --data {data}: --cases counts the phantoms the experiment writes; with --data "
            "every case of the dataset takes part"
        )
    out_p = Path(out)
    base = recipe_config(out_p, [*size.overrides, *(overrides or [])], data=Path(data) if data is not None else None)
    base.train.device = device
    data_p = Path(base.data.root)
    train_n, val_n = base.data.split_sizes[0], base.data.split_sizes[1]
    # with --data every case trains or is scored: discover refuses an image without its label
    n_cases = len(discover(data_p, "flare22")) if data is not None else int(cases if cases is not None else size.cases)
    if n_cases < train_n + val_n + 2:
        given = f"{data_p} holds {n_cases} cases" if data is not None else f"--cases {n_cases}"
        raise ValueError(
            f"{given}: the recipe trains on {train_n} and validates on {val_n} cases; give at least "
            f"{train_n + val_n + 2} so that some are held out"
        )
    base.data.split_sizes = (train_n, val_n, n_cases - train_n - val_n)
    _claim_output(out_p, data_p if data is not None else None, n_cases)
    if data is None:
        _write_phantoms(data_p, n_cases, base.model.preprocess.image_size, quiet)

    runs = {run_name(v, s): out_p / "runs" / run_name(v, s) for s in range(n_seeds) for v in VARIANTS}
    tasks = [
        _Task(base, out_p / "runs" / run_name(v, s), VARIANTS[v], s, data_p, out_p / "scores" / f"{run_name(v, s)}.json")
        for v in LONGEST_FIRST  # with --jobs, the longest trainings start first
        for s in range(n_seeds)
    ]
    todo = [t for t in tasks if not (t.scores.is_file() and (t.run / "DONE").is_file())]
    stage1 = Path(base.model.init_from)
    if todo:
        n_jobs = min(len(todo), jobs if jobs is not None else default_jobs(device, threads))
        _say(
            quiet,
            f"[2/4] stage 1 (the shared single-slice model) → {stage1}, then {len(todo)} trainings and scorings, "
            f"{n_jobs} at a time with {threads} torch thread(s) each → {out_p / 'runs'}",
        )
        # an error or Ctrl-C stops the workers; their trainings resume next time
        done = side_by_side(_train_and_score, todo, jobs=n_jobs, threads=threads, first=(ensure_init_model, (base, True)))
        for i, name in enumerate(done, 1):
            _say(quiet, f"[3/4] {name} trained and scored ({i}/{len(todo)})")

    scores = {name: read_json(out_p / "scores" / f"{name}.json") for name in runs}
    _say(quiet, "[4/4] writing results.json and results.md")
    results = analyse(scores, runs, n_seeds)
    results["protocol"] = {
        "recipe": str(RECIPE.name),
        "overrides": [*size.overrides, *(overrides or [])],
        "data": f"{n_cases} fresh phantoms" if data is None else str(data_p),
        "cases": n_cases,
        "split_sizes": list(base.data.split_sizes),
        "seeds": n_seeds,
        "data_seed": DATA_SEED if data is None else None,
        "image_size": base.model.preprocess.image_size,
        "context": base.model.context,
        "context_mode": base.model.context_mode,
        "metric": "3-D Dice per organ per held-out case (native protocol)",
        "decision_rule": f"T-Gated mean Dice ≥ each control + {MIN_GAIN} and > 2 × seed sd of the paired difference",
    }
    results["stage1"] = _stage1_summary(stage1)
    results["environment"] = run_environments({"stage1": stage1, **runs})
    atomic_write_json(out_p / "results.json", results)
    atomic_write_text(out_p / "results.md", results_markdown(results))
    return results


def _claim_output(out: Path, data: Path | None, n_cases: int) -> None:
    """Create ``out`` for the experiment on ``data`` (None: its own phantoms), or check that the
    runs already there were trained on the same data: resuming on other data would mix the two.
    Folders made before ``DATA_SOURCE`` existed name their phantoms in ``data/DONE``."""
    source = _phantoms(n_cases) if data is None else f"{n_cases} cases of {data.resolve()}"
    stamp, legacy = out / "DATA_SOURCE", out / "data" / "DONE"
    recorded = stamp if stamp.is_file() else legacy if legacy.is_file() else None
    if recorded is not None:
        found = recorded.read_text(encoding="utf-8").strip()
        if found != source:
            raise ValueError(
                f"{out}: its runs were trained on {found}, not on the {source} asked for now; use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write_text(stamp, source + "\n")


def _write_phantoms(data: Path, n_cases: int, image_size: int, quiet: bool) -> None:
    """The experiment's fresh phantoms (seed :data:`DATA_SEED`), unless ``data`` holds them already
    (:func:`_claim_output` checked that they are these)."""
    from tgated.data.phantom import write_dataset

    if (data / "DONE").is_file():
        return
    _say(quiet, f"[1/4] writing {n_cases} phantoms (seed {DATA_SEED}) to {data}")
    write_dataset(
        data, cases=n_cases, seed=DATA_SEED, layout="flare22", modality="ct", size=image_size, overwrite=True, quiet=True
    )
    atomic_write_text(data / "DONE", _phantoms(n_cases) + "\n")


def _phantoms(n_cases: int) -> str:
    """How the experiment's own phantoms are named in its stamps."""
    return f"{n_cases} phantoms, seed {DATA_SEED}"


@dataclass(frozen=True)
class _Task:
    """One variant × seed: train ``run`` from ``base`` with ``changes`` and ``seed``, then score it."""

    base: ExperimentConfig
    run: Path
    changes: list[str]
    seed: int
    data: Path
    scores: Path


def _train_and_score(task: _Task) -> str:
    """Train (or resume) ``task.run`` unless it is done, then write its scores; returns its name."""
    from tgated.training import train

    run = task.run
    if not (run / "DONE").is_file():
        seeded = [f"seed={task.seed}", f"train.seed={task.seed}", f"model.backbone.seed={task.seed}"]
        train(
            task.base,
            run,
            overrides=[*task.changes, *seeded],
            resume=(run / "checkpoints" / "last.pt").is_file(),
            quiet=True,
        )
        atomic_write_text(run / "DONE", "trained\n")
    if not task.scores.is_file():
        atomic_write_json(task.scores, score_run(run, task.data, device=task.base.train.device, window=task.base.model))
    return run.name


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        logger.info(msg)


# ----------------------------------------------------------------------------------------------
# scoring one run
# ----------------------------------------------------------------------------------------------


def z_runs(present: np.ndarray) -> int:
    """Number of separate runs of True in a 1-D boolean array (slices where an organ is present)."""
    p = np.asarray(present, dtype=bool)
    if not p.size:
        return 0
    return int(p[0]) + int(np.count_nonzero(p[1:] & ~p[:-1]))


def slice_dice(gt: np.ndarray, pred: np.ndarray) -> list[float | None]:
    """2-D Dice of each axial slice (last axis) of two boolean masks; None where both are empty."""
    inter = np.count_nonzero(gt & pred, axis=(0, 1))
    total = np.count_nonzero(gt, axis=(0, 1)) + np.count_nonzero(pred, axis=(0, 1))
    return [
        None if t == 0 else round(2.0 * i / t, 4) for i, t in zip(inter.tolist(), total.tolist(), strict=True)
    ]


def error_anatomy(gt: np.ndarray, pred: np.ndarray, reach: int) -> dict[str, float]:
    """Where one organ's errors lie along z (last axis), for two boolean masks with ``gt`` non-empty.

    Voxel counts: ``off_near`` / ``off_far`` = false positives on slices without the organ, at most /
    more than ``reach`` slices from its nearest slice; ``missed`` = false negatives on slices where
    ``pred`` has none of it; ``in_slice`` = every other wrong voxel; and ``dice_z_oracle`` = Dice of
    ``pred`` with its slices outside the organ's blanked.
    """
    g_z, p_z = gt.any(axis=(0, 1)), pred.any(axis=(0, 1))
    fp = np.count_nonzero(pred & ~gt, axis=(0, 1))
    fn = np.count_nonzero(gt & ~pred, axis=(0, 1))
    z = np.arange(gt.shape[-1])
    organ_z = np.flatnonzero(g_z)
    dist = np.abs(z[:, None] - organ_z[None, :]).min(axis=1)
    off = ~g_z
    off_near = int(fp[off & (dist <= reach)].sum())
    off_far = int(fp[off & (dist > reach)].sum())
    missed = int(fn[~p_z].sum())
    inter = int(np.count_nonzero(gt & pred))
    kept = int(np.count_nonzero(pred[..., g_z]))
    return {
        "off_near": off_near,
        "off_far": off_far,
        "missed": missed,
        "in_slice": int(fp.sum() + fn.sum()) - off_near - off_far - missed,
        "dice_z_oracle": 2.0 * inter / (kept + int(np.count_nonzero(gt))),
    }


def window_reach(model: ModelConfig, z_spacing_mm: float) -> int:
    """Slices from a window's centre to its outermost neighbour: K // 2, or in ``physical`` mode
    K // 2 steps of ``context_step_mm`` in slices of ``z_spacing_mm``."""
    half = model.context // 2
    if model.context_mode == "physical":
        return round(half * model.context_step_mm / z_spacing_mm)
    return half


def score_run(
    run: Path, data: Path, *, device: str = "cpu", window: ModelConfig | None = None
) -> dict[str, Any]:
    """Dice per organ per held-out case of ``run``'s model (and, with context, the same with the
    neighbours replaced by the centre slice), z-fragments, per-slice profiles, where the errors lie
    (:func:`error_anatomy`, with the reach of ``window``'s context windows, default the run's own),
    adapter statistics."""
    from tgated.data.datasets import discover, load_case, read_splits
    from tgated.inference.predictor import Predictor
    from tgated.metrics import dice

    predictor = Predictor.from_path(run, device=device, quiet=True)
    model = predictor.model
    splits = read_splits(run / "splits.json")
    cases = {c.case_id: c for c in discover(data, "flare22")}
    variants = ["real", "centre"] if model.context > 1 else ["real"]
    modality = model.config.preprocess.modality  # the model's own normalisation, as in training
    out: dict[str, Any] = {v: {} for v in variants}
    out["z_fragments"], out["z_profiles"], out["z_errors"] = {}, {}, {}
    for i, cid in enumerate(splits["test"]):
        image, label = load_case(cases[cid])
        if label is None:
            raise ValueError(f"{cases[cid].image}: held-out case {cid} has no label to score against")
        reach = window_reach(window or model.config, label.spacing[2])
        for variant in variants:
            pred = predictor.predict_volume(image, modality=modality, neighbours=variant).labels
            row: dict[str, float] = {}
            for organ in model.organs:
                g, p = label.data == organ.id, pred == organ.id
                if g.any() or p.any():
                    row[organ.name] = float(dice(g, p))
                if variant != "real":
                    continue
                extra = z_runs(p.any(axis=(0, 1))) - z_runs(g.any(axis=(0, 1)))
                out["z_fragments"].setdefault(cid, {})[organ.name] = extra
                if g.any():
                    out["z_errors"].setdefault(cid, {})[organ.name] = error_anatomy(g, p, reach)
                    if i < Z_PROFILE_CASES:
                        out["z_profiles"].setdefault(cid, {})[organ.name] = slice_dice(g, p)
            out[variant][cid] = row
    log = run / "log.csv"
    if log.is_file():
        import csv

        rows = list(csv.DictReader(log.read_text(encoding="utf-8").splitlines()))
        out["train_seconds"] = round(sum(float(r["time_s"]) for r in rows), 1)
        last = rows[-1] if rows else {}
        out["adapter_stats"] = {
            k: float(v) for k, v in last.items() if k.startswith(("gate_open", "temporal_share")) and v
        }
    return out


# ----------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------


def mean_dice(case_rows: dict[str, dict[str, float]]) -> tuple[float, dict[str, float]]:
    """(mean over organs of per-organ case means, per-organ means) of ``{case: {organ: dice}}``."""
    per_organ: dict[str, list[float]] = {}
    for row in case_rows.values():
        for organ, d in row.items():
            per_organ.setdefault(organ, []).append(d)
    organs = {o: float(np.mean(v)) for o, v in per_organ.items()}
    return (float(np.mean(list(organs.values()))) if organs else math.nan), organs


def _case_means(case_rows: dict[str, dict[str, float]]) -> dict[str, float]:
    return {cid: float(np.mean(list(row.values()))) for cid, row in case_rows.items() if row}


def _msd(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": round(float(a.mean()), 4),
        "sd": round(float(a.std(ddof=1)), 4) if a.size > 1 else 0.0,
        "n": int(a.size),
    }


def analyse(scores: dict[str, dict[str, Any]], runs: dict[str, Path], n_seeds: int) -> dict[str, Any]:
    """``results.json`` from the per-run scores (see the module docstring for what is reported)."""
    from scipy.stats import wilcoxon

    seeds = list(range(n_seeds))
    means = {v: [mean_dice(scores[run_name(v, s)]["real"])[0] for s in seeds] for v in VARIANTS}
    organ_means = {v: [mean_dice(scores[run_name(v, s)]["real"])[1] for s in seeds] for v in VARIANTS}
    organs = sorted({o for v in VARIANTS for per in organ_means[v] for o in per})
    results: dict[str, Any] = {"variants": {}, "comparisons": {}}
    for v in VARIANTS:
        frag = [
            max(extra, 0)
            for s in seeds
            for row in scores[run_name(v, s)]["z_fragments"].values()
            for extra in row.values()
        ]
        results["variants"][v] = {
            "mean_dice": _msd(means[v]),
            "per_seed": [round(x, 4) for x in means[v]],
            "organs": {o: _msd([per[o] for per in organ_means[v] if o in per]) for o in organs},
            "extra_z_fragments_per_organ": round(float(np.mean(frag)), 3) if frag else None,
            "errors": _error_summary([scores[run_name(v, s)].get("z_errors") for s in seeds]),
            "train_seconds": _msd([scores[run_name(v, s)].get("train_seconds", math.nan) for s in seeds]),
        }
    ablated = [mean_dice(scores[run_name("tgated", s)]["centre"])[0] for s in seeds]
    results["context_ablation"] = {
        "mean_dice_real_neighbours": _msd(means["tgated"]),
        "mean_dice_centre_only": _msd(ablated),
        "drop": _msd([r - a for r, a in zip(means["tgated"], ablated, strict=True)]),
        "adapter_stats": [scores[run_name("tgated", s)].get("adapter_stats", {}) for s in seeds],
    }
    verdicts = []
    for control in CONTROLS:
        diffs = [t - c for t, c in zip(means["tgated"], means[control], strict=True)]
        d = _msd(diffs)
        cases_t = _seed_averaged_cases(scores, "tgated", seeds)
        cases_c = _seed_averaged_cases(scores, control, seeds)
        common = sorted(set(cases_t) & set(cases_c))
        case_diffs = [cases_t[c] - cases_c[c] for c in common]
        try:
            p = float(wilcoxon(case_diffs).pvalue) if any(case_diffs) else 1.0
        except ValueError:
            p = math.nan
        per_organ = {}
        for o in organs:
            t = [per[o] for per in organ_means["tgated"] if o in per]
            c = [per[o] for per in organ_means[control] if o in per]
            if t and c:
                per_organ[o] = round(float(np.mean(t) - np.mean(c)), 4)
        helps = d["mean"] >= MIN_GAIN and d["mean"] > 2 * d["sd"]
        verdicts.append(helps)
        results["comparisons"][f"tgated_vs_{control}"] = {
            "paired_seed_difference": d,
            "paired_case_difference": {
                **_msd(case_diffs),
                "cases_better": int(sum(x > 0 for x in case_diffs)),
                "cases_worse": int(sum(x < 0 for x in case_diffs)),
                "wilcoxon_p": round(p, 4) if not math.isnan(p) else None,
            },
            "per_organ_difference": per_organ,
            "organs_helped": [
                o for o, x in sorted(per_organ.items(), key=lambda kv: -kv[1]) if x >= MIN_GAIN
            ],
            "organs_hurt": [o for o, x in sorted(per_organ.items(), key=lambda kv: kv[1]) if x <= -MIN_GAIN],
            "meets_decision_rule": helps,
        }
    results["verdict"] = (
        "T-Gated beats both controls by the pre-registered margin"
        if all(verdicts)
        else "T-Gated does NOT beat both controls by the pre-registered margin"
    )
    results["z_profiles"] = {v: scores[run_name(v, 0)]["z_profiles"] for v in ("tgated", "baseline")}
    return results


ERROR_KINDS = ("in_slice", "missed", "off_near", "off_far")


def _error_summary(per_seed: list[dict[str, dict[str, dict[str, float]]] | None]) -> dict[str, Any] | None:
    """Shares of the wrong voxels by kind (:func:`error_anatomy`), over all seeds, cases and organs and
    per organ, and the z-oracle Dice: the mean (± sd over seeds) and per organ (mean over seeds and
    cases); None for scores made before it existed."""
    if not per_seed or any(s is None for s in per_seed):
        return None

    def shares(counts: dict[str, float]) -> dict[str, float]:
        n = sum(counts.values()) or 1
        return {k: round(counts[k] / n, 3) for k in ERROR_KINDS}

    totals = dict.fromkeys(ERROR_KINDS, 0)
    by_organ: dict[str, dict[str, float]] = {}
    organ_oracle: dict[str, list[float]] = {}
    oracle = []
    for seed_rows in per_seed:
        organ_dice: dict[str, list[float]] = {}
        for row in seed_rows.values():  # type: ignore[union-attr]
            for organ, e in row.items():
                counts = by_organ.setdefault(organ, dict.fromkeys(ERROR_KINDS, 0))
                for k in ERROR_KINDS:
                    totals[k] += e[k]
                    counts[k] += e[k]
                organ_dice.setdefault(organ, []).append(e["dice_z_oracle"])
                organ_oracle.setdefault(organ, []).append(e["dice_z_oracle"])
        oracle.append(float(np.mean([np.mean(d) for d in organ_dice.values()])))
    return {
        "share": shares(totals),
        "mean_dice_z_oracle": _msd(oracle),
        "organs": {
            o: {"share": shares(c), "dice_z_oracle": round(float(np.mean(organ_oracle[o])), 4)}
            for o, c in sorted(by_organ.items())
        },
    }


def _seed_averaged_cases(
    scores: dict[str, dict[str, Any]], variant: str, seeds: list[int]
) -> dict[str, float]:
    per_seed = [_case_means(scores[run_name(variant, s)]["real"]) for s in seeds]
    common = set.intersection(*(set(p) for p in per_seed)) if per_seed else set()
    return {c: float(np.mean([p[c] for p in per_seed])) for c in common}


def _stage1_summary(run: Path) -> dict[str, Any]:
    val = run / "val.json"
    if not val.is_file():
        return {}
    best = read_json(val).get("best") or {}
    return {"val_mean_dice": best.get("mean_dice"), "epoch": best.get("epoch")}


def run_environments(runs: dict[str, Path]) -> dict[str, Any]:
    """The environment the trainings ran in (``RUN/environment.json``): the first run's, and for each
    run whose environment differs from it, what differs. The numbers reproduce to the last digit only
    under the same package versions and thread count."""
    from tgated.training.runs import environment_differences

    envs = {
        name: read_json(run / "environment.json")
        for name, run in runs.items()
        if (run / "environment.json").is_file()
    }
    if not envs:
        return {}
    first_name, first = next(iter(envs.items()))
    differs = {
        name: {k: [a, b] for k, (a, b) in environment_differences(first, env).items()}
        for name, env in envs.items()
    }
    return {"run": first_name, **first, "differs": {k: v for k, v in differs.items() if v}}


def environment_line(env: dict[str, Any]) -> str:
    """One line naming the versions, processor, threads and device of ``results["environment"]``."""
    if not env:
        return "Environment: not recorded."
    pkgs = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
    line = (
        f"Environment ({env['run']}): python {env.get('python')}, {pkgs}; "
        f"{env.get('cpu')} ({env.get('cpu_capability')}), "
        f"{env.get('torch_threads')} torch thread(s), {env.get('device')}."
    )
    elsewhere = [
        f"{name} ({', '.join(f'{k} {a} -> {b}' for k, (a, b) in d.items())})"
        for name, d in env.get("differs", {}).items()
    ]
    if elsewhere:
        line += " Runs trained in another environment: " + "; ".join(elsewhere) + "."
    return line


def results_markdown(results: dict[str, Any]) -> str:
    """The per-organ table (mean ± sd over seeds) with the differences, then the comparisons."""
    v = results["variants"]
    organs = sorted(v["tgated"]["organs"])

    def cell(m: dict[str, float]) -> str:
        return f"{m['mean']:.3f} ± {m['sd']:.3f}"

    lines = [
        f"| organ | baseline | context 1 | T-Gated K={results.get('protocol', {}).get('context', 5)} | Δ vs baseline "
        "| Δ vs context 1 |",
        "|---|---|---|---|---|---|",
    ]
    cmp_b = results["comparisons"]["tgated_vs_baseline"]["per_organ_difference"]
    cmp_c = results["comparisons"]["tgated_vs_context1"]["per_organ_difference"]
    for o in organs:
        row = [o] + [
            cell(v[x]["organs"][o]) if o in v[x]["organs"] else "—"
            for x in ("baseline", "context1", "tgated")
        ]
        row += [f"{cmp_b.get(o, math.nan):+.3f}", f"{cmp_c.get(o, math.nan):+.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{cell(v[x]['mean_dice'])}**" for x in ("baseline", "context1", "tgated"))
        + f" | **{results['comparisons']['tgated_vs_baseline']['paired_seed_difference']['mean']:+.3f}**"
        + f" | **{results['comparisons']['tgated_vs_context1']['paired_seed_difference']['mean']:+.3f}** |"
    )
    lines += [
        "",
        "| comparison | paired Δ over seeds (mean ± sd) | per case: better / worse, Wilcoxon p | organs helped (Δ ≥ 0.03) | organs hurt | decision rule |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in results["comparisons"].items():
        d, pc = c["paired_seed_difference"], c["paired_case_difference"]
        lines.append(
            f"| {name.replace('_', ' ')} | {d['mean']:+.3f} ± {d['sd']:.3f} | {pc['cases_better']} / {pc['cases_worse']}, "
            f"p = {pc['wilcoxon_p']} | {', '.join(c['organs_helped']) or '—'} | {', '.join(c['organs_hurt']) or '—'} | "
            f"{'met' if c['meets_decision_rule'] else 'not met'} |"
        )
    ab = results["context_ablation"]
    stats = ab["adapter_stats"]
    gate = [s[k] for s in stats for k in s if k.startswith("gate_open")]
    share = [s[k] for s in stats for k in s if k.startswith("temporal_share")]
    lines += [
        "",
        f"Context ablation (T-Gated, neighbours replaced by the centre slice): mean Dice {cell(ab['mean_dice_real_neighbours'])} "
        f"with the real neighbours, {cell(ab['mean_dice_centre_only'])} without them (drop {cell(ab['drop'])}).",
    ]
    if gate:
        lines.append(
            f"Gate opening (last epoch, mean over seeds) {np.mean(gate):.3f}; temporal share of the token norm {np.mean(share):.3f}."
        )
    lines.append(
        "Extra z-fragments per organ (prediction runs along z beyond the ground truth's): "
        + ", ".join(f"{x} {v[x]['extra_z_fragments_per_organ']}" for x in ("baseline", "context1", "tgated"))
        + "."
    )
    if all(v[x].get("errors") for x in VARIANTS):
        lines += [
            "",
            "Where the wrong voxels are (shares over seeds, cases and organs; 'near' = within the window's reach):",
            "",
            "| variant | in-plane | missed slices | off-organ slices, near | off-organ slices, far | mean Dice | with off-organ slices blanked |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in ("baseline", "context1", "tgated"):
            e = v[x]["errors"]
            lines.append(
                f"| {x} | "
                + " | ".join(f"{e['share'][k]:.2f}" for k in ERROR_KINDS)
                + f" | {cell(v[x]['mean_dice'])} | {cell(e['mean_dice_z_oracle'])} |"
            )
    lines += ["", f"**Verdict**: {results['verdict']}.", "", environment_line(results.get("environment", {}))]
    return "\n".join(lines) + "\n"
