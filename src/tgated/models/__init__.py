"""Models: CLIPSeg + T-Gated adapter (:mod:`tgated.models.tgated`), the adapter itself
(:mod:`tgated.models.adapter`) and the CLIPSeg backbone builders (:mod:`tgated.models.backbone`).

Names are re-exported lazily so that importing the package does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TGatedModel": "tgated.models.tgated",
    "WindowPlan": "tgated.models.tgated",
    "plan_windows": "tgated.models.tgated",
    "model_info": "tgated.models.tgated",
    "TGatedAdapter": "tgated.models.adapter",
    "load_backbone": "tgated.models.backbone",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tgated.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
