"""decode_organs: organ-independent decoder work once per slice, equal to the stock CLIPSeg decoder."""

from __future__ import annotations

import pytest
import torch

import tgated.models.decoder as decoder_module
from tgated.models.decoder import decode_organs

S = 64


def _inputs(model, b: int, o: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = (S // 16) ** 2 + 1
    acts = [torch.randn(b, n, model.channels, generator=gen) for _ in model.token_layers]
    cond = torch.randn(o, model.backbone.config.projection_dim, generator=gen)
    return acts, cond


def _stock(model, acts: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
    """The stock decoder called once per (slice, organ) pair."""
    b, o = acts[0].shape[0], cond.shape[0]
    logits = model.decoder([a.repeat_interleave(o, dim=0) for a in acts], cond.repeat(b, 1)).logits
    return logits.view(b, o, S, S)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # three activations, FiLM on the first decoder layer, complex transposed convolution
        {"variant": "reference"},  # one activation: only the first reduce / FiLM / layer
    ],
)
def test_equals_the_stock_decoder(make_model, changes) -> None:
    model = make_model(**changes).eval()
    acts, cond = _inputs(model, b=3, o=5)
    with torch.no_grad():
        ours = decode_organs(model.decoder, acts, cond)
        stock = _stock(model, acts, cond)
    assert ours.shape == (3, 5, S, S)
    assert (ours - stock).abs().max() <= 1e-5
    assert stock.std() > 1e-2  # organs and slices differ: a mixed-up order would be caught
    assert (stock[:, 0] - stock[:, 1]).abs().max() > 1e-3 and (stock[0] - stock[1]).abs().max() > 1e-3


def test_plain_transposed_convolution_and_small_blocks(make_model, monkeypatch) -> None:
    """Patch 8 builds the single ConvTranspose2d upsampler; blocks of one sequence give the same logits."""
    from tgated.config import BackboneConfig

    model = make_model(backbone=BackboneConfig(source="random", preset="tiny", patch_size=8, seed=0)).eval()
    assert not model.backbone.config.use_complex_transposed_convolution
    gen = torch.Generator().manual_seed(0)
    acts = [torch.randn(2, (S // 8) ** 2 + 1, model.channels, generator=gen) for _ in model.token_layers]
    cond = torch.randn(4, model.backbone.config.projection_dim, generator=gen)
    with torch.no_grad():
        whole = decode_organs(model.decoder, acts, cond)
        monkeypatch.setattr(decoder_module, "ROWS_PER_BLOCK", 1)
        blocks = decode_organs(model.decoder, acts, cond)
        stock = _stock(model, acts, cond)
    assert (whole - stock).abs().max() <= 1e-5
    assert (blocks - stock).abs().max() <= 1e-5


def test_film_after_the_first_layer(make_model) -> None:
    """With conditional_layer 1 the first decoder layer is organ-independent and runs once per slice."""
    model = make_model().eval()
    model.decoder.conditional_layer = 1
    acts, cond = _inputs(model, b=2, o=3)
    calls = []
    norm = model.decoder.layers[0].layer_norm1
    hook = norm.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        ours = decode_organs(model.decoder, acts, cond)
        hook.remove()
        stock = _stock(model, acts, cond)
    assert calls == [2]  # the slices, not slices × organs
    assert (ours - stock).abs().max() <= 1e-5


def test_conditioning_must_be_one_vector_per_organ(make_model) -> None:
    model = make_model().eval()
    acts, cond = _inputs(model, b=1, o=2)
    with pytest.raises(ValueError, match=r"\(organs, dim\)"):
        decode_organs(model.decoder, acts, cond[0])
