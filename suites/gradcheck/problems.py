"""Fixed-point problems with known solutions, shared by the gradcheck and solver suites.

Each problem is a map f(z; params) on a batch of states, a starting point and
a loss L(z*) = sum(c * z*) + sum(z*^2) / 2. ``params`` contains the parameters
and the input x as leaf tensors, so one gradient covers both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from deqbench.solvers import get_solver

Tensor = torch.Tensor
Cell = Callable[[Tensor, dict[str, Tensor]], Tensor]

# Tolerance of the forward solves behind the finite-difference and dense
# references. A reference solve that misses REFERENCE_CHECK raises RuntimeError.
REFERENCE_TOL = 1e-14
REFERENCE_CHECK = 1e-12


@dataclass
class Problem:
    """A fixed-point problem z = cell(z, params) and its loss."""

    name: str
    cell: Cell
    params: dict[str, Tensor]  # leaves: parameters and the input "x"
    z0: Tensor  # (B, D) starting point
    loss_weights: Tensor  # (B, D), the c of the loss
    contraction: float  # Lipschitz bound of the map, or the spectral radius of df/dz at z* where measured
    closed_form: Callable[[], dict[str, Tensor]] | None = None  # exact gradients, where known
    notes: dict[str, float] = field(default_factory=dict)

    def f(self, params: dict[str, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
        """Return the map z -> cell(z, params) with the problem's own parameters by default."""
        bound = self.params if params is None else params
        return lambda z: self.cell(z, bound)

    def loss(self, z: Tensor) -> Tensor:
        """Return L(z) = sum(c * z) + sum(z^2) / 2 as a 0-d tensor."""
        return (self.loss_weights * z).sum() + 0.5 * (z * z).sum()

    def loss_grad(self, z: Tensor) -> Tensor:
        """Return dL/dz = c + z, shape of z."""
        return self.loss_weights + z

    def solve_reference(self, params: dict[str, Tensor] | None = None, start: Tensor | None = None) -> Tensor:
        """Return z*(params) from a Broyden solve to REFERENCE_TOL, checked against REFERENCE_CHECK.

        ``start`` replaces z0 as the starting point, for example the z* of
        nearby parameters.
        """
        z0 = self.z0 if start is None else start
        result = get_solver("broyden")(self.f(params), z0, max_nfe=400, tol=REFERENCE_TOL)
        worst = float(result.stats.rel_residual.max())
        if not worst <= REFERENCE_CHECK:
            raise RuntimeError(
                f"reference solve of {self.name} reached rel residual {worst:.3g}, above {REFERENCE_CHECK}; "
                "the problem is not contracting enough for a reference"
            )
        return result.z

    def detached_params(self) -> dict[str, Tensor]:
        """Return copies of the parameters without autograd history, for perturbation."""
        return {name: value.detach().clone() for name, value in self.params.items()}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scaled_to_norm(matrix: Tensor, norm: float) -> Tensor:
    """Return ``matrix`` rescaled to spectral norm ``norm``."""
    return matrix * (norm / torch.linalg.matrix_norm(matrix, ord=2))


def affine(dim: int = 6, batch: int = 2, rho: float = 0.9, seed: int = 0, dtype=torch.float64) -> Problem:
    """Build z = z A^T + x B^T + b with ||A||_2 = rho, whose fixed point and gradients are closed-form."""
    gen = _generator(seed)
    params = {
        "A": _scaled_to_norm(torch.randn(dim, dim, generator=gen, dtype=dtype), rho),
        "B": torch.randn(dim, dim, generator=gen, dtype=dtype) / math.sqrt(dim),
        "b": torch.randn(dim, generator=gen, dtype=dtype),
        "x": torch.randn(batch, dim, generator=gen, dtype=dtype),
    }
    params = {name: value.requires_grad_() for name, value in params.items()}

    def cell(z: Tensor, p: dict[str, Tensor]) -> Tensor:
        return z @ p["A"].T + p["x"] @ p["B"].T + p["b"]

    problem = Problem(
        name=f"affine_rho{rho}",
        cell=cell,
        params=params,
        z0=torch.zeros(batch, dim, dtype=dtype),
        loss_weights=torch.randn(batch, dim, generator=gen, dtype=dtype),
        contraction=rho,
    )

    def closed_form() -> dict[str, Tensor]:
        # Rows are samples: Z = (X B^T + b) (I - A)^{-T}, and with G = dL/dZ the
        # adjoint is U = G (I - A)^{-1}, so dL/dA = U^T Z, dL/dB = U^T X,
        # dL/db = sum of the rows of U and dL/dX = U B.
        p = problem.detached_params()
        eye = torch.eye(dim, dtype=dtype)
        inject = p["x"] @ p["B"].T + p["b"]  # (B, D)
        z = torch.linalg.solve(eye - p["A"], inject.T).T  # (B, D)
        g = problem.loss_grad(z)
        u = torch.linalg.solve((eye - p["A"]).T, g.T).T  # (B, D)
        return {"A": u.T @ z, "B": u.T @ p["x"], "b": u.sum(0), "x": u @ p["B"]}

    problem.closed_form = closed_form
    return problem


def tanh(
    dim: int = 8,
    batch: int = 2,
    rho: float = 0.9,
    symmetric: bool = False,
    seed: int = 0,
    input_scale: float = 1.0,
    dtype=torch.float64,
) -> Problem:
    """Build z = tanh(z W^T + x U^T + b) with ||W||_2 = rho, a contraction since |tanh'| <= 1.

    ``symmetric`` draws W = Q diag(lam) Q^T with eigenvalues uniform in
    [-rho, rho] and one at rho. A small ``input_scale`` keeps tanh near its
    linear range, so that the contraction factor at z* stays close to rho.
    """
    gen = _generator(seed)
    if symmetric:
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))
        lam = torch.empty(dim, dtype=dtype).uniform_(-rho, rho, generator=gen)
        lam[0] = rho
        w = q @ torch.diag(lam) @ q.T
    else:
        w = _scaled_to_norm(torch.randn(dim, dim, generator=gen, dtype=dtype), rho)
    params = {
        "W": w,
        "U": torch.randn(dim, dim, generator=gen, dtype=dtype) / math.sqrt(dim),
        "b": input_scale * torch.randn(dim, generator=gen, dtype=dtype),
        "x": input_scale * torch.randn(batch, dim, generator=gen, dtype=dtype),
    }
    params = {name: value.requires_grad_() for name, value in params.items()}

    def cell(z: Tensor, p: dict[str, Tensor]) -> Tensor:
        return torch.tanh(z @ p["W"].T + p["x"] @ p["U"].T + p["b"])

    kind = "tanh_sym" if symmetric else "tanh"
    return Problem(
        name=f"{kind}_rho{rho}",
        cell=cell,
        params=params,
        z0=torch.zeros(batch, dim, dtype=dtype),
        loss_weights=torch.randn(batch, dim, generator=gen, dtype=dtype),
        contraction=rho,
    )


def cosine(dim: int = 4, batch: int = 2, seed: int = 0, dtype=torch.float64) -> Problem:
    """Build z = cos(z) + theta + x, elementwise, where dz*/dtheta = 1 / (1 + sin z*).

    theta + x is drawn in [-0.5, 0.5], where z* lies in [0.4, 1.1] and
    |sin z*| <= 0.9, so the map contracts near z*.
    """
    gen = _generator(seed)
    params = {
        "theta": torch.empty(dim, dtype=dtype).uniform_(-0.25, 0.25, generator=gen),
        "x": torch.empty(batch, dim, dtype=dtype).uniform_(-0.25, 0.25, generator=gen),
    }
    params = {name: value.requires_grad_() for name, value in params.items()}

    def cell(z: Tensor, p: dict[str, Tensor]) -> Tensor:
        return torch.cos(z) + p["theta"] + p["x"]

    problem = Problem(
        name="cos",
        cell=cell,
        params=params,
        z0=torch.zeros(batch, dim, dtype=dtype),
        loss_weights=torch.randn(batch, dim, generator=gen, dtype=dtype),
        contraction=0.9,
    )

    def closed_form() -> dict[str, Tensor]:
        # dz*/d(offset) = 1 / (1 + sin z*) elementwise, applied to dL/dz*.
        z = problem.solve_reference()
        adjoint = problem.loss_grad(z) / (1 + torch.sin(z))
        return {"theta": adjoint.sum(0), "x": adjoint}

    problem.closed_form = closed_form
    return problem


# Shapes of the small two-resolution cell: branch 0 is (C, 8, 8), branch 1 (C, 4, 4).
CONV_CHANNELS = 4
CONV_INPUT_CHANNELS = 3
CONV_SIZES = (8, 4)


def conv_cell(batch: int = 2, seed: int = 0, dtype=torch.float64) -> Problem:
    """Build a two-resolution cell shaped like an MDEQ cell, with the state flattened per sample.

    Branch 0 (C, 8, 8) gets the injection of x. Branch 1 (C, 4, 4) receives
    branch 0 only through a stride-2 convolution. Each branch is conv, fusion of the
    other branch, GroupNorm with affine parameters, ReLU. The weight scales
    keep fixed-point iteration convergent: the spectral radius of df/dz at
    z* (about 0.55 for seed 0) is measured and stored in ``contraction``.
    The spectral norm of df/dz is above 1 (about 1.5), so the map is not a
    contraction in the 2-norm, only locally convergent.
    """
    gen = _generator(seed)
    c, cin = CONV_CHANNELS, CONV_INPUT_CHANNELS

    def draw(*shape: int, scale: float) -> Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=dtype)

    params = {
        "conv0": draw(c, c, 3, 3, scale=0.1),
        "conv1": draw(c, c, 3, 3, scale=0.1),
        "down": draw(c, c, 3, 3, scale=0.2),  # branch 0 -> 1, stride 2
        "up": draw(c, c, 1, 1, scale=0.2),  # branch 1 -> 0, 1x1 then nearest upsampling
        "inject": draw(c, cin, 3, 3, scale=0.3),
        "gn0_weight": 1.0 + draw(c, scale=0.1),
        "gn0_bias": draw(c, scale=0.1),
        "gn1_weight": 0.5 + draw(c, scale=0.05),
        "gn1_bias": draw(c, scale=0.1),
        "x": torch.randn(batch, cin, CONV_SIZES[0], CONV_SIZES[0], generator=gen, dtype=dtype),
    }
    params = {name: value.requires_grad_() for name, value in params.items()}
    size0 = c * CONV_SIZES[0] ** 2
    size1 = c * CONV_SIZES[1] ** 2

    def cell(z: Tensor, p: dict[str, Tensor]) -> Tensor:
        # Split the flat state (B, D) into (B, C, 8, 8) and (B, C, 4, 4).
        n = z.shape[0]
        z0 = z[:, :size0].reshape(n, c, CONV_SIZES[0], CONV_SIZES[0])
        z1 = z[:, size0:].reshape(n, c, CONV_SIZES[1], CONV_SIZES[1])

        # Branch 0: own conv, upsampled branch 1, injection of x.
        up = F.interpolate(F.conv2d(z1, p["up"]), scale_factor=2, mode="nearest")  # (B, C, 8, 8)
        h0 = F.conv2d(z0, p["conv0"], padding=1) + up + F.conv2d(p["x"], p["inject"], padding=1)
        out0 = F.relu(F.group_norm(h0, 2, p["gn0_weight"], p["gn0_bias"]))

        # Branch 1: own conv and the downsampled branch 0.
        down = F.conv2d(z0, p["down"], stride=2, padding=1)  # (B, C, 4, 4)
        h1 = F.conv2d(z1, p["conv1"], padding=1) + down
        out1 = F.relu(F.group_norm(h1, 2, p["gn1_weight"], p["gn1_bias"]))

        # Flatten back to (B, D), D = C*64 + C*16.
        return torch.cat([out0.reshape(n, size0), out1.reshape(n, size1)], dim=1)

    problem = Problem(
        name="conv_gn",
        cell=cell,
        params=params,
        z0=torch.zeros(batch, size0 + size1, dtype=dtype),
        loss_weights=torch.randn(batch, size0 + size1, generator=gen, dtype=dtype),
        contraction=math.nan,
    )
    problem.contraction = spectral_radius(problem)
    return problem


def jacobian_at(problem: Problem, z: Tensor) -> Tensor:
    """Return the per-sample Jacobians df/dz at z (B, D) as (B, D, D).

    Samples do not interact in these problems (GroupNorm also normalizes per
    sample), so one batched vector-Jacobian product per state coordinate j,
    with e_j in every sample at once, gives row j of every sample's Jacobian.
    """
    batch, dim = z.shape
    leaf = z.detach().requires_grad_()
    out = problem.cell(leaf, problem.detached_params())
    basis = torch.eye(dim, dtype=z.dtype).unsqueeze(1).expand(dim, batch, dim)  # (D, B, D)
    (rows,) = torch.autograd.grad(out, leaf, basis, is_grads_batched=True)  # (D, B, D)
    return rows.permute(1, 0, 2)  # (B, D, D), entry [b, j, :] = e_j^T J_b


def spectral_radius(problem: Problem) -> float:
    """Return the largest per-sample spectral radius of df/dz at the reference z*."""
    z = problem.solve_reference()
    return float(torch.linalg.eigvals(jacobian_at(problem, z)).abs().max())
