"""Broyden's method ("good" Broyden) for the root of g(z) = f(z) - z.

The inverse Jacobian of g is approximated as H = -I + sum_i u_i v_i^T,
starting at -I (the Jacobian of g is J - I, close to -I when f is a mild
contraction). Each step is the quasi-Newton step z <- z - H g(z) with step
size 1, so the first step is z1 = z0 + g(z0) = f(z0). After a step with
s = z_new - z and y = g(z_new) - g(z), the Sherman-Morrison form of the good
Broyden update gives

    H <- H + (s - H y) s^T H / (s^T H y),

stored as u = (s - H y) / (s^T H y) and v = H^T s. An update whose
denominator is zero up to rounding (|s^T H y| <= eps ||s|| ||H y||) or not
finite is skipped for that sample.

Limited memory: with ``memory`` = m the approximation restarts at -I when m
updates are stored, and the update of that step becomes the first one of the
new cycle. Every cycle is thus exact good Broyden, so the scheme stays valid
for any m >= 1, at the cost of the information of older cycles.
"""

from __future__ import annotations

import torch

from deqbench.solvers._common import SolveTracker, evaluate, masked_update, parse_options
from deqbench.solvers.base import FixedPointMap, SolverResult, check_solve_arguments, register_solver

Tensor = torch.Tensor


@register_solver("broyden")
def broyden(
    f: FixedPointMap,
    z0: Tensor,
    *,
    max_nfe: int,
    tol: float,
    stop_mode: str = "rel",
    **options: object,
) -> SolverResult:
    """Solve z = f(z) by good Broyden from z0 and return the best iterate.

    Options: ``memory`` (stored updates before a restart at -I, or None to
    keep every update, max_nfe - 1 at most) and the stop options ``stall_window``
    and ``divergence_factor`` of every solver. ``solver_state_bytes`` is the
    size of the two update buffers, (B, m, D) each. The solve runs without
    autograd.
    """
    check_solve_arguments(z0, max_nfe, tol, stop_mode)
    own, stop = parse_options("broyden", options, {"memory": None})
    memory = own["memory"]
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory < 1):
        raise ValueError(f"memory must be None (keep every update) or an integer >= 1; got {memory!r}")

    with torch.no_grad():
        # Flat state: z0 is (B, ...), the solver works on (B, D).
        shape = z0.shape
        z = z0.detach().reshape(shape[0], -1)  # (B, D)
        batch, dim = z.shape
        fz = evaluate(f, z, shape)  # (B, D)
        tracker = SolveTracker(z, max_nfe=max_nfe, tol=tol, stop_mode=stop_mode, stop=stop)
        tracker.observe(z, fz)
        g = fz - z  # (B, D)

        # Update buffers of H = -I + U^T V, each (B, m, D). A solve takes at most
        # max_nfe - 1 steps, so no more slots are ever needed.
        slots = max_nfe - 1 if memory is None else min(memory, max_nfe - 1)
        us = z.new_zeros(batch, slots, dim)
        vs = z.new_zeros(batch, slots, dim)
        used = 0

        while tracker.any_active():
            # Quasi-Newton step of size 1: z_new = z - H g.
            step = z - _apply(us[:, :used], vs[:, :used], g)  # (B, D)
            z_new = masked_update(tracker.active, step, z)
            fz_new = evaluate(f, z_new, shape)
            tracker.observe(z_new, fz_new)
            g_new = fz_new - z_new

            # Restart at -I when the buffer is full, then store this step's update
            # (after the last step too, which saves a device sync per step).
            if used == slots:
                used = 0
            u, v, valid = _update(us[:, :used], vs[:, :used], z_new - z, g_new - g)
            valid = valid & tracker.active
            us[:, used] = torch.where(valid.unsqueeze(1), u, torch.zeros_like(u))
            vs[:, used] = torch.where(valid.unsqueeze(1), v, torch.zeros_like(v))
            used += 1
            z, g = z_new, g_new

    state_bytes = us.numel() * us.element_size() + vs.numel() * vs.element_size()
    return tracker.result(shape, solver_state_bytes=state_bytes)


def _apply(us: Tensor, vs: Tensor, x: Tensor) -> Tensor:
    """Return H x = -x + sum_i u_i (v_i . x) for updates us, vs (B, n, D) and x (B, D)."""
    coeffs = torch.bmm(vs, x.unsqueeze(2))  # (B, n, 1)
    return -x + torch.bmm(us.transpose(1, 2), coeffs).squeeze(2)  # (B, D)


def _apply_transposed(us: Tensor, vs: Tensor, x: Tensor) -> Tensor:
    """Return H^T x = -x + sum_i v_i (u_i . x) for updates us, vs (B, n, D) and x (B, D)."""
    coeffs = torch.bmm(us, x.unsqueeze(2))  # (B, n, 1)
    return -x + torch.bmm(vs.transpose(1, 2), coeffs).squeeze(2)  # (B, D)


def _update(us: Tensor, vs: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return the good Broyden update (u, v), each (B, D), for step s and residual change y.

    ``valid`` (B,) is False where the denominator s^T H y is zero up to
    rounding or anything is not finite. The caller stores zeros there.
    """
    h_y = _apply(us, vs, y)  # (B, D)
    denom = (s * h_y).sum(dim=1)  # (B,)
    scale = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(h_y, dim=1)
    eps = torch.finfo(s.dtype).eps

    u = (s - h_y) / denom.unsqueeze(1)  # (B, D)
    v = _apply_transposed(us, vs, s)  # (B, D)
    valid = (denom.abs() > eps * scale) & torch.isfinite(u).all(dim=1) & torch.isfinite(v).all(dim=1)
    return u, v, valid
