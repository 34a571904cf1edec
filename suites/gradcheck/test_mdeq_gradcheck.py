"""IFT gradients of a small float64 MDEQ classifier against three references.

The model is the real MDEQClassifier (stem, weight-normed cell with
multiscale fusion, head) with two branches of 4 channels on 8 x 8 images and
no dropout, in eval mode so that BatchNorm is a fixed affine map. The
references are scipy finite differences along random directions, autograd
through 5, 10 and 80 unrolled iterations, and a dense implicit solve.

How the cell is made to contract: at initialization f is not contractive.
Scaling its weights does not help, because f ends in the post-fusion
GroupNorm, which removes any scale of the weights before it. So that
GroupNorm is made affine (fusion_norm_affine=True) with gain
POST_NORM_GAIN and a bias drawn from N(0, 1). The gain scales f's
dependence on z, and the bias keeps z* away from zero. Near zero, the
GroupNorm after the block's first convolution is scale-invariant and its
Jacobian grows as 1 / ||z||. test_mdeq_small_contracts measures the
spectral radius of df/dz at z*.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pytest
import scipy.differentiate
import torch
from torch import Tensor

from deqbench.implicit import BackwardSpec, SolveSpec
from deqbench.models import MDEQClassifier
from deqbench.scenarios import TINY, ModelConfig
from deqbench.solvers import get_solver
from suites.gradcheck.tolerances import TOLERANCES

pytestmark = pytest.mark.gradcheck

F64 = TOLERANCES["float64"]
PROBLEM = "mdeq_small"
SOLVERS = ("broyden", "anderson")

CONFIG = ModelConfig(
    num_branches=2,
    channels=(4, 4),
    head_channels=(1, 2),
    final_channels=4,
    dropout=0.0,
    group_norm_groups=4,  # 4 channels and 20 hidden channels per block
    fusion_norm_groups=2,
    fusion_norm_affine=True,
)
IMAGE_SIZE = 8
BATCH = 2
POST_NORM_GAIN = 0.05
MAX_NFE = 300

# Reference forward solves (dense solve and every finite-difference point)
# go to this relative residual and fail loudly above REFERENCE_CHECK.
REFERENCE_TOL = 1e-14
REFERENCE_CHECK = 1e-12

# scipy.differentiate.derivative along random unit directions: central
# differences of order 4, the step halved each iteration. Each set of
# leaves has its own first step and iteration count, measured on this
# model. The ReLUs make the loss piecewise smooth, and along parameter
# directions steps of 1e-4 to 1e-2 crossed kinks (errors near 1e-5), while
# steps from 1e-5 agreed with the dense solve to 1e-8. Along the input the
# loss changes about 100 times more slowly, so steps below 1e-4 lose digits
# to round-off, and steps from 1e-2 agreed to 3e-8.
FD_SETS = {
    # set name: (first step, iterations)
    "cell": (1e-5, 3),
    "input": (1e-2, 8),
    "all": (1e-5, 3),
}
FD_ORDER = 4
FD_STEP_FACTOR = 2.0
DIRECTIONS_PER_SET = 3

UNROLLED_DEPTHS = (5, 10, 80)


@dataclass
class Case:
    """The model, its input and the weights c of the loss L = sum(c * logits)."""

    model: MDEQClassifier
    x: Tensor  # (B, 3, 8, 8), float64
    loss_weights: Tensor  # (B, 10), float64


@pytest.fixture
def case() -> Case:
    torch.manual_seed(0)
    model = MDEQClassifier(CONFIG, TINY.deq).double().eval()

    # PyTorch's default init for the plain convolutions instead of N(0, 0.01),
    # so that the injection and the head carry O(1) signals and the loss
    # depends on x and on the cell strongly enough for finite differences.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()

    with torch.no_grad():
        for post in model.cell.fusion.post:
            post.norm.weight.fill_(POST_NORM_GAIN)
            post.norm.bias.normal_(0.0, 1.0)

    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64)
    loss_weights = torch.randn(BATCH, CONFIG.num_classes, dtype=torch.float64)
    return Case(model, x, loss_weights)


def use_solver(model: MDEQClassifier, solver: str, tol: float) -> None:
    """Make ``solver`` the forward and the IFT backward solver, both to ``tol``."""
    model.forward_spec = SolveSpec(solver, max_nfe=MAX_NFE, tol=tol)
    model.backward_spec = BackwardSpec("ift", SolveSpec(solver, max_nfe=MAX_NFE, tol=tol))


def leaves(case: Case) -> dict[str, Tensor]:
    """Return every trainable parameter by name, and the input under the name "x"."""
    named = dict(case.model.named_parameters())
    named["x"] = case.x
    return named


def gradients(case: Case, mode: str) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Return dL/d(parameters, x) through the model in ``mode`` and the largest NFE of both solves."""
    x = case.x.detach().requires_grad_()
    output = case.model(x, mode=mode)
    loss = (case.loss_weights * output.logits).sum()

    targets = dict(case.model.named_parameters())
    targets["x"] = x
    grads = torch.autograd.grad(loss, list(targets.values()))

    backward_stats = output.backward.stats if output.backward is not None else None
    nfe = {
        "forward_nfe": int(output.forward_stats.nfe.max()),
        "backward_nfe": int(backward_stats.nfe.max()) if backward_stats is not None else 0,
    }
    return dict(zip(targets, grads)), nfe


def max_rel_error(values: dict[str, Tensor], references: dict[str, Tensor]) -> float:
    """Return the largest ||g - g_ref|| / ||g_ref|| over the tensors with a nonzero reference."""
    errors = [
        float((values[name] - reference).norm() / reference.norm())
        for name, reference in references.items()
        if reference.norm() > 0
    ]
    return max(errors)


def loss_along(case: Case, direction: dict[str, Tensor], t: float) -> float:
    """Return L at (parameters, x) + t * direction, with z* from a reference solve to REFERENCE_TOL."""
    model = case.model
    base = {name: value.detach().clone() for name, value in dict(model.named_parameters()).items()}
    try:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in direction:
                    parameter.add_(t * direction[name])
            x = case.x + t * direction["x"] if "x" in direction else case.x
            output = model(x)
    finally:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(base[name])

    residual = float(output.forward_stats.rel_residual.max())
    if not residual <= REFERENCE_CHECK:
        raise RuntimeError(f"reference solve at t = {t:g} reached rel residual {residual:.3g}, above {REFERENCE_CHECK}")
    return float((case.loss_weights * output.logits).sum())


def fd_directional(
    case: Case, directions: list[dict[str, Tensor]], first_step: float, iterations: int
) -> np.ndarray:
    """Return dL/dt along each direction by scipy.differentiate.derivative, as a (K,) array."""

    def losses(t: np.ndarray, index: np.ndarray) -> np.ndarray:
        # Elementwise: entry j moves along directions[index[j]] by t[j].
        out = np.empty(t.shape)
        index = np.broadcast_to(index, t.shape)
        for j in np.ndindex(t.shape):
            out[j] = loss_along(case, directions[int(index[j])], float(t[j]))
        return out

    count = len(directions)
    result = scipy.differentiate.derivative(
        losses,
        np.zeros(count),
        args=(np.arange(count, dtype=float),),
        initial_step=first_step,
        step_factor=FD_STEP_FACTOR,
        order=FD_ORDER,
        maxiter=iterations,
    )
    return np.asarray(result.df)


def random_direction(case: Case, names: list[str], seed: int) -> dict[str, Tensor]:
    """Return a random unit direction over the named leaves."""
    generator = torch.Generator().manual_seed(seed)
    named = leaves(case)
    direction = {
        name: torch.randn(named[name].shape, generator=generator, dtype=torch.float64) for name in names
    }
    norm = torch.sqrt(sum((d * d).sum() for d in direction.values()))
    return {name: d / norm for name, d in direction.items()}


def directional(grads: dict[str, Tensor], direction: dict[str, Tensor]) -> float:
    """Return the directional derivative, the sum over leaves of <gradient, direction>."""
    return sum(float((grads[name] * d).sum()) for name, d in direction.items())


def leaf_sets(case: Case) -> dict[str, list[str]]:
    """Return the leaves each set of directions moves: the cell, the input, and everything."""
    names = list(leaves(case))
    return {
        "cell": [name for name in names if name.startswith("cell.")],
        "input": ["x"],
        "all": names,
    }


def reference_equilibrium(case: Case, x: Tensor) -> Tensor:
    """Return z* (B, D) for images x from a Broyden solve to REFERENCE_TOL, without autograd."""
    with torch.no_grad():
        problem = case.model.equilibrium_problem(x)
        result = get_solver("broyden")(problem.f, problem.z0, max_nfe=MAX_NFE, tol=REFERENCE_TOL)

    residual = float(result.stats.rel_residual.max())
    if not residual <= REFERENCE_CHECK:
        raise RuntimeError(f"reference solve reached rel residual {residual:.3g}, above {REFERENCE_CHECK}")
    return result.z


def per_sample_jacobians(f: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Return df/dz at z (B, D) as (B, D, D); samples do not interact, so the diagonal blocks suffice."""
    full = torch.autograd.functional.jacobian(f, z)  # (B, D, B, D)
    index = torch.arange(z.shape[0])
    return full[index, :, index, :]


def dense_gradients(case: Case) -> dict[str, Tensor]:
    """Return dL/d(parameters, x) from a dense solve of (I - J)^T u = dL/dz* per sample."""
    x = case.x.detach().requires_grad_()
    z_star = reference_equilibrium(case, x)
    problem = case.model.equilibrium_problem(x)

    # dL/dz* through the head, and the Jacobians (B, D, D) of f at z*.
    z_leaf = z_star.clone().requires_grad_()
    direct_loss = (case.loss_weights * case.model.head(problem.layout.split(z_leaf))).sum()
    (loss_grad,) = torch.autograd.grad(direct_loss, z_leaf)
    jacobians = per_sample_jacobians(problem.f, z_star)

    # Solve (I - J_b)^T u_b = g_b for each sample b.
    identity = torch.eye(jacobians.shape[1], dtype=torch.float64)
    u = torch.linalg.solve((identity - jacobians).transpose(1, 2), loss_grad.unsqueeze(2)).squeeze(2)  # (B, D)

    # dL/dtheta = dL/dtheta through the head at fixed z* + u^T df/dtheta at z*.
    head_loss = (case.loss_weights * case.model.head(problem.layout.split(z_star))).sum()
    total = head_loss + (problem.f(z_star) * u).sum()
    targets = dict(case.model.named_parameters())
    targets["x"] = x
    grads = torch.autograd.grad(total, list(targets.values()), allow_unused=True)
    return {
        name: torch.zeros_like(target) if grad is None else grad
        for (name, target), grad in zip(targets.items(), grads)
    }


def test_mdeq_small_contracts(case: Case) -> None:
    z_star = reference_equilibrium(case, case.x)
    with torch.no_grad():
        problem = case.model.equilibrium_problem(case.x)

    jacobians = per_sample_jacobians(problem.f, z_star)
    radius = torch.linalg.eigvals(jacobians).abs().max(dim=1).values  # (B,)

    # Measured: 0.22 and 0.23 for the two samples with these seeds (spectral norms 0.62 and 0.90).
    assert torch.all(radius < 0.6), f"spectral radius of df/dz at z*: {radius.tolist()}"
    assert torch.all(radius > 0.05), f"spectral radius {radius.tolist()} is too small to test the IFT"


@pytest.mark.parametrize("solver", SOLVERS)
def test_mdeq_ift_vs_finite_differences(case: Case, solver: str, record_check) -> None:
    use_solver(case.model, solver, F64["solver_tol"])
    grads, nfe = gradients(case, "implicit")

    # Finite differences of forward solves to REFERENCE_TOL with the same solver.
    # The error of a set is ||ift - fd|| / ||fd|| over its K directional
    # derivatives, so one direction nearly orthogonal to the gradient does
    # not turn round-off into a large relative error.
    use_solver(case.model, solver, REFERENCE_TOL)
    errors = {}
    for set_index, (label, names) in enumerate(leaf_sets(case).items()):
        directions = [random_direction(case, names, 10 * set_index + k) for k in range(DIRECTIONS_PER_SET)]
        ift = np.array([directional(grads, direction) for direction in directions])
        reference = fd_directional(case, directions, *FD_SETS[label])
        errors[label] = float(np.linalg.norm(ift - reference) / np.linalg.norm(reference))

    error = max(errors.values())
    row = record_check(
        solver=solver,
        backward_solver=solver,
        problem=PROBLEM,
        reference="finite_difference",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["finite_difference"],
        mode="ift",
        detail=f"errors per direction set: { {label: f'{e:.3g}' for label, e in errors.items()} }",
        **nfe,
    )
    assert row["passed"], f"rel errors per direction {errors} above {F64['finite_difference']}"


@pytest.mark.parametrize("solver", SOLVERS)
def test_mdeq_ift_vs_unrolled(case: Case, solver: str, record_check) -> None:
    use_solver(case.model, solver, F64["solver_tol"])
    grads, nfe = gradients(case, "implicit")

    # Warm-up mode backpropagates through ``depth`` iterations from z0 = 0.
    errors = []
    for depth in UNROLLED_DEPTHS:
        case.model.deq = replace(case.model.deq, warmup_layers=depth)
        unrolled, _ = gradients(case, "warmup")
        errors.append(max_rel_error(grads, unrolled))

    row = record_check(
        solver=solver,
        backward_solver=solver,
        problem=PROBLEM,
        reference="unrolled_depth80",
        dtype="float64",
        max_rel_error=errors[-1],
        tolerance=F64["unrolled_depth80"],
        mode="ift",
        detail=f"errors at depths {UNROLLED_DEPTHS}: {[f'{e:.3g}' for e in errors]}",
        **nfe,
    )
    assert errors[0] > errors[1] > errors[2], f"errors at depths {UNROLLED_DEPTHS}: {errors}"
    assert row["passed"], f"rel error at depth 80 {errors[-1]:.3g} above {F64['unrolled_depth80']}"


@pytest.mark.parametrize("solver", SOLVERS)
def test_mdeq_ift_vs_dense(case: Case, solver: str, record_check) -> None:
    use_solver(case.model, solver, F64["solver_tol"])
    grads, nfe = gradients(case, "implicit")

    error = max_rel_error(grads, dense_gradients(case))

    row = record_check(
        solver=solver,
        backward_solver=solver,
        problem=PROBLEM,
        reference="dense",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["dense"],
        mode="ift",
        **nfe,
    )
    assert row["passed"], f"rel error {error:.3g} above {F64['dense']}"
