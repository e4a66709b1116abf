"""tgated: 3-D medical image segmentation with CLIPSeg and the T-Gated adjacent-slice adapter.

The public API is re-exported lazily so that ``import tgated`` (and ``tgated --help``) stays light:
torch and transformers load when a model-related name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "segment": "tgated.inference",
    "predict": "tgated.inference",
    "TGatedModel": "tgated.models.tgated",
    "read_volume": "tgated.io.volumes",
    "evaluate": "tgated.evaluate",
    "train": "tgated.training",
    "ExperimentConfig": "tgated.config",
    "load_config": "tgated.config",
    "ORGANS": "tgated.organs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tgated' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
