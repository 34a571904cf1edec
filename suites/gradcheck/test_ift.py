"""IFT gradients for every forward and backward solver pair against reference gradients (float64)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from suites.gradcheck import cases, problems
from suites.gradcheck.cases import BUILDERS, SOLVERS, ift_result
from suites.gradcheck.references import directional, max_rel_error
from suites.gradcheck.tolerances import TOLERANCES

pytestmark = pytest.mark.gradcheck

F64 = TOLERANCES["float64"]
PAIRS = list(itertools.product(SOLVERS, SOLVERS))
CLOSED_FORM = [key for key in BUILDERS if key.startswith(("affine", "cos"))]


def _nfe(key: str, solver: str, backward_solver: str) -> dict[str, int]:
    _, forward, backward = ift_result(key, solver, backward_solver)
    return {"forward_nfe": int(forward.nfe.max()), "backward_nfe": int(backward.nfe.max())}


def _fd_error(key: str, grads: dict) -> float:
    """Return the largest relative error of the IFT gradient against the finite differences."""
    coordinates, directions = cases.finite_differences(key)
    errors = []
    for name, (indices, partials) in coordinates.items():
        ift = grads[name].flatten()[indices].numpy()
        errors.append(np.linalg.norm(ift - partials) / np.linalg.norm(partials))
    for direction, derivative in directions:
        errors.append(abs(directional(grads, direction) - derivative) / abs(derivative))
    return float(max(errors))


@pytest.mark.parametrize("solver,backward_solver", PAIRS)
@pytest.mark.parametrize("key", list(BUILDERS))
def test_ift_vs_dense(key: str, solver: str, backward_solver: str, record_check) -> None:
    grads, forward, backward = ift_result(key, solver, backward_solver)
    error = max_rel_error(grads, cases.dense(key))
    row = record_check(
        solver=solver,
        backward_solver=backward_solver,
        problem=key,
        reference="dense",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["dense"],
        mode="ift",
        **_nfe(key, solver, backward_solver),
    )
    assert bool(forward.converged.all()), f"forward stop reasons {forward.stop_reason}"
    assert bool(backward.converged.all()), f"backward stop reasons {backward.stop_reason}"
    assert row["passed"], f"rel error {error:.3g} > {F64['dense']}"


@pytest.mark.parametrize("solver,backward_solver", PAIRS)
@pytest.mark.parametrize("key", list(BUILDERS))
def test_ift_vs_finite_differences(key: str, solver: str, backward_solver: str, record_check) -> None:
    grads, _, _ = ift_result(key, solver, backward_solver)
    error = _fd_error(key, grads)
    row = record_check(
        solver=solver,
        backward_solver=backward_solver,
        problem=key,
        reference="finite_difference",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["finite_difference"],
        mode="ift",
        **_nfe(key, solver, backward_solver),
    )
    assert row["passed"], f"rel error {error:.3g} > {F64['finite_difference']}"


@pytest.mark.parametrize("solver,backward_solver", PAIRS)
@pytest.mark.parametrize("key", CLOSED_FORM)
def test_ift_vs_closed_form(key: str, solver: str, backward_solver: str, record_check) -> None:
    grads, _, _ = ift_result(key, solver, backward_solver)
    error = max_rel_error(grads, cases.closed_form(key))
    row = record_check(
        solver=solver,
        backward_solver=backward_solver,
        problem=key,
        reference="closed_form",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["closed_form"],
        mode="ift",
        **_nfe(key, solver, backward_solver),
    )
    assert row["passed"], f"rel error {error:.3g} > {F64['closed_form']}"


@pytest.mark.parametrize("key", list(BUILDERS))
def test_references_agree(key: str) -> None:
    # The dense solve itself must match the finite differences, or neither is a reference.
    error = _fd_error(key, cases.dense(key))
    assert error <= F64["finite_difference"]


@pytest.mark.parametrize("key", ["tanh_rho0.9", "conv_gn"])
def test_jacobian_blocks_match_functional(key: str) -> None:
    # The dense reference builds per-sample blocks from batched VJPs; the full
    # Jacobian from torch.autograd.functional.jacobian must agree, with zero
    # blocks between samples.
    prob = cases.problem(key)
    z = prob.solve_reference()
    blocks = problems.jacobian_at(prob, z)
    full = torch.autograd.functional.jacobian(prob.f(prob.detached_params()), z)  # (B, D, B, D)
    index = torch.arange(z.shape[0])
    assert torch.allclose(full[index, :, index, :], blocks, rtol=0, atol=1e-14)
    off_diagonal = full.clone()
    off_diagonal[index, :, index, :] = 0
    assert bool((off_diagonal == 0).all())
