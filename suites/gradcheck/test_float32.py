"""IFT gradients computed in float32 against the float64 dense solve, with float32 tolerances."""

from __future__ import annotations

import pytest
import torch

from suites.gradcheck import cases
from suites.gradcheck.cases import SOLVERS
from suites.gradcheck.references import ift_gradients, max_rel_error
from suites.gradcheck.tolerances import TOLERANCES

pytestmark = [pytest.mark.gradcheck, pytest.mark.float32]

F32 = TOLERANCES["float32"]
PROBLEMS = ("tanh_rho0.9", "tanh_sym_rho0.99", "cos", "conv_gn")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("key", PROBLEMS)
def test_float32_ift_vs_dense(key: str, solver: str, record_check) -> None:
    grads, out = ift_gradients(cases.problem(key), solver, solver, tol=F32["solver_tol"], dtype=torch.float32)
    error = max_rel_error(grads, cases.dense(key))
    row = record_check(
        solver=solver,
        backward_solver=solver,
        problem=key,
        reference="dense",
        dtype="float32",
        max_rel_error=error,
        tolerance=F32["dense"],
        forward_nfe=int(out.forward_stats.nfe.max()),
        backward_nfe=int(out.backward.stats.nfe.max()),
        mode="ift",
        detail="float32 solve and gradient; float64 dense reference",
    )
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert row["passed"], f"rel error {error:.3g} > {F32['dense']}"
