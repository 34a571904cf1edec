"""The result file of a reproduction run and its verdict against the published accuracy.

Only a run of the full budget on the official CIFAR-10 archive can confirm or
miss a published number. Every other run (smoke or custom budget, the JPEG
copy or another ImageFolder) gets ``not_comparable`` with the reason.
"""

from __future__ import annotations

import math
from typing import Any

from deqbench.scenarios import Scenario

# A run reproduces the target when its best test accuracy is at most this many
# percentage points below the reproduction's number. One point is about twice
# the spread between seeds that the MDEQ papers report (0.2 to 0.4 pp), and
# runs that beat the target count as reproduced, because the original papers
# report higher accuracies than the reproduction.
TOLERANCE_PP = 1.0

SCHEMA_VERSION = 1

# Per-epoch keys kept in the result's history (the log keeps everything).
HISTORY_KEYS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_acc", "test_loss",
    "warmup_steps", "implicit_steps", "jacobian_steps", "nfe", "residual", "converged_fraction",
    "test_nfe_mean", "epoch_time_s", "peak_memory_bytes",
)


def json_safe(value: Any) -> Any:
    """Return ``value`` with every NaN or infinite float replaced by None, so strict JSON can hold it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def accuracy_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the best and final test accuracy in percent and the 1-based epoch of the best; None before any epoch."""
    if not history:
        return {"best": None, "final": None, "best_epoch": None}
    best = max(history, key=lambda record: record["test_acc"])
    return {"best": best["test_acc"], "final": history[-1]["test_acc"], "best_epoch": best["epoch"]}


def decide_verdict(
    *,
    run_status: str,
    budget_name: str,
    data_source: str,
    data_note: str,
    best_accuracy: float | None,
    target_value: float,
    failure_reason: str | None = None,
) -> dict[str, Any]:
    """Compare a finished run with the reproduction target and return the verdict with its reason.

    ``run_status`` is the trainer's "completed" or "failed". The criterion is
    best accuracy >= target - TOLERANCE_PP, as the original code reports the
    best epoch's test accuracy.
    """
    verdict: dict[str, Any] = {
        "tolerance_pp": TOLERANCE_PP,
        "criterion": f"best test accuracy >= target - {TOLERANCE_PP} pp, full budget on the official CIFAR-10 archive only",
        "target": target_value,
    }
    if run_status == "failed":
        return {**verdict, "status": "failed", "reason": failure_reason or "training failed"}

    comparable_budget = budget_name == "full"
    comparable_data = data_source == "official"
    if not (comparable_budget and comparable_data):
        reasons = []
        if not comparable_budget:
            reasons.append(f"budget {budget_name!r} is not the published schedule (only 'full' is)")
        if not comparable_data:
            copy = f" ({data_note})" if data_note else ""
            reasons.append(f"data source {data_source!r}{copy} is not the official CIFAR-10 archive")
        return {**verdict, "status": "not_comparable", "reason": "; ".join(reasons)}

    assert best_accuracy is not None  # a completed run has at least one epoch
    delta = best_accuracy - target_value
    if delta >= -TOLERANCE_PP:
        status, relation = "reproduced", "within"
    else:
        status, relation = "not_reproduced", "outside"
    reason = f"best test accuracy {best_accuracy:.2f}% is {delta:+.2f} pp from the target {target_value:.2f}%, {relation} the tolerance"
    return {**verdict, "status": status, "reason": reason}


def build_result(
    *,
    scenario: Scenario,
    budget: dict[str, Any],
    data: dict[str, Any],
    env: dict[str, Any],
    outcome: Any,
    command: list[str],
    log_path: str,
    checkpoint_dir: str,
    plot_path: str | None,
) -> dict[str, Any]:
    """Assemble the result file of a completed or failed run (``outcome`` is a TrainOutcome)."""
    history = outcome.history
    accuracy = accuracy_summary(history)
    target = scenario.targets[0]
    verdict = decide_verdict(
        run_status=outcome.status,
        budget_name=budget["name"],
        data_source=data["source"],
        data_note=data.get("note", ""),
        best_accuracy=accuracy["best"],
        target_value=target.value,
        failure_reason=outcome.failure["reason"] if outcome.failure else None,
    )
    verdict["target_source"] = target.source

    epoch_times = [record["epoch_time_s"] for record in history]
    last = history[-1] if history else None
    peak = max((record["peak_memory_bytes"] for record in history), default=None)

    result = {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario.name,
        "variant": scenario.variant,
        "config": scenario.to_dict(),
        "budget": budget,
        "data": data,
        "env": env,
        "seed": outcome.seeds.get("seed"),
        "seeds": outcome.seeds,
        "accuracy": {**accuracy, "unit": "percent", "split": "test"},
        "targets": [
            {
                "value": t.value,
                "source": t.source,
                "delta": None if accuracy["best"] is None else accuracy["best"] - t.value,
            }
            for t in scenario.targets
        ],
        "verdict": verdict,
        "epochs_completed": len(history),
        "steps": outcome.steps,
        "wall_time_s": outcome.wall_time_s,
        "epoch_time_s": {
            "per_epoch": epoch_times,
            "mean": sum(epoch_times) / len(epoch_times) if epoch_times else None,
            "clock": "time.perf_counter around training and evaluation of each epoch",
        },
        "nfe": _last_epoch_nfe(last),
        "peak_memory_bytes": peak,
        "peak_memory_kind": last["peak_memory_kind"] if last else None,
        "failure": outcome.failure,
        "resumed_from": outcome.resumed_from,
        "history": [{key: record.get(key) for key in HISTORY_KEYS} for record in history],
        "command": command,
        "log": log_path,
        "checkpoint_dir": checkpoint_dir,
        "plot": plot_path,
    }
    return json_safe(result)


def _last_epoch_nfe(record: dict[str, Any] | None) -> dict[str, Any]:
    """Forward and backward NFE of the last epoch's implicit steps; None where it had none."""
    keys = ("forward_mean", "forward_max", "backward_mean", "backward_max")
    if record is None:
        return {key: None for key in keys} | {"epoch": None}
    return {key: record["nfe"][key] for key in keys} | {"epoch": record["epoch"]}
