"""Experiments: the embedded demo (train → predict → evaluate → report), resumable.

``tgated demo`` runs on CPU in minutes: synthetic abdominal phantoms in the FLARE22 layout, the CPU
evidence recipe at the demo's size (a tiny, randomly initialised CLIPSeg trained on single slices as
stage 1, then the single-slice baseline (``adapter: none``) and T-Gated fine-tuned from it with the
same recipe), predictions on the held-out phantoms, evaluation, and a report. When the real example scans can be fetched (TotalSegmentator's sdist on PyPI), both models
are also run on a real CT — a zero-shot domain shift, scored against TotalSegmentator's own
predictions. Re-running the demo into the same folder reuses finished steps.

The demo's numbers say nothing about the method's real performance: the backbone is tiny and random,
the data synthetic. The real thing is the paper protocol on FLARE22 with the pretrained CLIPSeg, on a
GPU (see ``configs/flare22_tgated.yaml`` and README).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tgated.config import ExperimentConfig
from tgated.io.files import atomic_write_text, read_json

logger = logging.getLogger(__name__)

DEMO_ORGANS = (
    "liver",
    "right_kidney",
    "spleen",
    "pancreas",
    "aorta",
    "gallbladder",
    "stomach",
    "duodenum",
    "left_kidney",
)
"""The organs the demo's models learn: large and small, lateral pairs, and the pancreas and duodenum,
which single slices confuse with bowel. The adrenals, oesophagus and inferior vena cava are left out:
a CPU demo's few minutes from random weights do not learn them (Dice about 0; docs/evidence.md)."""

TINY_NOTE = (
    "The demo uses a TINY, RANDOMLY INITIALISED CLIPSeg (no pretrained weights) trained for minutes on "
    f"synthetic phantoms, for {len(DEMO_ORGANS)} organs, with the CPU evidence recipe (configs/cpu_evidence.yaml: "
    "a single-slice stage 1 stands in for CLIPSeg's pre-training, then both models are fine-tuned from it): its "
    "numbers only show that the pipeline works end to end, not how well T-Gated performs (docs/evidence.md). For "
    "the real thing, train the pretrained CIDAS/clipseg-rd64-refined on FLARE22 on a GPU: "
    "tgated train configs/flare22_tgated.yaml --out runs/tgated (and configs/flare22_baseline.yaml)."
)
REAL_CT_NOTE = (
    "Real CT (example_ct_sm, TotalSegmentator's example scan): zero-shot for models trained on phantoms; its "
    "labels are TotalSegmentator predictions, not expert annotations."
)
MODELS = ("baseline", "tgated")


@dataclass(frozen=True)
class DemoSize:
    cases: int
    size: int
    """In-plane size of the phantoms, and the model's input size."""
    split: tuple[int, int, int]
    """Train / validation / held-out cases."""
    stage1_steps: int
    """Optimizer steps of the shared single-slice stage 1 (two epochs)."""
    steps: int
    """Optimizer steps of each model's stage 2 (two epochs)."""


QUICK = DemoSize(cases=10, size=64, split=(6, 1, 3), stage1_steps=600, steps=120)
FULL = DemoSize(cases=20, size=96, split=(12, 2, 6), stage1_steps=1600, steps=1200)


def demo_config(adapter: str = "tgated", quick: bool = False, *, root: str = "", stage1: str = "") -> ExperimentConfig:
    """The demo's experiment config: the CPU evidence recipe at the demo's size, for
    :data:`DEMO_ORGANS`. The two models differ in exactly one thing, ``model.adapter`` (``none`` =
    the single-slice baseline); both start from the same stage-1 model ``stage1``.
    """
    from tgated.config import load_config
    from tgated.experiments.evidence import RECIPE

    s = QUICK if quick else FULL
    stage1_overrides = [
        "model.adapter=none",
        "model.train_backbone=true",
        "train.epochs=2",
        f"train.steps_per_epoch={s.stage1_steps // 2}",
        "train.lr_backbone=5.0e-4",
        "train.lr_decoder=1.0e-3",
        "train.lr_conditioning=1.0e-3",
        "train.augment=true",
    ]
    cfg = load_config(
        RECIPE,
        [
            f"name=demo_{'baseline' if adapter == 'none' else 'tgated'}",
            f"data.root={root}",
            f"data.split_sizes=[{s.split[0]},{s.split[1]},{s.split[2]}]",
            f"model.adapter={adapter}",
            f"model.init_from={stage1}",
            f"model.organs=[{','.join(DEMO_ORGANS)}]",
            f"model.preprocess.image_size={s.size}",
            "train.epochs=2",
            f"train.steps_per_epoch={s.steps // 2}",
        ],
    )
    cfg.pretrain.overrides = stage1_overrides
    return cfg


@dataclass
class DemoResult:
    out: Path
    report: Path
    mean_dice: dict[str, float] = field(default_factory=dict)
    real_ct_mean_dice: dict[str, float] = field(default_factory=dict)
    table: str = ""


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        logger.info(msg)


def _trained(run: Path) -> bool:
    return (run / "model" / "config.json").is_file() and (run / "DONE").is_file()


def run_demo(
    out: str | os.PathLike = "tgated_demo",
    *,
    quick: bool = False,
    quiet: bool = False,
    device: str = "cpu",
    examples: bool = True,
    threads: int = 1,
) -> DemoResult:
    """Run the demo into ``out`` (resumable); returns where everything is and the headline numbers.

    Every training runs with ``threads`` torch threads, the two fine-tunings side by side when the
    machine has the cores for both (:func:`tgated.training.runs.side_by_side`). A training's numbers
    depend on its thread count (floats summed in another order), so the default of one thread makes
    the demo's numbers the same on any machine with the same libraries and processor, whatever its
    core count.
    """
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected at least 1")
    from tgated.data.datasets import discover, read_splits
    from tgated.data.phantom import write_dataset
    from tgated.evaluation import evaluate
    from tgated.inference.api import predict
    from tgated.report import make_report
    from tgated.training.loop import ensure_init_model
    from tgated.training.runs import default_jobs, side_by_side

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    s = QUICK if quick else FULL
    logger.warning(TINY_NOTE)

    data = out_p / "data"
    if not (data / "DONE").is_file():
        _say(f"[1/5] writing {s.cases} synthetic abdominal CT phantoms (FLARE22 layout) to {data}", quiet)
        write_dataset(
            data,
            cases=s.cases,
            seed=0,
            layout="flare22",
            modality="ct",
            size=s.size,
            overwrite=True,
            quiet=quiet,
        )
        atomic_write_text(data / "DONE", "phantoms written\n")
    else:
        _say(f"[1/5] phantoms already in {data}", quiet)

    cfgs = {
        name: demo_config(
            "none" if name == "baseline" else "tgated", quick, root=str(data), stage1=str(out_p / "runs" / "stage1")
        )
        for name in MODELS
    }
    runs = {name: out_p / "runs" / name for name in MODELS}
    for name in MODELS:
        cfgs[name].train.device = device
        if _trained(runs[name]):
            _say(f"[2/5] {name}: already trained ({runs[name]})", quiet)
    todo = [name for name in ("tgated", "baseline") if not _trained(runs[name])]  # the longer one first
    if todo:
        jobs = min(len(todo), default_jobs(device, threads))
        _say(
            f"[2/5] the shared single-slice stage 1 → {out_p / 'runs' / 'stage1'}, then {' and '.join(todo)} "
            f"fine-tuned from it, {jobs} at a time with {threads} torch thread(s) each",
            quiet,
        )
        pairs = [(cfgs[n], runs[n]) for n in todo]
        for name in side_by_side(_train_model, pairs, jobs=jobs, threads=threads, first=(ensure_init_model, (cfgs["baseline"], True))):
            _say(f"      {name} trained", quiet)

    splits = read_splits(runs["tgated"] / "splits.json")
    cases = {c.case_id: c for c in discover(data, "flare22")}
    test_images = [cases[cid].image for cid in splits["test"]]
    evals: dict[str, Path] = {}
    for name, run in runs.items():
        pred_dir = out_p / "predictions" / name / "phantom_test"
        _say(f"[3/5] {name}: predicting {len(test_images)} held-out phantoms → {pred_dir}", quiet)
        predict(run, test_images, pred_dir, device=device, quiet=True)
        ev = out_p / "evaluation" / name / "phantom_test"
        _say(f"[3/5] {name}: evaluating → {ev}", quiet)
        evaluate(pred=pred_dir, gt=data, dataset="flare22", out=ev, quiet=True)
        evals[f"{name}/phantom_test"] = ev

    real: dict[str, Path] = {}
    if examples:
        real = _real_ct(out_p, runs, device, quiet)

    order = [evals["baseline/phantom_test"], evals["tgated/phantom_test"]]
    if real:
        order += [real["baseline"], real["tgated"]]
    notes = [TINY_NOTE] + ([REAL_CT_NOTE] if real else [])
    _say("[5/5] writing the report", quiet)
    report = make_report(
        order, out_p / "report", title="tgated demo: baseline vs T-Gated", notes=notes, quiet=True
    )
    result = DemoResult(out=out_p, report=report)
    for name in MODELS:
        result.mean_dice[name] = float(
            read_json(evals[f"{name}/phantom_test"] / "summary.json")["mean_dice"] or 0.0
        )
        if real:
            result.real_ct_mean_dice[name] = float(read_json(real[name] / "summary.json")["mean_dice"] or 0.0)
    result.table = (out_p / "report" / "comparison.md").read_text(encoding="utf-8")
    return result


def _train_model(job: tuple[ExperimentConfig, Path]) -> str:
    """Train (or resume) one demo model in a worker process; returns its name."""
    from tgated.training import train

    cfg, run = job
    train(cfg, out=run, resume=(run / "checkpoints" / "last.pt").is_file(), quiet=True)
    atomic_write_text(run / "DONE", "trained\n")
    return run.name


def _real_ct(out_p: Path, runs: dict[str, Path], device: str, quiet: bool) -> dict[str, Path]:
    """Predict and score the real example CT with both models; empty when the scans cannot be fetched."""
    from tgated.data import examples
    from tgated.evaluation import evaluate
    from tgated.inference.api import predict

    folder = out_p / "examples"
    try:
        if not (folder / "labels" / "example_ct_sm.nii.gz").is_file():
            _say("[4/5] fetching the real example CT (TotalSegmentator sdist on PyPI)", quiet)
            examples.export_folder(folder, ["example_ct_sm"], quiet=True)
    except (OSError, ValueError) as exc:
        logger.warning("real example CT unavailable (%s); the demo continues with phantoms only", exc)
        return {}
    out = {}
    for name, run in runs.items():
        _say(f"[4/5] {name}: predicting and evaluating the real example CT (zero-shot)", quiet)
        pred_dir = out_p / "predictions" / name / "real_ct"
        predict(run, folder / "images", pred_dir, device=device, quiet=True)
        ev = out_p / "evaluation" / name / "real_ct"
        evaluate(pred=pred_dir, gt=folder / "labels", dataset="folder", out=ev, quiet=True)
        out[name] = ev
    return out


def describe(result: DemoResult) -> str:
    """What the CLI prints at the end of the demo."""
    lines = ["", "Held-out phantoms, per-organ Dice (n cases):", result.table.rstrip(), ""]
    b, t = result.mean_dice.get("baseline"), result.mean_dice.get("tgated")
    if b is not None and t is not None:
        lines.append(f"mean Dice: baseline {b:.3f}, T-Gated {t:.3f} (difference {t - b:+.3f})")
    if result.real_ct_mean_dice:
        rb, rt = result.real_ct_mean_dice["baseline"], result.real_ct_mean_dice["tgated"]
        lines.append(f"real CT (zero-shot, TotalSegmentator labels): baseline {rb:.3f}, T-Gated {rt:.3f}")
    lines += ["", f"report: {result.report}", f"everything else: {result.out}", "", TINY_NOTE]
    return "\n".join(lines)
