"""Figures of the memory and solver benchmarks, drawn from their JSON records."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from deqbench.results import atomic_write_bytes

LIBRARY_STYLES = {"deqbench": "-", "torchdeq": "--"}
SOLVER_COLORS = {"fixed_point": "tab:blue", "anderson": "tab:orange", "broyden": "tab:green"}
BACKWARD_STYLES = {"ift": ("o", "-"), "unrolled": ("s", "--"), "phantom": ("^", ":")}


def _figure(rows: int, columns: int, width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    return figure, axes


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def plot_memory(data: dict[str, Any], path: Path) -> None:
    """Plot saved-for-backward bytes against the forward limit, log-log, one panel per model."""
    runs = data["runs"]
    models = sorted({r["model"] for r in runs}, key=lambda m: (m != "TINY", m))
    figure, axes = _figure(1, len(models), 5.0 * len(models), 4.0)

    for axis, model in zip(axes[0], models):
        for backward in sorted({r["backward"] for r in runs if r["model"] == model}):
            points = sorted((r["f_max_iter"], r["saved_tensor_bytes"]) for r in runs if r["model"] == model and r["backward"] == backward)
            marker, line = BACKWARD_STYLES.get(backward, ("x", "-"))
            batch = next(r["batch_size"] for r in runs if r["model"] == model)
            axis.plot([p[0] for p in points], [p[1] / 2**20 for p in points], marker=marker, linestyle=line, label=backward)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("forward limit (evaluations of f)")
        axis.set_ylabel("saved for backward (MiB)")
        axis.set_title(f"{model}, batch {batch}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    _save(figure, path)


def plot_solvers(data: dict[str, Any], path: Path) -> None:
    """Plot the largest relative residual over the batch against NFE, one panel per problem.

    Each solver has one colour; deqbench is drawn solid and torchdeq dashed.
    The solve at the tightest tolerance of each pair is drawn, because it
    runs longest.
    """
    runs = data["runs"]
    problems = [p["name"] for p in data["problems"]]
    figure, axes = _figure(1, len(problems), 5.0 * len(problems), 4.0)

    for axis, problem in zip(axes[0], problems):
        chosen = [r for r in runs if r["problem"] == problem]
        tightest = min(r["tolerance"] for r in chosen)
        for run in sorted(chosen, key=lambda r: (r["solver"], r["library"])):
            if run["tolerance"] != tightest:
                continue
            points = [(n, value) for n, value in run["trace"] if value is not None]
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=SOLVER_COLORS.get(run["solver"], "black"),
                linestyle=LIBRARY_STYLES.get(run["library"], ":"),
                label=f"{run['library']} {run['solver']}",
            )
        axis.axhline(tightest, color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("evaluations of f (NFE)")
        axis.set_ylabel("max relative residual over the batch")
        axis.set_title(problem)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    _save(figure, path)
