"""The implicit layer: a forward fixed-point solve and one of three backward passes.

The map f is a closure f(z) that captures the input x and the parameters,
for example ``lambda z: cell(z, x)``. Backward modes:

- ift: the forward solve runs without a graph. f is called once more with
  gradients on at the detached equilibrium z*, and an autograd Function on
  that output replaces the incoming gradient g by the solution u of
  u = J^T u + g (J = df/dz at z*), found by the backward SolveSpec's solver
  through vector-Jacobian products. Autograd then carries u through the one
  tracked f call to the parameters and x.
- unrolled: ``steps`` iterations z <- f(z) from z0, all tracked, so memory
  grows with the number of steps.
- phantom: the forward solve runs without a graph, then ``steps`` tracked
  damped steps z <- (1 - d) z + d f(z) start from the detached z*. One step
  with d = 1 is the Jacobian-free gradient.

Under ift and phantom the gradient with respect to z0 is zero, because z* is
detached from the solve that started at z0 (the implicit function theorem
makes z* independent of z0). Only unrolled backpropagates into z0.

Nothing is registered on the module or on f, so one layer can be called any
number of times in one graph.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from deqbench.scenarios import SolveConfig
from deqbench.solvers import STOP_MODES, SolverResult, SolverStats, StopReason, get_solver
from deqbench.solvers._common import residuals

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

BACKWARD_MODES = ("ift", "unrolled", "phantom")

# IFT backward solves in this process that missed their tolerance. Only the
# 1st, 2nd, 4th, 8th, ... miss is logged, so that a training run whose
# backward solves keep missing does not log once per step.
_backward_misses = 0


@dataclass(frozen=True)
class SolveSpec:
    """One fixed-point solve: solver name, budget, stop test and solver-specific options."""

    solver: str = "broyden"
    max_nfe: int = 30  # function evaluations
    tol: float = 1e-3  # on the residual selected by stop_mode
    stop_mode: str = "rel"  # "rel" is ||f(z)-z|| / (||f(z)|| + 1e-12), "abs" is ||f(z)-z||
    options: Mapping[str, Any] = field(default_factory=dict)  # damping, window, memory, ridge, ...

    def __post_init__(self) -> None:
        get_solver(self.solver)  # raises ValueError listing the registered solvers
        if isinstance(self.max_nfe, bool) or not isinstance(self.max_nfe, int) or self.max_nfe < 1:
            raise ValueError(f"max_nfe must be an integer >= 1 (function evaluations); got {self.max_nfe!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 < self.tol < math.inf:
            raise ValueError(f"tol must be a positive finite number; got {self.tol!r}")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}; got {self.stop_mode!r}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping of solver option names to values; got {self.options!r}")
        # A private copy, so that later changes to the caller's dict do not leak in.
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def from_config(cls, cfg: SolveConfig, **options: Any) -> "SolveSpec":
        """Build a SolveSpec from a scenario's SolveConfig plus solver-specific options."""
        return cls(solver=cfg.solver, max_nfe=cfg.max_nfe, tol=cfg.tol, stop_mode=cfg.stop_mode, options=options)

    def run(self, f: Callable[[Tensor], Tensor], z0: Tensor) -> SolverResult:
        """Solve z = f(z) from z0 with this spec and return the SolverResult."""
        solver = get_solver(self.solver)
        return solver(f, z0, max_nfe=self.max_nfe, tol=self.tol, stop_mode=self.stop_mode, **self.options)


@dataclass(frozen=True)
class BackwardSpec:
    """The backward pass: its mode and the settings that mode reads."""

    mode: str = "ift"  # "ift" | "unrolled" | "phantom"
    solve: SolveSpec = SolveSpec()  # ift: the adjoint fixed-point solve u = J^T u + g
    steps: int = 1  # tracked iterations (unrolled) or tracked damped steps (phantom)
    damping: float = 1.0  # phantom step size d in (0, 1]

    def __post_init__(self) -> None:
        if self.mode not in BACKWARD_MODES:
            raise ValueError(f"backward mode must be one of {BACKWARD_MODES}; got {self.mode!r}")
        if not isinstance(self.solve, SolveSpec):
            raise ValueError(f"solve must be a SolveSpec; got {type(self.solve).__name__}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        damping_ok = isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool)
        if not damping_ok or not 0 < self.damping <= 1:
            raise ValueError(f"damping must be a number in (0, 1]; got {self.damping!r}")


@dataclass
class BackwardRecord:
    """Statistics of the backward solve of one implicit call, filled in when backward runs.

    ``stats`` stays None until backward runs, and always under unrolled and
    phantom, which solve nothing in backward.
    """

    stats: SolverStats | None = None


@dataclass
class ImplicitOutput:
    """The equilibrium with its graph, and what the solves reported."""

    # Shape of z0, with the graph of the chosen backward mode. Under ift it is a view
    # of f_out, so an in-place change raises RuntimeError (clone it first).
    z: Tensor
    forward_stats: SolverStats
    backward: BackwardRecord
    z_star: Tensor | None  # ift and phantom: detached equilibrium, a leaf that requires grad when grad is on
    f_out: Tensor | None  # f(z_star) with graph: the value of z (ift) or the first tracked step (phantom)


def implicit_solve(
    f: Callable[[Tensor], Tensor], z0: Tensor, forward: SolveSpec, backward: BackwardSpec
) -> ImplicitOutput:
    """Find the fixed point z = f(z) from z0 and attach the backward pass that ``backward`` selects.

    Graphs are built only when autograd is enabled, so under torch.no_grad()
    every mode returns plain values. The gradient with respect to z0 is zero
    under ift and phantom, where z0 gets no gradient at all (see the module
    docstring).
    """
    if backward.mode == "unrolled":
        return _unrolled(f, z0, forward, backward.steps)

    # Forward solve without a graph. z* becomes a fresh leaf.
    with torch.no_grad():
        result = forward.run(f, z0.detach())
    z_star = result.z.detach().requires_grad_(torch.is_grad_enabled())
    record = BackwardRecord()

    if backward.mode == "ift":
        # The one tracked f call. The Function swaps the incoming gradient for u.
        f_out = f(z_star)
        z = f_out
        if f_out.requires_grad:
            z = _ImplicitGradient.apply(f_out, z_star, backward.solve, record)
        return ImplicitOutput(z=z, forward_stats=result.stats, backward=record, z_star=z_star, f_out=f_out)

    # Phantom gradient: tracked damped steps from the detached z*.
    z, f_out = z_star, None
    for index in range(backward.steps):
        fz = f(z)
        if index == 0:
            f_out = fz
        if backward.damping == 1:
            z = fz
        else:
            z = z + backward.damping * (fz - z)
    return ImplicitOutput(z=z, forward_stats=result.stats, backward=record, z_star=z_star, f_out=f_out)


class _ImplicitGradient(torch.autograd.Function):
    """Pass f(z*) through in forward, and replace the gradient g by u with u = J^T u + g in backward."""

    @staticmethod
    def forward(ctx: Any, f_out: Tensor, z_star: Tensor, spec: SolveSpec, record: BackwardRecord) -> Tensor:
        ctx.save_for_backward(f_out, z_star)
        ctx.spec = spec
        ctx.record = record
        return f_out.view_as(f_out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        f_out, z_star = ctx.saved_tensors

        # The adjoint map u -> J^T u + g, one vector-Jacobian product per call.
        def adjoint_map(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(f_out, z_star, u, retain_graph=True, allow_unused=True)
            return grad if vjp is None else vjp + grad

        # Start at g, the Jacobian-free gradient, so that a solve that never
        # improves on its start still returns a usable direction.
        result = ctx.spec.run(adjoint_map, grad)
        ctx.record.stats = result.stats
        _warn_if_unconverged(result.stats, ctx.spec)
        return result.z, None, None, None


def _warn_if_unconverged(stats: SolverStats, spec: SolveSpec) -> None:
    """Count an adjoint solve that missed its tolerance on any sample, and log a warning at powers of two."""
    global _backward_misses
    missed = int((~stats.converged).sum())
    if missed == 0:
        return
    _backward_misses += 1
    if _backward_misses & (_backward_misses - 1):
        return  # not a power of two: counted, not logged

    residual = stats.rel_residual if spec.stop_mode == "rel" else stats.abs_residual
    reasons = sorted({reason.value for reason, ok in zip(stats.stop_reason, stats.converged.tolist()) if not ok})
    logger.warning(
        "IFT backward solve (%s) missed tol %g on %d of %d samples: max %s residual %.3g after at most %d "
        "evaluations (stop reasons: %s), so the gradient is approximate. Raise the backward max_nfe or tol. "
        "This is miss %d in this process. Later misses are logged only when their count is a power of two.",
        spec.solver,
        spec.tol,
        missed,
        len(stats.stop_reason),
        spec.stop_mode,
        float(residual.max()),
        int(stats.nfe.max()),
        ", ".join(reasons),
        _backward_misses,
    )


def _unrolled(f: Callable[[Tensor], Tensor], z0: Tensor, spec: SolveSpec, steps: int) -> ImplicitOutput:
    """Run ``steps`` tracked iterations z <- f(z) from z0 and describe them as solver statistics."""
    z = z0
    abs_trace, rel_trace = [], []
    for _ in range(steps):
        fz = f(z)
        abs_res, rel_res = residuals(z.detach().reshape(z.shape[0], -1), fz.detach().reshape(z.shape[0], -1))
        abs_trace.append(abs_res)
        rel_trace.append(rel_res)
        z = fz
    stats = _trace_stats(torch.stack(abs_trace, dim=1), torch.stack(rel_trace, dim=1), spec)
    return ImplicitOutput(z=z, forward_stats=stats, backward=BackwardRecord(), z_star=None, f_out=None)


def _trace_stats(abs_trace: Tensor, rel_trace: Tensor, spec: SolveSpec) -> SolverStats:
    """Build SolverStats from (B, steps) residual traces of unrolled iterates z_0 .. z_{steps-1}.

    Residuals, best_step and converged follow the solver contract (lowest
    residual seen). The stop reason is non_finite if any residual was not
    finite, tolerance if the last iterate met ``tol``, and limit otherwise,
    because unrolling never stops early.
    """
    batch, steps = abs_trace.shape
    trace = rel_trace if spec.stop_mode == "rel" else abs_trace

    # Lowest finite residual and where it was seen, per sample.
    finite = torch.isfinite(trace)
    masked = torch.where(finite, trace, torch.full_like(trace, math.inf))
    best, best_step = masked.min(dim=1)
    index = best_step.unsqueeze(1)

    # Stop reason per sample.
    last_met_tol = (trace[:, -1] <= spec.tol).tolist()
    all_finite = finite.all(dim=1).tolist()
    reasons = []
    for sample_finite, sample_met_tol in zip(all_finite, last_met_tol):
        if not sample_finite:
            reasons.append(StopReason.NON_FINITE)
        elif sample_met_tol:
            reasons.append(StopReason.TOLERANCE)
        else:
            reasons.append(StopReason.LIMIT)
    return SolverStats(
        nfe=torch.full((batch,), steps, dtype=torch.int64, device=trace.device),
        abs_residual=abs_trace.gather(1, index).squeeze(1),
        rel_residual=rel_trace.gather(1, index).squeeze(1),
        abs_trace=abs_trace,
        rel_trace=rel_trace,
        converged=best <= spec.tol,
        stop_reason=reasons,
        best_step=best_step,
        solver_state_bytes=0,
    )


class ImplicitLayer(nn.Module):
    """An implicit layer with fixed forward and backward specs; forward(f, z0) -> ImplicitOutput."""

    def __init__(self, forward: SolveSpec | None = None, backward: BackwardSpec | None = None) -> None:
        super().__init__()
        self.forward_spec = SolveSpec() if forward is None else forward
        self.backward_spec = BackwardSpec() if backward is None else backward

    def forward(self, f: Callable[[Tensor], Tensor], z0: Tensor) -> ImplicitOutput:
        """Solve z = f(z) from z0 as implicit_solve does."""
        return implicit_solve(f, z0, self.forward_spec, self.backward_spec)

    def extra_repr(self) -> str:
        fwd, bwd = self.forward_spec, self.backward_spec
        return (
            f"forward={fwd.solver}(max_nfe={fwd.max_nfe}, tol={fwd.tol}, {fwd.stop_mode}), "
            f"backward={bwd.mode}(solver={bwd.solve.solver}, steps={bwd.steps}, damping={bwd.damping})"
        )
