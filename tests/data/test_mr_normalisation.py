"""The MR intensity normalisation the zero-shot MR evaluation uses (docs/protocol.md, MR): each volume
clipped to its own 0.5th and 99.5th percentiles and mapped to [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgated.config import PreprocessConfig
from tgated.data.slices import normalise_intensity


def test_mr_volume_is_clipped_to_its_own_percentiles_and_scaled():
    # 0, 1, ..., 200: torch.quantile interpolates linearly, so the 0.5th percentile is 1.0 and the
    # 99.5th is 199.0; 1 -> 0, 100 -> 99/198 = 0.5, 199 -> 1, and the tails are clipped
    x = np.arange(201, dtype=np.float32).reshape(3, 67, 1)
    out = normalise_intensity(x, "mr", PreprocessConfig()).reshape(-1)
    assert out[0].item() == 0.0 and out[1].item() == 0.0
    assert out[100].item() == pytest.approx(0.5)
    assert out[199].item() == pytest.approx(1.0) and out[200].item() == 1.0
    assert out.dtype == torch.float32


def test_mr_normalisation_ignores_the_scanner_s_scale_and_offset():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 100.0, size=(20, 20, 10)).astype(np.float32)
    a = normalise_intensity(x, "mr", PreprocessConfig())
    b = normalise_intensity(3.0 * x + 500.0, "mr", PreprocessConfig())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ct_uses_the_hu_window_not_percentiles_and_a_constant_mr_volume_is_zero():
    hu = np.array([-1000.0, -125.0, 75.0, 275.0, 2000.0], dtype=np.float32).reshape(5, 1, 1)
    out = normalise_intensity(hu, "ct", PreprocessConfig()).reshape(-1).tolist()
    assert out == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    flat = normalise_intensity(np.full((4, 4, 4), 7.0, np.float32), "mr", PreprocessConfig())
    assert float(flat.abs().max()) == 0.0
