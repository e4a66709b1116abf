"""model_info (``tgated info``), the FLARE22 configs, and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tgated.config import ConfigError
from tgated.models import model_info

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tiny_yaml(tmp_path: Path, **model: object) -> Path:
    data = {
        "model": {
            "backbone": {"source": "random", "preset": "tiny"},
            "adapt_layers": [3],
            "context": 3,
            "adapter_config": {"dim": 32, "layers": 2, "heads": 4, "ffn_dim": 64, "spatial_heads": 4},
            "preprocess": {"image_size": 64},
            **model,
        }
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_info_on_a_tiny_config(tmp_path) -> None:
    info = model_info(_tiny_yaml(tmp_path), overrides=["model.adapt_layers=[2,3]"])
    assert info["config"]["model"]["adapt_layers"] == [2, 3]
    params = info["parameters"]
    assert set(params) >= {"backbone", "adapter", "decoder", "trainable", "adapter_components"}
    # frozen backbone; random backbone -> learned conditioning, 13 organs x projection_dim 32
    assert params["conditioning"] == 13 * 32
    assert params["trainable"] == params["adapter"] + params["decoder"] + params["conditioning"]
    assert sum(params["adapter_components"].values()) == params["adapter"]
    assert "random weights" in info["note"]
    json.dumps(info)  # serialisable as is


def test_info_unknown_key_names_key_and_valid_keys(tmp_path) -> None:
    path = _tiny_yaml(tmp_path, contxt=5)
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model\.contxt'.*context_mode.*Did you mean 'context'"
    ):
        model_info(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.adapter_config\.gate_bias'"):
        model_info(_tiny_yaml(tmp_path), overrides=["model.adapter_config.gate_bias=1"])


def test_info_invalid_adapt_layer(tmp_path) -> None:
    with pytest.raises(ValueError, match="valid adapt layers: 1, 2, 3"):
        model_info(_tiny_yaml(tmp_path), overrides=["model.adapt_layers=[7]"])


def test_info_full_size_offline() -> None:
    """configs/flare22_tgated.yaml: ViT-B/16 rd64 counted offline (meta device, no weights)."""
    info = model_info(CONFIGS / "flare22_tgated.yaml")
    params = info["parameters"]
    assert params["adapter"] == pytest.approx(10.0e6, abs=0.3e6)
    assert params["backbone"] == pytest.approx(150e6, rel=0.01)
    assert params["decoder"] == 1_127_009  # rd64-refined's decoder
    assert params["adapter_components"] == {
        "temporal": 3_554_560,
        "gate": 590_592,
        "spatial": 4_727_040,
        "head": 1_182_720,
    }
    assert params["trainable"] == params["adapter"] + params["decoder"]
    cfg = info["config"]
    assert cfg["model"]["context"] == 5 and cfg["model"]["preprocess"]["image_size"] == 352
    assert cfg["model"]["backbone"]["source"] == "CIDAS/clipseg-rd64-refined"
    assert cfg["data"]["layout"] == "flare22"


def test_baseline_config_differs_only_in_the_adapter() -> None:
    from tgated.config import load_config, to_dict

    tgated = to_dict(load_config(CONFIGS / "flare22_tgated.yaml"))
    baseline = to_dict(load_config(CONFIGS / "flare22_baseline.yaml"))
    assert baseline["model"]["adapter"] == "none" and tgated["model"]["adapter"] == "tgated"
    baseline["model"]["adapter"] = "tgated"
    baseline["name"] = tgated["name"]
    assert baseline == tgated
    info = model_info(CONFIGS / "flare22_baseline.yaml")
    assert info["parameters"]["adapter"] == 0
    assert "K=1" in info["note"]


def test_cli_info(capsys) -> None:
    from tgated.cli import main

    code = main(["info", str(CONFIGS / "flare22_tgated.yaml"), "--set", "model.adapt_layers=[6,9]"])
    assert code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["adapter"] == 2 * 10_054_912


def test_import_does_not_pull_training_or_reporting() -> None:
    code = (
        "import tgated.models.tgated, sys; "
        "assert not any(m.startswith(('tgated.training', 'tgated.report')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
