"""Anderson acceleration (type II, depth m) for fixed points z = f(z).

With residuals g_k = f(z_k) - z_k and the last n = min(k, m) differences
dZ_i = z_i - z_{i-1}, dG_i = g_i - g_{i-1} as rows of (n, D) matrices, each
step solves the regularized least-squares problem

    gamma = argmin ||g_k - dG^T gamma||^2 + lam ||gamma||^2,
    lam = ridge * mean(diag(dG dG^T)),

and moves to z_{k+1} = z_k + beta g_k - (dZ + beta dG)^T gamma. This is
Walker and Ni's difference form (SIAM J. Numer. Anal. 49(4), 2011) of the
constrained mixing problem. The ridge is relative: it scales with the squared
residual differences, so it keeps its effect as the residuals shrink instead
of dominating the mixing weights near convergence as an absolute constant
would.
"""

from __future__ import annotations

import torch

from deqbench.solvers._common import SolveTracker, check_damping, evaluate, masked_update, parse_options
from deqbench.solvers.base import FixedPointMap, SolverResult, check_solve_arguments, register_solver

Tensor = torch.Tensor

DEFAULT_WINDOW = 5
DEFAULT_RIDGE = 1e-8


@register_solver("anderson")
def anderson(
    f: FixedPointMap,
    z0: Tensor,
    *,
    max_nfe: int,
    tol: float,
    stop_mode: str = "rel",
    **options: object,
) -> SolverResult:
    """Solve z = f(z) by Anderson acceleration from z0 and return the best iterate.

    Options: ``window`` (depth m, the number of past differences mixed,
    default 5), ``damping`` (beta in (0, 1], default 1), ``ridge`` (relative
    regularization of the Gram matrix, default 1e-8), and the stop options
    ``stall_window`` and ``divergence_factor`` of every solver. A sample whose
    mixing system is singular or gives non-finite weights takes a plain
    damped step instead. The solve runs without autograd.
    """
    check_solve_arguments(z0, max_nfe, tol, stop_mode)
    defaults = {"window": DEFAULT_WINDOW, "damping": 1.0, "ridge": DEFAULT_RIDGE}
    own, stop = parse_options("anderson", options, defaults)
    window, beta, ridge = _check_options(own)

    with torch.no_grad():
        # Flat state: z0 is (B, ...), the solver works on (B, D).
        shape = z0.shape
        z = z0.detach().reshape(shape[0], -1)  # (B, D)
        batch, dim = z.shape
        fz = evaluate(f, z, shape)  # (B, D)
        tracker = SolveTracker(z, max_nfe=max_nfe, tol=tol, stop_mode=stop_mode, stop=stop)
        tracker.observe(z, fz)

        # Ring buffers of the last `window` differences, (B, m, D). A solve takes
        # at most max_nfe - 1 steps, so no more slots are allocated.
        slots = min(window, max_nfe - 1)
        d_z = z.new_zeros(batch, slots, dim)
        d_g = z.new_zeros(batch, slots, dim)
        g = fz - z  # (B, D)
        iteration = 0

        while tracker.any_active():
            # Record the newest differences (not before the first step).
            if iteration > 0:
                slot = (iteration - 1) % slots
                d_z[:, slot] = masked_update(tracker.active, z - z_prev, d_z[:, slot])
                d_g[:, slot] = masked_update(tracker.active, g - g_prev, d_g[:, slot])
            used = min(iteration, slots)

            # Mixed step, which is the damped fixed-point step while there is no history.
            step = z + beta * g  # (B, D)
            if used > 0:
                gamma = _mixing_weights(d_g[:, :used], g, ridge)  # (B, n)
                correction = d_z[:, :used] + beta * d_g[:, :used]  # (B, n, D)
                step = step - torch.bmm(gamma.unsqueeze(1), correction).squeeze(1)  # (B, D)

            # Advance the running samples and evaluate.
            z_prev, g_prev = z, g
            z = masked_update(tracker.active, step, z)
            fz = evaluate(f, z, shape)
            tracker.observe(z, fz)
            g = fz - z
            iteration += 1

    state_bytes = d_z.numel() * d_z.element_size() + d_g.numel() * d_g.element_size()
    return tracker.result(shape, solver_state_bytes=state_bytes)


def _check_options(own: dict[str, object]) -> tuple[int, float, float]:
    """Validate window, damping and ridge, naming the value and the allowed range."""
    window, ridge = own["window"], own["ridge"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (past differences mixed); got {window!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
        raise ValueError(f"ridge must be a finite number >= 0 (relative to the Gram diagonal); got {ridge!r}")
    return window, check_damping(own["damping"]), float(ridge)


def _mixing_weights(d_g: Tensor, g: Tensor, ridge: float) -> Tensor:
    """Solve (dG dG^T + lam I) gamma = dG g per sample; d_g is (B, n, D), g (B, D), gamma (B, n).

    The n x n system is solved in float64 whatever the state's dtype. Samples
    whose system is singular or whose weights are not finite get gamma = 0.
    """
    # Gram matrix and right-hand side, (B, n, n) and (B, n, 1).
    gram = torch.bmm(d_g, d_g.transpose(1, 2)).double()
    rhs = torch.bmm(d_g, g.unsqueeze(2)).double()

    # Relative ridge: lam = ridge * mean of the diagonal, per sample, (B, 1, 1).
    n = gram.shape[-1]
    lam = ridge * torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1).view(-1, 1, 1)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    gram = gram + lam * eye

    # Batched solve that reports singular systems instead of raising.
    gamma, info = torch.linalg.solve_ex(gram, rhs)
    gamma = gamma.squeeze(2)  # (B, n)
    usable = (info == 0) & torch.isfinite(gamma).all(dim=1)
    gamma = torch.where(usable.unsqueeze(1), gamma, torch.zeros_like(gamma))
    return gamma.to(g.dtype)
