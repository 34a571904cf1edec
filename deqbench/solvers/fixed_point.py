"""Damped fixed-point (Picard) iteration: z <- (1 - d) z + d f(z)."""

from __future__ import annotations

import torch

from deqbench.solvers._common import SolveTracker, check_damping, evaluate, masked_update, parse_options
from deqbench.solvers.base import FixedPointMap, SolverResult, check_solve_arguments, register_solver

Tensor = torch.Tensor


@register_solver("fixed_point")
def fixed_point(
    f: FixedPointMap,
    z0: Tensor,
    *,
    max_nfe: int,
    tol: float,
    stop_mode: str = "rel",
    **options: object,
) -> SolverResult:
    """Iterate z <- (1 - damping) z + damping f(z) from z0 and return the best iterate.

    Options: ``damping`` in (0, 1], default 1 (plain iteration), and the stop
    options ``stall_window`` and ``divergence_factor`` of every solver. The
    solve runs without autograd, so the returned iterate has no graph.
    """
    check_solve_arguments(z0, max_nfe, tol, stop_mode)
    own, stop = parse_options("fixed_point", options, {"damping": 1.0})
    damping = check_damping(own["damping"])

    with torch.no_grad():
        # Flat state: z0 is (B, ...), the solver works on (B, D).
        shape = z0.shape
        z = z0.detach().reshape(shape[0], -1)  # (B, D)
        fz = evaluate(f, z, shape)  # (B, D)
        tracker = SolveTracker(z, max_nfe=max_nfe, tol=tol, stop_mode=stop_mode, stop=stop)
        tracker.observe(z, fz)

        while tracker.any_active():
            # Damped step for the samples still running, while stopped ones stay frozen.
            step = z + damping * (fz - z)  # (B, D)
            z = masked_update(tracker.active, step, z)

            fz = evaluate(f, z, shape)
            tracker.observe(z, fz)

    return tracker.result(shape, solver_state_bytes=0)
