"""The report document: comparison tables written to files, and ``report.html`` tying them to the plots
(:mod:`tgated.report.figures`) and overlays. :func:`make_report` is the entry point.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any

from tgated import __version__
from tgated.io.files import atomic_write_text
from tgated.report.tables import (
    Evaluation,
    cross_domain_table,
    csv_text,
    find_evaluations,
    markdown,
    organ_table,
)

logger = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f2f2f2}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.6em 1em}
code{background:#f5f5f5;padding:1px 4px}
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(c: str, tag: str) -> str:
        bold = c.startswith("**") and c.endswith("**")
        text = html.escape(c.strip("*"))
        return f"<{tag}>{'<b>' + text + '</b>' if bold else text}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def by_dataset(evals: list[Evaluation]) -> dict[str, list[Evaluation]]:
    """Evaluations grouped by dataset, in input order: tables compare like with like."""
    groups: dict[str, list[Evaluation]] = {}
    for e in evals:
        groups.setdefault(e.dataset, []).append(e)
    return groups


def write_tables(evals: list[Evaluation], out: Path) -> dict[str, Any]:
    """``comparison.md`` / ``comparison.csv`` / ``nsd.md`` (one table per dataset) and ``cross_domain.md``."""
    groups = by_dataset(evals)
    dice = {ds: organ_table(group, "dice") for ds, group in groups.items()}
    nsd = {ds: organ_table(group, "nsd") for ds, group in groups.items()}
    cross = cross_domain_table(evals)
    single = len(groups) == 1

    def md(tables: dict[str, tuple[list[str], list[list[str]]]]) -> str:
        return "\n".join(
            markdown(*t) if single else f"### {ds}\n\n{markdown(*t)}" for ds, t in tables.items()
        )

    atomic_write_text(out / "comparison.md", md(dice))
    atomic_write_text(out / "nsd.md", md(nsd))
    csv_parts = []
    for ds, (head, body) in dice.items():
        csv_parts.append(csv_text(["dataset", *head], [[ds, *r] for r in body]))
    atomic_write_text(out / "comparison.csv", "\n".join(csv_parts))
    if cross[1]:
        atomic_write_text(out / "cross_domain.md", markdown(*cross))
    return {"dice": dice, "nsd": nsd, "cross": cross}


def make_report(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    title: str = "tgated report",
    notes: list[str] | None = None,
    overlays: bool = True,
    max_overlay_cases: int = 2,
    quiet: bool = False,
) -> Path:
    """Write tables, plots and ``report.html`` for the evaluations in ``inputs``; returns the HTML path."""
    from tgated.report.figures import case_distribution, dice_bars, evaluation_overlays, relpath

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    evals = find_evaluations(list(inputs))
    tables = write_tables(evals, out_p)
    bars = dice_bars(evals, out_p / "dice_by_organ.png")
    dist = case_distribution(evals, out_p / "dice_by_case.png")
    overlay_files: list[tuple[str, list[Path]]] = []
    if overlays:
        for e in evals:
            files = evaluation_overlays(e, out_p, max_cases=max_overlay_cases)
            if files:
                overlay_files.append((e.name, files))

    parts = [f"<h1>{html.escape(title)}</h1>"]
    for note in notes or []:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append("<h2>Evaluations</h2><ul>")
    for e in evals:
        s = e.summary
        parts.append(
            f"<li><b>{html.escape(e.name)}</b>: dataset <code>{html.escape(e.dataset)}</code>, protocol "
            f"<code>{html.escape(str(s.get('protocol', '?')))}</code>, {s.get('cases', '?')} cases — "
            f"<code>{html.escape(str(e.path))}</code></li>"
        )
    parts.append("</ul><h2>Dice per organ</h2>")
    for ds, table in tables["dice"].items():
        parts.append(f"<h3>{html.escape(ds)}</h3>" if len(tables["dice"]) > 1 else "")
        parts.append(_html_table(*table))
    parts.append(
        "<p>Mean over cases per organ (number of cases in brackets); the mean row is the unweighted "
        "mean over organs. Organs a dataset does not label are left out.</p>"
    )
    parts.append(f'<img src="{relpath(bars, out_p)}" alt="Dice per organ">')
    parts.append(f'<img src="{relpath(dist, out_p)}" alt="Dice per case">')
    parts.append("<h2>Normalised surface Dice per organ</h2>")
    for ds, table in tables["nsd"].items():
        parts.append(f"<h3>{html.escape(ds)}</h3>" if len(tables["nsd"]) > 1 else "")
        parts.append(_html_table(*table))
    if tables["cross"][1]:
        parts.append("<h2>Cross-domain drop</h2>")
        parts.append(_html_table(*tables["cross"]))
        parts.append(
            "<p>drop = (in-domain − zero-shot) / in-domain mean Dice; the first evaluation listed for a "
            "model is its in-domain reference.</p>"
        )
    if overlay_files:
        parts.append(
            "<h2>Overlays</h2><p>Left: ground truth; right: prediction. Radiological view (the patient's "
            "right on the image's left).</p>"
        )
        for name, files in overlay_files:
            for f in files:
                parts.append(f'<img src="{relpath(f, out_p)}" alt="{html.escape(name)}">')
    parts.append(f"<p><small>tgated {__version__}</small></p>")
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + f"</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    path = out_p / "report.html"
    atomic_write_text(path, doc)
    if not quiet:
        logger.info("report: %s", path)
    return path
