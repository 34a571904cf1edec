"""Budgets, the per-step cosine schedule and the warm-up length of shortened runs."""

from __future__ import annotations

import math

import pytest

from deqbench.scenarios import LARGE_REG, TINY
from deqbench.train.schedule import (
    CIFAR10_TRAIN_IMAGES,
    SMOKE_WARMUP_FRACTION,
    apply_budget,
    cosine_lr,
    jacobian_step,
    make_budget,
    plan_run,
    steps_per_epoch,
)


def test_cosine_endpoints() -> None:
    assert cosine_lr(0, 100, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_lr(100, 100, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert cosine_lr(50, 100, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)


def test_cosine_monotone_decreasing() -> None:
    values = [cosine_lr(step, 37, 1e-3, 1e-6) for step in range(38)]
    assert all(later < earlier for earlier, later in zip(values, values[1:]))


def test_full_budget_matches_published() -> None:
    budget = make_budget("full", TINY)
    plan = plan_run(TINY, TINY, budget, CIFAR10_TRAIN_IMAGES)

    assert budget.name == "full"
    assert plan.steps_per_epoch == math.ceil(CIFAR10_TRAIN_IMAGES / TINY.train.batch_size)
    assert plan.total_steps == plan.published_total_steps
    assert not plan.scaled
    assert plan.warmup_steps == TINY.deq.warmup_iterations
    assert plan.warmup_source == "published"


def test_shortened_run_scales_warmup() -> None:
    budget = make_budget("full", TINY, epochs=5)
    plan = plan_run(TINY, apply_budget(TINY, budget), budget, CIFAR10_TRAIN_IMAGES)

    assert budget.name == "custom"
    assert plan.scaled
    assert plan.total_steps == plan.published_total_steps // 10
    assert plan.warmup_steps == round(TINY.deq.warmup_iterations * plan.total_steps / plan.published_total_steps)
    assert plan.warmup_source == "scaled"
    assert plan.to_dict()["scaled"] is True


def test_smoke_preset_mostly_warmup() -> None:
    budget = make_budget("smoke", TINY)
    plan = plan_run(TINY, apply_budget(TINY, budget), budget, budget.train_subset)

    assert budget.name == "smoke"
    assert plan.warmup_steps == round(SMOKE_WARMUP_FRACTION * plan.total_steps)
    assert plan.warmup_steps > plan.total_steps / 2
    assert plan.warmup_steps < plan.total_steps
    assert plan.warmup_source == "preset"


def test_override_makes_smoke_custom() -> None:
    assert make_budget("smoke", TINY, test_subset=100).name == "custom"
    assert make_budget("smoke", TINY, config_overridden=True).name == "custom"


def test_explicit_warmup_not_scaled() -> None:
    budget = make_budget("full", TINY, epochs=1, warmup_iterations=7)
    plan = plan_run(TINY, apply_budget(TINY, budget), budget, 1000)

    assert plan.warmup_steps == 7
    assert plan.warmup_source == "override"


def test_unknown_budget_rejected() -> None:
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        make_budget("huge", TINY)


@pytest.mark.parametrize(
    ("images", "batch", "world", "expected"),
    [(64, 16, 1, 4), (65, 16, 1, 5), (65, 16, 2, 4), (66, 16, 2, 5), (50_000, 128, 1, 391)],
)
def test_steps_per_epoch(images: int, batch: int, world: int, expected: int) -> None:
    assert steps_per_epoch(images, batch, world) == expected


def test_jacobian_draw_rate() -> None:
    probability = LARGE_REG.jacobian_reg.probability
    draws = [jacobian_step(42, step, probability) for step in range(20_000)]
    rate = sum(draws) / len(draws)

    # Binomial standard deviation at n = 20,000 is about 0.001 for p = 0.02.
    assert abs(rate - probability) < 0.005


def test_jacobian_draw_repeatable() -> None:
    first = [jacobian_step(3, step, 0.3) for step in range(200)]
    second = [jacobian_step(3, step, 0.3) for step in range(200)]
    other_seed = [jacobian_step(4, step, 0.3) for step in range(200)]

    assert first == second
    assert first != other_seed
    assert not any(jacobian_step(3, step, 0.0) for step in range(200))
