"""Fixtures for the training tests: a 4-case phantom dataset and the tiny CPU config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tgated.config import ExperimentConfig, apply_overrides, load_config
from tgated.training.checkpoint import load_checkpoint

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"

# Fast, deterministic settings: small epochs, validation on the one validation case.
FAST = [
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=4",
    "train.num_workers=0",
    "train.device=cpu",
]


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 phantom CT cases, 64 × 64 in-plane, FLARE22 layout (2 train / 1 val / 1 test with tiny_cpu)."""
    from tgated.data.phantom import write_dataset

    root = tmp_path_factory.mktemp("phantom4")
    write_dataset(root, cases=4, size=64, seed=0, layout="flare22", quiet=True)
    return root


@pytest.fixture
def tiny_cfg(phantom_root: Path) -> Callable[..., ExperimentConfig]:
    """``tiny_cfg("train.lr_adapter=1e-3", ...)``: configs/tiny_cpu.yaml on the phantoms, FAST, overrides."""

    def make(*overrides: str) -> ExperimentConfig:
        cfg = load_config(TINY_CONFIG, [f"data.root={phantom_root}", *FAST])
        return apply_overrides(cfg, list(overrides))

    return make


def no_dropout() -> list[str]:
    """Overrides that make the adapter deterministic (no dropout, no stochastic depth)."""
    from tgated.config import ADAPTER_DROPOUT_KEYS

    return [f"model.adapter_config.{k}=0.0" for k in ADAPTER_DROPOUT_KEYS]


def checkpoint_step(run: Path) -> int:
    """The optimizer step of ``run``'s last checkpoint; -1 while there is none (or it is being written)."""
    try:
        return int(load_checkpoint(run / "checkpoints" / "last.pt")["step"])
    except (FileNotFoundError, ValueError):
        return -1
