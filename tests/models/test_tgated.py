"""TGatedModel with tiny random CLIPSeg backbones: composition, variants, gradients, shared core."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPSegForImageSegmentation

from tgated.config import AdapterConfig
from tgated.models.tgated import TGatedModel, plan_windows
from tgated.organs import ORGANS, get_organ

S = 64
SMALL_ADAPTER = {"dim": 32, "layers": 2, "heads": 4, "ffn_dim": 64, "spatial_heads": 4}


def _windows(k: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, k, 1, S, S, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ baseline


def test_no_adapter_equals_stock_clipseg(make_model) -> None:
    model = make_model(adapter="none").eval()
    assert model.context == 1 and len(model.adapters) == 0
    pixels = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(3, model.backbone.config.projection_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = CLIPSegForImageSegmentation.forward(
            model.backbone, pixel_values=pixels, conditional_embeddings=cond
        )
        ours = model(pixel_windows=pixels[:, None], organs=cond)
    assert ours.shape == (3, S, S)
    # the tiny backbone's 32-px position grid is interpolated to 64 px, as rd64's 224 → 352
    assert model.backbone.config.vision_config.image_size == 32
    assert (ours - stock.logits).abs().max() <= 1e-5
    assert stock.logits.abs().max() > 1e-3  # not trivially zero


def test_baseline_forces_single_slices(make_model) -> None:
    model = make_model(adapter="none", context=5)
    assert model.context == 1
    with pytest.raises(ValueError, match="K=1"):
        model(pixel_windows=_windows(5), organs=torch.tensor([1, 2]))


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_output_shapes_and_token_path(make_model, k: int) -> None:
    model = make_model(context=k).eval()
    windows = _windows(k)
    organs = torch.tensor([1, 13])
    with torch.no_grad():
        logits = model(pixel_windows=windows, organs=organs)
        tokens = model.encode(windows.flatten(0, 1)).unflatten(0, (2, k))
        from_tokens = model(token_windows=tokens, organs=organs)
    assert logits.shape == (2, S, S)
    assert tokens.shape == (2, k, 3, 17, 64)  # L = 3 extracted layers, N = 4·4 + 1, C = 64
    torch.testing.assert_close(from_tokens, logits, rtol=0, atol=1e-6)


def test_context_one_keeps_the_adapter(make_model) -> None:
    with_context = make_model(context=5).parameter_counts()
    without = make_model(context=1).parameter_counts()
    assert without["adapter_components"].keys() == with_context["adapter_components"].keys()
    # only the slice-position embedding (K × dim) differs
    assert with_context["adapter"] - without["adapter"] == 4 * 32


def test_even_context_is_an_error(make_model) -> None:
    with pytest.raises(ValueError, match="odd"):
        make_model(context=4)


def test_one_channel_images_are_clip_normalised(make_model) -> None:
    from tgated.data.slices import clip_normalise

    model = make_model().eval()
    w = _windows(3)
    pix = clip_normalise(w.flatten(0, 1), model.config.preprocess).unflatten(0, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_windows=w, organs=[1, 2]), model(pixel_windows=pix, organs=[1, 2])
        )


def test_wrong_image_size_is_an_error(make_model) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="to_model_grid"):
        model(pixel_windows=torch.rand(1, 3, 1, 32, 32), organs=[1])


def test_organ_ids_names_and_embeddings_agree(make_model) -> None:
    model = make_model(conditioning="text").eval()
    w = _windows(3)
    emb = model.text_embeddings([model.prompt("liver"), model.prompt("left_kidney")])
    with torch.no_grad():
        a = model(pixel_windows=w, organs=torch.tensor([1, 13]))
        b = model(pixel_windows=w, organs=["liver", "left kidney"])
        c = model(pixel_windows=w, organs=emb)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert not torch.allclose(a[0], model(pixel_windows=w[:1], organs=[2])[0])
    with pytest.raises(ValueError, match="1-13"):
        model(pixel_windows=w, organs=torch.tensor([0, 14]))


def test_learned_conditioning_ids_names_and_vectors_agree(make_model) -> None:
    model = make_model().eval()  # random backbone: conditioning auto -> learned
    assert model.conditioning == "learned" and model.config.conditioning == "learned"
    w = _windows(3)
    vectors = model.organ_conditioning([get_organ("liver"), get_organ("left_kidney")])
    torch.testing.assert_close(vectors, model.organ_embedding[[0, 12]].detach(), rtol=0, atol=0)
    with torch.no_grad():
        a = model(pixel_windows=w, organs=torch.tensor([1, 13]))
        b = model(pixel_windows=w, organs=["liver", "left kidney"])
        c = model(pixel_windows=w, organs=vectors)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_random_text_tower_collapses_the_prompts_and_learned_conditioning_does_not(make_model) -> None:
    # A random text tower maps different prompts to nearly parallel vectors: the decoder cannot
    # tell the organs apart. The learned embeddings start orthogonal (13 rows in 32 dimensions).
    text = make_model(conditioning="text").conditioning_similarity(list(ORGANS))
    assert text["max_off_diagonal"] > 0.9
    learned = make_model().conditioning_similarity(list(ORGANS))
    assert learned["conditioning"] == "learned"
    assert learned["max_off_diagonal"] < 0.9
    assert abs(learned["max_off_diagonal"]) < 1e-4  # orthogonal rows
    assert all(abs(learned["cosine"][i][i] - 1) < 1e-4 for i in range(len(ORGANS)))


def test_learned_conditioning_starts_from_the_text_embeddings_of_a_pretrained_tower(make_model) -> None:
    model = make_model(conditioning="text")
    start = model._initial_organ_embedding(random_text=False)
    torch.testing.assert_close(start, model.text_embeddings([model.prompt(o) for o in ORGANS]).float())
    ortho = model._initial_organ_embedding(random_text=True)
    torch.testing.assert_close(ortho.norm(dim=1).mean(), start.norm(dim=1).mean(), rtol=1e-4, atol=0)


def test_text_embeddings_are_cached_and_frozen(make_model, monkeypatch) -> None:
    model = make_model(conditioning="text")
    assert not any(p.requires_grad for p in model.backbone.clip.text_model.parameters())
    first = model.text_embeddings(["liver", "spleen"])
    calls = []
    original = model.backbone.clip.get_text_features
    monkeypatch.setattr(
        model.backbone.clip, "get_text_features", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    again = model.text_embeddings(["spleen", "liver"])
    assert calls == []
    torch.testing.assert_close(again, first.flip(0), rtol=0, atol=0)
    # one prompt at a time: an embedding does not depend on its batch-mates
    torch.testing.assert_close(model.text_embeddings(["pancreas", "liver"])[1], first[0], rtol=0, atol=0)
    assert calls == [1]


def test_prompt_overrides(make_model) -> None:
    model = make_model(prompts={"liver": "hepatic parenchyma"})
    assert model.prompt("liver") == "hepatic parenchyma"
    assert model.prompt(3) == "spleen"
    with pytest.raises(ValueError, match="unknown organ"):
        make_model(prompts={"livr": "x"})


# ------------------------------------------------------------------------------------ init


def test_adapted_tokens_equal_centre_at_init(make_model) -> None:
    model = make_model(context=5).eval()
    with torch.no_grad():
        tokens = model.encode(_windows(5).flatten(0, 1)).unflatten(0, (2, 5))
        acts = model.adapt(tokens)
    j = model.token_layers.index(3)
    centre = tokens[:, 2, j]
    ratio = (acts[j] - centre).norm(dim=-1) / centre.norm(dim=-1)
    assert ratio.max() < 0.01
    assert ratio.min() > 0.006  # the gate's σ(−5) = 0.67 %: the adapter is there
    for other in (0, 1):  # unadapted layers come from the centre slice unchanged
        assert torch.equal(acts[other], tokens[:, 2, other])


def test_adapter_statistics_at_init(make_model) -> None:
    model = make_model(context=5).eval()
    model.track_adapter_stats(True)
    with torch.no_grad():
        model(pixel_windows=_windows(5), organs=[1, 2])
    stats = model.pop_adapter_stats()
    assert set(stats) == {3}
    assert stats[3]["gate_open"] == pytest.approx(1 / (1 + math.exp(5.0)), rel=1e-5)
    # zero-initialised temporal output: h = (1 - g) * centre, so the share is exactly σ(−5)
    assert stats[3]["temporal_share"] == pytest.approx(1 / (1 + math.exp(5.0)), rel=1e-4)
    assert model.pop_adapter_stats() == {}  # popped
    model.track_adapter_stats(False)
    with torch.no_grad():
        model(pixel_windows=_windows(5), organs=[1, 2])
    assert model.pop_adapter_stats() == {}


def test_normal_temporal_init_stays_near_the_centre_tokens(make_model) -> None:
    # the published initialisation: the temporal output is not zero, but the nearly closed gate
    # keeps the adapted tokens within a few percent of the centre tokens (measured tolerance)
    model = make_model(context=5, adapter_config=AdapterConfig(**SMALL_ADAPTER, temporal_out_init="normal"))
    model.eval()
    with torch.no_grad():
        tokens = model.encode(_windows(5).flatten(0, 1)).unflatten(0, (2, 5))
        acts = model.adapt(tokens)
    j = model.token_layers.index(3)
    centre = tokens[:, 2, j]
    ratio = (acts[j] - centre).norm(dim=-1) / centre.norm(dim=-1)
    assert 0.006 < ratio.max() < 0.03
    assert model.adapters["3"].temporal.out_proj.weight.abs().sum() > 0


def test_gate_regulariser_value_at_init(make_model) -> None:
    model = make_model()
    s = 1 / (1 + math.exp(5.0))
    assert model.gate_regularization().item() == pytest.approx(1e-3 * s * (1 - s), rel=1e-6)
    assert make_model(adapter="none").gate_regularization().item() == 0.0
    two = make_model(adapt_layers=[1, 3])
    assert two.gate_regularization().item() == pytest.approx(2e-3 * s * (1 - s), rel=1e-6)


# ------------------------------------------------------------------------------------ variants


def test_two_adapt_layers_build_two_adapters(make_model) -> None:
    model = make_model(adapt_layers=[1, 3]).eval()
    assert sorted(model.adapters) == ["1", "3"]
    with torch.no_grad():
        assert model(pixel_windows=_windows(3), organs=[1, 2]).shape == (2, S, S)
    single = make_model().parameter_counts()["adapter"]
    assert model.parameter_counts()["adapter"] == 2 * single


def test_adapt_layer_outside_extract_layers_names_the_valid_ones(make_model) -> None:
    with pytest.raises(ValueError, match=r"valid adapt layers: 1, 2, 3"):
        make_model(adapt_layers=[0])
    with pytest.raises(ValueError, match="distinct"):
        make_model(adapt_layers=[3, 3])


def test_reference_variant(make_model) -> None:
    model = make_model(variant="reference").eval()
    final = model.num_encoder_layers - 1
    assert model.token_layers == (final,) and list(model.adapters) == [str(final)]
    assert model.adapters[str(final)].head.residual is False
    # only the first reduce / FiLM / decoder layer is used, the rest is frozen
    assert all(p.requires_grad for p in model.decoder.reduces[0].parameters())
    assert not any(p.requires_grad for p in model.decoder.reduces[1].parameters())
    assert not any(p.requires_grad for p in model.decoder.layers[2].parameters())
    with torch.no_grad():
        tokens = model.encode(_windows(3).flatten(0, 1))
        out = model(pixel_windows=_windows(3), organs=[1, 2])
    assert tokens.shape == (6, 1, 17, 64)
    assert out.shape == (2, S, S)
    # the final-layer tokens are taken before the post-LayerNorm
    with torch.no_grad():
        pix = model._pixels(_windows(1).flatten(0, 1))
        hs = model.vision(pix, output_hidden_states=True).hidden_states
    torch.testing.assert_close(model.encode(_windows(1).flatten(0, 1))[:, 0], hs[-1], rtol=0, atol=1e-6)


def test_gate_needs_temporal(make_model) -> None:
    with pytest.raises(ValueError, match="gate=false"):
        make_model(temporal=False)
    model = make_model(temporal=False, gate=False)
    assert set(model.parameter_counts()["adapter_components"]) == {"spatial", "head"}


# ------------------------------------------------------------------------------------ training


def _loss(model: TGatedModel, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    windows = torch.rand(2, model.context, 1, S, S, generator=g)
    target = (torch.rand(2, S, S, generator=g) > 0.5).float()
    logits = model(pixel_windows=windows, organs=torch.tensor([1, 4]))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + model.gate_regularization()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"train_backbone": True, "adapt_layers": [1, 2]},
        {"variant": "reference"},
        {"adapter": "none", "train_backbone": True},
        {"gate": False, "spatial": False},
        {"variant": "reference", "train_backbone": True, "train_text": True, "conditioning": "text"},
    ],
    ids=["standard", "train-backbone", "reference", "baseline", "no-gate-no-spatial", "published-towers"],
)
def test_every_trainable_parameter_gets_a_gradient(make_model, changes) -> None:
    torch.manual_seed(0)
    model = make_model(**changes).train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    nonzero: set[str] = set()
    for step in range(2):
        opt.zero_grad()
        _loss(model, step).backward()
        missing = [n for n, p in trainable.items() if p.grad is None]
        assert not missing, f"step {step}: no gradient for {missing}"
        nonzero |= {n for n, p in trainable.items() if p.grad.abs().sum() > 0}
        opt.step()
    dead = sorted(set(trainable) - nonzero)
    assert not dead, f"zero gradient in both steps: {dead}"
    # nothing outside the trainable set receives a gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _snapshot(model: TGatedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model: TGatedModel, prefix: str) -> dict[str, bool]:
    return {n: not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith(prefix)}


def _train(model: TGatedModel, steps: int = 3) -> None:
    groups = model.param_groups()
    opt = torch.optim.AdamW([{"params": ps} for ps in groups.values() if ps], lr=1e-3)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def test_frozen_backbone_stays_unchanged(make_model) -> None:
    model = make_model()
    before = _snapshot(model)
    assert model.param_groups()["backbone"] == []
    _train(model)
    assert not any(_changed(before, model, "backbone.clip.").values())
    assert all(_changed(before, model, "adapters.").values())
    assert all(_changed(before, model, "backbone.decoder.").values())


def test_train_backbone_updates_the_vision_layers_used(make_model) -> None:
    model = make_model(train_backbone=True, adapt_layers=[2], backbone=_backbone(extract_layers=[0, 1, 2]))
    assert model.deepest == 2 and model.num_encoder_layers == 4
    before = _snapshot(model)
    _train(model)
    vis = "backbone.clip.vision_model."
    changed = _changed(before, model, vis)
    used = [
        n
        for n in changed
        if n.startswith(
            (
                f"{vis}encoder.layers.0.",
                f"{vis}encoder.layers.1.",
                f"{vis}encoder.layers.2.",
                f"{vis}embeddings.",
                f"{vis}pre_layrnorm.",
            )
        )
    ]
    unused = [n for n in changed if n.startswith((f"{vis}encoder.layers.3.", f"{vis}post_layernorm."))]
    assert used and unused
    assert all(changed[n] for n in used), [n for n in used if not changed[n]]
    assert not any(changed[n] for n in unused)
    assert not any(_changed(before, model, "backbone.clip.text_model.").values())
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if n.startswith(f"{vis}encoder.layers.3.")
    )


def test_train_text_updates_the_text_transformer_and_never_reuses_stale_embeddings(make_model) -> None:
    """``train_text``: the text transformer (not its output projection) is its own group and changes
    in training; training forwards compute the prompt embeddings with gradients, and the cached
    embeddings used outside training follow the weights after every optimizer step."""
    model = make_model(train_text=True, conditioning="text")
    groups = model.param_groups()
    text_params = {id(p) for p in model.backbone.clip.text_model.parameters()}
    assert {id(p) for p in groups["text"]} == text_params
    assert not groups["backbone"] and not model.backbone.clip.text_projection.weight.requires_grad
    organs = torch.tensor([1, 4])

    def fresh() -> torch.Tensor:  # the embeddings computed from the current weights, no cache
        with torch.no_grad():
            return torch.cat([model._encode_prompt(model.prompt(o)) for o in (1, 4)])

    model.eval()
    cached = model.organ_embeddings(organs)
    torch.testing.assert_close(cached, fresh(), rtol=0, atol=0)
    before = _snapshot(model)
    _train(model, steps=2)
    assert all(_changed(before, model, "backbone.clip.text_model.").values())
    assert not any(_changed(before, model, "backbone.clip.text_projection.").values())
    assert not any(_changed(before, model, "backbone.clip.vision_model.").values())
    model.eval()
    now = model.organ_embeddings(organs)
    assert (now - cached).abs().max() > 1e-6  # not the stale cache
    torch.testing.assert_close(now, fresh(), rtol=0, atol=0)
    torch.testing.assert_close(model.organ_conditioning(list(model.organs))[[0, 3]], now, rtol=0, atol=0)
    # a training forward takes its embeddings with gradients (not from the cache) ...
    model.train()
    live = model.organ_embeddings(torch.tensor([4, 1, 4]))
    assert live.requires_grad
    torch.testing.assert_close(live.detach(), now[[1, 0, 1]], rtol=1e-6, atol=1e-6)
    # ... and a weight change by other means (load_state_dict, in-place edits) drops the cache too
    model.eval()
    with torch.no_grad():
        model.backbone.clip.text_model.final_layer_norm.bias.add_(0.5)
    torch.testing.assert_close(model.organ_embeddings(organs), fresh(), rtol=0, atol=0)


def test_frozen_text_tower_is_not_a_group_and_its_embeddings_come_from_the_cache(make_model) -> None:
    model = make_model(conditioning="text").train()
    assert model.param_groups()["text"] == []
    emb = model.organ_embeddings(torch.tensor([1, 4]))
    assert not emb.requires_grad and set(model._text_cache) == {model.prompt(o) for o in ORGANS}


def test_train_text_needs_text_conditioning(make_model) -> None:
    with pytest.raises(ValueError, match=r"model.train_text=true with model.conditioning='learned': expected "
                       r"conditioning: text"):
        make_model(train_text=True)  # a random backbone resolves conditioning auto to learned


def _backbone(**changes):
    from tgated.config import BackboneConfig

    return BackboneConfig(source="random", preset="tiny", image_size=32, **changes)


# ------------------------------------------------------------------------------------ shared core


def test_plan_windows_index_mode() -> None:
    plan = plan_windows(4, 5)
    assert plan.num_images == 4
    assert plan.index.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]
    assert torch.equal(plan.lo, torch.arange(4)) and torch.equal(plan.w, torch.zeros(4))


def test_plan_windows_physical_mode_dedups_and_interpolates() -> None:
    # slices at 0, 2, 4, 6 mm; neighbours at ±3 mm
    plan = plan_windows(4, 3, mode="physical", step_mm=3.0, positions_mm=[0.0, 2.0, 4.0, 6.0])
    stack = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1) * 10  # value = 10 × index
    images = plan.images(stack).flatten()
    windows = images[plan.index]
    # centre 0: clamp(−3)=0 → 0, 0, 3 mm → 15;  centre 1: −1 mm → 0 (clamped), 2 → 10, 5 → 25 ...
    expected = torch.tensor([[0.0, 0.0, 15.0], [0.0, 10.0, 25.0], [5.0, 20.0, 30.0], [15.0, 30.0, 30.0]])
    torch.testing.assert_close(windows, expected)
    # each distinct image once: 0, 10, 20, 30 and the interpolated 5, 15, 25
    assert plan.num_images == 7
    assert torch.equal(images[plan.index[:, 1]], torch.tensor([0.0, 10.0, 20.0, 30.0]))


def test_plan_windows_centre_only_ablation() -> None:
    real = plan_windows(6, 5)
    ablated = plan_windows(6, 5, neighbours="centre")
    slots = ablated.lo[ablated.index]
    assert torch.equal(slots, torch.arange(6).unsqueeze(1).expand(6, 5))
    assert not torch.equal(real.lo[real.index], slots)
    with pytest.raises(ValueError, match="'real' or 'centre'"):
        plan_windows(6, 5, neighbours="none")


def test_centre_only_stack_equals_windows_of_the_repeated_centre(make_model, randomise, stack) -> None:
    model = make_model(context=3).eval()
    randomise(model)
    ablated = model.segment_stack(stack, ["liver"], neighbours="centre")
    with torch.no_grad():
        repeated = stack.unsqueeze(1).expand(-1, 3, -1, -1, -1)
        direct = model(pixel_windows=repeated, organs=["liver"] * stack.shape[0])
    torch.testing.assert_close(ablated[:, 0], direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.segment_stack(stack, ["liver"])[:, 0], direct, atol=1e-3)


def test_plan_windows_errors() -> None:
    with pytest.raises(ValueError, match="positions_mm"):
        plan_windows(4, 3, mode="physical")
    with pytest.raises(ValueError, match="increase"):
        plan_windows(3, 3, mode="physical", positions_mm=[0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="one per slice"):
        plan_windows(3, 3, mode="physical", positions_mm=[0.0, 2.0])
    with pytest.raises(ValueError, match="index' or 'physical"):
        plan_windows(3, 3, mode="z")


@pytest.mark.parametrize("mode", ["index", "physical"])
def test_shared_core_equals_naive(make_model, randomise, stack, mode) -> None:
    model = make_model(context=5, context_mode=mode, adapt_layers=[2, 3], context_step_mm=2.5).eval()
    randomise(model)
    positions = torch.cumsum(torch.tensor([0.0, 1.5, 1.0, 2.0, 1.5, 3.0, 1.0, 2.5, 1.0]), 0) + 40.0
    organs = ["liver", "aorta", "left_kidney"]
    shared = model.segment_stack(stack, organs, positions_mm=positions, batch_size=4)
    naive = model.segment_stack_naive(stack, organs, positions_mm=positions, batch_size=3)
    assert shared.shape == (9, 3, S, S)
    assert (shared - naive).abs().max() <= 1e-5
    # the neighbours matter (so a wrong window would be caught) ...
    edited = stack.clone()
    edited[5] = 1 - edited[5]
    changed = model.segment_stack(edited, organs, positions_mm=positions)
    assert (changed[4] - shared[4]).abs().max() > 1e-3
    # ... and streaming in chunks gives the same slices in order
    chunks = list(model.iter_segment_stack(stack, organs, positions_mm=positions, batch_size=2))
    assert [c.tolist() for c, _ in chunks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    torch.testing.assert_close(torch.cat([lg for _, lg in chunks]), shared, rtol=0, atol=1e-5)


def test_physical_mode_differs_from_index_mode(make_model, randomise, stack) -> None:
    index = make_model(context=3).eval()
    randomise(index)
    physical = make_model(context=3, context_mode="physical", context_step_mm=0.5).eval()
    physical.load_state_dict(index.state_dict())
    positions = torch.arange(9) * 1.0  # 1 mm slices, neighbours at ±0.5 mm: halfway images
    a = index.segment_stack(stack, ["liver"])
    b = physical.segment_stack(stack, ["liver"], positions_mm=positions)
    assert (a - b).abs().max() > 1e-4
    assert physical.plan(9, positions).num_images == 9 + 8  # slices + midpoints
    with pytest.raises(ValueError, match="positions_mm"):
        physical.segment_stack(stack, ["liver"])


def test_segment_stack_defaults_to_model_organs(make_model, stack) -> None:
    model = make_model(organs=["spleen", "liver"]).eval()
    assert [o.name for o in model.organs] == ["liver", "spleen"]
    out = model.segment_stack(stack[:3])
    assert out.shape == (3, 2, S, S)
    torch.testing.assert_close(out[:, 1], model.segment_stack(stack[:3], ["spleen"])[:, 0], rtol=0, atol=1e-6)


def test_encode_stack_runs_once_per_distinct_image(make_model, stack, monkeypatch) -> None:
    model = make_model(context=5).eval()
    seen = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda images: seen.append(images.shape[0]) or original(images))
    model.segment_stack(stack, ["liver", "spleen", "aorta"], batch_size=4)
    assert seen == [4, 4, 1]  # 9 slices encoded once, whatever K and the number of organs
    seen.clear()
    model.segment_stack_naive(stack, ["liver", "spleen", "aorta"], batch_size=9)
    assert sum(seen) == 9 * 5 * 3


def test_random_decoder_starts_at_the_foreground_prior(make_model) -> None:
    """Random weights start near p = RANDOM_FOREGROUND_PRIOR (not 0.5) on every pixel, so early
    training does not spend its steps learning that most pixels are background."""
    from tgated.models.backbone import RANDOM_FOREGROUND_PRIOR

    model = make_model(adapter="none").eval()
    gen = torch.Generator().manual_seed(3)
    windows = torch.rand(4, 1, 1, 64, 64, generator=gen)
    with torch.no_grad():
        p = torch.sigmoid(model(pixel_windows=windows, organs=torch.tensor([1, 3, 5, 11])))
    assert RANDOM_FOREGROUND_PRIOR / 4 < float(p.median()) < RANDOM_FOREGROUND_PRIOR * 4
    assert float(p.max()) < 0.5


def test_tiny_preset_patch_8(make_model) -> None:
    """patch_size 8: a 4x finer token grid, decoded back to the full input size."""
    from tgated.config import BackboneConfig

    model = make_model(backbone=BackboneConfig(source="random", preset="tiny", patch_size=8, seed=0))
    assert model.backbone.config.vision_config.patch_size == 8
    out = model(pixel_windows=torch.rand(2, 3, 1, 64, 64), organs=torch.tensor([1, 2]))
    assert out.shape == (2, 64, 64)
    with pytest.raises(ValueError, match=r"patch_size=12: expected 8 or 16"):
        make_model(backbone=BackboneConfig(source="random", preset="tiny", patch_size=12, seed=0))
