"""NaN and Inf mid-solve, non-contracting maps, maps without a fixed point, and a budget of one."""

from __future__ import annotations

import math

import pytest
import torch

from deqbench.solvers import StopReason, get_solver
from deqbench.solvers._common import DEFAULT_DIVERGENCE_FACTOR, DEFAULT_STALL_WINDOW
from suites.solvers.maps import SOLVERS, Poisoned, doubling_map, rotation_map, shift_map, tanh_map

POISON_AT = 5  # the evaluation that returns NaN or Inf


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("solver", SOLVERS)
def test_poisoned_evaluation(solver: str, value: float) -> None:
    f, z0 = tanh_map(0.9)
    poisoned = Poisoned(f, at=POISON_AT, rows=[0], value=value)
    result = get_solver(solver)(poisoned, z0, max_nfe=100, tol=1e-10)
    stats = result.stats

    # The poisoned sample stops at that evaluation and keeps its best finite iterate.
    assert stats.stop_reason[0] == StopReason.NON_FINITE
    assert int(stats.nfe[0]) == POISON_AT
    assert bool(torch.isfinite(result.z[0]).all())
    assert int(stats.best_step[0]) < POISON_AT - 1
    assert math.isfinite(float(stats.rel_residual[0]))
    assert not bool(stats.converged[0])

    # The other samples converge as usual.
    assert all(reason == StopReason.TOLERANCE for reason in stats.stop_reason[1:])


@pytest.mark.parametrize("solver", SOLVERS)
def test_best_iterate_residual_matches(solver: str) -> None:
    f, z0 = tanh_map(0.9)
    poisoned = Poisoned(f, at=POISON_AT, rows=[0])
    result = get_solver(solver)(poisoned, z0, max_nfe=100, tol=1e-10)
    with torch.no_grad():
        residual = torch.linalg.vector_norm(f(result.z) - result.z, dim=1)
    assert torch.allclose(residual, result.stats.abs_residual, rtol=1e-10, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_at_start(solver: str) -> None:
    f, z0 = tanh_map(0.9)
    result = get_solver(solver)(Poisoned(f, at=1, rows=[1]), z0, max_nfe=50, tol=1e-10)
    assert result.stats.stop_reason[1] == StopReason.NON_FINITE
    assert torch.equal(result.z[1], z0[1])
    assert int(result.stats.best_step[1]) == 0
    assert result.stats.rel_residual[1] == math.inf


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_rotation_fixed_point_diverges(stop_mode: str) -> None:
    f, z0, _ = rotation_map(scale=1.5)
    result = get_solver("fixed_point")(f, z0, max_nfe=200, tol=1e-10, stop_mode=stop_mode)
    assert all(reason == StopReason.DIVERGENCE for reason in result.stats.stop_reason)
    assert bool(torch.isfinite(result.z).all())


def test_rotation_returns_start() -> None:
    # The absolute residual only grows, so the starting point stays the best iterate.
    f, z0, _ = rotation_map(scale=1.5)
    result = get_solver("fixed_point")(f, z0, max_nfe=200, tol=1e-10, stop_mode="abs")
    assert bool((result.stats.best_step == 0).all())
    assert torch.equal(result.z, z0)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_rotation_solved_by_acceleration(solver: str) -> None:
    # Both methods solve affine problems, contracting or not.
    f, z0, z_star = rotation_map(scale=1.5)
    result = get_solver(solver)(f, z0, max_nfe=50, tol=1e-10)
    assert all(reason == StopReason.TOLERANCE for reason in result.stats.stop_reason)
    assert torch.allclose(result.z, z_star, rtol=0, atol=1e-8)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_doubling_fixed_point_diverges(damping: float, stop_mode: str) -> None:
    f, z0, _ = doubling_map()
    result = get_solver("fixed_point")(f, z0, max_nfe=200, tol=1e-10, damping=damping, stop_mode=stop_mode)
    assert all(reason == StopReason.DIVERGENCE for reason in result.stats.stop_reason)
    assert bool(torch.isfinite(result.z).all())
    # ||f(z) - z|| grows by (1 + damping) per step from its value at z0, so
    # divergence comes after the first k steps with (1 + damping)^k > factor.
    steps = math.floor(math.log(DEFAULT_DIVERGENCE_FACTOR) / math.log(1 + damping)) + 1
    assert result.stats.nfe.tolist() == [steps + 1] * z0.shape[0]


def test_doubling_returns_start() -> None:
    f, z0, _ = doubling_map()
    result = get_solver("fixed_point")(f, z0, max_nfe=200, tol=1e-10, stop_mode="abs")
    assert torch.equal(result.z, z0)
    assert bool((result.stats.best_step == 0).all())


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_doubling_solved_by_acceleration(solver: str) -> None:
    f, z0, z_star = doubling_map()
    result = get_solver(solver)(f, z0, max_nfe=50, tol=1e-10)
    assert all(reason == StopReason.TOLERANCE for reason in result.stats.stop_reason)
    assert torch.allclose(result.z, z_star, rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_no_fixed_point_stalls(solver: str) -> None:
    # ||f(z) - z|| = ||1|| at every z, so the absolute residual never improves.
    f, z0 = shift_map()
    result = get_solver(solver)(f, z0, max_nfe=200, tol=1e-10, stop_mode="abs")
    assert all(reason == StopReason.STALL for reason in result.stats.stop_reason)
    assert result.stats.nfe.tolist() == [DEFAULT_STALL_WINDOW + 1] * z0.shape[0]
    assert bool(torch.isfinite(result.z).all())
    assert torch.equal(result.z, z0)
    assert not bool(result.stats.converged.any())


@pytest.mark.parametrize("solver", SOLVERS)
def test_no_fixed_point_rel_mode(solver: str) -> None:
    # The relative residual ||1|| / ||f(z)|| keeps shrinking as z grows, so only the budget stops it.
    f, z0 = shift_map()
    result = get_solver(solver)(f, z0, max_nfe=60, tol=1e-10)
    assert all(reason == StopReason.LIMIT for reason in result.stats.stop_reason)
    assert bool(torch.isfinite(result.z).all())
    assert not bool(result.stats.converged.any())


@pytest.mark.parametrize("solver", SOLVERS)
def test_budget_of_one(solver: str) -> None:
    f, z0 = tanh_map(0.9)
    result = get_solver(solver)(f, z0, max_nfe=1, tol=1e-10)
    stats = result.stats
    assert all(reason == StopReason.LIMIT for reason in stats.stop_reason)
    assert stats.nfe.tolist() == [1] * z0.shape[0]
    assert torch.equal(result.z, z0)
    assert bool((stats.best_step == 0).all())
    assert stats.abs_trace.shape == (z0.shape[0], 1)
    assert bool(torch.isfinite(stats.abs_trace).all())
    assert not bool(stats.converged.any())


@pytest.mark.parametrize("solver", SOLVERS)
def test_limit_reached(solver: str) -> None:
    f, z0 = tanh_map(0.99, symmetric=True, input_scale=0.1)
    result = get_solver(solver)(f, z0, max_nfe=6, tol=1e-12)
    assert all(reason == StopReason.LIMIT for reason in result.stats.stop_reason)
    assert result.stats.nfe.tolist() == [6] * z0.shape[0]
    assert bool((result.stats.best_step > 0).all())
    assert bool(torch.isfinite(result.z).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_start_at_fixed_point(solver: str) -> None:
    # A starting point that already meets the tolerance costs one evaluation.
    f, z0 = tanh_map(0.9)
    z_star = get_solver("broyden")(f, z0, max_nfe=100, tol=1e-13).z
    result = get_solver(solver)(f, z_star, max_nfe=100, tol=1e-10)
    assert all(reason == StopReason.TOLERANCE for reason in result.stats.stop_reason)
    assert result.stats.nfe.tolist() == [1] * z0.shape[0]
    assert torch.equal(result.z, z_star)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_singular_update_falls_back(solver: str) -> None:
    # On z -> z + 1 every residual difference is zero: Anderson's Gram matrix is
    # singular and Broyden's update denominator is zero, so both must take the
    # plain fixed-point step instead.
    f, z0 = shift_map()
    options = {"ridge": 0.0} if solver == "anderson" else {}
    result = get_solver(solver)(f, z0, max_nfe=10, tol=1e-10, stop_mode="abs", **options)
    plain = get_solver("fixed_point")(f, z0, max_nfe=10, tol=1e-10, stop_mode="abs")
    assert torch.equal(result.stats.abs_trace, plain.stats.abs_trace)
    assert bool(torch.isfinite(result.z).all())
