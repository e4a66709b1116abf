import pytest

from tgated.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)


def test_round_trip_through_yaml(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), ["model.context=7", "train.lr_adapter=3e-4"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    back = load_config(p)
    assert back == cfg
    assert back.model.context == 7 and back.train.lr_adapter == pytest.approx(3e-4)
    assert isinstance(back.model.preprocess.ct_window, tuple)


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  contxt: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "model.contxt" in msg and "context" in msg and "adapt_layers" in msg and str(p) in msg
    assert "Did you mean 'context'" in msg


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.context=three", "expected int"),
        ("model.temporal=1", "expected bool"),
        ("model.adapter=lora", "'tgated', 'none'"),
        ("data.split_sizes=[1,2]", "expected 3"),
        ("nosuch.key=1", "not a config section"),
        ("train.epochs", "expected key=value"),
    ],
)
def test_bad_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(ExperimentConfig(), [override])


def test_float_fields_accept_yaml11_exponents():
    cfg = from_dict(ExperimentConfig, {"train": {"lr_backbone": "1e-6", "epochs": 3}})
    assert cfg.train.lr_backbone == pytest.approx(1e-6)
    with pytest.raises(ConfigError):
        from_dict(ExperimentConfig, {"train": {"lr_backbone": "fast"}})


def test_to_dict_is_plain():
    d = to_dict(ExperimentConfig())
    assert isinstance(d["model"]["preprocess"]["ct_window"], list)
    assert d["model"]["model_type"] == "tgated"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not a valid YAML"):
        load_config(bad)
