"""Figures drawn from training logs and result files, rendered with matplotlib's Agg canvas.

The figures are built on a bare Figure with an Agg canvas, so importing this
module changes no global matplotlib backend and needs no display.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from deqbench.results import atomic_write_bytes


def _step_losses(history: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Return (fractional epoch, loss) of every optimizer step.

    Step i (0-based) of the n steps of epoch e is placed at e - 1 + (i + 1) / n.
    """
    positions, losses = [], []
    for record in history:
        step_loss = record.get("step_loss") or []
        for index, loss in enumerate(step_loss):
            positions.append(record["epoch"] - 1 + (index + 1) / len(step_loss))
            losses.append(loss)
    return positions, losses


def _implicit_start(history: Sequence[dict[str, Any]]) -> float | None:
    """Return the fractional epoch at which the first implicit step ran, or None without one."""
    for record in history:
        steps = record.get("steps") or 0
        if record.get("implicit_steps") and steps:
            return record["epoch"] - 1 + record.get("warmup_steps", 0) / steps
    return None


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Draw test accuracy, training loss and NFE against epoch into a PNG at ``path``; return the path.

    ``history`` contains one record per epoch with at least epoch, test_acc,
    train_loss and nfe {forward_mean, backward_mean}. With step_loss, steps
    and warmup_steps in the records, the loss panel also shows every step's
    loss and where warm-up ended. Epochs without implicit steps have NFE
    None and are left out of that panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("history is empty; a training curve needs at least one finished epoch")
    epochs = [record["epoch"] for record in history]

    figure = Figure(figsize=(11, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    accuracy_axes, loss_axes, nfe_axes = figure.subplots(1, 3)

    # Test accuracy per epoch.
    accuracy_axes.plot(epochs, [record["test_acc"] for record in history], marker="o", color="tab:blue")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")

    # Training loss: every step, the epoch means, and the start of the implicit steps.
    positions, losses = _step_losses(history)
    if positions:
        loss_axes.plot(positions, losses, color="tab:red", alpha=0.35, linewidth=1, label="step")
    loss_axes.plot(epochs, [record["train_loss"] for record in history], marker="o", color="tab:red", label="epoch mean")
    implicit_start = _implicit_start(history)
    if implicit_start is not None:
        loss_axes.axvline(implicit_start, color="gray", linestyle="--", linewidth=1, label="implicit from here")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    loss_axes.legend(fontsize="small")

    # Mean forward and backward NFE of the implicit steps of each epoch.
    for key, label, color in (("forward_mean", "forward", "tab:green"), ("backward_mean", "backward", "tab:purple")):
        points = [(record["epoch"], record["nfe"][key]) for record in history if record["nfe"][key] is not None]
        if points:
            nfe_axes.plot(*zip(*points), marker="o", label=label, color=color)
    nfe_axes.set(xlabel="epoch", ylabel="function evaluations per sample", title="NFE (implicit steps)")
    if nfe_axes.get_legend_handles_labels()[0]:
        nfe_axes.legend(fontsize="small")
    else:
        nfe_axes.text(0.5, 0.5, "warm-up only", ha="center", va="center", transform=nfe_axes.transAxes)

    # Shared epoch axis from 0, so that a one-epoch run is not drawn around a lone point.
    for axes in (accuracy_axes, loss_axes, nfe_axes):
        axes.grid(alpha=0.3)
        axes.set_xlim(0, max(epochs) + 0.25)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    figure.tight_layout()

    # Render to memory, then write atomically; no software stamp, so reruns give the same bytes.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
