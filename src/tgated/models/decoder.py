"""CLIPSeg's decoder for many organs at once: organ-independent work once per slice.

``CLIPSegDecoder`` (transformers) maps the extracted activations of one image and one conditioning
vector to logits. Segmenting O organs of a slice with it means O calls on the same activations
(or one call on the activations repeated O times). Everything before the FiLM step does not depend
on the organ: the ``reduces`` projections of the activations (and the decoder layers before
``conditional_layer``, none in CLIPSeg's checkpoints). :func:`decode_organs` computes that once per
slice and sends the organs through the rest together, with the same modules and weights:

* FiLM broadcasts each organ's ``film_mul`` / ``film_add`` over the slice's reduced tokens;
* each later ``reduces`` projection is computed once and added to every organ's tokens;
* the decoder layers run on ``(slices × organs)`` sequences, a block of sequences at a time, so that
  the MLP's hidden activations (2048 wide in rd64) stay small and in cache;
* the upsampler runs channels-last: the 3 × 3 convolution on a channels-last view of the tokens
  (no transpose copy) and each ``ConvTranspose2d`` whose stride equals its kernel (CLIPSeg's) as one
  matrix product per block, since such a layer maps every input pixel to its own k × k patch.

The result equals the stock decoder's up to float rounding (max |Δ logit| ≤ 1e-5 in float32,
tested against ``CLIPSegDecoder.forward``); ``benchmarks/bench_encoder_sharing.py`` measures the
speed. Inference only (no dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ROWS_PER_BLOCK = 1024
"""Token rows (sequences × tokens) per block through the decoder layers and the upsampler: rd64's
MLP hidden activations of a block (1024 × 2048 floats) stay in cache, which makes its matrix products
about twice as fast on a CPU as for all organs of a batch at once."""


def decode_organs(
    decoder: Any, activations: Sequence[torch.Tensor], conditioning: torch.Tensor
) -> torch.Tensor:
    """Logits (B, O, S, S) of B slices for O organs.

    ``decoder``: a ``CLIPSegDecoder``; ``activations``: the decoder's inputs, L tensors (B, N, C) in
    ``extract_layers`` order, as ``CLIPSegDecoder.forward`` takes them; ``conditioning``: one
    vector per organ (O, projection_dim) — the prompts' text embeddings or learned vectors.
    """
    if conditioning.dim() != 2:
        raise ValueError(f"conditioning: expected (organs, dim), got shape {tuple(conditioning.shape)}")
    acts = list(activations)[::-1]
    b, n = acts[0].shape[:2]
    o = conditioning.shape[0]
    film_mul, film_add = decoder.film_mul(conditioning), decoder.film_add(conditioning)  # (O, R)
    out: torch.Tensor | None = None  # (B, N, R) before FiLM, (B·O, N, R) after
    per_organ = False
    # as the stock decoder: fewer activations than layers (the reference variant's one) use the first layers
    for i, (act, layer, reduce) in enumerate(zip(acts, decoder.layers, decoder.reduces, strict=False)):
        r = reduce(act)  # once per slice
        if out is None:
            out = r
        elif per_organ:
            out = (out.view(b, o, n, -1) + r.unsqueeze(1)).flatten(0, 1)
        else:
            out = out + r
        if i == decoder.conditional_layer:
            out = (film_mul[None, :, None, :] * out[:, None] + film_add[None, :, None, :]).flatten(0, 1)
            per_organ = True
        out = _layer(layer, out)
    assert out is not None
    if not per_organ:  # conditional_layer beyond the layers used: FiLM never applied, as in the stock decoder
        raise ValueError(
            f"decoder.conditional_layer={decoder.conditional_layer} is not among the {len(acts)} decoder "
            "layers used; the organs would not be told apart"
        )
    logits = _upsample(decoder.transposed_convolution, out[:, 1:, :])
    return logits.view(b, o, *logits.shape[-2:])


def _rows_per_block(n_tokens: int) -> int:
    return max(1, ROWS_PER_BLOCK // max(1, n_tokens))


def _layer(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``CLIPSegDecoderLayer`` (post-LN attention + MLP) over (M, N, R), blocks of sequences."""
    step = _rows_per_block(x.shape[1])
    if x.shape[0] <= step:
        return _layer_block(layer, x)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], step):
        out[start : start + step] = _layer_block(layer, x[start : start + step])
    return out


def _layer_block(layer: Any, x: torch.Tensor) -> torch.Tensor:
    attn, _ = layer.self_attn(hidden_states=x, attention_mask=None)
    h = layer.layer_norm1(x + attn)
    mlp = layer.mlp
    y = mlp.fc1(h)
    y = y.relu_() if isinstance(mlp.activation_fn, nn.ReLU) else mlp.activation_fn(y)  # in place: no copy
    return layer.layer_norm2(h + mlp.fc2(y))


def _upsample(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's ``transposed_convolution`` on (M, h·w, R) tokens → (M, S, S) logits."""
    m, hw, r = tokens.shape
    side = round(hw**0.5)
    if side * side != hw:
        raise ValueError(f"{hw} patch tokens do not form a square grid")
    # (M, R, side, side) in channels-last memory: the tokens' own order, without the CLS token
    x = tokens.reshape(m, side, side, r).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    step = _rows_per_block(hw)
    parts = []
    for start in range(0, m, step):
        y = x[start : start + step]
        for lay in layers:
            y = _conv_transpose(lay, y) if _is_patch_transpose(lay) else lay(y)
        parts.append(y)
    return torch.cat(parts).squeeze(1)


def _is_patch_transpose(layer: nn.Module) -> bool:
    """A ``ConvTranspose2d`` that writes each input pixel into its own k × k output patch."""
    return (
        isinstance(layer, nn.ConvTranspose2d)
        and layer.stride == layer.kernel_size
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
        and layer.groups == 1
    )


def _conv_transpose(layer: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a stride = kernel transposed convolution, as one matrix product.

    ``out[b, co, h·k + i, w·k + j] = bias[co] + Σ_ci x[b, ci, h, w] · weight[ci, co, i, j]``.
    """
    b, ci, h, w = x.shape
    co, kh, kw = layer.weight.shape[1:]
    y = x.permute(0, 2, 3, 1).reshape(-1, ci) @ layer.weight.reshape(ci, co * kh * kw)
    y = y.view(b, h, w, co, kh, kw)
    if layer.bias is not None:
        y = y + layer.bias.view(1, 1, 1, co, 1, 1)
    # (b, h, kh, w, kw, co) -> (b, co, h·kh, w·kw) in channels-last memory, as the next layer reads it
    return y.permute(0, 1, 4, 2, 5, 3).reshape(b, h * kh, w * kw, co).permute(0, 3, 1, 2)


__all__ = ["ROWS_PER_BLOCK", "decode_organs"]
