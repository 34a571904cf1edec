"""Solver behaviour: acceptance on hard problems, batch independence, options, stop modes, arguments."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqbench.solvers import RESIDUAL_EPS, SOLVERS as REGISTRY, StopReason, get_solver
from suites.solvers.maps import SOLVERS, Counting, doubling_map, shift_map, sub_batch_map, tanh_map


def test_registry_has_three_solvers() -> None:
    assert set(SOLVERS) <= set(REGISTRY)
    for name in SOLVERS:
        assert get_solver(name) is REGISTRY[name]


def test_unknown_solver_name() -> None:
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        get_solver("newton")


# Acceptance: Broyden on the symmetric tanh problem with spectral norm 0.99
# (64 dimensions, batch 4, inputs 0.1 * N(0, 1)) reaches a relative residual
# of 1e-10 within 100 evaluations in float64.
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**16))
def test_broyden_symmetric_099(seed: int) -> None:
    f, z0 = tanh_map(0.99, symmetric=True, input_scale=0.1, seed=seed)
    result = get_solver("broyden")(f, z0, max_nfe=100, tol=1e-10)
    assert bool(result.stats.converged.all()), f"stop reasons {result.stats.stop_reason}"
    assert int(result.stats.nfe.max()) <= 100
    assert float(result.stats.rel_residual.max()) <= 1e-10


def test_symmetric_099_beats_fixed_point() -> None:
    # The same problem is hard: plain iteration does not get there in 100 evaluations.
    f, z0 = tanh_map(0.99, symmetric=True, input_scale=0.1)
    result = get_solver("fixed_point")(f, z0, max_nfe=100, tol=1e-10)
    assert not bool(result.stats.converged.all())


def test_anderson_not_slower_than_fixed_point() -> None:
    f, z0 = tanh_map(0.9)
    anderson = get_solver("anderson")(f, z0, max_nfe=300, tol=1e-10)
    plain = get_solver("fixed_point")(f, z0, max_nfe=300, tol=1e-10)
    assert bool(anderson.stats.converged.all())
    assert bool((anderson.stats.nfe <= plain.stats.nfe).all())


@pytest.mark.parametrize("memory", [1, 2, 5])
def test_broyden_limited_memory_converges(memory: int) -> None:
    f, z0 = tanh_map(0.9)
    result = get_solver("broyden")(f, z0, max_nfe=80, tol=1e-10, memory=memory)
    assert bool(result.stats.converged.all()), f"stop reasons {result.stats.stop_reason}"
    assert bool(torch.isfinite(result.z).all())


@pytest.mark.parametrize("memory", [None, 3])
def test_broyden_state_bytes(memory: int | None) -> None:
    f, z0 = tanh_map(0.9)
    max_nfe = 40
    result = get_solver("broyden")(f, z0, max_nfe=max_nfe, tol=1e-10, memory=memory)
    slots = max_nfe - 1 if memory is None else memory
    batch, dim = z0.shape
    assert result.stats.solver_state_bytes == 2 * batch * slots * dim * z0.element_size()


def test_anderson_state_bytes() -> None:
    f, z0 = tanh_map(0.9)
    result = get_solver("anderson")(f, z0, max_nfe=40, tol=1e-10, window=4)
    batch, dim = z0.shape
    assert result.stats.solver_state_bytes == 2 * batch * 4 * dim * z0.element_size()


def test_broyden_first_step_is_f() -> None:
    # H starts at -I, so z1 = z0 - H g(z0) = f(z0).
    f, z0 = tanh_map(0.9)
    result = get_solver("broyden")(f, z0, max_nfe=2, tol=1e-14)
    fixed = get_solver("fixed_point")(f, z0, max_nfe=2, tol=1e-14)
    assert torch.equal(result.stats.abs_trace, fixed.stats.abs_trace)


@pytest.mark.parametrize("solver", SOLVERS)
def test_converged_sample_matches_alone(solver: str) -> None:
    # Samples with small inputs converge early, and each must equal its solve alone.
    scales = torch.tensor([0.05, 1.0, 0.3, 2.0], dtype=torch.float64)
    for_rows = sub_batch_map(0.9, scales)
    z0 = torch.zeros(len(scales), 32, dtype=torch.float64)
    together = get_solver(solver)(for_rows([0, 1, 2, 3]), z0, max_nfe=200, tol=1e-10)
    assert len(set(together.stats.nfe.tolist())) > 1  # the samples stop at different evaluations
    for row in range(len(scales)):
        alone = get_solver(solver)(for_rows([row]), z0[row : row + 1], max_nfe=200, tol=1e-10)
        assert int(together.stats.nfe[row]) == int(alone.stats.nfe[0])
        assert together.stats.stop_reason[row] == alone.stats.stop_reason[0]
        assert torch.allclose(together.z[row], alone.z[0], rtol=0, atol=1e-13)
        assert torch.allclose(together.stats.rel_trace[row], alone.stats.rel_trace[0], rtol=0, atol=1e-13, equal_nan=True)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nfe_counts_every_call(solver: str) -> None:
    f, z0 = tanh_map(0.9, batch=1)
    counting = Counting(f)
    result = get_solver(solver)(counting, z0, max_nfe=100, tol=1e-10)
    assert int(result.stats.nfe[0]) == counting.calls


@pytest.mark.parametrize("solver", SOLVERS)
def test_traces_padded_after_stop(solver: str) -> None:
    f, z0 = tanh_map(0.9)
    max_nfe = 100
    stats = get_solver(solver)(f, z0, max_nfe=max_nfe, tol=1e-8).stats
    assert stats.abs_trace.shape == (z0.shape[0], max_nfe)
    for row, nfe in enumerate(stats.nfe.tolist()):
        assert bool(torch.isfinite(stats.rel_trace[row, :nfe]).all())
        assert bool(torch.isnan(stats.rel_trace[row, nfe:]).all())
        assert float(stats.rel_residual[row]) == float(stats.rel_trace[row, :nfe].min())
        assert float(stats.rel_residual[row]) == float(stats.rel_trace[row, int(stats.best_step[row])])


@pytest.mark.parametrize("solver", SOLVERS)
def test_relative_residual_definition(solver: str) -> None:
    f, z0 = tanh_map(0.9)
    result = get_solver(solver)(f, z0, max_nfe=100, tol=1e-6)
    with torch.no_grad():
        fz = f(result.z)
    absolute = torch.linalg.vector_norm(fz - result.z, dim=1)
    relative = absolute / (torch.linalg.vector_norm(fz, dim=1) + RESIDUAL_EPS)
    assert torch.allclose(result.stats.abs_residual, absolute, rtol=1e-12, atol=0)
    assert torch.allclose(result.stats.rel_residual, relative, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_stop_modes_honoured(solver: str) -> None:
    # With ||f(z*)|| about 6, tol 1e-6 is met sooner in "rel" than in "abs".
    f, z0 = tanh_map(0.9)
    rel = get_solver(solver)(f, z0, max_nfe=200, tol=1e-6, stop_mode="rel").stats
    abs_ = get_solver(solver)(f, z0, max_nfe=200, tol=1e-6, stop_mode="abs").stats
    assert bool((rel.rel_residual <= 1e-6).all())
    assert bool((abs_.abs_residual <= 1e-6).all())
    assert bool((rel.abs_residual > 1e-6).any())
    assert int(abs_.nfe.sum()) > int(rel.nfe.sum())


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_solve(solver: str) -> None:
    f, z0 = tanh_map(0.9, dtype=torch.float32)
    result = get_solver(solver)(f, z0, max_nfe=100, tol=1e-5)
    assert result.z.dtype == torch.float32
    assert bool(result.stats.converged.all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_result_has_no_graph(solver: str) -> None:
    f, z0 = tanh_map(0.9)
    result = get_solver(solver)(f, z0.clone().requires_grad_(), max_nfe=50, tol=1e-8)
    assert not result.z.requires_grad


# Every option changes behaviour.


def _trace(solver: str, f, z0, **options) -> torch.Tensor:
    return get_solver(solver)(f, z0, max_nfe=60, tol=1e-12, **options).stats.abs_trace


def test_fixed_point_damping_effect() -> None:
    f, z0 = tanh_map(0.9)
    slow = get_solver("fixed_point")(f, z0, max_nfe=300, tol=1e-10, damping=0.5)
    fast = get_solver("fixed_point")(f, z0, max_nfe=300, tol=1e-10, damping=1.0)
    assert int(slow.stats.nfe.sum()) > int(fast.stats.nfe.sum())


@pytest.mark.parametrize("option, values", [("window", (1, 5)), ("damping", (1.0, 0.6)), ("ridge", (1e-8, 10.0))])
def test_anderson_option_effect(option: str, values: tuple) -> None:
    f, z0 = tanh_map(0.9)
    first = _trace("anderson", f, z0, **{option: values[0]})
    second = _trace("anderson", f, z0, **{option: values[1]})
    assert not torch.equal(first, second)


def test_anderson_ridge_is_relative() -> None:
    # On an affine map from z0 = 0, scaling the offset scales every iterate.
    # A ridge relative to the Gram diagonal leaves the mixing weights alone,
    # so the NFE and the relative residuals are the same at both scales.
    matrix = 0.9 * torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    offset = torch.randn(2, 16, dtype=torch.float64)
    z0 = torch.zeros(2, 16, dtype=torch.float64)
    traces = []
    for scale in (1.0, 1e-6):
        result = get_solver("anderson")(lambda z: z @ matrix.T + scale * offset, z0, max_nfe=100, tol=1e-10, ridge=1e-4)
        traces.append(result.stats.rel_trace)
    assert torch.allclose(traces[0], traces[1], rtol=1e-6, atol=0, equal_nan=True)


def test_broyden_memory_effect() -> None:
    f, z0 = tanh_map(0.9)
    assert not torch.equal(_trace("broyden", f, z0, memory=2), _trace("broyden", f, z0, memory=None))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("window", [5, 12])
def test_stall_window_effect(solver: str, window: int) -> None:
    f, z0 = shift_map()
    result = get_solver(solver)(f, z0, max_nfe=100, tol=1e-10, stop_mode="abs", stall_window=window)
    assert result.stats.nfe.tolist() == [window + 1] * z0.shape[0]


@pytest.mark.parametrize("factor", [10.0, 1e3])
def test_divergence_factor_effect(factor: float) -> None:
    f, z0, _ = doubling_map()
    result = get_solver("fixed_point")(f, z0, max_nfe=100, tol=1e-10, divergence_factor=factor)
    steps = math.floor(math.log2(factor)) + 1
    assert result.stats.nfe.tolist() == [steps + 1] * z0.shape[0]
    assert all(reason == StopReason.DIVERGENCE for reason in result.stats.stop_reason)


# Invalid arguments name the value and are rejected before f is called.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_nfe": 0}, "max_nfe"),
        ({"max_nfe": 2.0}, "max_nfe"),
        ({"max_nfe": True}, "max_nfe"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": math.nan}, "tol"),
        ({"tol": math.inf}, "tol"),
        ({"stop_mode": "max"}, "stop_mode"),
    ],
)
@pytest.mark.parametrize("solver", SOLVERS)
def test_invalid_arguments(solver: str, kwargs: dict, message: str) -> None:
    f, z0 = tanh_map(0.9, batch=1)
    counting = Counting(f)
    arguments = {"max_nfe": 10, "tol": 1e-6, **kwargs}
    with pytest.raises(ValueError, match=message):
        get_solver(solver)(counting, z0, **arguments)
    assert counting.calls == 0


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("z0", [torch.tensor(1.0), torch.zeros(0, 3)])
def test_invalid_start(solver: str, z0: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="z0"):
        get_solver(solver)(lambda z: z, z0, max_nfe=10, tol=1e-6)


@pytest.mark.parametrize(
    "solver, options, message",
    [
        ("fixed_point", {"damping": 0.0}, "damping"),
        ("fixed_point", {"damping": 1.5}, "damping"),
        ("anderson", {"window": 0}, "window"),
        ("anderson", {"ridge": -1.0}, "ridge"),
        ("anderson", {"damping": 2.0}, "damping"),
        ("broyden", {"memory": 0}, "memory"),
        ("broyden", {"memory": 2.5}, "memory"),
        ("broyden", {"stall_window": 0}, "stall_window"),
        ("anderson", {"divergence_factor": 1.0}, "divergence_factor"),
    ],
)
def test_invalid_option_values(solver: str, options: dict, message: str) -> None:
    f, z0 = tanh_map(0.9, batch=1)
    with pytest.raises(ValueError, match=message):
        get_solver(solver)(f, z0, max_nfe=10, tol=1e-6, **options)


@pytest.mark.parametrize("solver, option", [("fixed_point", "window"), ("anderson", "memory"), ("broyden", "damping")])
def test_unknown_option(solver: str, option: str) -> None:
    f, z0 = tanh_map(0.9, batch=1)
    with pytest.raises(TypeError, match=f"unknown option.*'{option}'"):
        get_solver(solver)(f, z0, max_nfe=10, tol=1e-6, **{option: 1})


@pytest.mark.parametrize("solver", SOLVERS)
def test_wrong_output_shape(solver: str) -> None:
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        get_solver(solver)(lambda z: z[:, :3], z0, max_nfe=10, tol=1e-6)
