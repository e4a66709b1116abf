"""Evaluation folders -> comparison tables (markdown and CSV) and cross-domain drops.

An *evaluation* is a folder written by ``tgated evaluate`` (``summary.json`` + ``metrics.csv``). A run
folder or any other folder is searched for evaluations below it. Each evaluation gets a short name:
its path relative to the common parent of all inputs.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tgated.io.files import read_json
from tgated.organs import ORGAN_NAMES

SUMMARY = "summary.json"
METRICS = "metrics.csv"


@dataclass
class Evaluation:
    name: str
    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset", "?"))

    @property
    def mean_dice(self) -> float:
        return _num(self.summary.get("mean_dice"))

    @property
    def model_key(self) -> str | None:
        model = self.summary.get("model")
        if isinstance(model, dict):
            return model.get("hash") or model.get("name")
        return None

    def organ(self, name: str, metric: str = "dice") -> tuple[float, int]:
        entry = (self.summary.get("organs") or {}).get(name)
        if not entry:
            return math.nan, 0
        return _num(entry.get(metric)), int(entry.get("n") or 0)

    def per_case(self, metric: str = "dice") -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in self.rows:
            v = _num(r.get(metric))
            if not math.isnan(v):
                out.setdefault(r["organ"], []).append(v)
        return out


def _num(v: Any) -> float:
    try:
        return math.nan if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return math.nan


def load_evaluation(path: str | os.PathLike, name: str | None = None) -> Evaluation:
    p = Path(path)
    summary = read_json(p / SUMMARY)
    if not isinstance(summary, dict) or "organs" not in summary:
        raise ValueError(f"{p / SUMMARY}: not a tgated evaluation summary (no 'organs' entry)")
    rows: list[dict[str, Any]] = []
    if (p / METRICS).is_file():
        with open(p / METRICS, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    return Evaluation(name or p.name, p, summary, rows)


def find_evaluations(inputs: list[str | os.PathLike]) -> list[Evaluation]:
    """Evaluations in the given folders (each input itself or any folder below it), in input order."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"{p}: does not exist; expected a run folder or an evaluation folder")
        if (p / SUMMARY).is_file():
            found.append(p)
            continue
        below = sorted(s.parent for s in p.rglob(SUMMARY))
        if not below:
            raise FileNotFoundError(f"{p}: no {SUMMARY} found in or below it; run `tgated evaluate` first")
        found += below
    if not found:
        raise FileNotFoundError("no evaluations given")
    resolved = [f.resolve() for f in found]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    evals = []
    for f in resolved:
        rel = f.relative_to(common).as_posix() if f != common else f.name
        evals.append(load_evaluation(f, rel or f.name))
    return evals


def _fmt(v: float, n: int | None = None, digits: int = 3) -> str:
    if math.isnan(v):
        return "—"
    s = f"{v:.{digits}f}"
    return f"{s} ({n})" if n is not None else s


def organ_table(evals: list[Evaluation], metric: str = "dice") -> tuple[list[str], list[list[str]]]:
    """Rows = organs (+ mean), columns = evaluations; with ≥ 2 evaluations, Δ = last − first."""
    header = ["organ"] + [e.name for e in evals]
    with_delta = len(evals) >= 2
    if with_delta:
        header.append(f"Δ ({evals[-1].name} − {evals[0].name})")
    rows = []
    organs = [o for o in ORGAN_NAMES if any(e.organ(o, metric)[1] for e in evals)]
    for organ in organs:
        vals = [e.organ(organ, metric) for e in evals]
        row = [organ] + [_fmt(v, n) for v, n in vals]
        if with_delta:
            row.append(_fmt(vals[-1][0] - vals[0][0]) if not math.isnan(vals[-1][0] - vals[0][0]) else "—")
        rows.append(row)
    key = "mean_dice" if metric == "dice" else f"mean_{metric}"
    means = [_num(e.summary.get(key)) for e in evals]
    mean_row = [f"**mean {metric}**"] + [f"**{_fmt(m)}**" for m in means]
    if with_delta:
        mean_row.append(f"**{_fmt(means[-1] - means[0])}**" if not math.isnan(means[-1] - means[0]) else "—")
    rows.append(mean_row)
    return header, rows


def cross_domain_table(evals: list[Evaluation]) -> tuple[list[str], list[list[str]]]:
    """Drop = (in-domain − zero-shot) / in-domain mean Dice, per model.

    Evaluations of the same model (``summary["model"]["hash"]``, from the predictions' provenance) are
    grouped; the first one listed is the in-domain reference. Without model information all
    evaluations form one group.
    """
    groups: dict[str, list[Evaluation]] = {}
    for e in evals:
        groups.setdefault(e.model_key or "all", []).append(e)
    header = ["model", "in-domain", "zero-shot", "in-domain Dice", "zero-shot Dice", "drop"]
    rows = []
    for key, group in groups.items():
        ref = group[0]
        for other in group[1:]:
            d_in, d_out = ref.mean_dice, other.mean_dice
            drop = (d_in - d_out) / d_in if d_in and not math.isnan(d_in) else math.nan
            label = key[:12] if key != "all" else "—"
            rows.append(
                [
                    label,
                    ref.name,
                    other.name,
                    _fmt(d_in),
                    _fmt(d_out),
                    "—" if math.isnan(drop) else f"{100 * drop:.1f} %",
                ]
            )
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([[c.replace("**", "") for c in r] for r in rows])
    return buf.getvalue()


def mean_of(values: list[float]) -> float:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    return float(arr.mean()) if arr.size else math.nan
