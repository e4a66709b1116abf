"""Experiments: train → predict → evaluate → report pipelines, resumable (docs/architecture.md).

* :mod:`tgated.experiments.demo`: ``tgated demo``, the embedded CPU demo.
* :mod:`tgated.experiments.evidence`: ``tgated experiment evidence``, the pre-registered CPU
  experiment that asks whether the adjacent-slice context is used and helps.
* :mod:`tgated.experiments.paper`: ``tgated experiment paper``, the paper's main table (FLARE22 test
  split, BTCV, AMOS CT and MR) for T-Gated, its baseline and the DynUNet, in either recipe.

Names are re-exported lazily so that ``import tgated.experiments`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEMO_ORGANS": "tgated.experiments.demo",
    "DemoResult": "tgated.experiments.demo",
    "run_evidence": "tgated.experiments.evidence",
    "demo_config": "tgated.experiments.demo",
    "describe": "tgated.experiments.demo",
    "run_demo": "tgated.experiments.demo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tgated.experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
