"""Property checks: Hypothesis draws sizes, seeds, contraction factors and solver pairs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from suites.gradcheck import problems
from suites.gradcheck.cases import SOLVERS
from suites.gradcheck.recording import record_check
from suites.gradcheck.references import dense_gradients, ift_gradients, max_rel_error
from suites.gradcheck.tolerances import TOLERANCES

pytestmark = pytest.mark.gradcheck

F64 = TOLERANCES["float64"]
EXAMPLES = 12  # kept small for CI time, because every example runs a forward and a backward solve


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    kind=st.sampled_from(["affine", "tanh", "tanh_sym"]),
    dim=st.integers(min_value=2, max_value=10),
    batch=st.integers(min_value=1, max_value=3),
    rho=st.floats(min_value=0.05, max_value=0.95),
    seed=st.integers(min_value=0, max_value=2**16),
    solver=st.sampled_from(SOLVERS),
    backward_solver=st.sampled_from(SOLVERS),
)
def test_ift_vs_dense_drawn(kind, dim, batch, rho, seed, solver, backward_solver) -> None:
    if kind == "affine":
        problem = problems.affine(dim=dim, batch=batch, rho=rho, seed=seed)
    else:
        problem = problems.tanh(dim=dim, batch=batch, rho=rho, symmetric=kind == "tanh_sym", seed=seed)

    grads, out = ift_gradients(problem, solver, backward_solver, tol=F64["solver_tol"])
    error = max_rel_error(grads, dense_gradients(problem))
    row = record_check(
        solver=solver,
        backward_solver=backward_solver,
        problem=f"{kind}_drawn",
        reference="dense",
        dtype="float64",
        max_rel_error=error,
        tolerance=F64["dense"],
        forward_nfe=int(out.forward_stats.nfe.max()),
        backward_nfe=int(out.backward.stats.nfe.max()),
        mode="ift",
        detail=f"dim {dim}, batch {batch}, rho {rho:.4g}, seed {seed}",
    )
    assert row["passed"], f"rel error {error:.3g} > {F64['dense']}"
