"""Shared fixtures: small NIfTI volumes with non-identity geometry."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Keep the suite predictable on 2-core CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def lps_affine(spacing=(0.8, 0.9, 3.0), origin=(120.0, -40.0, -300.0)) -> np.ndarray:
    """An LPS-stored grid (x and y flipped relative to RAS), anisotropic, with a non-zero origin."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return aff


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def examples_root():
    """The real example scans (TotalSegmentator 2.18.0 sdist), fetched once into the user cache.

    Their labels are TotalSegmentator predictions, not expert annotations. Set TGATED_OFFLINE=1 to
    skip these tests on a machine without network access; CI fetches them.
    """
    if os.environ.get("TGATED_OFFLINE") == "1":
        pytest.skip("TGATED_OFFLINE=1: the example scans are not fetched")
    from tgated.data.examples import fetch

    return fetch(quiet=True)
