"""Bookkeeping shared by the fixed-point solvers: options, residuals and per-sample stop tests.

Every solver evaluates f on the whole batch at once, so a sample that has
stopped is still passed through f. The tracker freezes such a sample: its
iterate, its statistics and its NFE no longer change, so its result is the
same as when it is solved alone.

Stop tests, checked in this order after each evaluation of an active sample:

- non_finite: f(z) or z contains NaN or Inf, or ||f(z) - z|| overflows. The
  sample stops at once and keeps its best finite iterate.
- tolerance: the residual in the chosen stop mode is at or below ``tol``.
- divergence: the absolute residual ||f(z) - z|| exceeds ``divergence_factor``
  (default 1e4) times the lowest absolute residual seen so far. The test
  uses the absolute residual in both stop modes, because the relative one
  stays bounded (near 1) while the iterates run off to infinity.
- stall: over the last ``stall_window`` evaluations (default 30) the best
  residual in the stop mode fell by less than 1%, that is
  best_now > 0.99 * best_then. A map without a fixed point, such as
  z -> z + 1, stalls in "abs" mode; in "rel" mode its relative residual keeps
  shrinking as ||z|| grows, so it runs to the limit.
- limit: the sample has used ``max_nfe`` evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from deqbench.solvers.base import FixedPointMap, SolverResult, SolverStats, StopReason

Tensor = torch.Tensor

# Added to ||f(z)|| in the relative residual ||f(z) - z|| / (||f(z)|| + eps), so
# that f(z) = 0 gives a finite value. At 1e-12 it changes no residual of a
# state whose norm is above about 1e-6.
RESIDUAL_EPS = 1e-12

DEFAULT_STALL_WINDOW = 30  # evaluations
DEFAULT_DIVERGENCE_FACTOR = 1e4
# A stall is progress below 1% over the window: best_now > STALL_RATIO * best_then.
STALL_RATIO = 0.99

# Stop reasons are kept as small integer codes on the device during a solve,
# so that no per-sample Python list is touched inside the loop.
_CODES = (
    StopReason.RUNNING,
    StopReason.TOLERANCE,
    StopReason.LIMIT,
    StopReason.STALL,
    StopReason.DIVERGENCE,
    StopReason.NON_FINITE,
)
_CODE = {reason: code for code, reason in enumerate(_CODES)}


@dataclass(frozen=True)
class StopOptions:
    """Options of the stop tests that every solver accepts."""

    stall_window: int = DEFAULT_STALL_WINDOW  # evaluations without 1% progress before a stall
    divergence_factor: float = DEFAULT_DIVERGENCE_FACTOR  # ||f(z)-z|| / lowest ||f(z)-z|| that counts as divergence


def parse_options(
    solver: str, options: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], StopOptions]:
    """Split ``options`` into the solver's own options and the common stop options.

    Unknown names raise TypeError, as an unknown keyword argument would. The
    stop options are validated here, and the solver validates its own.
    """
    common = {"stall_window": DEFAULT_STALL_WINDOW, "divergence_factor": DEFAULT_DIVERGENCE_FACTOR}
    accepted = sorted({*defaults, *common})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"{solver} got unknown option(s) {', '.join(map(repr, unknown))}; it accepts: {', '.join(accepted)}"
        )

    own = {name: options.get(name, default) for name, default in defaults.items()}
    window = options.get("stall_window", DEFAULT_STALL_WINDOW)
    factor = options.get("divergence_factor", DEFAULT_DIVERGENCE_FACTOR)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"stall_window must be an integer >= 1 (evaluations); got {window!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"divergence_factor must be a number > 1; got {factor!r}")
    return own, StopOptions(stall_window=window, divergence_factor=float(factor))


def check_damping(value: Any, name: str = "damping") -> float:
    """Return ``value`` as a float in (0, 1], or raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    return float(value)


def evaluate(f: FixedPointMap, z: Tensor, shape: torch.Size) -> Tensor:
    """Call f on the flat batch z (B, D) in the caller's shape and return f(z) flattened to (B, D)."""
    out = f(z.view(shape))
    if out.shape != shape:
        raise ValueError(
            f"f must return a tensor of the input's shape {tuple(shape)}; got {tuple(out.shape)}. "
            "Return the new state in the layout of z."
        )
    return out.reshape(z.shape)


def residuals(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """Return the absolute and relative residual per sample, each (B,), of z and f(z), each (B, D)."""
    abs_res = torch.linalg.vector_norm(fz - z, dim=1)
    rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1) + RESIDUAL_EPS)
    return abs_res, rel_res


class SolveTracker:
    """Per-sample residuals, best iterate, NFE and stop state of one batched solve.

    A solver calls ``observe`` after every evaluation of f and only moves the
    samples in ``active``. ``result`` builds the SolverResult.
    """

    def __init__(self, z: Tensor, *, max_nfe: int, tol: float, stop_mode: str, stop: StopOptions) -> None:
        batch = z.shape[0]
        device, dtype = z.device, z.dtype
        self.max_nfe = max_nfe
        self.tol = tol
        self.stop_mode = stop_mode
        self.stop = stop
        self.evaluations = 0  # calls of f so far, each charged to every sample active at the time

        # Per-sample state, (B,) unless noted.
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.nfe = torch.zeros(batch, dtype=torch.int64, device=device)
        self.code = torch.zeros(batch, dtype=torch.int8, device=device)
        self.best_z = z.clone()  # (B, D)
        self.best_abs = torch.full((batch,), math.inf, dtype=dtype, device=device)
        self.best_rel = torch.full((batch,), math.inf, dtype=dtype, device=device)
        self.best_step = torch.zeros(batch, dtype=torch.int64, device=device)
        self.lowest_abs = torch.full((batch,), math.inf, dtype=dtype, device=device)  # for the divergence test

        # (B, T) traces with T = max_nfe, NaN after a sample stops.
        self.abs_trace = torch.full((batch, max_nfe), math.nan, dtype=dtype, device=device)
        self.rel_trace = torch.full((batch, max_nfe), math.nan, dtype=dtype, device=device)
        # (B, T) best residual in the stop mode after each evaluation, for the stall test.
        self.best_history = torch.full((batch, max_nfe), math.inf, dtype=dtype, device=device)

    def any_active(self) -> bool:
        """Return whether any sample still needs evaluations (one device sync)."""
        return bool(self.active.any())

    def observe(self, z: Tensor, fz: Tensor) -> None:
        """Charge one evaluation to the active samples and apply the stop tests to z (B, D) and f(z) (B, D)."""
        step = self.evaluations  # index of this evaluation, 0 for f(z0)
        charged = self.active
        self.evaluations += 1

        # Residuals. A NaN or Inf in z or f(z) makes ||f(z) - z|| NaN or Inf,
        # so one test on the norm finds it (a norm that overflows counts too).
        abs_res, rel_res = residuals(z, fz)
        finite = torch.isfinite(abs_res)
        res = rel_res if self.stop_mode == "rel" else abs_res
        self.nfe += charged.long()
        self.abs_trace[:, step] = torch.where(charged, abs_res, self.abs_trace[:, step])
        self.rel_trace[:, step] = torch.where(charged, rel_res, self.rel_trace[:, step])

        # Best iterate: replaced only by a finite, strictly better one.
        best = self.best_rel if self.stop_mode == "rel" else self.best_abs
        improved = charged & finite & (res < best)
        self.best_z = torch.where(improved[:, None], z, self.best_z)
        self.best_abs = torch.where(improved, abs_res, self.best_abs)
        self.best_rel = torch.where(improved, rel_res, self.best_rel)
        self.best_step = torch.where(improved, torch.full_like(self.best_step, step), self.best_step)
        best = self.best_rel if self.stop_mode == "rel" else self.best_abs
        self.best_history[:, step] = best
        lower = charged & finite & (abs_res < self.lowest_abs)
        self.lowest_abs = torch.where(lower, abs_res, self.lowest_abs)

        # Stop tests in order of precedence: the first test that is true sets the reason.
        window = self.stop.stall_window
        stalled = torch.zeros_like(charged)
        if step >= window:
            stalled = best > STALL_RATIO * self.best_history[:, step - window]
        tests = (
            (StopReason.NON_FINITE, ~finite),
            (StopReason.TOLERANCE, res <= self.tol),
            (StopReason.DIVERGENCE, abs_res > self.stop.divergence_factor * self.lowest_abs),
            (StopReason.STALL, stalled),
            (StopReason.LIMIT, torch.full_like(charged, self.evaluations >= self.max_nfe)),
        )
        for reason, condition in tests:
            stops = self.active & condition
            self.code = torch.where(stops, torch.full_like(self.code, _CODE[reason]), self.code)
            self.active = self.active & ~stops

    def result(self, shape: torch.Size, solver_state_bytes: int = 0) -> SolverResult:
        """Return the best iterates in ``shape`` and the per-sample statistics."""
        best = self.best_rel if self.stop_mode == "rel" else self.best_abs
        reasons = [_CODES[int(code)] for code in self.code.tolist()]
        stats = SolverStats(
            nfe=self.nfe,
            abs_residual=self.best_abs,
            rel_residual=self.best_rel,
            abs_trace=self.abs_trace,
            rel_trace=self.rel_trace,
            converged=best <= self.tol,
            stop_reason=reasons,
            best_step=self.best_step,
            solver_state_bytes=int(solver_state_bytes),
        )
        return SolverResult(z=self.best_z.view(shape), stats=stats)


def masked_update(active: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Return ``new`` for active samples and ``old`` for the others; active is (B,), new/old (B, ...)."""
    mask = active.view(-1, *([1] * (new.dim() - 1)))  # (B, 1, ...)
    return torch.where(mask, new, old)
