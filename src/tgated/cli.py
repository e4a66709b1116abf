"""Command-line interface: parses arguments and calls the documented functions of the package.

Heavy imports (torch, transformers, monai) happen inside the command handlers so that
``tgated --help`` is instant. ``main(argv)`` returns the exit code, so tests drive it in-process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from tgated import __version__
from tgated.data.layouts import LAYOUT_NAMES
from tgated.organs import TOTALSEG_TASKS
from tgated.protocols import DEFAULT_PROTOCOL, PROTOCOL_NAMES

logger = logging.getLogger("tgated")


# ---------------------------------------------------------------------------------------------
# command handlers (each imports what it needs)
# ---------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from tgated.experiments import describe, run_demo

    result = run_demo(out=args.out, quick=args.quick, quiet=args.quiet, device=args.device, threads=args.threads)
    print(describe(result))
    return 0


def _cmd_experiment_evidence(args: argparse.Namespace) -> int:
    from tgated.experiments.evidence import run_evidence

    run_evidence(
        out=args.out,
        seeds=args.seeds,
        cases=args.cases,
        data=args.data,
        quick=args.quick,
        overrides=args.set,
        device=args.device,
        jobs=args.jobs,
        threads=args.threads,
        quiet=args.quiet,
    )
    with open(os.path.join(args.out, "results.md"), encoding="utf-8") as fh:
        print(fh.read())
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from tgated.data.phantom import write_dataset

    write_dataset(
        args.out,
        cases=args.cases,
        seed=args.seed,
        layout=args.layout,
        modality=args.modality,
        size=args.size,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tgated.training import train

    train(args.config, out=args.out, overrides=args.set, resume=args.resume, quiet=args.quiet)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tgated.inference import predict

    predict(
        model=args.model,
        input=args.input,
        output=args.output,
        run=args.run,
        split=args.split,
        cases=args.cases,
        organs=args.organs,
        modality=args.modality,
        device=args.device,
        save_probabilities=args.save_probabilities,
        overwrite=args.overwrite,
        series=args.series,
        batch_size=args.batch_size,
        quiet=args.quiet,
        output_type=args.output_type,
        statistics=args.statistics,
        preview=args.preview,
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tgated.evaluation import evaluate

    summary = evaluate(
        pred=args.pred,
        gt=args.gt,
        dataset=args.dataset,
        protocol=args.protocol,
        out=args.out,
        totalseg_task=args.totalseg_task,
        quiet=args.quiet,
        organs=args.organs,
        run=args.run,
        split=args.split,
        cases=args.cases,
        modality=args.modality,
        allow_train_cases=args.allow_train_cases,
    )
    if not args.quiet:
        parts = summary.get("by_modality") or {"": summary}
        for mod, part in parts.items():
            where = (
                os.path.join(args.out, mod, "summary.json") if mod else os.path.join(args.out, "summary.json")
            )
            print(
                f"{mod.upper() + ': ' if mod else ''}{part['cases']} cases, mean Dice {part['mean_dice']:.4f}, "
                f"mean NSD {part['mean_nsd']:.4f} -> {where}"
            )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from tgated.models import model_info

    print(json.dumps(model_info(args.config, overrides=args.set), indent=2))
    return 0


def _cmd_experiment_paper(args: argparse.Namespace) -> int:
    from tgated.experiments.paper import run_paper

    run_paper(
        args.flare22,
        args.out,
        btcv=args.btcv,
        amos=args.amos,
        recipe=args.recipe,
        methods=args.methods,
        preset=args.preset,
        overrides=args.set,
        device=args.device,
        config_dir=args.configs,
        quiet=args.quiet,
    )
    if not args.quiet:
        with open(os.path.join(args.out, "table.md"), encoding="utf-8") as fh:
            print(fh.read())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tgated.report import make_report

    path = make_report(args.inputs, out=args.out, quiet=args.quiet)
    if not args.quiet:
        print(f"report written to {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or status messages")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _selection(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--run", default=None, help="training run whose splits.json --split reads")
    p.add_argument(
        "--split", choices=("train", "val", "test"), default=None, help=f"{verb} only this split of --run"
    )
    p.add_argument(
        "--cases", default=None, help=f"{verb} only these case ids: ID,ID,... or a file of ids (one a line)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgated",
        description="3-D medical image segmentation with CLIPSeg and the T-Gated adjacent-slice adapter.",
    )
    parser.add_argument("--version", action="version", version=f"tgated {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="phantoms -> train baseline and T-Gated (tiny model) -> predict -> evaluate -> report",
        description="Run the embedded demo on CPU: synthetic phantoms (plus the real example scans when they "
        "can be fetched), a tiny randomly initialised CLIPSeg, baseline vs T-Gated, and a report.",
    )
    p.add_argument("--out", default="tgated_demo", help="output folder (default: ./tgated_demo)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller demo (under 2 minutes on one CPU core; the full one about 5 on 2 cores, 6 on one)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per training (default 1: the same numbers on every machine with the same libraries "
        "and processor; the two fine-tunings run side by side when there are the cores)",
    )
    _common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("phantom", help="write a synthetic abdominal CT/MR dataset in a dataset layout")
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--layout",
        choices=LAYOUT_NAMES,
        default=LAYOUT_NAMES[0],
        help="dataset layout (default: %(default)s)",
    )
    p.add_argument("--modality", choices=("ct", "mr"), default="ct", help="ct or mr (default: ct)")
    p.add_argument("--size", type=int, default=128, help="in-plane size in voxels (default: 128)")
    p.add_argument("--overwrite", action="store_true", help="replace existing cases")
    _common(p)
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML experiment config")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="segment volumes (NIfTI files, folders, DICOM series)")
    p.add_argument("--model", default=None, help="run folder or model folder (default: --run)")
    p.add_argument(
        "--input",
        default=None,
        help="NIfTI file, folder of NIfTI files, or DICOM series folder (default with --run: the run's dataset)",
    )
    p.add_argument("--output", required=True, help="output file (single input) or folder")
    _selection(p, "predict")
    p.add_argument(
        "--organs", default=None, help="comma-separated organ names (default: all the model knows)"
    )
    p.add_argument("--modality", choices=("auto", "ct", "mr"), default="auto", help="default: auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_probs.npz (float16)")
    p.add_argument("--overwrite", action="store_true", help="redo cases that were already predicted")
    p.add_argument("--series", default=None, help="DICOM series instance UID when a folder holds several")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default: 16)")
    p.add_argument(
        "--output-type",
        choices=("multilabel", "per-organ", "both", "seg-nrrd"),
        default="multilabel",
        help="multilabel: <case>.nii.gz (default); per-organ: <case>/<organ>.nii.gz (0/1); both; "
        "seg-nrrd: <case>.seg.nrrd for 3D Slicer",
    )
    p.add_argument(
        "--statistics",
        action="store_true",
        help="per organ volume (ml), intensity mean/sd/p5/p95, slice range, largest component share: "
        "<case>_statistics.json and statistics.csv",
    )
    p.add_argument(
        "--preview", action="store_true", help="<case>_preview.png: axial, coronal, sagittal views"
    )
    _common(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="score predictions against ground truth: metrics.csv, summary.json")
    p.add_argument("--pred", required=True, help="folder of <case>.nii.gz predictions (canonical ids)")
    p.add_argument("--gt", required=True, help="dataset root (named layouts) or label folder (folder)")
    p.add_argument("--dataset", required=True, choices=LAYOUT_NAMES, help="ground-truth layout")
    p.add_argument(
        "--protocol", choices=PROTOCOL_NAMES, default=DEFAULT_PROTOCOL, help="default: %(default)s"
    )
    p.add_argument(
        "--totalseg-task",
        choices=TOTALSEG_TASKS,
        default=None,
        help="TotalSegmentator task of multilabel ground truth (dataset totalseg)",
    )
    p.add_argument(
        "--organs",
        default=None,
        help="organs to score, e.g. liver,spleen, or 'all' (default: those in the predictions' labels.json)",
    )
    _selection(p, "score")
    p.add_argument(
        "--modality",
        choices=("ct", "mr"),
        default=None,
        help="score the cases of one modality (default: each modality on its own, never averaged together)",
    )
    p.add_argument(
        "--allow-train-cases",
        action="store_true",
        help="score cases of the training split of the run that made the predictions (an error otherwise)",
    )
    p.add_argument("--out", required=True, help="output folder")
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "info", help="resolved config, parameter counts, conditioning and adapter statistics (JSON)"
    )
    p.add_argument("config", help="YAML experiment config, or a trained run / model folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    _common(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("experiment", help="experiments: the CPU evidence experiment, the paper's protocol")
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = exp.add_parser(
        "evidence",
        help="T-Gated vs the single-slice baseline vs the no-context adapter on phantoms, 3 seeds",
        description="The pre-registered CPU evidence experiment (docs/evidence.md): fresh phantoms, the "
        "configs/cpu_evidence.yaml recipe for T-Gated (K=5), adapter: none and context: 1, several seeds, "
        "held-out Dice, paired comparisons, the context ablation; results.json and results.md. Resumable.",
    )
    p.add_argument("--out", default="tgated_evidence", help="output folder (default: ./tgated_evidence)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3)")
    p.add_argument(
        "--cases", type=int, default=None, help="phantoms in all (default 26: 12 train, 2 val, 12 test)"
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="run on this FLARE22-layout dataset (every case labelled) instead of fresh phantoms: 12 cases "
        "train, 2 validate, the rest are held out",
    )
    p.add_argument(
        "--quick", action="store_true", help="a one-minute pipeline check (its numbers mean nothing)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="trainings at a time, each in its own process (default: the usable cores divided by --threads, on "
        "the CPU; 1 on a GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per training (default 1, the setting of docs/evidence.md's runs); a training's "
        "numbers depend on it",
    )
    _common(p)
    p.set_defaults(func=_cmd_experiment_evidence)

    p = exp.add_parser(
        "paper",
        help="the paper's main table: train, predict and evaluate FLARE22 (test split), BTCV, AMOS CT and MR",
        description="Train what is missing, predict and evaluate FLARE22's test split and the zero-shot sets "
        "(BTCV, AMOS CT, AMOS MR, each on its own), and write OUT/results.json, OUT/table.md and "
        "OUT/report/report.html. Re-running skips finished steps.",
    )
    p.add_argument("--flare22", required=True, help="FLARE22 root (images/, labels/)")
    p.add_argument("--btcv", default=None, help="BTCV root (img/, label/); skipped when not given")
    p.add_argument("--amos", default=None, help="AMOS22 root (imagesTr/, labelsTr/); skipped when not given")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--recipe",
        choices=("reference", "ours"),
        default="reference",
        help="reference: the published code's recipe (configs/reference/, comparable with the paper); "
        "ours: configs/ (default: reference)",
    )
    p.add_argument("--methods", default="tgated,baseline,dynunet", help="default: tgated,baseline,dynunet")
    p.add_argument(
        "--preset",
        choices=("cpu-tiny",),
        default=None,
        help="cpu-tiny: tiny random models and short schedules (minutes on CPU; checks the pipeline only)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument(
        "--configs", default=None, help="folder holding the recipe configs (default: the checkout's configs/)"
    )
    _common(p)
    p.set_defaults(func=_cmd_experiment_paper)

    p = sub.add_parser("report", help="comparison tables, plots and report.html from runs / evaluations")
    p.add_argument("inputs", nargs="+", help="run folders or evaluation folders")
    p.add_argument("--out", required=True, help="output folder")
    _common(p)
    p.set_defaults(func=_cmd_report)

    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler, torchrun stopping its workers): handled as Ctrl-C is."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


MAX_MESSAGE_CHARS = 2000
"""An error message longer than this is cut (a value quoted in it can be arbitrarily long)."""


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message):,} characters)"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s" if not args.debug else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        hint = ""
        if args.command == "train":
            hint = f"; the last checkpoint is kept: continue with tgated train {args.config} --out {args.out} --resume"
        elif args.command in ("predict", "demo"):
            hint = "; finished cases are kept: run the same command again to finish the rest"
        terminated = isinstance(exc, Terminated)
        print(
            f"tgated {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM if terminated else 130
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        if args.debug:
            raise
        print(f"tgated {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line without --debug, the traceback with it
        if args.debug:
            raise
        print(
            f"tgated {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} — run again with "
            "--debug for the traceback, and please report it",
            file=sys.stderr,
        )
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
