"""Shared pytest fixtures: seeds reset per test, float64 tolerances, the CIFAR-10 copy."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JPEG_TAR = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar"


@pytest.fixture(autouse=True)
def _reset_seeds() -> None:
    """Make every test start from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar_jpeg_tar() -> Path:
    """Path of the CIFAR-10 JPEG tar: $DEQBENCH_DATA, else ../shared/data/cifar10-jpeg.tar.

    Outside CI a missing copy skips the test; in CI (CI=true) it fails it,
    because CI must exercise the real images.
    """
    path = Path(os.environ.get("DEQBENCH_DATA", DEFAULT_JPEG_TAR))
    if not path.exists():
        message = (
            f"CIFAR-10 JPEG copy not found at {path}; set DEQBENCH_DATA to a tar or "
            "ImageFolder directory with train/ and test/ class folders"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path
