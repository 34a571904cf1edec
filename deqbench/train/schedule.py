"""Run plans: budgets, the per-step cosine learning rate and the warm-up length.

The published recipes anneal the learning rate with a cosine over every
optimizer step of the full schedule. A shortened run anneals over its own
steps instead, so that it still ends at ``lr_min``. It also shortens the
warm-up in proportion. The plan records both the published and the scaled
numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deqbench.scenarios import Scenario, apply_overrides

CIFAR10_TRAIN_IMAGES = 50_000
CIFAR10_TEST_IMAGES = 10_000

BUDGET_NAMES = ("full", "smoke")

# Schedule of the `smoke` budget: 8 to 15 minutes of TINY on two CPU cores that
# still passes through warm-up and the implicit layer on real images.
SMOKE_EPOCHS = 1
SMOKE_TRAIN_SUBSET = 3000  # training images
SMOKE_TEST_SUBSET = 1000  # test images
SMOKE_BATCH_SIZE = 32
SMOKE_WARMUP_FRACTION = 0.9  # share of the optimizer steps trained with the unrolled cell


@dataclass(frozen=True)
class Budget:
    """How much of a scenario's published schedule one run trains."""

    name: str  # "full", "smoke" or "custom" (any explicit override)
    epochs: int
    train_subset: int | None  # training images drawn per run; None uses the whole training set
    test_subset: int | None  # test images evaluated after each epoch; None uses the whole test set
    batch_size: int  # global batch over all processes, images per optimizer step
    warmup_iterations: int | None  # optimizer steps in warm-up; None scales the published count
    warmup_fraction: float | None = None  # share of the run's steps in warm-up (smoke preset only)


@dataclass(frozen=True)
class RunPlan:
    """The step counts of one run next to those of the published schedule."""

    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int  # optimizer steps of this run; the cosine schedule spans them
    published_total_steps: int  # optimizer steps of the published schedule on 50,000 images
    warmup_steps: int  # optimizer steps trained with the unrolled cell
    published_warmup_steps: int
    warmup_source: str  # "published", "scaled", "preset" or "override"
    lr: float  # learning rate at step 0
    lr_min: float  # learning rate after the last step

    @property
    def scaled(self) -> bool:
        """True when the cosine schedule spans fewer or more steps than the published one."""
        return self.total_steps != self.published_total_steps

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scaled"] = self.scaled
        data["kind"] = "cosine per optimizer step"
        return data


def make_budget(
    name: str,
    scenario: Scenario,
    *,
    epochs: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    batch_size: int | None = None,
    warmup_iterations: int | None = None,
    config_overridden: bool = False,
) -> Budget:
    """Build the budget named ``name`` ("full" or "smoke") with explicit overrides on top.

    Any override, including ``config_overridden`` for a ``--set`` on the
    scenario, renames the budget to "custom", because its accuracy can no
    longer be compared with either preset.
    """
    if name not in BUDGET_NAMES:
        raise ValueError(f"unknown budget {name!r}; choose one of {BUDGET_NAMES}")

    # Preset values first.
    if name == "smoke":
        preset = Budget(
            name="smoke",
            epochs=SMOKE_EPOCHS,
            train_subset=SMOKE_TRAIN_SUBSET,
            test_subset=SMOKE_TEST_SUBSET,
            batch_size=SMOKE_BATCH_SIZE,
            warmup_iterations=None,
            warmup_fraction=SMOKE_WARMUP_FRACTION,
        )
    else:
        preset = Budget(
            name="full",
            epochs=scenario.train.epochs,
            train_subset=None,
            test_subset=None,
            batch_size=scenario.train.batch_size,
            warmup_iterations=None,
        )

    # Then the explicit overrides.
    overrides = {
        "epochs": epochs,
        "train_subset": train_subset,
        "test_subset": test_subset,
        "batch_size": batch_size,
        "warmup_iterations": warmup_iterations,
    }
    explicit = {key: value for key, value in overrides.items() if value is not None}
    if not explicit and not config_overridden:
        return preset
    fields = {**asdict(preset), **explicit, "name": "custom"}
    if warmup_iterations is not None:
        fields["warmup_fraction"] = None
    return Budget(**fields)


def apply_budget(scenario: Scenario, budget: Budget) -> Scenario:
    """Return the scenario with the budget's epochs and batch size written into its config."""
    return apply_overrides(scenario, {"train": {"epochs": budget.epochs, "batch_size": budget.batch_size}})


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Count the optimizer steps of one epoch over ``num_images``.

    The last batch may be smaller than ``batch_size``. It is dropped only when
    it has fewer images than there are processes, because then a process
    would get an empty shard.
    """
    full, rest = divmod(num_images, batch_size)
    return full + (1 if rest >= world_size else 0)


def plan_run(
    published: Scenario,
    scenario: Scenario,
    budget: Budget,
    num_train: int,
    *,
    world_size: int = 1,
) -> RunPlan:
    """Lay out the step counts of a run of ``budget`` over ``num_train`` training images.

    ``published`` is the unmodified scenario. Its epochs, batch size and
    warm-up define the published schedule on CIFAR-10's 50,000 training
    images. ``scenario`` is the one this run trains, which sets the learning rates.
    """
    # Steps of this run and of the published schedule.
    per_epoch = steps_per_epoch(num_train, budget.batch_size, world_size)
    total = per_epoch * budget.epochs
    published_total = published.train.epochs * math.ceil(CIFAR10_TRAIN_IMAGES / published.train.batch_size)
    published_warmup = published.deq.warmup_iterations

    # Warm-up: explicit values first, then the preset's share, else the
    # published count scaled to this run's length.
    if budget.warmup_iterations is not None:
        warmup, source = budget.warmup_iterations, "override"
    elif budget.warmup_fraction is not None:
        warmup, source = round(budget.warmup_fraction * total), "preset"
    elif total == published_total:
        warmup, source = published_warmup, "published"
    else:
        warmup, source = round(published_warmup * total / published_total), "scaled"

    return RunPlan(
        steps_per_epoch=per_epoch,
        total_steps=total,
        published_total_steps=published_total,
        warmup_steps=warmup,
        published_warmup_steps=published_warmup,
        warmup_source=source,
        lr=scenario.train.lr,
        lr_min=scenario.train.lr_min,
    )


def cosine_lr(step: int, total_steps: int, lr: float, lr_min: float) -> float:
    """Return the learning rate of optimizer step ``step`` (0-based) on a cosine from lr to lr_min.

    Step 0 uses ``lr``; the value after the last step (``step == total_steps``)
    is ``lr_min``, as with torch's CosineAnnealingLR stepped once per batch.
    """
    if total_steps <= 0:
        return lr
    progress = min(max(step, 0), total_steps) / total_steps
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def jacobian_step(seed: int, step: int, probability: float) -> bool:
    """Decide whether optimizer step ``step`` adds the Jacobian penalty.

    The draw depends only on (seed, step), so every process of a distributed
    run and every resumed run makes the same choice without carrying RNG state.
    """
    if probability <= 0.0:
        return False
    draw = np.random.default_rng([seed, step, 0x4A52]).random()
    return bool(draw < probability)
