"""The gradient-check problems by name, with their references computed once per session."""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from deqbench.solvers import SolverStats
from suites.gradcheck import problems
from suites.gradcheck.problems import Problem
from suites.gradcheck.references import (
    dense_gradients,
    fd_coordinates,
    fd_direction,
    ift_gradients,
    random_direction,
)
from suites.gradcheck.tolerances import TOLERANCES

Tensor = torch.Tensor
SOLVERS = ("fixed_point", "anderson", "broyden")

BUILDERS: dict[str, Callable[[], Problem]] = {
    "affine_rho0.9": lambda: problems.affine(rho=0.9),
    "tanh_rho0.5": lambda: problems.tanh(rho=0.5),
    "tanh_rho0.9": lambda: problems.tanh(rho=0.9),
    "tanh_rho0.99": lambda: problems.tanh(rho=0.99),
    "tanh_sym_rho0.99": lambda: problems.tanh(rho=0.99, symmetric=True, input_scale=0.1),
    "cos": problems.cosine,
    "conv_gn": problems.conv_cell,
}

# Parameters differentiated per coordinate by finite differences. All
# parameters are also covered by random directions. The conv cell is too
# large for per-coordinate differences and uses directions only.
FD_COORDINATES: dict[str, tuple[str, ...]] = {
    "affine_rho0.9": ("x", "b"),
    "tanh_rho0.5": ("x", "b"),
    "tanh_rho0.9": ("x", "b"),
    "tanh_rho0.99": ("x", "b"),
    "tanh_sym_rho0.99": ("x", "b"),
    "cos": ("x", "theta"),
    "conv_gn": (),
}
FD_DIRECTIONS = 2  # random unit directions over all parameters and x


@functools.lru_cache(maxsize=None)
def problem(key: str) -> Problem:
    """Build problem ``key`` (cached for the session)."""
    return BUILDERS[key]()


@functools.lru_cache(maxsize=None)
def dense(key: str) -> dict[str, Tensor]:
    """Return the dense implicit-solve gradients of problem ``key`` (cached)."""
    return dense_gradients(problem(key))


@functools.lru_cache(maxsize=None)
def closed_form(key: str) -> dict[str, Tensor]:
    """Return the closed-form gradients of problem ``key`` (cached)."""
    return problem(key).closed_form()


@functools.lru_cache(maxsize=None)
def finite_differences(key: str):
    """Return scipy finite differences of problem ``key`` (cached).

    A pair: {name: (flat indices, partials)} per coordinate, and a list of
    (unit direction, directional derivative).
    """
    prob = problem(key)
    coordinates = {}
    for name in FD_COORDINATES[key]:
        indices = np.arange(prob.params[name].numel())
        coordinates[name] = (indices, fd_coordinates(prob, name, indices))
    directions = []
    for seed in range(FD_DIRECTIONS):
        direction = random_direction(prob, list(prob.params), seed)
        directions.append((direction, fd_direction(prob, direction)))
    return coordinates, directions


@functools.lru_cache(maxsize=None)
def ift_result(key: str, solver: str, backward_solver: str) -> tuple[dict[str, Tensor], SolverStats, SolverStats]:
    """Return (gradients, forward stats, backward stats) of the float64 IFT check (cached)."""
    tol = TOLERANCES["float64"]["solver_tol"]
    grads, out = ift_gradients(problem(key), solver, backward_solver, tol=tol)
    return grads, out.forward_stats, out.backward.stats
