"""Every user-facing check of the models package fires with a message that names the problem."""

from __future__ import annotations

import json

import pytest
import torch

from tgated.config import BackboneConfig, PreprocessConfig
from tgated.models.tgated import TGatedModel


def test_image_size_must_be_a_multiple_of_the_patch(make_model) -> None:
    with pytest.raises(ValueError, match=r"image_size=72 is not a multiple.*patch size 16; use e\.g\. 64"):
        make_model(preprocess=PreprocessConfig(image_size=72))


def test_model_type_must_be_tgated(make_model) -> None:
    with pytest.raises(ValueError, match="'dynunet'; TGatedModel needs 'tgated'"):
        make_model(model_type="dynunet")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 66}, r"hidden_size=66 is not divisible by num_attention_heads=4"),
        ({"text_hidden_size": 30}, r"text_hidden_size=30 is not divisible"),
        ({"reduce_dim": 18}, r"reduce_dim=18: expected a multiple of 4"),
        ({"extract_layers": [1, 4]}, r"extract_layers=\[1, 4\]: expected indices in 0\.\.3"),
    ],
)
def test_tiny_backbone_sizes(make_model, changes, message) -> None:
    bb = BackboneConfig(source="random", preset="tiny", image_size=32, **changes)
    with pytest.raises(ValueError, match=message):
        make_model(backbone=bb)


def test_backbone_source_that_is_a_file(make_model, tmp_path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; expected a CLIPSeg checkpoint directory"):
        make_model(backbone=BackboneConfig(source=str(f)))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        make_model(backbone=BackboneConfig(source=str(tmp_path / "d")))
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert'; expected 'clipseg'"):
        make_model(backbone=BackboneConfig(source=str(tmp_path / "d")))


def test_unavailable_hub_checkpoint(make_model) -> None:
    with pytest.raises(OSError, match="could not load the CLIPSeg backbone.*source=random"):
        TGatedModel.from_config(
            make_model().config.__class__(backbone=BackboneConfig(source="nobody/no-such-model")),
            local_files_only=True,
        )


def test_forward_argument_checks(make_model) -> None:
    model = make_model().eval()
    w = torch.rand(2, 3, 1, 64, 64)
    tokens = model.encode(w.flatten(0, 1)).unflatten(0, (2, 3))
    with pytest.raises(ValueError, match="exactly one of pixel_windows"):
        model(organs=[1, 2])
    with pytest.raises(ValueError, match="exactly one of pixel_windows"):
        model(pixel_windows=w, token_windows=tokens, organs=[1, 2])
    with pytest.raises(ValueError, match="organs is required"):
        model(pixel_windows=w)
    with pytest.raises(ValueError, match=r"pixel_windows: expected \(B, K, C, S, S\)"):
        model(pixel_windows=w[0], organs=[1, 2])
    with pytest.raises(ValueError, match=r"token_windows: expected \(B, K, L=3, N, C=64\)"):
        model(token_windows=tokens[:, :, :2], organs=[1, 2])
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        model(pixel_windows=w, organs=torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        model(pixel_windows=w, organs=[1])
    with pytest.raises(ValueError, match="organs: expected canonical organ ids"):
        model(pixel_windows=w, organs="liver")
    with pytest.raises(ValueError, match=r"expected images \(M, 1 or 3, S, S\)"):
        model.encode(torch.rand(2, 2, 64, 64))


def test_stack_argument_checks(make_model) -> None:
    model = make_model().eval()
    stack = torch.rand(4, 1, 64, 64)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.segment_stack(stack, ["liver"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.segment_stack_naive(stack, ["liver"], batch_size=0)
    with pytest.raises(ValueError, match=r"slices: expected \(Z, 1, S, S\)"):
        model.segment_stack(stack[0], ["liver"])
    with pytest.raises(ValueError, match="at least one organ"):
        model.segment_stack(stack, [])
    with pytest.raises(ValueError, match="centre slices must lie in 0..3"):
        model.plan(4, centres=[5])
    physical = make_model(context_mode="physical")
    with pytest.raises(ValueError, match="positions_mm"):
        physical.segment_stack_naive(stack, ["liver"])


def test_meta_model_has_no_tokenizer(tiny_config) -> None:
    model = TGatedModel.from_config(
        tiny_config(backbone=BackboneConfig(source="random", preset="rd64")), meta=True
    )
    assert model.device.type == "meta"
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.text_embeddings(["liver"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is newer"),
        (lambda m: m.pop("clipseg"), "missing key 'clipseg'"),
        (lambda m: m.update(model_type="dynunet"), "model_type is 'dynunet'; expected 'tgated'"),
    ],
)
def test_saved_config_checks(make_model, tmp_path, edit, message) -> None:
    out = make_model().save_pretrained(tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    edit(meta)
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        TGatedModel.from_pretrained(out)


def test_missing_tokenizer_folder(make_model, tmp_path) -> None:
    import shutil

    out = make_model().save_pretrained(tmp_path / "m")
    shutil.rmtree(out / "tokenizer")
    with pytest.raises(ValueError, match="tokenizer is missing"):
        TGatedModel.from_pretrained(out)


def test_model_info_of_a_dynunet(tmp_path) -> None:
    from tgated.config import load_config
    from tgated.models import model_info
    from tgated.models.dynunet import DynUNetModel

    path = tmp_path / "d.yaml"
    path.write_text(
        "model:\n  model_type: dynunet\n  dynunet:\n    patch_size: [32, 32, 16]\n    filters: [8, 16, 32, 64]\n    deep_supr_num: 1\n"
    )
    info = model_info(path)
    built = DynUNetModel(load_config(path).model)
    assert info["parameters"]["total"] == sum(p.numel() for p in built.parameters()) > 0
    assert "4 levels" in info["note"] and info["config"]["model"]["dynunet"]["patch_size"] == [32, 32, 16]
