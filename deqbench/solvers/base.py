"""The solver contract shared by every fixed-point solver, and the registry.

Every solver has the signature

    solve(f, z0, *, max_nfe, tol, stop_mode="rel", **options) -> SolverResult

where ``f`` maps a batched tensor to a tensor of the same shape and ``z0``
has shape (B, ...). Solvers work on the flattened view (B, D) and return the
best iterate in the shape of ``z0``. Statistics are per sample, so one
sample's convergence never depends on the rest of its batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]

STOP_MODES = ("abs", "rel")


class StopReason(str, enum.Enum):
    """Stop reason of one sample's solve; the string value goes into results files."""

    RUNNING = "running"  # only while a solve is in progress
    TOLERANCE = "tolerance"
    LIMIT = "limit"  # the function-evaluation budget ran out
    STALL = "stall"  # the residual stopped improving
    DIVERGENCE = "divergence"  # the residual grew far above its best value
    NON_FINITE = "non_finite"  # f returned NaN or Inf for this sample


@dataclass
class SolverStats:
    """Per-sample statistics of one solve; B is the batch size, T the trace length.

    nfe:          (B,) int64, function evaluations charged to the sample.
    abs_residual: (B,) lowest ||f(z) - z|| seen.
    rel_residual: (B,) lowest ||f(z) - z|| / (||f(z)|| + eps) seen.
    abs_trace:    (B, T) absolute residual after each evaluation, NaN-padded.
    rel_trace:    (B, T) relative residual after each evaluation, NaN-padded.
    converged:    (B,) bool, the stop test held for the best iterate.
    stop_reason:  one StopReason per sample.
    best_step:    (B,) int64, evaluation count at which the best iterate was seen
                  (0 means the starting point was never improved upon).
    solver_state_bytes: bytes of working memory the solver allocated beyond z
                  (Broyden's stored updates, Anderson's history).
    """

    nfe: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    converged: Tensor
    stop_reason: list[StopReason]
    best_step: Tensor
    solver_state_bytes: int = 0

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        """Reduce the per-sample tensors to plain numbers for logs and JSON."""
        reasons: dict[str, int] = {}
        for reason in self.stop_reason:
            reasons[reason.value] = reasons.get(reason.value, 0) + 1
        return {
            "nfe_mean": float(self.nfe.double().mean()),
            "nfe_max": int(self.nfe.max()),
            "abs_residual_max": float(self.abs_residual.max()),
            "rel_residual_mean": float(self.rel_residual.double().mean()),
            "rel_residual_max": float(self.rel_residual.max()),
            "converged_fraction": float(self.converged.double().mean()),
            "stop_reasons": reasons,
            "solver_state_bytes": int(self.solver_state_bytes),
        }


@dataclass
class SolverResult:
    """The best iterate, in the shape of z0, and its statistics."""

    z: Tensor
    stats: SolverStats


class Solver(Protocol):
    def __call__(
        self,
        f: FixedPointMap,
        z0: Tensor,
        *,
        max_nfe: int,
        tol: float,
        stop_mode: str = "rel",
        **options: object,
    ) -> SolverResult: ...


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Register a solver under ``name``; a second solver with the same name is an error."""

    def decorate(solver: Solver) -> Solver:
        if name in SOLVERS:
            raise ValueError(f"solver name {name!r} is already registered")
        SOLVERS[name] = solver
        return solver

    return decorate


def get_solver(name: str) -> Solver:
    """Look up a solver by name; an unknown name lists the registered ones."""
    if name not in SOLVERS:
        known = ", ".join(sorted(SOLVERS))
        raise ValueError(f"unknown solver {name!r}; choose one of: {known}")
    return SOLVERS[name]


def check_solve_arguments(z0: Tensor, max_nfe: int, tol: float, stop_mode: str) -> None:
    """Reject arguments that no solver can use, naming the value and the fix."""
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must be batched with shape (B, ...), B >= 1; got shape {tuple(z0.shape)}")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1:
        raise ValueError(f"max_nfe must be a positive integer; got {max_nfe!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and tol == tol and tol != float("inf")):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}; got {stop_mode!r}")
