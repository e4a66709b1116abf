"""The dataset layout registry: file-name rules, modality, label maps, and that every copy agrees."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from tgated.cli import build_parser
from tgated.config import DataConfig
from tgated.data.datasets import case_id_from_path
from tgated.data.layouts import LAYOUT_NAMES, LAYOUTS, get_layout
from tgated.protocols import PROTOCOL_NAMES


def _choices(command: str, option: str) -> tuple[str, ...]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


def test_config_literal_equals_the_registry():
    hints = typing.get_type_hints(DataConfig)
    assert typing.get_args(hints["layout"]) == LAYOUT_NAMES
    assert DataConfig().layout in LAYOUTS


def test_cli_choices_read_the_registries():
    assert _choices("evaluate", "--dataset") == LAYOUT_NAMES
    assert _choices("phantom", "--layout") == LAYOUT_NAMES
    assert _choices("evaluate", "--protocol") == PROTOCOL_NAMES


def test_metrics_score_every_registered_protocol():
    from tgated.metrics import CASE_SCORERS

    assert tuple(CASE_SCORERS) == PROTOCOL_NAMES


def test_building_the_cli_loads_no_numpy():
    code = "import sys; from tgated.cli import build_parser; build_parser(); print(sorted(m for m in " \
        "('numpy', 'torch', 'yaml', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("layout", "case_id", "image", "label"),
    [
        ("flare22", "FLARE22_Tr_0007", "FLARE22_Tr_0007_0000.nii.gz", "FLARE22_Tr_0007.nii.gz"),
        ("btcv", "img0007", "img0007.nii.gz", "label0007.nii.gz"),
        ("amos", "amos_0507", "amos_0507.nii.gz", "amos_0507.nii.gz"),
        ("nnunet", "liver_12", "liver_12_0000.nii.gz", "liver_12.nii.gz"),
        ("folder", "patient-3", "patient-3.nii.gz", "patient-3.nii.gz"),
    ],
)
def test_file_names_round_trip(layout, case_id, image, label):
    spec = get_layout(layout)
    assert (spec.image_name(case_id), spec.label_name(case_id)) == (image, label)
    assert case_id_from_path(image) == case_id
    assert spec.case_id_of_label(label.removesuffix(".nii.gz")) == case_id


def test_modality_rules():
    amos = get_layout("amos")
    assert [amos.modality_of(c) for c in ("amos_0001", "amos_0500", "amos_0501", "amos_0600")] == [
        "ct",
        "ct",
        "mr",
        "mr",
    ]
    assert (amos.phantom_case_id(0, "ct"), amos.phantom_case_id(1, "mr")) == ("amos_0001", "amos_0502")
    assert get_layout("flare22").modality_of("FLARE22_Tr_0001") == "ct"
    assert get_layout("folder").modality_of("x") is None


def test_label_maps():
    btcv = get_layout("btcv")
    assert btcv.label_map()[6] == 1 and btcv.label_map()[10] == 0  # liver; portal/splenic vein: background
    assert "duodenum" not in btcv.labelled_organs() and len(btcv.labelled_organs()) == 12
    assert get_layout("folder").label_map() == {i: i for i in range(14)}
    for spec in LAYOUTS.values():  # every organ id maps back to the dataset id it came from
        mapping = spec.label_map()
        assert all(mapping[d] == c for c, d in spec.canonical_to_dataset().items()), spec.name


def test_unknown_layout_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dataset layout 'btvc'.*flare22, btcv.*Did you mean 'btcv'"):
        get_layout("btvc")
