"""docs/protocol.md's tables agree with the configs they describe: every key of a table resolves
(``tgated info``) to the value the table gives for the reference recipe and for ours."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tgated.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"


def _tables() -> dict[str, list[list[str]]]:
    """Section title -> rows (cells) of the first table under it."""
    out: dict[str, list[list[str]]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section and line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out.setdefault(section, []).append(cells)
    return {k: rows[1:] for k, rows in out.items()}  # drop the header row


def _resolved(config: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["info", str(ROOT / config), "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)["config"]


def _at(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: not a config key ({part!r} missing)"
        node = node[part]
    return node


def _value(cell: str):
    assert cell.startswith("`") and cell.endswith("`"), f"expected a `value`, got {cell!r}"
    return yaml.safe_load(cell.strip("`"))


# section, key column, [(config, value column)]
CASES = [
    ("T-Gated", 2, [("configs/reference/flare22_tgated.yaml", 3), ("configs/flare22_tgated.yaml", 4)]),
    (
        "The baseline (CLIPSeg fine-tuned on single slices)",
        2,
        [("configs/reference/flare22_baseline.yaml", 3), ("configs/flare22_baseline.yaml", 4)],
    ),
    (
        "The 3-D DynUNet baseline",
        2,
        [("configs/reference/flare22_dynunet.yaml", 3), ("configs/flare22_dynunet.yaml", 3)],
    ),
]


@pytest.mark.parametrize(("section", "key_col", "configs"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_every_setting_of_the_table_resolves_to_the_value_it_gives(section, key_col, configs, capsys):
    rows = _tables()[section]
    assert len(rows) >= 4
    for config, col in configs:
        cfg = _resolved(config, capsys)
        for row in rows:
            key = row[key_col].strip("`")
            expected, found = _value(row[col]), _at(cfg, key)
            if isinstance(expected, float) or isinstance(found, float):
                assert found == pytest.approx(expected), (
                    f"{config}: {key} is {found!r}; the table says {expected!r}"
                )
            else:
                assert found == expected, f"{config}: {key} is {found!r}; the table says {expected!r}"


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v and k not in ("organ_weights", "prompts"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize(
    ("reference", "ours", "sections"),
    [
        ("configs/reference/flare22_tgated.yaml", "configs/flare22_tgated.yaml", ["T-Gated"]),
        (
            "configs/reference/flare22_baseline.yaml",
            "configs/flare22_baseline.yaml",
            ["The baseline (CLIPSeg fine-tuned on single slices)", "T-Gated"],
        ),
    ],
    ids=["tgated", "baseline"],
)
def test_every_difference_between_the_recipes_is_a_row(reference, ours, sections, capsys):
    """A setting in which the reference file and ours differ is listed in the table (for the baseline,
    in its own table or in the T-Gated one, whose data pipeline and schedule it shares)."""
    a, b = _flat(_resolved(reference, capsys)), _flat(_resolved(ours, capsys))
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"name"}
    tables = _tables()
    listed = {row[2].strip("`") for section in sections for row in tables[section]}
    assert differ, "the recipes should differ"
    missing = sorted(differ - listed)
    assert not missing, f"{reference} and {ours} differ in {missing}, which docs/protocol.md does not list"


def test_the_reference_dynunet_is_the_published_recipe_file(capsys):
    a = _resolved("configs/reference/flare22_dynunet.yaml", capsys)
    b = _resolved("configs/flare22_dynunet.yaml", capsys)
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}


def test_a_wrong_table_value_is_caught(capsys):
    cfg = _resolved("configs/reference/flare22_tgated.yaml", capsys)
    assert _at(cfg, "train.lr_adapter") != pytest.approx(1e-4)  # the reference rate is not ours
