"""Inference: volumes → label maps (:mod:`tgated.inference.predictor`) and the file-level
``tgated predict`` / :func:`segment` API (:mod:`tgated.inference.api`).

Names are re-exported lazily; this package never imports training or report code.
"""

from __future__ import annotations

from tgated.exports import lazy_exports

_EXPORTS = {
    "predict": "tgated.inference.api",
    "segment": "tgated.inference.api",
    "find_inputs": "tgated.inference.api",
    "Predictor": "tgated.inference.predictor",
    "Prediction": "tgated.inference.predictor",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
