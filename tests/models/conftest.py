"""Tiny random CLIPSeg + T-Gated models for the model tests (CPU, milliseconds per forward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tgated.config import AdapterConfig, BackboneConfig, ModelConfig, PreprocessConfig

IMAGE = 64  # 4 x 4 patches of 16 px + CLS = 17 tokens


def tiny_model_config(**changes: Any) -> ModelConfig:
    """A tiny ModelConfig: 4-layer ViT (width 64, patch 16, position grid 32 px interpolated to 64),
    extract layers [1, 2, 3], a small adapter (width 32, 2 temporal layers) on layer 3, K = 3."""
    backbone = BackboneConfig(source="random", preset="tiny", image_size=32, seed=0)
    adapter = AdapterConfig(dim=32, layers=2, heads=4, ffn_dim=64, spatial_heads=4)
    cfg = ModelConfig(
        backbone=backbone,
        adapter_config=adapter,
        context=3,
        adapt_layers=[3],
        preprocess=PreprocessConfig(image_size=IMAGE),
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def make_model() -> Callable[..., Any]:
    from tgated.models.tgated import TGatedModel

    def make(**changes: Any) -> TGatedModel:
        return TGatedModel.from_config(tiny_model_config(**changes))

    return make


def randomise_adapters(model: Any, seed: int = 0) -> None:
    """Give the zero-initialised adapter layers random values (gate open at 0.5) so that the
    neighbours of a window change the output; used where init's near-identity would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            if name.endswith("gate.proj.bias"):
                p.zero_()
            elif p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif p.dim() == 1 and not p.any() and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def even_odds(model: Any) -> None:
    """Set the decoder's output bias to 0: random weights then predict foreground on about half of the
    pixels instead of the 2 % training prior, so label-map logic (argmax, threshold) is exercised."""
    from tgated.models.backbone import decoder_output_layer

    with torch.no_grad():
        decoder_output_layer(model).bias.zero_()


@pytest.fixture
def stack() -> torch.Tensor:
    """(9, 1, 64, 64) slices in [0, 1] that differ from slice to slice."""
    gen = torch.Generator().manual_seed(1)
    return torch.rand(9, 1, IMAGE, IMAGE, generator=gen)


@pytest.fixture
def randomise() -> Callable[..., None]:
    return randomise_adapters


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    return tiny_model_config
