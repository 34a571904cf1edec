"""One reproduction run from request to result file: validate, load data, train, report.

``prepare`` checks the whole request without touching data or weights, so
the command line can reject bad input within a second. ``execute`` loads
the data, trains (resuming when asked) and, on the main process, writes the
result file, its plot and returns the outcome. Nothing here prints.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from deqbench.results import atomic_write_json, capture_env, validate
from deqbench.scenarios import ConfigError, Scenario, apply_overrides, get_scenario
from deqbench.train.distributed import (
    DistContext,
    barrier,
    env_world,
    init_distributed,
    resolve_device,
    run_on_main,
    shutdown_distributed,
)
from deqbench.train.loop import Trainer
from deqbench.train.progress import Progress
from deqbench.train.report import build_result
from deqbench.train.schedule import (
    CIFAR10_TEST_IMAGES,
    CIFAR10_TRAIN_IMAGES,
    Budget,
    RunPlan,
    apply_budget,
    make_budget,
    plan_run,
)
from deqbench.train.settings import CHECKPOINT_DIR, LOG_NAME, TrainOutcome, TrainSettings

logger = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = Path("results") / "reproduce_cifar"
DEFAULT_RUNS_DIR = Path("runs")


class UsageError(ValueError):
    """An invalid or conflicting request; the message names the value, the allowed values and the fix."""


@dataclass(frozen=True)
class ReproduceRequest:
    """The options of `deqbench reproduce`, as plain values."""

    scenario: str = "TINY"
    variant: str = "code"
    budget: str = "full"
    data: str | None = None  # tar or ImageFolder directory; None uses torchvision's CIFAR-10 under data_root
    data_root: str = "./data"
    cache_dir: str | None = None  # where a tar is extracted; None uses $DEQBENCH_CACHE or ~/.cache/deqbench
    download: bool = True
    seed: int | None = None  # None keeps the scenario's seed
    output: str | None = None  # checkpoints and log; None gives runs/<name>
    results: str | None = None  # result file; None gives results/reproduce_cifar/<name>.json
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    workers: int | None = None  # None: 0 on the CPU, 4 on CUDA
    max_unconverged_steps: int = 50
    unconverged_residual: float = 0.5
    epochs: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int | None = None
    warmup_iterations: int | None = None
    settings: tuple[str, ...] = ()  # "dotted.key=value" scenario overrides
    stop_after_steps: int | None = None
    plot: bool = True
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedRun:
    """A validated request: the scenario and budget to train and where everything goes."""

    request: ReproduceRequest
    published: Scenario  # the scenario as published, for the schedule's reference numbers
    scenario: Scenario  # overrides and budget applied; warm-up still the published value
    budget: Budget
    device_type: str  # "cpu" or "cuda"
    workers: int
    run_name: str  # <scenario>[-<variant>]-<budget>
    output_dir: Path
    results_path: Path

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR


@dataclass
class ReproduceReport:
    """Output of one run: the trainer's outcome and, on the main process, the result file written."""

    outcome: TrainOutcome
    prepared: PreparedRun
    result: dict[str, Any] | None = None  # None for interrupted runs and on other processes
    results_path: Path | None = None
    plan: RunPlan | None = None


# ----------------------------------------------------------------- prepare


def parse_settings(settings: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Turn ["train.lr=0.002", "model.channels=[16,16]"] into a nested override mapping.

    Values are parsed as JSON; text that is not valid JSON is taken as a
    string, so ``deq.forward.solver=anderson`` needs no quotes.
    """
    nested: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is invalid; expected KEY=VALUE with a dotted key, e.g. --set train.lr=0.002")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        # json.loads accepts NaN and Infinity, which no scenario value can use.
        if _has_non_finite(value):
            raise UsageError(f"--set {item!r} is invalid; expected finite numbers, so pass a finite value")
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {item!r} conflicts with an earlier --set of {part!r}; set each key once")
            node = child
        if parts[-1] in node:
            raise UsageError(f"--set {key} is given twice; set each key once")
        node[parts[-1]] = value
    return nested


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(item) for item in value)
    return False


def _require(value: int | None, name: str, minimum: int, meaning: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise UsageError(f"{name} {value!r} is invalid; expected an integer >= {minimum} ({meaning})")


def _pop_schedule_settings(nested: dict[str, Any], request: ReproduceRequest) -> dict[str, int | None]:
    """Merge --set train.epochs, train.batch_size, train.seed and deq.warmup_iterations with their flags.

    The keys are removed from ``nested``, so that both spellings of an
    override have the same effect on the budget and its name.
    """
    moved: dict[str, int | None] = {
        "epochs": request.epochs,
        "batch_size": request.batch_size,
        "warmup": request.warmup_iterations,
        "seed": request.seed,
    }
    for section, key, target, flag in (
        ("train", "epochs", "epochs", "--epochs"),
        ("train", "batch_size", "batch_size", "--batch-size"),
        ("train", "seed", "seed", "--seed"),
        ("deq", "warmup_iterations", "warmup", "--warmup-iterations"),
    ):
        if isinstance(nested.get(section), dict) and key in nested[section]:
            value = nested[section].pop(key)
            if moved[target] is not None and moved[target] != value:
                raise UsageError(f"--set {section}.{key}={value!r} conflicts with {flag} {moved[target]}; give one of them")
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"--set {section}.{key}={value!r} is invalid; expected an integer")
            moved[target] = value
            if not nested[section]:
                del nested[section]
    return moved


def prepare(request: ReproduceRequest, *, check_paths: bool = True) -> PreparedRun:
    """Validate the request and resolve scenario, budget and paths; raise UsageError naming the fix.

    ``check_paths=False`` skips the checks of existing results and
    checkpoints, for commands that write neither.
    """
    # Plain numeric options.
    _require(request.epochs, "--epochs", 1, "training epochs")
    _require(request.train_subset, "--train-subset", 1, "training images")
    _require(request.test_subset, "--test-subset", 1, "test images")
    _require(request.batch_size, "--batch-size", 1, "images per optimizer step over all processes")
    _require(request.warmup_iterations, "--warmup-iterations", 0, "optimizer steps with the unrolled cell")
    _require(request.workers, "--workers", 0, "DataLoader worker processes")
    _require(request.max_unconverged_steps, "--max-unconverged-steps", 0, "0 disables the check")
    _require(request.seed, "--seed", 0, "non-negative seed")
    _require(request.stop_after_steps, "--stop-after-steps", 1, "optimizer steps before stopping")
    if not (0.0 < request.unconverged_residual and math.isfinite(request.unconverged_residual)):
        raise UsageError(
            f"--unconverged-residual {request.unconverged_residual!r} is invalid; expected a finite relative residual > 0 "
            "(pass --max-unconverged-steps 0 to disable the check)"
        )
    for value, name, limit in (
        (request.train_subset, "--train-subset", CIFAR10_TRAIN_IMAGES),
        (request.test_subset, "--test-subset", CIFAR10_TEST_IMAGES),
    ):
        if value is not None and value > limit:
            raise UsageError(f"{name} {value} is larger than CIFAR-10's {limit} images; pass at most {limit}")

    # Scenario, --set overrides and budget.
    try:
        published = get_scenario(request.scenario, request.variant)
    except ConfigError as error:
        raise UsageError(str(error)) from error
    nested = parse_settings(request.settings)
    schedule = _pop_schedule_settings(nested, request)
    # The flags passed their checks above, so an invalid value here came from --set.
    _require(schedule["epochs"], "--set train.epochs", 1, "training epochs")
    _require(schedule["batch_size"], "--set train.batch_size", 1, "images per optimizer step")
    _require(schedule["warmup"], "--set deq.warmup_iterations", 0, "optimizer steps with the unrolled cell")
    _require(schedule["seed"], "--set train.seed", 0, "non-negative seed")
    try:
        scenario = apply_overrides(published, nested) if nested else published
    except ConfigError as error:
        raise UsageError(f"{error}; correct that --set option") from error
    try:
        if schedule["seed"] is not None:
            scenario = apply_overrides(scenario, {"train": {"seed": schedule["seed"]}})
        budget = make_budget(
            request.budget,
            scenario,
            epochs=schedule["epochs"],
            train_subset=request.train_subset,
            test_subset=request.test_subset,
            batch_size=schedule["batch_size"],
            warmup_iterations=schedule["warmup"],
            config_overridden=bool(nested),
        )
        scenario = apply_budget(scenario, budget)
    except (ConfigError, ValueError) as error:
        raise UsageError(str(error)) from error

    # Processes and device.
    _, world_size, _ = env_world()
    if budget.batch_size < world_size:
        raise UsageError(
            f"batch size {budget.batch_size} is smaller than the {world_size} processes; "
            f"pass --batch-size >= {world_size} or start fewer processes"
        )
    try:
        device_type = resolve_device(request.device)
    except ValueError as error:
        raise UsageError(str(error)) from error
    workers = request.workers
    if workers is None:
        workers = 4 if device_type == "cuda" else 0

    # Paths, and what already exists there.
    run_name = published.name if published.variant == "code" else f"{published.name}-{published.variant}"
    run_name = f"{run_name}-{budget.name}"
    if request.output is None and request.results is None and not request.resume and not request.overwrite:
        run_name = _unused_run_name(run_name)
    output_dir = Path(request.output) if request.output else DEFAULT_RUNS_DIR / run_name
    results_path = Path(request.results) if request.results else DEFAULT_RESULTS_DIR / f"{run_name}.json"
    prepared = PreparedRun(request, published, scenario, budget, device_type, workers, run_name, output_dir, results_path)
    if check_paths:
        _check_paths(prepared)
    return prepared


def _unused_run_name(run_name: str) -> str:
    """Return ``run_name``, or ``run_name-N`` with the smallest N >= 2 whose default paths are free.

    A new run with default paths thus never touches an earlier run's result
    or checkpoints. Explicit --output or --results paths are never renamed:
    they are checked, and rejected when taken, by _check_paths.
    """
    candidate, number = run_name, 1
    while (DEFAULT_RESULTS_DIR / f"{candidate}.json").exists() or (DEFAULT_RUNS_DIR / candidate / CHECKPOINT_DIR).exists():
        number += 1
        candidate = f"{run_name}-{number}"
    return candidate


def _check_paths(prepared: PreparedRun) -> None:
    """Reject runs that would overwrite a result or mix checkpoints of two runs."""
    request = prepared.request
    if prepared.results_path.exists() and not request.overwrite:
        raise UsageError(
            f"result file {prepared.results_path} already exists; pass --overwrite to replace it "
            "or --results PATH to write elsewhere"
        )
    has_checkpoints = prepared.checkpoint_dir.is_dir() and any(prepared.checkpoint_dir.iterdir())
    if request.resume and not has_checkpoints:
        raise UsageError(
            f"--resume found no checkpoint in {prepared.checkpoint_dir}; drop --resume to start a fresh run "
            "or pass the --output of the run to continue"
        )
    if not request.resume and has_checkpoints and not request.overwrite:
        raise UsageError(
            f"{prepared.checkpoint_dir} contains checkpoints of an earlier run; pass --resume to continue it, "
            "--overwrite to delete them and start over, or --output DIR for a new run"
        )


# ----------------------------------------------------------------- execute


def fingerprint(scenario: Scenario, budget: Budget, plan: RunPlan, data: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """Collect everything that fixes the sequence of training steps; a checkpoint must match it to be resumed."""
    return {
        "scenario": scenario.to_dict(),
        "budget": asdict(budget),
        "plan": plan.to_dict(),
        "data": data.get("sha256") or f"{data['source']}:{data['path']}",
        "train_images": data.get("train_images"),
        "test_images": data.get("test_images"),
        "world_size": world_size,
    }


def load_data(prepared: PreparedRun, ctx: DistContext) -> tuple[Any, Any, dict[str, Any]]:
    """Load CIFAR-10, draw the subsets and return (train, test, data description); rank 0 extracts first."""
    from deqbench.data import load_cifar10, subset

    request, scenario, budget = prepared.request, prepared.scenario, prepared.budget

    def load() -> tuple[Any, Any, Any]:
        return load_cifar10(
            request.data,
            root=request.data_root,
            augment=scenario.train.augment,
            download=request.download,
            cache_dir=request.cache_dir,
        )

    # The main process extracts a tar into the cache; the others then find it there.
    loaded = run_on_main(load, ctx)
    if loaded is None:
        loaded = load()
    train, test, source = loaded

    for size, available, flag in (
        (budget.train_subset, source.num_train, "--train-subset"),
        (budget.test_subset, source.num_test, "--test-subset"),
    ):
        if size is not None and size > available:
            raise UsageError(f"{flag} {size} is larger than the {available} images of {source.path}; pass at most {available}")
    seed = scenario.train.seed
    train = subset(train, budget.train_subset, seed)
    test = subset(test, budget.test_subset, seed)
    data = {**source.to_dict(), "train_images": len(train), "test_images": len(test)}
    return train, test, data


def execute(prepared: PreparedRun, progress: Progress | None = None) -> ReproduceReport:
    """Train the prepared run and, on the main process, write its result file and plot."""
    request = prepared.request
    ctx = init_distributed(prepared.device_type)
    try:
        train, test, data = load_data(prepared, ctx)

        # The schedule for this data; the warm-up used goes into the recorded config.
        plan = plan_run(
            prepared.published,
            prepared.scenario,
            prepared.budget,
            len(train),
            world_size=ctx.world_size,
        )
        scenario = apply_overrides(prepared.scenario, {"deq": {"warmup_iterations": plan.warmup_steps}})

        # A fresh run with --overwrite starts from an empty checkpoint folder.
        if ctx.is_main and request.overwrite and not request.resume and prepared.checkpoint_dir.exists():
            logger.warning("deleting checkpoints of an earlier run in %s (--overwrite)", prepared.checkpoint_dir)
            shutil.rmtree(prepared.checkpoint_dir)
        barrier(ctx)

        settings = TrainSettings(
            scenario=scenario,
            plan=plan,
            seed=scenario.train.seed,
            output_dir=prepared.output_dir,
            fingerprint=fingerprint(scenario, prepared.budget, plan, data, ctx.world_size),
            workers=prepared.workers,
            max_unconverged_steps=request.max_unconverged_steps,
            unconverged_residual=request.unconverged_residual,
            stop_after_steps=request.stop_after_steps,
            resume=request.resume,
        )
        outcome = Trainer(settings, train, test, ctx).run(progress)

        report = ReproduceReport(outcome=outcome, prepared=prepared, plan=plan)
        if ctx.is_main and outcome.status in ("completed", "failed"):
            report.result = _write_result(prepared, scenario, plan, data, outcome, ctx)
            report.results_path = prepared.results_path
        return report
    finally:
        shutdown_distributed(ctx)


def _write_result(
    prepared: PreparedRun,
    scenario: Scenario,
    plan: RunPlan,
    data: dict[str, Any],
    outcome: TrainOutcome,
    ctx: DistContext,
) -> dict[str, Any]:
    """Build, validate and atomically write the result file, with the training curves beside it."""
    budget = prepared.budget
    plot_path: Path | None = None
    if prepared.request.plot and outcome.history:
        from deqbench.plots import plot_training_curves

        plot_path = prepared.results_path.with_suffix(".png")
        plot_training_curves(outcome.history, plot_path, title=f"{prepared.run_name} ({data['source']} data)")

    result = build_result(
        scenario=scenario,
        budget={
            "name": budget.name,
            "epochs": budget.epochs,
            "train_subset": budget.train_subset,
            "test_subset": budget.test_subset,
            "batch_size": budget.batch_size,
            "train_images": data["train_images"],
            "test_images": data["test_images"],
            "schedule": plan.to_dict(),
        },
        data=data,
        env={**capture_env(prepared.device_type), "world_size": ctx.world_size},
        outcome=outcome,
        command=list(prepared.request.command),
        log_path=str(prepared.output_dir / LOG_NAME),
        checkpoint_dir=str(prepared.checkpoint_dir),
        plot_path=str(plot_path) if plot_path is not None else None,
    )
    validate(result, "reproduce")
    atomic_write_json(prepared.results_path, result)
    return result
