"""Per-epoch training statistics, summed over steps and processes, and peak memory."""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

import torch

from deqbench.solvers.base import SolverStats
from deqbench.train.distributed import DistContext, all_reduce_max, all_reduce_sum

# Slots of an epoch's sums. Image counts and sums are added over every
# process's shard; the step counts are added once per optimizer step.
_SUM_FIELDS = (
    "loss_sum",  # cross-entropy summed over images
    "correct",  # training images classified correctly
    "images",
    "steps",
    "warmup_steps",
    "implicit_steps",
    "jacobian_steps",
    "jacobian_loss_sum",  # Jacobian penalty summed over the steps that computed it
    "fwd_samples",  # images with forward solver statistics (implicit steps)
    "fwd_nfe_sum",
    "fwd_rel_sum",
    "fwd_converged",
    "bwd_samples",
    "bwd_nfe_sum",
    "bwd_rel_sum",
    "bwd_converged",
)
_MAX_FIELDS = ("fwd_nfe_max", "fwd_rel_max", "bwd_nfe_max", "bwd_rel_max")

# A step's sums add two flags and the samples below the unconverged limit, all summed as counts.
_STEP_SUM_KEYS = _SUM_FIELDS + ("non_finite", "stop_requested", "fwd_below", "bwd_below")


def solver_moments(stats: SolverStats | None) -> dict[str, float]:
    """Reduce per-sample solver statistics to sums and maxima that add up across steps and processes."""
    if stats is None:
        return {}
    return {
        "samples": float(stats.nfe.numel()),
        "nfe_sum": float(stats.nfe.double().sum()),
        "nfe_max": float(stats.nfe.max()),
        "rel_sum": float(stats.rel_residual.double().sum()),
        "rel_max": float(stats.rel_residual.double().max()),
        "converged": float(stats.converged.double().sum()),
    }


class EpochMeter:
    """Accumulates one epoch's training numbers; state() and load_state() carry it across a resume."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64)
        # Maxima start at -inf so that any value wins; -inf after the epoch means "no implicit step".
        self.maxima = torch.full((len(_MAX_FIELDS),), -math.inf, dtype=torch.float64)
        self.step_loss: list[float] = []  # mean training loss of each optimizer step, all processes

    def add_step(self, reduced: dict[str, float], maxima: dict[str, float]) -> None:
        """Add one step's numbers, already reduced over processes."""
        for i, name in enumerate(_SUM_FIELDS):
            self.sums[i] += reduced.get(name, 0.0)
        for i, name in enumerate(_MAX_FIELDS):
            if name in maxima:
                self.maxima[i] = max(float(self.maxima[i]), maxima[name])
        if reduced.get("images", 0.0) > 0:
            self.step_loss.append(reduced["loss_sum"] / reduced["images"])

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums.clone(), "maxima": self.maxima.clone(), "step_loss": list(self.step_loss)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sums = state["sums"].clone()
        self.maxima = state["maxima"].clone()
        self.step_loss = list(state["step_loss"])

    def summary(self) -> dict[str, Any]:
        """Return the epoch's training loss, accuracy, solver statistics and step counts as JSON values."""
        s = dict(zip(_SUM_FIELDS, self.sums.tolist()))
        m = dict(zip(_MAX_FIELDS, self.maxima.tolist()))
        images = max(s["images"], 1.0)

        def mean(total: str, count: str) -> float | None:
            return s[total] / s[count] if s[count] > 0 else None

        def maximum(name: str, integral: bool = False) -> float | int | None:
            if m[name] == -math.inf:
                return None
            return int(m[name]) if integral else m[name]

        return {
            "train_loss": s["loss_sum"] / images,
            "train_acc": 100.0 * s["correct"] / images,
            "train_images": int(s["images"]),
            "steps": int(s["steps"]),
            "warmup_steps": int(s["warmup_steps"]),
            "implicit_steps": int(s["implicit_steps"]),
            "jacobian_steps": int(s["jacobian_steps"]),
            "jacobian_loss_mean": mean("jacobian_loss_sum", "jacobian_steps"),
            "nfe": {
                "forward_mean": mean("fwd_nfe_sum", "fwd_samples"),
                "forward_max": maximum("fwd_nfe_max", integral=True),
                "backward_mean": mean("bwd_nfe_sum", "bwd_samples"),
                "backward_max": maximum("bwd_nfe_max", integral=True),
            },
            "residual": {
                "forward_rel_mean": mean("fwd_rel_sum", "fwd_samples"),
                "forward_rel_max": maximum("fwd_rel_max"),
                "backward_rel_mean": mean("bwd_rel_sum", "bwd_samples"),
                "backward_rel_max": maximum("bwd_rel_max"),
            },
            "converged_fraction": {
                "forward": mean("fwd_converged", "fwd_samples"),
                "backward": mean("bwd_converged", "bwd_samples"),
            },
            "step_loss": list(self.step_loss),
        }


def reduce_step(local: dict[str, float], local_max: dict[str, float], ctx: DistContext) -> tuple[dict[str, float], dict[str, float]]:
    """Sum and max one step's numbers over processes; a single process returns them unchanged.

    Keys missing on a process count as 0 for sums and are left out of maxima.
    """
    sums = torch.tensor([local.get(name, 0.0) for name in _STEP_SUM_KEYS], dtype=torch.float64)
    maxima = torch.tensor([local_max.get(name, -math.inf) for name in _MAX_FIELDS], dtype=torch.float64)
    all_reduce_sum(sums, ctx)
    all_reduce_max(maxima, ctx)
    reduced = dict(zip(_STEP_SUM_KEYS, sums.tolist()))
    reduced_max = {name: value for name, value in zip(_MAX_FIELDS, maxima.tolist()) if value != -math.inf}
    return reduced, reduced_max




def peak_memory_bytes(device: str) -> tuple[int, str]:
    """Return the peak memory so far and how it was measured.

    On CUDA it is torch.cuda.max_memory_allocated, which counts tensors only
    and which the trainer resets per epoch. On the CPU it is the process's
    peak resident set size (ru_maxrss), which covers the whole process
    lifetime and cannot be reset.
    """
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device))), "cuda_max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(peak * scale), "ru_maxrss"

