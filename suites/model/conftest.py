"""Fixtures of the model suite: a scaled-down MDEQ that runs in milliseconds and the real scenarios."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deqbench.scenarios import TINY, DEQConfig, ModelConfig, SolveConfig


@pytest.fixture
def small_config() -> ModelConfig:
    """Two branches of 8 channels: the TINY layout with every width cut down, dropout kept on."""
    return ModelConfig(
        num_branches=2,
        channels=(8, 8),
        head_channels=(2, 4),
        final_channels=8,
        dropout=0.25,
    )


@pytest.fixture
def small_deq() -> DEQConfig:
    """TINY's solver settings with budgets small enough for unit tests."""
    return replace(
        TINY.deq,
        warmup_layers=3,
        forward=SolveConfig("broyden", max_nfe=6, tol=1e-3, stop_mode="rel"),
        backward=SolveConfig("broyden", max_nfe=6, tol=1e-3, stop_mode="rel"),
    )
