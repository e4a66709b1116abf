"""Is context used? A task whose answer is visible only in the neighbouring slices.

Each window holds K = 3 slices of noise; a bright disc sits in the two neighbours (slices k ± 1)
at a random place, and the centre slice shows nothing of it. The target is the disc's mask on the
centre slice. A single-slice model (``adapter: none``) or an adapter without neighbours
(``context: 1``) can only guess; T-Gated has to carry the neighbours' tokens into the centre's.
The backbone is the tiny random CLIPSeg, frozen (its tokens are computed once), as in the
evidence recipe's stage 2.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.models.conftest import IMAGE, tiny_model_config
from tgated.config import AdapterConfig

K = 3


def toy_windows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K, 1, S, S) windows in [0, 1] and (n, S, S) masks of the disc in the centre slice."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(IMAGE), torch.arange(IMAGE), indexing="ij")
    windows = 0.3 + 0.1 * torch.rand(n, K, 1, IMAGE, IMAGE, generator=gen)
    masks = torch.zeros(n, IMAGE, IMAGE)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=gen) * (IMAGE - 20) + 10).tolist()
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= 8.0**2
        masks[i] = disc.float()
        for k in (0, 2):
            windows[i, k, 0][disc] = 0.9
    return windows, masks


def train_toy(steps: int = 300, seed: int = 0, **model_changes: Any) -> float:
    """Train adapter + decoder on the toy task from a frozen tiny backbone; held-out hard Dice."""
    from tgated.models.tgated import TGatedModel
    from tgated.training.losses import segmentation_loss

    torch.manual_seed(seed)
    cfg = tiny_model_config(**{"context": K, **model_changes})
    model = TGatedModel.from_config(cfg)
    k = model.context
    pick = slice(None) if k == K else slice(K // 2, K // 2 + 1)

    def tokens(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = windows[:, pick]
            return model.encode(w.flatten(0, 1)).unflatten(0, w.shape[:2])

    train_x, train_y = toy_windows(256, seed=100 + seed)
    test_x, test_y = toy_windows(64, seed=999)
    train_t, test_t = tokens(train_x), tokens(test_x)
    groups = model.param_groups()
    params = [p for name in ("adapter", "decoder", "conditioning") for p in groups[name]]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    organs = torch.ones(16, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, train_t.shape[0], (16,), generator=gen)
        logits = model(token_windows=train_t[idx], organs=organs)
        loss = segmentation_loss(logits, train_y[idx]).total + model.gate_regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(token_windows=test_t, organs=torch.ones(test_t.shape[0], dtype=torch.long)) > 0
    inter = (pred & (test_y > 0)).sum().item()
    return 2 * inter / (pred.sum().item() + test_y.sum().item())


SMALL = {"dim": 32, "layers": 2, "heads": 4, "ffn_dim": 64, "spatial_heads": 4}


@pytest.mark.slow
@pytest.mark.parametrize("init", ["zero", "normal"])
def test_tgated_learns_what_only_the_neighbours_show(init: str) -> None:
    # the paper's gate settings (bias −5, regulariser λ = 1e-3), with either output initialisation
    cfg = AdapterConfig(**SMALL, temporal_out_init=init)
    assert cfg.gate_bias_init == -5.0 and cfg.gate_reg == 1e-3
    assert train_toy(adapter_config=cfg) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{"adapter": "none"}, {"context": 1}], ids=["baseline", "context1"])
def test_models_without_neighbours_cannot(changes: dict[str, Any]) -> None:
    assert train_toy(adapter_config=AdapterConfig(**SMALL), **changes) <= 0.2


def test_toy_task_hides_the_target_in_the_centre_slice() -> None:
    windows, masks = toy_windows(8, seed=0)
    disc = masks.bool()
    for i in range(8):
        centre = windows[i, K // 2, 0]
        # the centre slice is the same noise inside and outside the disc
        assert centre[disc[i]].mean().item() == pytest.approx(centre[~disc[i]].mean().item(), abs=0.02)
        for k in (0, 2):
            assert torch.all(windows[i, k, 0][disc[i]] == 0.9)
    assert 150 < masks.sum(dim=(1, 2)).mean().item() < 250  # a radius-8 disc: about 201 pixels
