"""Reference gradients: dense implicit solve, scipy finite differences, unrolled autograd, IFT."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.differentiate
import torch

from deqbench.implicit import BackwardSpec, ImplicitOutput, SolveSpec, implicit_solve
from suites.gradcheck.problems import Problem, jacobian_at

Tensor = torch.Tensor

# scipy.differentiate.derivative settings: central differences of order 4,
# starting at FD_INITIAL_STEP and halving the step each iteration. The first
# step keeps every perturbed map contracting on the problems here.
FD_INITIAL_STEP = 1e-2
FD_ORDER = 4
FD_MAXITER = 8


def rel_error(value: Tensor, reference: Tensor) -> float:
    """Return ||value - reference|| / ||reference|| (2-norm over all entries)."""
    scale = float(torch.linalg.vector_norm(reference))
    diff = float(torch.linalg.vector_norm(value.to(reference.dtype) - reference))
    return diff / scale if scale > 0 else diff


def max_rel_error(values: dict[str, Tensor], references: dict[str, Tensor]) -> float:
    """Return the largest rel_error over the tensors named in ``references``."""
    return max(rel_error(values[name], ref) for name, ref in references.items())


def ift_gradients(
    problem: Problem,
    solver: str,
    backward_solver: str,
    *,
    tol: float = 1e-12,
    max_nfe: int = 4000,
    dtype: torch.dtype = torch.float64,
    options: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], ImplicitOutput]:
    """Return dL/dparams through implicit_solve with IFT backward, and its output."""
    params = {name: value.detach().to(dtype).requires_grad_() for name, value in problem.params.items()}
    forward = SolveSpec(solver, max_nfe=max_nfe, tol=tol, options=dict(options or {}))
    backward = BackwardSpec("ift", SolveSpec(backward_solver, max_nfe=max_nfe, tol=tol))
    out = implicit_solve(problem.f(params), problem.z0.to(dtype), forward, backward)
    grads = torch.autograd.grad(problem.loss(out.z), list(params.values()))
    return dict(zip(params, grads)), out


def dense_gradients(problem: Problem) -> dict[str, Tensor]:
    """Return dL/dparams from a dense implicit solve: (I - J)^T u = dL/dz* with J built by autograd."""
    # Equilibrium and per-sample Jacobians (B, D, D).
    z = problem.solve_reference()
    jac = jacobian_at(problem, z)

    # Adjoint u per sample from the dense linear system.
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    g = problem.loss_grad(z).unsqueeze(2)  # (B, D, 1)
    u = torch.linalg.solve((eye - jac).transpose(1, 2), g).squeeze(2)  # (B, D)

    # dL/dparams = u^T df/dparams at z*.
    params = problem.detached_params()
    leaves = {name: value.requires_grad_() for name, value in params.items()}
    f_out = problem.cell(z.detach(), leaves)
    grads = torch.autograd.grad(f_out, list(leaves.values()), u)
    return dict(zip(leaves, grads))


def unrolled_gradients(problem: Problem, depth: int) -> dict[str, Tensor]:
    """Return dL/dparams by backpropagating through ``depth`` iterations z <- f(z) from z0."""
    params = {name: value.detach().requires_grad_() for name, value in problem.params.items()}
    z = problem.z0
    for _ in range(depth):
        z = problem.cell(z, params)
    grads = torch.autograd.grad(problem.loss(z), list(params.values()))
    return dict(zip(params, grads))


def _loss_at(problem: Problem, params: dict[str, Tensor], start: Tensor) -> float:
    """Return L(z*(params)) as a float, with z* from the reference solve started at ``start``."""
    with torch.no_grad():
        return float(problem.loss(problem.solve_reference(params, start)))


def _derivative(function, count: int, args: tuple = ()) -> np.ndarray:
    """Run scipy.differentiate.derivative at t = 0 for ``count`` elementwise functions."""
    result = scipy.differentiate.derivative(
        function,
        np.zeros(count),
        args=args,
        order=FD_ORDER,
        initial_step=FD_INITIAL_STEP,
        maxiter=FD_MAXITER,
    )
    return np.asarray(result.df)


def fd_coordinates(problem: Problem, name: str, indices: np.ndarray) -> np.ndarray:
    """Return central finite-difference partials dL/dparams[name].flat[i] for i in ``indices``."""
    base = problem.detached_params()
    start = problem.solve_reference()

    def losses(t: np.ndarray, index: np.ndarray) -> np.ndarray:
        # Elementwise: entry j perturbs coordinate index[j] by t[j].
        out = np.empty(t.shape)
        index = np.broadcast_to(index, t.shape)
        for j in np.ndindex(t.shape):
            params = dict(base)
            flat = base[name].flatten().clone()
            flat[int(index[j])] += float(t[j])
            params[name] = flat.view_as(base[name])
            out[j] = _loss_at(problem, params, start)
        return out

    return _derivative(losses, len(indices), args=(np.asarray(indices, dtype=float),))


def fd_direction(problem: Problem, direction: dict[str, Tensor]) -> float:
    """Return the central finite-difference derivative of L along ``direction`` (a dict of tensors)."""
    base = problem.detached_params()
    start = problem.solve_reference()

    def losses(t: np.ndarray) -> np.ndarray:
        out = np.empty(t.shape)
        for j in np.ndindex(t.shape):
            params = {name: value + float(t[j]) * direction[name] if name in direction else value
                      for name, value in base.items()}
            out[j] = _loss_at(problem, params, start)
        return out

    return float(_derivative(losses, 1)[0])


def random_direction(problem: Problem, names: list[str], seed: int) -> dict[str, Tensor]:
    """Return a random unit direction over the named parameters."""
    gen = torch.Generator().manual_seed(seed)
    direction = {
        name: torch.randn(problem.params[name].shape, generator=gen, dtype=problem.params[name].dtype)
        for name in names
    }
    norm = torch.sqrt(sum((d * d).sum() for d in direction.values()))
    return {name: d / norm for name, d in direction.items()}


def directional(gradients: dict[str, Tensor], direction: dict[str, Tensor]) -> float:
    """Return the directional derivative sum over names of <gradient, direction>."""
    return float(sum((gradients[name].double() * d).sum() for name, d in direction.items()))
