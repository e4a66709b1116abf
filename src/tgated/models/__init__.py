"""Models: CLIPSeg + T-Gated adapter (:mod:`tgated.models.tgated`), the adapter itself
(:mod:`tgated.models.adapter`) and the CLIPSeg backbone builders (:mod:`tgated.models.backbone`).

Names are re-exported lazily so that importing the package does not load torch.
"""

from __future__ import annotations

from tgated.exports import lazy_exports

_EXPORTS = {
    "TGatedModel": "tgated.models.tgated",
    "WindowPlan": "tgated.models.tgated",
    "plan_windows": "tgated.models.tgated",
    "model_info": "tgated.models.tgated",
    "TGatedAdapter": "tgated.models.adapter",
    "load_backbone": "tgated.models.backbone",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
