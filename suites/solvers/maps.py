"""Small fixed-point maps for the solver tests, including maps that fail on purpose."""

from __future__ import annotations

import math
from typing import Callable

import torch

from suites.gradcheck import problems

Tensor = torch.Tensor
SOLVERS = ("fixed_point", "anderson", "broyden")


def tanh_map(rho: float = 0.9, *, symmetric: bool = False, input_scale: float = 1.0, seed: int = 1,
             dim: int = 64, batch: int = 4, dtype=torch.float64) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Return (f, z0) for z = tanh(z W^T + x U^T + b) with ||W||_2 = rho and z0 = 0 (default size 4 x 64)."""
    problem = problems.tanh(dim=dim, batch=batch, rho=rho, symmetric=symmetric, seed=seed,
                            input_scale=input_scale, dtype=dtype)
    params = problem.detached_params()
    return problem.f(params), problem.z0


def sub_batch_map(rho: float, scales: Tensor, seed: int = 1) -> Callable[[Tensor], Callable[[Tensor], Tensor]]:
    """Return rows -> f for a tanh map whose sample i has its input scaled by scales[i].

    ``rows`` is a list of sample indices, so the same samples can be solved
    together or alone.
    """
    problem = problems.tanh(dim=32, batch=len(scales), rho=rho, seed=seed)
    params = problem.detached_params()
    x = params["x"] * scales.unsqueeze(1)

    def for_rows(rows: list[int]) -> Callable[[Tensor], Tensor]:
        bound = {**params, "x": x[rows]}
        return lambda z: problem.cell(z, bound)

    return for_rows


def rotation_map(scale: float = 1.5, angle: float = 1.0, batch: int = 2, dtype=torch.float64):
    """Return (f, z0, z*) for z = scale * R(angle) z + c in 2-D, which does not contract when scale > 1."""
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=dtype
    )
    matrix = scale * rotation
    offset = torch.tensor([1.0, -0.5], dtype=dtype)
    z_star = torch.linalg.solve(torch.eye(2, dtype=dtype) - matrix, offset).expand(batch, 2)
    return (lambda z: z @ matrix.T + offset), torch.zeros(batch, 2, dtype=dtype), z_star


def doubling_map(batch: int = 2, dtype=torch.float64):
    """Return (f, z0, z*) for z = 2 z + 1: fixed point -1, repelling for fixed-point iteration."""
    z0 = torch.zeros(batch, 3, dtype=dtype)
    return (lambda z: 2 * z + 1), z0, torch.full_like(z0, -1.0)


def shift_map(batch: int = 2, dtype=torch.float64):
    """Return (f, z0) for z = z + 1, which has no fixed point: ||f(z) - z|| = ||1|| everywhere."""
    return (lambda z: z + 1), torch.zeros(batch, 3, dtype=dtype)


class Poisoned:
    """Wrap f so that evaluation number ``at`` (1-based) returns ``value`` for the samples in ``rows``."""

    def __init__(self, f: Callable[[Tensor], Tensor], at: int, rows: list[int], value: float = math.nan):
        self.f = f
        self.at = at
        self.rows = rows
        self.value = value
        self.calls = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        out = self.f(z)
        if self.calls == self.at:
            out = out.clone()
            out[self.rows] = self.value
        return out


class Counting:
    """Wrap f and count its calls."""

    def __init__(self, f: Callable[[Tensor], Tensor]):
        self.f = f
        self.calls = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.f(z)
