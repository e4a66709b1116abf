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


# ---------------------------------------------------------------------------------------------
# bounded YAML
# ---------------------------------------------------------------------------------------------


def test_benign_anchors_and_merge_keys_still_work():
    from tgated.config import load_yaml

    text = "base: &b {lr: 1, wd: 2}\nrun:\n  <<: *b\n  wd: 3\nlist: &l [1, 2]\nagain: *l\n"
    assert load_yaml(text) == {"base": {"lr": 1, "wd": 2}, "run": {"lr": 1, "wd": 3}, "list": [1, 2], "again": [1, 2]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb:\n  c: 2\n  c: 3\n", r"^line 4: duplicate key 'c' \(first on line 3\)"),
        ("a: &x [1, *x]\n", r"^line 1: an alias refers to the value that contains it"),
        ("a: " + "[" * 33 + "]" * 33, r"^line 1: nested more than 32 levels deep"),
        ("a: &x " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 15 + "*x" + "]" * 15, r"^line 1: aliases expand to more than 32 levels"),
        ("a: &x [" + ", ".join(["1"] * 200) + "]\nb: [" + ", ".join(["*x"] * 60) + "]\n", r"^line 2: aliases .* 10,000 values"),
        ("a: [1, 2\n", r"^not a valid YAML file \(while parsing a flow sequence"),
    ],
    ids=["duplicate key", "recursive alias", "too deep", "aliases too deep", "aliases too many", "syntax"],
)
def test_yaml_limits(text, message):
    from tgated.config import load_yaml

    with pytest.raises(ConfigError, match=message):
        load_yaml(text)


def test_values_in_errors_are_shortened():
    from tgated.config import MAX_SHOWN_CHARS, shorten

    assert shorten("abc") == "'abc'"
    long = shorten("x" * 1_000_000)
    assert len(long) <= MAX_SHOWN_CHARS + 25 and "..." in long
    nested: list = [1]
    for _ in range(10_000):
        nested = [nested, nested]  # 2**10000 leaves if printed in full
    assert len(shorten(nested)) < 300
    with pytest.raises(ConfigError) as exc:
        from_dict(ExperimentConfig, {"data": {"split_sizes": [["y" * 10**6]] * 3}})
    assert len(str(exc.value)) < 600


def test_override_values_are_parsed_with_the_same_limits():
    with pytest.raises(ConfigError, match=r"override 'train\.epochs=\{a: 1, a: 2\}': value: line 1: duplicate key 'a'"):
        apply_overrides(ExperimentConfig(), ["train.epochs={a: 1, a: 2}"])


# ---------------------------------------------------------------------------------------------
# model config validation: every check fires
# ---------------------------------------------------------------------------------------------

MODEL_PROBLEMS = [
    ("preprocess.ct_window", (float("inf"), 1.0), "two finite HU values"),
    ("preprocess.ct_window", (5.0, 5.0), "low < high"),
    ("preprocess.mr_percentiles", (50.0, 101.0), "0 <= low < high <= 100"),
    ("preprocess.image_size", 8, r"in 16\.\.2048"),
    ("preprocess.mean", (float("nan"), 0.5, 0.5), "three finite numbers"),
    ("preprocess.std", (0.2, -0.1, 0.2), "three positive numbers"),
    ("preprocess.background_threshold", 0.0, r"a probability in \(0, 1\)"),
    ("context", 0, "an odd number of slices"),
    ("context", 65, r"in 1\.\.63"),
    ("context_step_mm", float("nan"), "a positive distance in mm"),
    ("adapt_layers", [], "one or more distinct encoder layer indices"),
    ("adapt_layers", [9, 9], "one or more distinct"),
    ("organs", ["liver", "Liver"], r"each organ once \(repeated: liver\)"),
    ("organs", ["liver", " "], r"organ names \(no empty entries\)"),
    ("prompts", {"liver": "  "}, "a non-empty text prompt"),
    ("adapter_config.dim", 0, r"an integer in 1\.\.8192"),
    ("adapter_config.layers", 100, r"an integer in 1\.\.64"),
    ("adapter_config.heads", 5, r"a divisor of adapter_config\.dim=256 \(e\.g\. 4\)"),
    ("adapter_config.ffn_dim", -1, "an integer in"),
    ("adapter_config.spatial_heads", 0, "an integer in 1"),
    ("adapter_config.dropout", 1.0, r"a probability in \[0, 1\)"),
    ("adapter_config.head_out_dropout", -0.1, r"a probability in \[0, 1\)"),
    ("adapter_config.gate_bias_init", float("inf"), "a finite number"),
    ("adapter_config.gate_reg", -1.0, "a finite number >= 0"),
    ("backbone.hidden_size", 0, "an integer in 1"),
    ("backbone.num_hidden_layers", 1000, r"in 1\.\.64"),
    ("backbone.patch_size", 0, "a patch size in pixels"),
    ("backbone.image_size", -1, r"0 = the input size"),
]


@pytest.mark.parametrize(("key", "value", "expected"), MODEL_PROBLEMS, ids=[f"{k}={v}" for k, v, _ in MODEL_PROBLEMS])
def test_each_model_config_check_fires(key, value, expected):
    import re

    from tgated.config import BackboneConfig, ModelConfig, model_config_problems

    cfg = ModelConfig(backbone=BackboneConfig(source="random", preset="tiny"))
    assert model_config_problems(cfg) == []
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, value)
    problems = model_config_problems(cfg)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"model.{key}") and re.search(expected, problems[0]), problems[0]


def test_width_and_saved_checks():
    from tgated.config import AdapterConfig, ModelConfig, check_model_config, model_config_problems

    cfg = ModelConfig(adapter_config=AdapterConfig(spatial_heads=7))
    assert model_config_problems(cfg) == []  # the width is unknown without the backbone
    assert model_config_problems(cfg, width=768) == [
        "model.adapter_config.spatial_heads=7: expected a divisor of the backbone width 768 (e.g. 6)"
    ]
    assert model_config_problems(ModelConfig(), saved=True)[0].startswith("model.organs=[]: expected the organs")
    cfg.context = 4
    with pytest.raises(ConfigError, match=r"^model\.context=4: .* \(and 1 more problem\(s\)\)$"):
        check_model_config(cfg, width=768)
