"""Each solver's fixed point agrees with scipy.optimize on small problems."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from deqbench.solvers import get_solver
from suites.solvers.maps import SOLVERS, tanh_map

SCIPY_TOL = 1e-13  # absolute residual (max-norm) asked of scipy
AGREEMENT = 1e-10  # max |z_ours - z_scipy|


def _problems():
    """Return small maps by name: tanh with rho 0.5 and 0.9, and cos(z) + theta."""
    theta = torch.tensor([[-0.3, 0.0, 0.2, 0.4]], dtype=torch.float64)
    return {
        "tanh_rho0.5": tanh_map(0.5, dim=6, batch=2),
        "tanh_rho0.9": tanh_map(0.9, dim=6, batch=2),
        "cos": ((lambda z: torch.cos(z) + theta), torch.zeros(1, 4, dtype=torch.float64)),
    }


def _scipy_solution(f, z0: torch.Tensor, method: str) -> np.ndarray:
    """Solve with scipy on the flattened batch, which is one vector because the samples are independent."""
    shape = z0.shape

    def as_torch(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(v, dtype=np.float64)).reshape(shape)

    start = z0.flatten().numpy()
    if method == "fixed_point":
        # Plain iteration: scipy's default del2 acceleration works per
        # coordinate and does not converge on the coupled tanh map.
        return scipy.optimize.fixed_point(
            lambda v: f(as_torch(v)).flatten().numpy(), start, xtol=SCIPY_TOL, maxiter=5000, method="iteration"
        )
    result = scipy.optimize.root(
        lambda v: (f(as_torch(v)) - as_torch(v)).flatten().numpy(),
        start,
        method=method,
        options={"fatol": SCIPY_TOL, "maxiter": 500},
    )
    assert result.success, result.message
    return result.x


@pytest.mark.parametrize("method", ["broyden1", "anderson", "fixed_point"])
@pytest.mark.parametrize("name", ["tanh_rho0.5", "tanh_rho0.9", "cos"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_matches_scipy(solver: str, name: str, method: str) -> None:
    f, z0 = _problems()[name]
    reference = _scipy_solution(f, z0, method).reshape(z0.shape)
    result = get_solver(solver)(f, z0, max_nfe=500, tol=1e-13)
    assert all(reason.value == "tolerance" for reason in result.stats.stop_reason)
    assert np.abs(result.z.numpy() - reference).max() <= AGREEMENT
