"""Typed configurations of the CIFAR-10 scenarios TINY, LARGE and LARGE_REG.

Values follow the public MDEQ code: the YAML files of github.com/locuslab/mdeq
(experiments/cifar/cls_mdeq_{TINY,LARGE}.yaml) and the v2 code with Jacobian
regularization in github.com/locuslab/deq (MDEQ-Vision). Where the two differ
the v2 code wins, because it is what the maintainer points users to. The
variant printed in the Jacobian-regularization paper (Bai, Koltun, Kolter,
ICML 2021, its hyperparameter table) is available as LARGE_REG with
``variant="jr_paper"``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

BACKWARD_MODES = ("ift", "unrolled", "phantom")
SOLVER_NAMES = ("broyden", "anderson", "fixed_point")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one MDEQ classifier."""

    num_branches: int
    channels: tuple[int, ...]  # per branch, highest resolution first
    head_channels: tuple[int, ...]  # bottleneck width per branch in the head
    final_channels: int  # width of the 1x1 convolution before pooling
    num_classes: int = 10
    blocks_per_branch: int = 1
    expansion: int = 5  # hidden width of the residual block = expansion * channels
    stem_extra_1x1: bool = False  # LARGE adds a 1x1 conv, BatchNorm, ReLU after the stem
    dropout: float = 0.0  # variational dropout probability inside f
    group_norm_groups: int = 8
    fusion_norm_groups: int = 4  # GroupNorm after the post-fusion 1x1 convolution
    fusion_norm_affine: bool = False  # True selects the older locuslab/mdeq code (+96 / +960 params)
    weight_norm: bool = True


@dataclass(frozen=True)
class SolveConfig:
    """One fixed-point solve: which solver, its budget and its stop test."""

    solver: str = "broyden"
    max_nfe: int = 18  # function evaluations
    tol: float = 1e-3
    stop_mode: str = "rel"  # "rel": ||f(z)-z|| / ||f(z)||; "abs": ||f(z)-z||


@dataclass(frozen=True)
class DEQConfig:
    """Warm-up and the implicit layer's forward and backward passes."""

    warmup_layers: int  # weight-tied unrolled applications of f during warm-up
    warmup_iterations: int  # optimizer steps trained with the unrolled cell
    forward: SolveConfig
    backward: SolveConfig
    backward_mode: str = "ift"
    phantom_steps: int = 1  # tracked steps of the phantom gradient
    phantom_damping: float = 1.0  # step size of the phantom gradient


@dataclass(frozen=True)
class JacobianRegConfig:
    """Hutchinson penalty on ||df/dz||_F^2 / state size (Bai et al., ICML 2021)."""

    weight: float = 0.0  # 0 disables the penalty
    probability: float = 0.0  # fraction of training steps that compute it
    stop_epoch: int = 0  # epochs from this one on skip it
    samples: int = 1  # Gaussian probes per estimate


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and data handling of a full training run."""

    epochs: int
    batch_size: int  # global batch over all processes
    lr: float = 1e-3  # Adam learning rate at the start of the cosine schedule
    lr_min: float = 1e-6  # learning rate at the last iteration
    weight_decay: float = 0.0
    augment: bool = False  # random crop 32 with padding 4 and horizontal flip
    seed: int = 42


@dataclass(frozen=True)
class Target:
    """A published test accuracy to compare against."""

    value: float  # percent
    source: str


@dataclass(frozen=True)
class Scenario:
    name: str
    model: ModelConfig
    deq: DEQConfig
    train: TrainConfig
    jacobian_reg: JacobianRegConfig = field(default_factory=JacobianRegConfig)
    variant: str = "code"
    targets: tuple[Target, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Convert every value of the scenario to plain JSON types."""
        return dataclasses.asdict(self)


REPRODUCTION = "Pinto and Seman, UNIVALI (Google Colab reproduction, torchvision CIFAR-10)"

TINY = Scenario(
    name="TINY",
    model=ModelConfig(
        num_branches=2,
        channels=(24, 24),
        head_channels=(8, 16),
        final_channels=200,
        dropout=0.25,
    ),
    deq=DEQConfig(
        warmup_layers=10,
        warmup_iterations=3000,
        forward=SolveConfig("broyden", max_nfe=18, tol=1e-3, stop_mode="rel"),
        backward=SolveConfig("broyden", max_nfe=20, tol=1e-3, stop_mode="rel"),
    ),
    train=TrainConfig(epochs=50, batch_size=128, weight_decay=2.5e-6, augment=False),
    targets=(
        Target(83.83, REPRODUCTION),
        Target(87.1, "Bai, Koltun, Kolter, NeurIPS 2020 (MDEQ-small, no augmentation)"),
    ),
)

LARGE = Scenario(
    name="LARGE",
    model=ModelConfig(
        num_branches=4,
        channels=(32, 64, 128, 256),
        head_channels=(14, 28, 56, 112),
        final_channels=1680,
        stem_extra_1x1=True,
        dropout=0.3,
    ),
    deq=DEQConfig(
        warmup_layers=10,
        warmup_iterations=20000,
        forward=SolveConfig("broyden", max_nfe=18, tol=1e-3, stop_mode="rel"),
        backward=SolveConfig("broyden", max_nfe=20, tol=1e-3, stop_mode="rel"),
    ),
    train=TrainConfig(epochs=220, batch_size=128, weight_decay=0.0, augment=True),
    targets=(
        Target(93.03, REPRODUCTION),
        Target(93.6, "Bai, Koltun, Kolter, ICML 2021 (mean of 5 runs)"),
    ),
)

LARGE_REG = Scenario(
    name="LARGE_REG",
    model=replace(LARGE.model, dropout=0.22),
    deq=DEQConfig(
        warmup_layers=8,
        warmup_iterations=16000,
        forward=SolveConfig("broyden", max_nfe=8, tol=1e-3, stop_mode="rel"),
        backward=SolveConfig("broyden", max_nfe=7, tol=1e-3, stop_mode="rel"),
    ),
    train=TrainConfig(epochs=220, batch_size=96, weight_decay=0.0, augment=True),
    jacobian_reg=JacobianRegConfig(weight=0.4, probability=0.02, stop_epoch=90, samples=2),
    targets=(
        Target(91.88, REPRODUCTION),
        Target(93.1, "Bai, Koltun, Kolter, ICML 2021 (mean of 5 runs)"),
    ),
)

# The hyperparameter table printed in the Jacobian-regularization paper.
LARGE_REG_JR_PAPER = replace(
    LARGE_REG,
    variant="jr_paper",
    model=replace(LARGE.model, channels=(28, 56, 112, 224), dropout=0.25),
    deq=replace(
        LARGE_REG.deq,
        forward=replace(LARGE_REG.deq.forward, max_nfe=7),
        backward=replace(LARGE_REG.deq.backward, max_nfe=8),
    ),
    train=replace(LARGE_REG.train, epochs=200),
    jacobian_reg=JacobianRegConfig(weight=0.5, probability=0.05, stop_epoch=90, samples=1),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (TINY, LARGE, LARGE_REG)}
VARIANTS: dict[tuple[str, str], Scenario] = {
    **{(s.name, "code"): s for s in SCENARIOS.values()},
    ("LARGE_REG", "jr_paper"): LARGE_REG_JR_PAPER,
}


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type or a value out of range."""


def get_scenario(name: str, variant: str = "code") -> Scenario:
    """Return a scenario by name (case-insensitive) and variant."""
    key = (name.upper(), variant)
    if key not in VARIANTS:
        choices = ", ".join(f"{n} (variant {v})" for n, v in VARIANTS)
        raise ConfigError(f"unknown scenario {name!r} with variant {variant!r}; choose one of: {choices}")
    return VARIANTS[key]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field's type and return it in that type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())  # annotations are strings under __future__
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{key} cannot be overridden")
    return value


def apply_overrides(config: Any, overrides: Mapping[str, Any], prefix: str = "") -> Any:
    """Return a copy of a config dataclass with nested ``overrides`` applied.

    Unknown keys and values of the wrong type raise ConfigError naming the
    dotted key, for example ``deq.forward.max_nfe``.
    """
    known = {f.name: f for f in fields(config)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown configuration key {dotted!r}; known keys at this level: {', '.join(known)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a mapping of its fields; got {value!r}")
            changes[key] = apply_overrides(current, value, prefix=f"{dotted}.")
        else:
            changes[key] = _coerce(value, known[key].type, dotted)
    updated = replace(config, **changes)
    if isinstance(updated, Scenario):
        validate_scenario(updated)
    return updated


def validate_scenario(scenario: Scenario) -> None:
    """Reject values that no run can use, naming the key, the value and the allowed range."""
    model, deq, train, jr = scenario.model, scenario.deq, scenario.train, scenario.jacobian_reg
    checks = [
        ("model.num_branches", model.num_branches, model.num_branches >= 1, "an integer >= 1"),
        ("model.channels", model.channels, len(model.channels) == model.num_branches and all(c > 0 for c in model.channels), f"{model.num_branches} positive integers"),
        ("model.head_channels", model.head_channels, len(model.head_channels) == model.num_branches and all(c > 0 for c in model.head_channels), f"{model.num_branches} positive integers"),
        ("model.dropout", model.dropout, 0.0 <= model.dropout < 1.0, "a probability in [0, 1)"),
        ("deq.warmup_layers", deq.warmup_layers, deq.warmup_layers >= 1, "an integer >= 1"),
        ("deq.warmup_iterations", deq.warmup_iterations, deq.warmup_iterations >= 0, "an integer >= 0"),
        ("deq.backward_mode", deq.backward_mode, deq.backward_mode in BACKWARD_MODES, f"one of {BACKWARD_MODES}"),
        ("deq.phantom_steps", deq.phantom_steps, deq.phantom_steps >= 1, "an integer >= 1"),
        ("deq.phantom_damping", deq.phantom_damping, 0.0 < deq.phantom_damping <= 1.0, "a number in (0, 1]"),
        ("train.epochs", train.epochs, train.epochs >= 1, "an integer >= 1"),
        ("train.batch_size", train.batch_size, train.batch_size >= 1, "an integer >= 1"),
        ("train.lr", train.lr, train.lr > 0, "a positive number"),
        ("train.lr_min", train.lr_min, 0 <= train.lr_min <= train.lr, "a number in [0, train.lr]"),
        ("train.weight_decay", train.weight_decay, train.weight_decay >= 0, "a number >= 0"),
        ("jacobian_reg.weight", jr.weight, jr.weight >= 0, "a number >= 0"),
        ("jacobian_reg.probability", jr.probability, 0.0 <= jr.probability <= 1.0, "a probability in [0, 1]"),
        ("jacobian_reg.samples", jr.samples, jr.samples >= 1, "an integer >= 1"),
    ]
    for name, solve in (("deq.forward", deq.forward), ("deq.backward", deq.backward)):
        checks += [
            (f"{name}.solver", solve.solver, solve.solver in SOLVER_NAMES, f"one of {SOLVER_NAMES}"),
            (f"{name}.max_nfe", solve.max_nfe, solve.max_nfe >= 1, "an integer >= 1"),
            (f"{name}.tol", solve.tol, solve.tol > 0, "a positive number"),
            (f"{name}.stop_mode", solve.stop_mode, solve.stop_mode in ("abs", "rel"), "'abs' or 'rel'"),
        ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"invalid {key} = {value!r}; expected {allowed}")
