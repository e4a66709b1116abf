"""Reports: comparison tables (markdown / CSV), cross-domain drops, plots and ``report.html``.

``make_report(["runs/baseline/eval/flare22", "runs/tgated/eval/flare22"], out="report")`` writes:

* ``comparison.md`` / ``comparison.csv`` — per dataset, per-organ mean Dice (n cases) per evaluation,
  and the difference last − first when there are two or more;
* ``nsd.md`` — the same for NSD;
* ``cross_domain.md`` — in-domain vs zero-shot mean Dice and the relative drop per model;
* ``dice_by_organ.png``, ``dice_by_case.png``, ``overlay_*.png`` and ``report.html`` tying them together.
"""

from __future__ import annotations

from tgated.report.document import make_report, write_tables

__all__ = ["make_report", "write_tables"]
