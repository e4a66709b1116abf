"""Inference: volumes → label maps (:mod:`tgated.inference.predictor`) and the file-level
``tgated predict`` / :func:`segment` API (:mod:`tgated.inference.api`).

Names are re-exported lazily; this package never imports training or report code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "predict": "tgated.inference.api",
    "segment": "tgated.inference.api",
    "find_inputs": "tgated.inference.api",
    "Predictor": "tgated.inference.predictor",
    "Prediction": "tgated.inference.predictor",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tgated.inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
