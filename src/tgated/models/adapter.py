"""The T-Gated adjacent-slice adapter (docs/architecture.md, Model).

One :class:`TGatedAdapter` turns the encoder tokens of a context window of ``K`` slices into
adapted tokens for the window's centre slice:

``(B, K, N, C)`` tokens (CLS included, slice order inferior → superior, centre at ``K // 2``)
→ ``(B, N, C)`` adapted centre tokens.

1. **temporal** transformer, run per token position across the ``K`` slices: Linear C→dim (no bias)
   + LayerNorm, learned slice-position embedding (K, dim), ``layers`` pre-LN encoder layers (GELU,
   dropout, stochastic depth rising linearly 0 → ``drop_path``), LayerNorm, Linear dim→C (no bias,
   zero-initialised); the centre position is kept → ``h_t``. The last layer computes the centre
   query only (a fifth of its work at K = 5; keys and values of all K slices).
2. **gate**: ``g = sigmoid(W h_t + b)`` with a full C×C ``W`` (element-wise output), ``W = 0`` and
   ``b = gate_bias_init`` (−5) at init; ``h = g·h_t + (1 − g)·h_centre``.
3. **spatial** context block: pre-LN self-attention over the N tokens + MLP C→2C→C, both
   residual with zero-initialised output projections (``spatial_out_init: normal``: PyTorch's
   default, as the published code) and drop-path.

Attention projections keep ``nn.Linear``'s initialisation, or ``nn.MultiheadAttention``'s with
``attention_init: xavier`` (the published code's).
4. **head**: Linear C→C, LayerNorm, GELU, Dropout, Linear C→C (zero-init), Dropout, residual
   (``residual_head=False`` — the published wiring — drops the residual; its last Linear then
   keeps the default init).

Disabled parts are not built: without the temporal part ``h_t`` is the centre tokens and no gate
is possible; without the gate the temporal output is added to the centre tokens,
``h = h_centre + h_t`` (the zero-initialised projection keeps ``h = h_centre`` at init — a plain
``h = h_t`` would hand the decoder the 256-wide bottleneck's output and zeros at init).

At initialisation the adapted tokens equal ``(1 − σ(−5))·h_centre``, i.e. the centre tokens up to
0.67 %. With C = 768 and the default sizes one adapter has 10,054,912 parameters at K = 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgated.config import AdapterConfig
from tgated.data.slices import check_context

COMPONENTS = ("temporal", "gate", "spatial", "head")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole rows of the batch (dim 0) in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, L, D) with ``scaled_dot_product_attention``.

    ``init``: ``linear`` keeps ``nn.Linear``'s default initialisation; ``xavier`` is
    ``nn.MultiheadAttention``'s (Xavier-uniform q/k/v weights over the whole 3D×D matrix, zero
    q/k/v and output biases, the output weight as ``nn.Linear``).
    """

    def __init__(self, dim: int, heads: int, dropout: float, init: str = "linear") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        if init not in ("linear", "xavier"):
            raise ValueError(f"attention init {init!r}: expected 'linear' or 'xavier'")
        self.heads = heads
        self.dropout = float(dropout)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        if init == "xavier":
            nn.init.xavier_uniform_(self.qkv.weight)
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, query: int | None = None) -> torch.Tensor:
        """(B, L, D) → (B, L, D); with ``query``, only that position attends: (B, 1, D)."""
        b, n, d = x.shape
        if query is None:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        else:  # keys and values of every position, the query of one
            w, bias = self.qkv.weight, self.qkv.bias
            k, v = (
                F.linear(x, w[d:], bias[d:]).view(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            )
            q = F.linear(x[:, query : query + 1], w[:d], bias[:d]).view(b, 1, self.heads, -1).transpose(1, 2)
            n = 1
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-LN transformer encoder layer with drop-path on both residual branches.

    ``x + DropPath(Dropout(Attn(LN(x))))`` then ``x + DropPath(Dropout(W2 Dropout(GELU(W1 LN(x)))))``
    (the dropout placement of ``nn.TransformerEncoderLayer(norm_first=True)``). With
    ``zero_init_out`` the attention and MLP output projections start at zero, so the layer is the
    identity at init; ``attention_init`` is :class:`SelfAttention`'s ``init``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        drop_path: float,
        zero_init_out: bool = False,
        attention_init: str = "linear",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, attention_init)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU()
        self.drop_ffn = nn.Dropout(dropout)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.drop2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        if zero_init_out:
            for lin in (self.attn.out, self.fc2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, query: int | None = None) -> torch.Tensor:
        """(B, L, D) → (B, L, D); with ``query``, the output at that position only, (B, 1, D): the
        same values for a fifth of the work at K = 5 when only one position is read."""
        skip = x if query is None else x[:, query : query + 1]
        x = skip + self.drop_path(self.drop1(self.attn(self.norm1(x), query)))
        y = self.fc2(self.drop_ffn(self.act(self.fc1(self.norm2(x)))))
        return x + self.drop_path(self.drop2(y))


class TemporalTransformer(nn.Module):
    """Per-token-position transformer across the K slices of a window; returns the centre output.

    Input (B, K, N, C) → output (B, N, C). The B·N sequences have length K.
    """

    def __init__(self, channels: int, context: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.context = context
        self.in_proj = nn.Linear(channels, cfg.dim, bias=False)
        self.in_norm = nn.LayerNorm(cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(context, cfg.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = [cfg.drop_path * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]
        self.layers = nn.ModuleList(
            TransformerLayer(
                cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout, rate, attention_init=cfg.attention_init
            )
            for rate in rates
        )
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, channels, bias=False)
        if cfg.temporal_out_init == "zero":
            nn.init.zeros_(self.out_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, n, c = x.shape
        if k != self.context:
            raise ValueError(f"temporal transformer built for K={self.context} slices, got windows of {k}")
        h = x.permute(0, 2, 1, 3).reshape(b * n, k, c)
        return self._layers(self.in_norm(self.in_proj(h)) + self.pos_embed, b, n, c)

    def forward_indexed(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``forward(images[index])`` for windows given as distinct images (U, N, C) and, per
        window, the images of its K slices (B, K): the input projection and its LayerNorm, which
        act on each token of each slice alone, run once per image instead of once per window slot
        (K times fewer when the windows of a stack overlap), and only their narrower output is
        gathered into windows."""
        b, k = index.shape
        if k != self.context:
            raise ValueError(f"temporal transformer built for K={self.context} slices, got windows of {k}")
        n, c = images.shape[1:]
        p = self.in_norm(self.in_proj(images))  # (U, N, dim)
        h = p[index].transpose(1, 2).reshape(b * n, k, -1)
        return self._layers(h + self.pos_embed, b, n, c)

    def _layers(self, h: torch.Tensor, b: int, n: int, c: int) -> torch.Tensor:
        """(B·N, K, dim) embedded windows → (B, N, C) centre outputs. Only the centre is read after
        the last layer, so it alone is computed there (its keys and values still come from all K
        slices), in training as at inference."""
        for layer in self.layers[:-1]:
            h = layer(h)
        h = self.layers[-1](h, h.shape[1] // 2)  # (B·N, 1, dim)
        return self.out_proj(self.out_norm(h[:, 0])).view(b, n, c)


class Gate(nn.Module):
    """``g = sigmoid(W h_t + b)``, W a full C×C linear map (zero at init), b = ``bias_init``."""

    def __init__(self, channels: int, bias_init: float) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias_init)

    def forward(self, h_t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h_t))


class Head(nn.Module):
    """Linear, LayerNorm, GELU, Dropout, Linear, Dropout; residual with a zero-initialised last
    Linear, or (``residual=False``) a plain map whose last Linear keeps PyTorch's default init — a
    zero-initialised non-residual head would feed the decoder zeros and stall the zero-initialised
    parts before it for several optimiser steps."""

    def __init__(self, channels: int, dropout: float, out_dropout: float, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.fc1 = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(channels, channels)
        self.out_drop = nn.Dropout(out_dropout)
        if residual:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out_drop(self.fc2(self.drop(self.act(self.norm(self.fc1(x))))))
        return x + y if self.residual else y


class TGatedAdapter(nn.Module):
    """The T-Gated adapter for one encoder layer: (B, K, N, C) window tokens → (B, N, C).

    Parameters
    ----------
    channels:
        Token width C of the encoder (768 for ViT-B/16).
    context:
        Window size K (odd); the centre slice is at index ``K // 2``.
    cfg:
        Sizes and dropout rates (:class:`tgated.config.AdapterConfig`).
    temporal, gate, spatial:
        Build these parts (a disabled part is not built; ``gate`` needs ``temporal``).
    residual_head:
        ``False`` reproduces the published wiring (head output replaces its input).
    """

    def __init__(
        self,
        channels: int,
        context: int,
        cfg: AdapterConfig,
        *,
        temporal: bool = True,
        gate: bool = True,
        spatial: bool = True,
        residual_head: bool = True,
    ) -> None:
        super().__init__()
        check_context(context)
        if gate and not temporal:
            raise ValueError(
                "adapter gate: true needs temporal: true (the gate mixes the temporal and the centre "
                "tokens; without the temporal part it has nothing to mix) — set model.gate=false"
            )
        self.channels = channels
        self.context = context
        self.gate_reg_weight = float(cfg.gate_reg)
        self.temporal = TemporalTransformer(channels, context, cfg) if temporal else None
        self.gate = Gate(channels, cfg.gate_bias_init) if gate else None
        self.spatial = (
            TransformerLayer(
                channels,
                cfg.spatial_heads,
                2 * channels,
                cfg.spatial_dropout,
                cfg.spatial_drop_path,
                zero_init_out=cfg.spatial_out_init == "zero",
                attention_init=cfg.attention_init,
            )
            if spatial
            else None
        )
        self.head = Head(channels, cfg.head_dropout, cfg.head_out_dropout, residual=residual_head)
        self.track_stats = False
        self._stat_sums = [0.0, 0.0, 0]  # gate opening, temporal share (sums over batches), batches

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 4 or tokens.shape[1] != self.context or tokens.shape[-1] != self.channels:
            raise ValueError(
                f"adapter expects window tokens (B, K={self.context}, N, C={self.channels}), "
                f"got shape {tuple(tokens.shape)}"
            )
        centre = tokens[:, self.context // 2]
        return self._adapt(centre, None if self.temporal is None else self.temporal(tokens))

    def forward_indexed(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``forward(images[index])`` for windows given as distinct images (U, N, C) and the images
        of each window's K slices (B, K) (:meth:`TemporalTransformer.forward_indexed`: the temporal
        input projection once per image); the same values, without gathering the full-width
        window tokens."""
        if images.dim() != 3 or images.shape[-1] != self.channels or index.dim() != 2:
            raise ValueError(
                f"adapter expects images (U, N, C={self.channels}) and a window index (B, K={self.context}), "
                f"got shapes {tuple(images.shape)} and {tuple(index.shape)}"
            )
        centre = images[index[:, self.context // 2]]
        return self._adapt(centre, None if self.temporal is None else self.temporal.forward_indexed(images, index))

    def _adapt(self, centre: torch.Tensor, h_t: torch.Tensor | None) -> torch.Tensor:
        """Gate, spatial block and head, from the centre tokens and the temporal output (B, N, C)."""
        if h_t is None:
            h = centre
        else:
            if self.gate is None:
                h = centre + h_t
            else:
                g = self.gate(h_t)
                h = g * h_t + (1.0 - g) * centre
            if self.track_stats:
                self._record(None if self.gate is None else g, h - centre, centre)
        if self.spatial is not None:
            h = self.spatial(h)
        return self.head(h)

    @torch.no_grad()
    def _record(self, g: torch.Tensor | None, contribution: torch.Tensor, centre: torch.Tensor) -> None:
        self._stat_sums[0] += float(g.float().mean()) if g is not None else 1.0
        share = contribution.float().norm(dim=-1) / centre.float().norm(dim=-1).clamp_min(1e-12)
        self._stat_sums[1] += float(share.mean())
        self._stat_sums[2] += 1

    def stats_state(self) -> list[float]:
        """The running sums behind :meth:`pop_stats` (saved in training checkpoints for exact resume)."""
        return [float(x) for x in self._stat_sums]

    def load_stats_state(self, state: list[float]) -> None:
        gate, share, n = state
        self._stat_sums = [float(gate), float(share), int(n)]

    def pop_stats(self) -> dict[str, float] | None:
        """Means since the last call over the forward passes run with ``track_stats`` on, then reset:
        ``gate_open`` = mean σ of the gate (1 without a gate), ``temporal_share`` = mean over tokens of
        ‖h − h_centre‖ / ‖h_centre‖ before the spatial block, i.e. how far the temporal branch moves
        the centre slice's tokens. None when nothing was recorded (or without a temporal part)."""
        gate, share, n = self._stat_sums
        self._stat_sums = [0.0, 0.0, 0]
        if not n:
            return None
        return {"gate_open": gate / n, "temporal_share": share / n}

    def gate_regularization(self) -> torch.Tensor:
        """``λ · mean(σ(b)(1 − σ(b)))`` over the gate bias b (0 without a gate); add it to the loss."""
        if self.gate is None:
            return self.head.fc1.weight.new_zeros(())
        s = torch.sigmoid(self.gate.proj.bias)
        return self.gate_reg_weight * (s * (1.0 - s)).mean()

    def component_parameters(self) -> dict[str, int]:
        """Parameter count of each built part (``temporal``, ``gate``, ``spatial``, ``head``)."""
        out = {}
        for name in COMPONENTS:
            module = getattr(self, name)
            if module is not None:
                out[name] = sum(p.numel() for p in module.parameters())
        return out

