"""Unrolled and phantom backward modes against the dense implicit gradient (float64)."""

from __future__ import annotations

import pytest
import torch

from deqbench.implicit import BackwardSpec, SolveSpec, implicit_solve
from suites.gradcheck import cases
from suites.gradcheck.problems import Problem
from suites.gradcheck.references import max_rel_error, unrolled_gradients
from suites.gradcheck.tolerances import TOLERANCES

pytestmark = pytest.mark.gradcheck

F64 = TOLERANCES["float64"]
DEPTHS = (5, 20, 80)
PHANTOM_STEPS = (5, 20, 80)
PHANTOM_DAMPING = 0.5
FORWARD = SolveSpec("broyden", max_nfe=200, tol=F64["solver_tol"])


def _layer_gradients(problem: Problem, backward: BackwardSpec):
    """Return dL/dparams through implicit_solve with ``backward``, and the output."""
    params = {name: value.detach().requires_grad_() for name, value in problem.params.items()}
    out = implicit_solve(problem.f(params), problem.z0, FORWARD, backward)
    grads = torch.autograd.grad(problem.loss(out.z), list(params.values()))
    return dict(zip(params, grads)), out


@pytest.mark.parametrize("key", ["affine_rho0.9", "tanh_rho0.9", "tanh_sym_rho0.99", "cos", "conv_gn"])
def test_unrolled_error_shrinks(key: str, record_check) -> None:
    errors = []
    for depth in DEPTHS:
        grads, _ = _layer_gradients(cases.problem(key), BackwardSpec("unrolled", steps=depth))
        errors.append(max_rel_error(grads, cases.dense(key)))
    row = record_check(
        solver="unrolled",
        backward_solver="autograd",
        problem=key,
        reference="dense",
        dtype="float64",
        max_rel_error=errors[-1],
        tolerance=F64["unrolled_depth80"],
        forward_nfe=DEPTHS[-1],
        backward_nfe=0,
        mode="unrolled",
        detail="errors at depths " + ", ".join(f"{d}: {e:.3g}" for d, e in zip(DEPTHS, errors)),
    )
    assert errors[1] < errors[0]
    assert errors[2] < errors[1]
    assert row["passed"], f"depth-80 error {errors[-1]:.3g}"


def test_unrolled_mode_matches_manual_loop() -> None:
    problem = cases.problem("tanh_rho0.9")
    grads, out = _layer_gradients(problem, BackwardSpec("unrolled", steps=7))
    manual = unrolled_gradients(problem, 7)
    assert max_rel_error(grads, manual) == 0.0
    assert out.forward_stats.nfe.tolist() == [7] * problem.z0.shape[0]


@pytest.mark.parametrize("key", ["affine_rho0.9", "tanh_rho0.9", "conv_gn"])
def test_phantom_one_step_is_not_ift(key: str, record_check) -> None:
    grads, out = _layer_gradients(cases.problem(key), BackwardSpec("phantom", steps=1, damping=1.0))
    error = max_rel_error(grads, cases.dense(key))
    row = record_check(
        solver="broyden",
        backward_solver="phantom",
        problem=key,
        reference="dense",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["phantom_one_step_min"],
        bound="min",
        forward_nfe=int(out.forward_stats.nfe.max()),
        backward_nfe=0,
        mode="phantom",
        detail="1 step, damping 1 (Jacobian-free), which must differ from the IFT gradient",
    )
    assert row["passed"], f"1-step phantom error {error:.3g} < {F64['phantom_one_step_min']}"


@pytest.mark.parametrize("key", ["affine_rho0.9", "tanh_rho0.9", "conv_gn"])
def test_phantom_approaches_ift(key: str, record_check) -> None:
    errors = []
    for steps in PHANTOM_STEPS:
        grads, out = _layer_gradients(cases.problem(key), BackwardSpec("phantom", steps=steps, damping=PHANTOM_DAMPING))
        errors.append(max_rel_error(grads, cases.dense(key)))
    row = record_check(
        solver="broyden",
        backward_solver="phantom",
        problem=key,
        reference="dense",
        dtype="float64",
        max_rel_error=errors[-1],
        tolerance=F64["phantom_damped80"],
        forward_nfe=int(out.forward_stats.nfe.max()),
        backward_nfe=0,
        mode="phantom",
        detail=f"damping {PHANTOM_DAMPING}; errors at "
        + ", ".join(f"{s} steps: {e:.3g}" for s, e in zip(PHANTOM_STEPS, errors)),
    )
    assert errors[1] < errors[0]
    assert errors[2] < errors[1]
    assert row["passed"], f"80-step error {errors[-1]:.3g}"
