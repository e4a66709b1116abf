"""save_pretrained / from_pretrained: round trip, integrity checks, foreign folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tgated.models.tgated import TGatedModel


@pytest.fixture
def saved(make_model, randomise, tmp_path) -> tuple[TGatedModel, Path]:
    model = make_model(
        context=3, adapt_layers=[2, 3], context_mode="physical", prompts={"liver": "liver tissue"}
    )
    randomise(model)
    out = model.save_pretrained(tmp_path / "model")
    return model.eval(), out


def test_round_trip_gives_identical_logits(saved, stack) -> None:
    model, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    loaded = TGatedModel.from_pretrained(out)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.config.preprocess.image_size == 64 and loaded.config.context_mode == "physical"
    positions = torch.arange(9) * 2.5
    a = model.segment_stack(stack, ["liver", "pancreas"], positions_mm=positions)
    b = loaded.segment_stack(stack, ["liver", "pancreas"], positions_mm=positions)
    assert torch.equal(a, b)
    # the tokenizer travels with the model: same prompt embeddings (incl. the override)
    assert loaded.prompt("liver") == "liver tissue"
    assert torch.equal(model.text_embeddings(["liver tissue"]), loaded.text_embeddings(["liver tissue"]))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad


def test_config_json_is_self_contained(saved) -> None:
    _, out = saved
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "tgated"
    assert meta["model"]["preprocess"]["ct_window"] == [-125.0, 275.0]
    assert meta["model"]["backbone"]["source"] == "random"
    assert meta["clipseg"]["vision_config"]["patch_size"] == 16
    assert len(meta["weights_sha256"]) == 64


def test_run_folder_is_accepted(saved) -> None:
    _, out = saved
    loaded = TGatedModel.from_pretrained(out.parent)  # RUN/ holding model/
    assert loaded.context == 3


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_weights_are_rejected(saved) -> None:
    _, out = saved
    _flip_byte(out / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*modified"):
        TGatedModel.from_pretrained(out)


def test_truncated_weights_are_rejected(saved) -> None:
    _, out = saved
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        TGatedModel.from_pretrained(out)


def test_missing_weights_are_rejected(saved) -> None:
    _, out = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        TGatedModel.from_pretrained(out)


def test_garbled_file_with_matching_checksum_is_rejected(saved) -> None:
    _, out = saved
    weights = out / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    meta = json.loads((out / "config.json").read_text())
    from tgated.io.files import sha256_file

    meta["weights_sha256"] = sha256_file(weights)
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        TGatedModel.from_pretrained(out)


def test_weights_of_another_architecture_are_rejected(saved, make_model, tmp_path) -> None:
    _, out = saved
    other = make_model(context=3, adapt_layers=[3], prompts={"liver": "liver tissue"})
    other = other.save_pretrained(tmp_path / "other")
    (out / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    meta = json.loads((out / "config.json").read_text())
    meta["weights_sha256"] = json.loads((other / "config.json").read_text())["weights_sha256"]
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"do not match the model.*missing \['adapters\.2\."):
        TGatedModel.from_pretrained(out)


def test_raw_clipseg_checkpoint_is_not_a_tgated_model(make_model, tmp_path) -> None:
    clip_dir = tmp_path / "clipseg"
    make_model().backbone.save_pretrained(clip_dir)
    with pytest.raises(ValueError, match="raw CLIPSeg checkpoint.*backbone.source"):
        TGatedModel.from_pretrained(clip_dir)


def test_not_a_model_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TGatedModel.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        TGatedModel.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TGatedModel.from_pretrained(bad)


def test_unknown_config_key_in_saved_model(saved) -> None:
    _, out = saved
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["contxt"] = 5
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json.*'contxt'.*context"):
        TGatedModel.from_pretrained(out)


def test_saving_again_replaces_the_files(saved, randomise, stack) -> None:
    model, out = saved
    randomise(model, seed=5)
    model.save_pretrained(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    loaded = TGatedModel.from_pretrained(out)
    positions = torch.arange(9) * 2.5
    assert torch.equal(
        model.segment_stack(stack[:3], ["liver"], positions_mm=positions[:3]),
        loaded.segment_stack(stack[:3], ["liver"], positions_mm=positions[:3]),
    )


def test_clipseg_directory_as_backbone_source(make_model, tiny_config, tmp_path, stack) -> None:
    """A local CLIPSeg checkpoint (weights + tokenizer) is a valid backbone source."""
    base = make_model()
    clip_dir = tmp_path / "clipseg"
    base.backbone.save_pretrained(clip_dir)
    base.tokenizer.save_pretrained(clip_dir)
    cfg = tiny_config()
    cfg.backbone.source = str(clip_dir)
    model = TGatedModel.from_config(cfg).eval()
    assert model.note.startswith("pretrained weights from")
    for (n, p), (_, q) in zip(
        base.backbone.named_parameters(), model.backbone.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    torch.testing.assert_close(model.text_embeddings(["liver"]), base.text_embeddings(["liver"]))
    cfg.backbone.source = str(tmp_path / "model")
    make_model().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="saved T-Gated model"):
        TGatedModel.from_config(cfg)
    cfg.backbone.source = "./no/such/dir"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TGatedModel.from_config(cfg)


def test_learned_conditioning_round_trips(saved) -> None:
    model, out = saved
    assert json.loads((out / "config.json").read_text())["model"]["conditioning"] == "learned"
    loaded = TGatedModel.from_pretrained(out)
    torch.testing.assert_close(loaded.organ_embedding, model.organ_embedding, rtol=0, atol=0)


def test_model_saved_before_the_conditioning_key_loads_as_text(make_model, tmp_path) -> None:
    out = make_model(conditioning="text").save_pretrained(tmp_path / "old")
    meta = json.loads((out / "config.json").read_text())
    del meta["model"]["conditioning"]
    (out / "config.json").write_text(json.dumps(meta))
    assert TGatedModel.from_pretrained(out).conditioning == "text"


def test_init_from_takes_backbone_decoder_and_conditioning_and_starts_fresh_adapters(
    make_model, tiny_config, randomise, tmp_path
) -> None:
    stage1 = make_model(adapter="none", train_backbone=True)
    with torch.no_grad():  # make stage 1 differ from a fresh random model
        for p in stage1.parameters():
            p.add_(0.01)
    stage1.save_pretrained(tmp_path / "stage1" / "model")
    model = TGatedModel.from_config(tiny_config(init_from=str(tmp_path / "stage1"), context=3))
    assert model.conditioning == "learned" and model.context == 3
    assert "initialised from" in model.note
    theirs = dict(stage1.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("adapters."):
            continue
        assert torch.equal(p, theirs[name]), name
    fresh = make_model(context=3)
    for name, p in model.adapters.named_parameters():
        assert torch.equal(p, dict(fresh.adapters.named_parameters())[name]), name
    with pytest.raises(ValueError, match="other preprocessing"):
        cfg = tiny_config(init_from=str(tmp_path / "stage1"))
        cfg.preprocess.image_size = 32
        TGatedModel.from_config(cfg)


def test_saved_config_lists_the_organs_and_an_emptied_list_is_refused(make_model, tmp_path) -> None:
    out = make_model().save_pretrained(tmp_path / "model")  # built with organs: [] = all 13
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["organs"][:3] == ["liver", "right_kidney", "spleen"] and len(meta["model"]["organs"]) == 13
    meta["model"]["organs"] = []
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: model\.organs=\[\]: expected the organs the model was trained"):
        TGatedModel.from_pretrained(out)


def test_baseline_context_note_is_for_the_config_not_for_loading(make_model, tmp_path, caplog) -> None:
    """``adapter: none`` with K = 5 says once, when built from the config, that K is forced to 1;
    loading the saved baseline (a stage-1 model loaded to train T-Gated from) says nothing."""
    with caplog.at_level("INFO", logger="tgated"):
        model = make_model(adapter="none", context=5)
    assert model.context == 1
    assert [r.getMessage() for r in caplog.records if "forced to 1" in r.getMessage()] == [
        "adapter: none — the single-slice baseline; context K=5 forced to 1"
    ]
    out = model.save_pretrained(tmp_path / "baseline")
    caplog.clear()
    with caplog.at_level("INFO", logger="tgated"):
        assert TGatedModel.from_pretrained(out).context == 1
    assert not [r for r in caplog.records if "forced to 1" in r.getMessage()]
