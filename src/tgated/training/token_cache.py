"""Training-side vision tokens: the images of a volume's context windows, and the token cache.

With ``model.train_backbone: false`` the vision tower is a fixed function of each slice, so its tokens
can be computed once per distinct image of a volume's windows (:class:`~tgated.models.tgated.WindowPlan`,
physical-mode interpolated images included) instead of once per sample per epoch.
``train.cache_tokens``: ``off``; ``memory`` / ``disk`` (a memory-mapped scratch file under the run
folder, removed at the end) — image-space augmentation is then off (logged); ``auto`` caches in memory
when the backbone is frozen **and** no augmentation is asked for. Both are bounded by
``train.cache_max_gb``: over it, ``auto`` does not cache (logged) and ``memory``/``disk`` are an error.
See docs/architecture.md, "Data flow of tgated train".
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tgated.progress import progress
from tgated.training.augment import augmentation_active

logger = logging.getLogger(__name__)

ENCODE_BATCH = 32
"""Images per encoder call while filling the cache."""


def window_images(slices: torch.Tensor, plan: Any, ids: torch.Tensor) -> torch.Tensor:
    """Distinct images ``ids`` of a :class:`~tgated.models.tgated.WindowPlan` as float32 (n, 1, S, S):
    ``(1 − w)·slice[lo] + w·slice[hi]``, blended in float32 from the float16 training slices."""
    a = slices[plan.lo[ids]].float()
    w = plan.w[ids]
    if not bool((w != 0).any()):
        return a
    b = slices[plan.hi[ids]].float()
    w = w.view(-1, *([1] * (a.dim() - 1)))
    return (1 - w) * a + w * b


@dataclass
class TokenCache:
    """Per training volume, the tokens (U, L, N, C) of its plan's distinct images (tensors, or
    memory-mapped arrays for ``disk``); ``close`` removes the scratch folder."""

    tokens: list[Any]
    scratch: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        self.tokens = []
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None


def build_token_cache(
    model: Any,
    volumes: Sequence[Any],
    plans: Sequence[Any],
    train_cfg: Any,
    *,
    train_backbone: bool,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    run: Path,
    rank: int,
    quiet: bool,
    info: Callable[..., None],
) -> TokenCache | None:
    """The token cache ``train.cache_tokens`` asks for, or None (see the module docstring)."""
    t = train_cfg
    frozen = not train_backbone
    augmenting = augmentation_active(t)
    mode = t.cache_tokens
    if mode == "auto":
        mode = "memory" if frozen and not augmenting else "off"
        if mode == "off":
            why = "the backbone is trained" if not frozen else "augmentation is on"
            info("token cache off (cache_tokens: auto, %s)", why)
    if mode == "off":
        return None
    dtype = torch.float32 if amp_dtype is None else torch.float16
    n_tok = (model.image_size // int(model.backbone.config.vision_config.patch_size)) ** 2 + 1
    per_image = (
        len(model.token_layers) * n_tok * model.channels * torch.tensor([], dtype=dtype).element_size()
    )
    gb = sum(p.lo.numel() for p in plans) * per_image / 1e9
    if gb > t.cache_max_gb:
        msg = (
            f"the token cache needs {gb:.2f} GB (> train.cache_max_gb={t.cache_max_gb}); raise cache_max_gb, "
            "or train without it (cache_tokens: off)"
        )
        if t.cache_tokens == "auto":
            logger.warning("token cache off: %s", msg)
            return None
        raise ValueError(f"train.cache_tokens={t.cache_tokens!r}: {msg}")
    if augmenting:
        logger.warning("token cache on (%s): image-space augmentation is off", mode)
    info("caching vision tokens (%s, %.2f GB, %s)", mode, gb, str(dtype).replace("torch.", ""))
    cache = TokenCache(tokens=[])
    if mode == "disk":
        cache.scratch = tempfile.TemporaryDirectory(dir=run, prefix=f".token-cache-rank{rank}-")
    autocast = (
        contextlib.nullcontext
        if amp_dtype is None
        else (lambda: torch.autocast(device.type, dtype=amp_dtype))
    )
    was_training = model.training
    model.eval()
    try:
        pairs = list(zip(volumes, plans, strict=True))
        for v, (vol, plan) in enumerate(progress(pairs, desc="caching tokens", unit="case", quiet=quiet)):
            u = plan.lo.numel()
            store: Any = None
            if cache.scratch is not None:
                np_dtype = np.float32 if dtype == torch.float32 else np.float16
                shape = (u, len(model.token_layers), n_tok, model.channels)
                store = np.lib.format.open_memmap(
                    os.path.join(cache.scratch.name, f"{v}.npy"), mode="w+", dtype=np_dtype, shape=shape
                )
            chunks = []
            for start in range(0, u, ENCODE_BATCH):
                ids = torch.arange(start, min(start + ENCODE_BATCH, u))
                with torch.no_grad(), autocast():
                    tok = model.encode(window_images(vol.slices, plan, ids).to(device))
                tok = tok.to("cpu", dtype)
                if store is None:
                    chunks.append(tok)
                else:
                    store[start : start + len(ids)] = tok.numpy()
            if store is None:
                cache.tokens.append(torch.cat(chunks))
            else:
                store.flush()
                cache.tokens.append(np.load(store.filename, mmap_mode="r"))
    finally:
        model.train(was_training)
    return cache
