"""tgated: 3-D medical image segmentation with CLIPSeg and the T-Gated adjacent-slice adapter.

The public API is re-exported lazily so that ``import tgated`` (and ``tgated --help``) stays light:
torch and transformers load when a model-related name is first used.
"""

from __future__ import annotations

from tgated.exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "segment": "tgated.inference",
    "predict": "tgated.inference",
    "TGatedModel": "tgated.models.tgated",
    "read_volume": "tgated.io.volumes",
    "evaluate": "tgated.evaluation",
    "train": "tgated.training",
    "ExperimentConfig": "tgated.config",
    "load_config": "tgated.config",
    "ORGANS": "tgated.organs",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
