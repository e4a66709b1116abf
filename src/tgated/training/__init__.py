"""Training: ``tgated train`` and its parts (samples, augmentation, losses, checkpoints, DDP).

:func:`train` is the entry point (the CLI, the demo and the paper protocol call it); see
:mod:`tgated.training.loop` for what a run does and writes.
"""

from __future__ import annotations

from tgated.training.loop import RESUMABLE_KEYS, TrainResult, resolve_config, train

__all__ = ["RESUMABLE_KEYS", "TrainResult", "resolve_config", "train"]
