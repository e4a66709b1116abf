"""``tgated experiment paper``: the paper's main table, train → predict → evaluate → report, resumable.

For each method (``tgated``, ``baseline``: CLIPSeg on single slices, ``dynunet``: the 3-D DynUNet) and
recipe (``reference``: ``configs/reference/``, the published code's; ``ours``: ``configs/``):

1. train on FLARE22 into ``OUT/runs/METHOD`` (skipped when finished with the same config; a killed run
   is resumed);
2. predict and score FLARE22's **test split only** (``--run --split test``: no training case is scored);
3. zero-shot: BTCV (every case; 12 organs, no duodenum), AMOS CT (ids ≤ 500) and AMOS MR (ids > 500),
   each predicted and scored on its own, never averaged together;
4. write ``OUT/results.json``::

       {"recipe": ..., "preset": ..., "methods": {METHOD: {"flare22": {"mean_dice", "n_cases"},
        "btcv": {...}, "amos_ct": {...}, "amos_mr": {...}, "cross_domain_drop": x}},
        "config_hashes": {METHOD: sha256 of the resolved config}, "skipped": [...]}

   ``OUT/table.md`` (methods × datasets and the cross-domain drop as the paper defines it: the mean of
   the BTCV and AMOS CT drops, each (FLARE22 − zero-shot) / FLARE22 mean Dice), and
   ``OUT/report/report.html``.

A dataset that is not given is skipped (and listed under ``skipped``). Predictions skip the cases the
same model already predicted, and an evaluation whose predictions did not change since is kept, so a
second run trains nothing and redoes nothing. ``preset="cpu-tiny"`` swaps in tiny random models and
short schedules so that the whole protocol runs on 2 CPU cores in minutes (what the tests use); its
numbers only show that the pipeline works.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgated.config import ExperimentConfig, dump_yaml
from tgated.io.files import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

METHODS = ("tgated", "baseline", "dynunet")
RECIPES = ("reference", "ours")
PRESETS = ("cpu-tiny",)
DATASETS = ("flare22", "btcv", "amos_ct", "amos_mr")
ZERO_SHOT_DROP = ("btcv", "amos_ct")
"""The paper's cross-domain drop averages the drops on these (CT) datasets."""
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
"""The recipe files of a source checkout (``configs/`` next to ``src/``)."""

TINY_ORGANS = ["liver", "right_kidney", "spleen", "left_kidney"]
_TINY_COMMON = [
    "model.organs=[liver,right_kidney,spleen,left_kidney]",
    "train.precision=fp32",
    "train.val_max_cases=1",
]
TINY_CLIPSEG = [
    *_TINY_COMMON,
    "model.backbone.source=random",
    "model.backbone.preset=tiny",
    "model.backbone.hidden_size=64",
    "model.backbone.num_hidden_layers=4",
    "model.backbone.num_attention_heads=4",
    "model.backbone.intermediate_size=128",
    "model.backbone.text_hidden_size=32",
    "model.backbone.text_num_hidden_layers=2",
    "model.backbone.projection_dim=32",
    "model.backbone.extract_layers=[1,2,3]",
    "model.backbone.reduce_dim=16",
    "model.backbone.image_size=32",
    "model.adapt_layers=[3]",
    "model.context=3",
    "model.adapter_config={dim: 32, layers: 2, heads: 4, ffn_dim: 64, spatial_heads: 4}",
    "model.preprocess.image_size=64",
    "train.epochs=1",
    "train.steps_per_epoch=4",
    "train.batch_size=4",
]
TINY_DYNUNET = [
    *_TINY_COMMON,
    "model.dynunet.spacing=[6.0,6.0,6.0]",
    "model.dynunet.patch_size=[32,32,16]",
    "model.dynunet.filters=[8,16,32,64]",
    "model.dynunet.deep_supr_num=1",
    "train.dynunet.deep_supervision_weights=[]",  # the recipe's three weights are for two heads
    "train.epochs=1",
    "train.steps_per_epoch=4",
    "train.batch_size=2",
    "train.num_workers=0",
]
TINY_NOTE = (
    "preset cpu-tiny: tiny, randomly initialised models trained for a few steps; the numbers show that the "
    "protocol runs end to end, not how well any method performs"
)


@dataclass(frozen=True)
class PaperInputs:
    flare22: Path
    btcv: Path | None = None
    amos: Path | None = None


def recipe_config(method: str, recipe: str, config_dir: Path = CONFIG_DIR) -> Path:
    """The config file of ``method`` in ``recipe``."""
    folder = config_dir / "reference" if recipe == "reference" else config_dir
    path = folder / f"flare22_{method}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the {recipe} recipe's config for {method} does not exist; tgated experiment paper reads "
            "the configs/ folder of a source checkout — run it from one, or pass --configs DIR"
        )
    return path


def method_config(
    method: str,
    recipe: str,
    flare22: Path,
    preset: str | None,
    overrides: list[str],
    config_dir: Path = CONFIG_DIR,
) -> ExperimentConfig:
    from tgated.training import resolve_config

    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r}; expected some of {', '.join(METHODS)}")
    sets = [f"data.root={flare22}", "data.layout=flare22"]
    if preset == "cpu-tiny":
        sets += TINY_DYNUNET if method == "dynunet" else TINY_CLIPSEG
    elif preset is not None:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return resolve_config(recipe_config(method, recipe, config_dir), [*sets, *overrides])


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()


def _train(method: str, cfg: ExperimentConfig, run: Path, quiet: bool) -> None:
    from tgated.training import train

    done = run / "DONE"
    digest = config_hash(cfg)
    if done.is_file():
        if done.read_text(encoding="utf-8").strip() != digest:
            raise ValueError(
                f"{run}: trained with another config than this run of the protocol asks for (recipe, preset or "
                "--set changed); use another --out, or delete that run folder to train it again"
            )
        logger.info("%s: already trained (%s)", method, run)
        return
    logger.info("%s: training → %s", method, run)
    train(cfg, out=run, resume=(run / "config.yaml").is_file(), quiet=quiet)
    atomic_write_text(done, digest + "\n")


def _evaluate(pred: Path, gt: Path, dataset: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    """``evaluate`` unless ``out/summary.json`` is newer than the predictions' provenance."""
    from tgated.evaluation import evaluate

    summary = out / "summary.json"
    prov = pred / "provenance.json"
    if summary.is_file() and prov.is_file() and summary.stat().st_mtime_ns >= prov.stat().st_mtime_ns:
        return read_json(summary)
    return evaluate(pred=pred, gt=gt, dataset=dataset, out=out, quiet=True, **kwargs)


def _score(summary: dict[str, Any]) -> dict[str, Any]:
    d = summary.get("mean_dice")
    return {
        "mean_dice": None if d is None or (isinstance(d, float) and math.isnan(d)) else float(d),
        "n_cases": int(summary["cases"]),
    }


def cross_domain_drop(scores: dict[str, dict[str, Any]]) -> float | None:
    """The paper's averaged drop: mean over BTCV and AMOS CT (those present) of (in − out) / in."""
    ref = (scores.get("flare22") or {}).get("mean_dice")
    if not ref:
        return None
    drops = [
        (ref - scores[d]["mean_dice"]) / ref
        for d in ZERO_SHOT_DROP
        if scores.get(d, {}).get("mean_dice") is not None
    ]
    return sum(drops) / len(drops) if drops else None


def table_markdown(results: dict[str, Any]) -> str:
    names = {"flare22": "FLARE22 (test)", "btcv": "BTCV", "amos_ct": "AMOS CT", "amos_mr": "AMOS MR"}
    shown = [d for d in DATASETS if any(d in m for m in results["methods"].values())]
    lines = [
        f"Mean Dice (recipe: {results['recipe']}{', preset ' + results['preset'] if results['preset'] else ''}); "
        "cross-domain drop = mean of the BTCV and AMOS CT drops, (FLARE22 − zero-shot) / FLARE22.",
        "",
        "| method | " + " | ".join(names[d] for d in shown) + " | cross-domain drop |",
        "|---|" + "---|" * (len(shown) + 1),
    ]
    for method, scores in results["methods"].items():
        cells = []
        for d in shown:
            s = scores.get(d)
            n = f" (n={s['n_cases']})" if s and "n_cases" in s else ""
            cells.append("—" if not s or s["mean_dice"] is None else f"{s['mean_dice']:.3f}{n}")
        drop = scores.get("cross_domain_drop")
        cells.append("—" if drop is None else f"{100 * drop:.1f} %")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_paper(
    flare22: str | os.PathLike,
    out: str | os.PathLike,
    *,
    btcv: str | os.PathLike | None = None,
    amos: str | os.PathLike | None = None,
    recipe: str = "reference",
    methods: str | list[str] = METHODS,
    preset: str | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
    config_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the protocol into ``out`` (see the module docstring); returns ``results.json``'s content."""
    from tgated.data.datasets import discover
    from tgated.inference.api import predict
    from tgated.report import make_report

    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    chosen = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    cdir = Path(config_dir) if config_dir is not None else CONFIG_DIR
    out_p = Path(out)
    data = PaperInputs(Path(flare22), Path(btcv) if btcv else None, Path(amos) if amos else None)
    sets = list(overrides or [])
    if preset == "cpu-tiny":
        sets.append(f"train.device={'cpu' if device == 'auto' else device}")
    elif device != "auto":
        sets.append(f"train.device={device}")
    configs = {m: method_config(m, recipe, data.flare22, preset, sets, cdir) for m in chosen}
    skipped = [name for name, given in (("btcv", data.btcv), ("amos", data.amos)) if given is None]
    for name in skipped:
        logger.warning("--%s not given: the %s zero-shot evaluation is skipped", name, name.upper())
    amos_cases = discover(data.amos, "amos") if data.amos else []
    pdev = "cpu" if preset == "cpu-tiny" and device == "auto" else device

    results: dict[str, Any] = {
        "recipe": recipe,
        "preset": preset,
        "methods": {},
        "config_hashes": {},
        "skipped": skipped,
    }
    evals: list[Path] = []
    for method, cfg in configs.items():
        run = out_p / "runs" / method
        _train(method, cfg, run, quiet)
        results["config_hashes"][method] = config_hash(cfg)
        scores: dict[str, Any] = {}
        pred, ev = out_p / "predictions" / method, out_p / "evaluation" / method
        logger.info("%s: FLARE22 test split", method)
        predict(run, None, pred / "flare22", run=run, split="test", device=pdev, quiet=True)
        s = _evaluate(pred / "flare22", data.flare22, "flare22", ev / "flare22", run=run, split="test")
        scores["flare22"] = _score(s)
        evals.append(ev / "flare22")
        if data.btcv is not None:
            logger.info("%s: BTCV (zero-shot)", method)
            predict(run, data.btcv / "img", pred / "btcv", device=pdev, quiet=True)
            scores["btcv"] = _score(_evaluate(pred / "btcv", data.btcv, "btcv", ev / "btcv"))
            evals.append(ev / "btcv")
        for mod in ("ct", "mr"):
            images = [c.image for c in amos_cases if c.modality == mod and c.image is not None]
            if data.amos is None:
                continue
            key = f"amos_{mod}"
            if not images:
                logger.warning("%s: no AMOS %s case; skipped", data.amos, mod.upper())
                continue
            logger.info("%s: AMOS %s (zero-shot)", method, mod.upper())
            predict(run, images, pred / key, modality=mod, device=pdev, quiet=True)
            scores[key] = _score(_evaluate(pred / key, data.amos, "amos", ev / key, modality=mod))
            evals.append(ev / key)
        scores["cross_domain_drop"] = cross_domain_drop(scores)
        results["methods"][method] = scores

    atomic_write_json(out_p / "results.json", results)
    atomic_write_text(out_p / "table.md", table_markdown(results))
    notes = [TINY_NOTE] if preset == "cpu-tiny" else []
    notes.append(f"recipe: {recipe}; FLARE22 scored on its test split only; AMOS CT and MR scored apart")
    make_report(evals, out_p / "report", title="tgated: the paper's protocol", notes=notes, quiet=True)
    logger.info(
        "results: %s, %s, %s", out_p / "results.json", out_p / "table.md", out_p / "report" / "report.html"
    )
    return results
