"""The T-Gated adapter on its own: sizes, init behaviour, disabled parts, regulariser, drop-path."""

from __future__ import annotations

import math

import pytest
import torch

from tgated.config import AdapterConfig
from tgated.models.adapter import DropPath, TemporalTransformer, TGatedAdapter

SMALL = AdapterConfig(dim=32, layers=2, heads=4, ffn_dim=64, spatial_heads=4)


def _published_count(c: int, k: int, d: int = 256, layers: int = 4, ffn: int = 1024) -> dict[str, int]:
    """Hand count of the adapter of docs/architecture.md, Model."""
    ln = lambda w: 2 * w  # noqa: E731
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    layer = lin(d, 3 * d) + lin(d, d) + 2 * ln(d) + lin(d, ffn) + lin(ffn, d)
    temporal = lin(c, d, False) + ln(d) + k * d + layers * layer + ln(d) + lin(d, c, False)
    gate = lin(c, c)
    spatial = ln(c) + lin(c, 3 * c) + lin(c, c) + ln(c) + lin(c, 2 * c) + lin(2 * c, c)
    head = lin(c, c) + ln(c) + lin(c, c)
    return {"temporal": temporal, "gate": gate, "spatial": spatial, "head": head}


def test_published_size_at_vit_b() -> None:
    with torch.device("meta"):
        adapter = TGatedAdapter(768, 5, AdapterConfig())
    expected = _published_count(768, 5)
    assert adapter.component_parameters() == expected
    total = sum(p.numel() for p in adapter.parameters())
    assert total == sum(expected.values()) == 10_054_912  # "≈ 10.05 M"


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_shapes(k: int) -> None:
    adapter = TGatedAdapter(64, k, SMALL).eval()
    out = adapter(torch.randn(2, k, 17, 64))
    assert out.shape == (2, 17, 64)


def test_wrong_window_size_is_an_error() -> None:
    adapter = TGatedAdapter(64, 3, SMALL)
    with pytest.raises(ValueError, match="K=3"):
        adapter(torch.randn(2, 5, 17, 64))


def test_init_equals_centre_up_to_the_gate() -> None:
    torch.manual_seed(0)
    adapter = TGatedAdapter(64, 5, SMALL).eval()
    x = torch.randn(3, 5, 17, 64) * 4
    centre = x[:, 2]
    out = adapter(x)
    ratio = (out - centre).norm(dim=-1) / centre.norm(dim=-1)
    sigma = 1 / (1 + math.exp(5.0))  # 0.0067: h = (1 - σ(−5)) · centre exactly at init
    assert torch.allclose(ratio, torch.full_like(ratio, sigma), rtol=1e-4)
    assert ratio.max() < 0.01


def test_published_initialisations() -> None:
    """``spatial_out_init: normal`` + ``attention_init: xavier``: the spatial block's output
    projections keep PyTorch's default init (the block is no longer the identity), and every attention
    has nn.MultiheadAttention's init: zero q/k/v and output biases, q/k/v weights Xavier-uniform,
    whose bound sqrt(6 / (D + 3D)) is above nn.Linear's 1 / sqrt(D)."""
    import dataclasses

    torch.manual_seed(0)
    ours = TGatedAdapter(64, 3, SMALL)
    published = TGatedAdapter(
        64, 3, dataclasses.replace(SMALL, spatial_out_init="normal", attention_init="xavier")
    )
    sp_ours, sp_pub = ours.spatial, published.spatial
    for lin in (sp_ours.attn.out, sp_ours.fc2):
        assert not lin.weight.any() and not lin.bias.any()
    for lin in (sp_pub.attn.out, sp_pub.fc2):
        assert lin.weight.abs().max() > 0
    assert sp_pub.fc2.bias.abs().max() > 0  # the MLP keeps nn.Linear's bias init
    for attn, width in [(sp_pub.attn, 64), *((layer.attn, SMALL.dim) for layer in published.temporal.layers)]:
        assert not attn.qkv.bias.any() and not attn.out.bias.any()
        bound = math.sqrt(6 / (width + 3 * width))
        assert attn.qkv.weight.abs().max() <= bound
        assert attn.qkv.weight.abs().max() > 1 / math.sqrt(width)  # beyond nn.Linear's range
    for attn in (sp_ours.attn, *(layer.attn for layer in ours.temporal.layers)):
        assert attn.qkv.bias.abs().max() > 0  # ours: nn.Linear's default
        assert attn.qkv.weight.abs().max() <= 1 / math.sqrt(attn.qkv.in_features)
    # the spatial block now changes the tokens at init
    x = torch.randn(2, 3, 17, 64)
    published.eval()
    h = published.spatial(x[:, 1])
    assert (h - x[:, 1]).abs().max() > 1e-3


def test_gate_off_is_residual_and_identity_at_init() -> None:
    adapter = TGatedAdapter(64, 3, SMALL, gate=False).eval()
    assert adapter.gate is None
    x = torch.randn(2, 3, 17, 64)
    torch.testing.assert_close(adapter(x), x[:, 1], rtol=0, atol=1e-6)
    assert adapter.gate_regularization().item() == 0.0


def test_disabled_parts_are_not_built() -> None:
    adapter = TGatedAdapter(64, 3, SMALL, temporal=False, gate=False, spatial=False).eval()
    assert adapter.temporal is None and adapter.gate is None and adapter.spatial is None
    assert set(adapter.component_parameters()) == {"head"}
    x = torch.randn(2, 3, 17, 64)
    torch.testing.assert_close(adapter(x), x[:, 1])  # head residual, zero-init output


def test_gate_without_temporal_is_an_error() -> None:
    with pytest.raises(ValueError, match="gate=false"):
        TGatedAdapter(64, 3, SMALL, temporal=False, gate=True)


def test_even_context_is_an_error() -> None:
    with pytest.raises(ValueError, match="odd"):
        TGatedAdapter(64, 4, SMALL)


def test_non_residual_head_replaces_its_input() -> None:
    torch.manual_seed(0)
    adapter = TGatedAdapter(64, 3, SMALL, residual_head=False).eval()
    x = torch.randn(2, 3, 17, 64)
    out = adapter(x)
    h = adapter.spatial(0.9933071490757153 * x[:, 1])  # (1 − σ(−5)) · centre at init
    head = adapter.head
    torch.testing.assert_close(out, head.fc2(head.act(head.norm(head.fc1(h)))), rtol=1e-5, atol=1e-6)
    assert head.fc2.weight.abs().sum() > 0  # not zero-initialised: the decoder would get zeros


def test_gate_regulariser_at_init() -> None:
    cfg = AdapterConfig(dim=32, layers=1, heads=4, ffn_dim=64, spatial_heads=4, gate_reg=2e-3)
    adapter = TGatedAdapter(64, 3, cfg)
    s = 1 / (1 + math.exp(5.0))
    value = adapter.gate_regularization()
    assert value.item() == pytest.approx(2e-3 * s * (1 - s), rel=1e-6)
    value.backward()
    assert adapter.gate.proj.bias.grad is not None and adapter.gate.proj.bias.grad.abs().sum() > 0


def test_neighbours_reach_the_output_once_trained() -> None:
    torch.manual_seed(0)
    adapter = TGatedAdapter(64, 3, SMALL).eval()
    with torch.no_grad():
        adapter.temporal.out_proj.weight.normal_(0, 0.1)
        adapter.gate.proj.bias.zero_()
    x = torch.randn(1, 3, 17, 64)
    y = x.clone()
    y[:, 0] += 1.0  # change a neighbour only
    assert (adapter(x) - adapter(y)).abs().max() > 1e-3
    z = x.clone()
    z[:, :, 5] += 1.0  # change token 5 in all slices: the temporal part mixes only across slices
    diff = (adapter.temporal(x) - adapter.temporal(z)).abs().amax(dim=(0, 2))
    assert diff[5] > 1e-3 and diff[torch.arange(17) != 5].max() == 0


def test_drop_path() -> None:
    dp = DropPath(0.5)
    x = torch.ones(1000, 4, 8)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    rows = y.flatten(1)
    # whole rows are dropped or kept (and rescaled by 1 / keep)
    assert set(torch.unique(rows).tolist()) <= {0.0, 2.0}
    assert torch.all((rows == 0).all(1) | (rows == 2).all(1))
    assert 0.4 < (rows[:, 0] == 0).float().mean() < 0.6
    with pytest.raises(ValueError, match="drop-path"):
        DropPath(1.0)


def test_temporal_drop_path_rises_linearly() -> None:
    adapter = TGatedAdapter(
        64, 3, AdapterConfig(dim=32, layers=4, heads=4, ffn_dim=64, drop_path=0.3, spatial_heads=4)
    )
    rates = [layer.drop_path.p for layer in adapter.temporal.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert adapter.spatial.drop_path.p == pytest.approx(0.05)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_temporal_last_layer_computes_the_centre_only(k):
    """The last temporal layer computes the centre position alone, in eval and in train mode: the
    same output, and in training the same gradients, as running every position through every
    layer and keeping the centre (dropout and drop-path 0: train mode is deterministic)."""
    torch.manual_seed(0)
    cfg = AdapterConfig(dim=32, layers=3, heads=4, ffn_dim=64, dropout=0.0, drop_path=0.0)
    temporal = TemporalTransformer(48, k, cfg)
    with torch.no_grad():
        for p in temporal.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # no zero-initialised layer hides a wrong position
    x = torch.randn(2, k, 7, 48)

    def every_position():
        h = temporal.in_norm(temporal.in_proj(x.permute(0, 2, 1, 3).reshape(14, k, 48))) + temporal.pos_embed
        for layer in temporal.layers:
            h = layer(h)
        return temporal.out_proj(temporal.out_norm(h[:, k // 2])).view(2, 7, 48)

    temporal.eval()
    with torch.no_grad():
        fast, full = temporal(x), every_position()
    assert fast.shape == (2, 7, 48) and full.abs().max() > 0.1
    assert (fast - full).abs().max() <= 1e-5
    temporal.train()
    rows = []  # positions per sequence that reach the last layer's MLP: the centre alone
    hook = temporal.layers[-1].fc1.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    temporal(x)
    hook.remove()
    assert rows == [1]
    weight = torch.randn(2, 7, 48)
    grads = []
    for forward in (lambda: temporal(x), every_position):
        temporal.zero_grad()
        (forward() * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in temporal.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    scale = max(g.abs().max() for g in grads[1].values())
    assert scale > 0.1
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize(("temporal", "gate"), [(True, True), (True, False), (False, False)])
def test_indexed_windows_equal_gathered_windows(temporal, gate):
    """``forward_indexed(images, index)`` (the temporal input projection once per image, windows
    gathered after it) gives ``forward(images[index])``'s values, for overlapping windows with
    repeated edge slices, in eval and in train mode."""
    torch.manual_seed(0)
    k, c = 5, 48
    adapter = TGatedAdapter(c, k, SMALL, temporal=temporal, gate=gate)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # no zero-initialised part hides a wrong slice
    images = torch.randn(6, 7, c)
    index = torch.tensor([[max(0, min(5, z + d)) for d in range(-2, 3)] for z in range(6)])  # clamped windows
    adapter.eval()
    with torch.no_grad():
        fast = adapter.forward_indexed(images, index)
        gathered = adapter(images[index])
        assert fast.shape == (6, 7, c) and gathered.abs().max() > 0.1
        assert (fast - gathered).abs().max() <= 1e-6
        # a window is its own slices: permuting the images and the index alike changes nothing
        perm = torch.randperm(6)
        moved = adapter.forward_indexed(images[perm], torch.argsort(perm)[index])
        assert (moved - fast).abs().max() <= 1e-6
    adapter.train()
    torch.manual_seed(1)
    trained = adapter.forward_indexed(images, index)
    torch.manual_seed(1)
    assert (trained - adapter(images[index])).abs().max() <= 1e-6  # the same dropout draws
    with pytest.raises(ValueError, match=r"adapter expects images \(U, N, C=48\)"):
        adapter.forward_indexed(images[None], index)
