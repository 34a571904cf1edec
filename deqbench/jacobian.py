"""Hutchinson estimate of the squared Frobenius norm of a fixed-point map's Jacobian.

Jacobian regularization (Bai, Koltun, Kolter, "Stabilizing Equilibrium Models
by Jacobian Regularization", ICML 2021) adds ||df/dz||_F^2 / D at the
equilibrium z* to the loss. For a Gaussian probe v ~ N(0, I),
E[||v^T J||^2] = ||J||_F^2, so the mean of ||v^T J||^2 over a few probes is an
unbiased estimate that needs one vector-Jacobian product per probe.
"""

from __future__ import annotations

import torch
from torch import Tensor


def hutchinson_frobenius(f_out: Tensor, z_star: Tensor, samples: int, create_graph: bool = True) -> Tensor:
    """Estimate ||df/dz||_F^2 / D per sample, with D the number of state values per sample.

    f_out is f(z_star) with its autograd graph; both have shape (B, ...) and
    sample b's output depends only on sample b's input. The graph of f_out is
    retained, so the implicit backward pass can reuse it. With create_graph
    the estimate is differentiable, so its gradient reaches the parameters
    of f. Returns a (B,) tensor.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples = {samples!r} is invalid; expected an integer >= 1 (the number of Gaussian probes)")
    if f_out.shape != z_star.shape:
        raise ValueError(
            f"f_out has shape {tuple(f_out.shape)} but z_star has shape {tuple(z_star.shape)}; "
            "pass f(z_star) and z_star itself"
        )
    if not z_star.requires_grad or f_out.grad_fn is None:
        raise ValueError(
            "f_out must be computed from z_star with autograd on; "
            "call z_star.requires_grad_() and evaluate f_out = f(z_star) outside torch.no_grad()"
        )

    # z_star: (B, ...) -> per-sample size D
    batch = z_star.shape[0]
    state_size = z_star[0].numel()

    total = z_star.new_zeros(batch)
    for _ in range(samples):
        probe = torch.randn_like(z_star)
        (vjp,) = torch.autograd.grad(f_out, z_star, probe, create_graph=create_graph, retain_graph=True)
        # (B, ...) -> (B, D) -> (B,)
        total = total + vjp.reshape(batch, -1).pow(2).sum(dim=1)

    return total / (samples * state_size)
