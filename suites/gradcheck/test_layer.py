"""The implicit layer's contract: z0 gradients, repeated calls, records, specs, dtypes and devices."""

from __future__ import annotations

import logging

import pytest
import torch

from deqbench import implicit
from deqbench.implicit import (
    BackwardRecord,
    BackwardSpec,
    ImplicitLayer,
    SolveSpec,
    implicit_solve,
)
from deqbench.scenarios import TINY
from suites.gradcheck import cases, problems
from suites.gradcheck.references import max_rel_error
from suites.gradcheck.tolerances import TOLERANCES

pytestmark = pytest.mark.gradcheck

F64 = TOLERANCES["float64"]
TIGHT = SolveSpec("broyden", max_nfe=200, tol=F64["solver_tol"])
MODES = {
    "ift": BackwardSpec("ift", TIGHT),
    "phantom": BackwardSpec("phantom", steps=3, damping=0.5),
    "unrolled": BackwardSpec("unrolled", steps=10),
}


def _tanh():
    """Return the tanh problem (rho 0.9) with fresh leaf parameters and its map."""
    problem = cases.problem("tanh_rho0.9")
    params = {name: value.detach().clone().requires_grad_() for name, value in problem.params.items()}
    return problem, params


@pytest.mark.parametrize("mode", ["ift", "phantom"])
def test_z0_gradient_is_zero(mode: str) -> None:
    problem, params = _tanh()
    z0 = torch.randn_like(problem.z0).requires_grad_()
    out = implicit_solve(problem.f(params), z0, TIGHT, MODES[mode])
    (grad,) = torch.autograd.grad(problem.loss(out.z), [z0], allow_unused=True)
    assert grad is None or bool((grad == 0).all())


def test_z0_gradient_unrolled_nonzero() -> None:
    problem, params = _tanh()
    z0 = torch.randn_like(problem.z0).requires_grad_()
    out = implicit_solve(problem.f(params), z0, TIGHT, MODES["unrolled"])
    (grad,) = torch.autograd.grad(problem.loss(out.z), [z0])
    assert float(grad.abs().max()) > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_layer_called_twice(mode: str) -> None:
    # Two calls of one layer in one graph: the gradient of the summed loss is
    # the sum of the separate gradients.
    problem, params = _tanh()
    layer = ImplicitLayer(TIGHT, MODES[mode])
    other_x = torch.randn_like(params["x"])

    def f_other(z: torch.Tensor) -> torch.Tensor:
        return problem.cell(z, {**params, "x": params["x"] + other_x})

    names = list(params)
    first = torch.autograd.grad(problem.loss(layer(problem.f(params), problem.z0).z), list(params.values()))
    second = torch.autograd.grad(problem.loss(layer(f_other, problem.z0).z), list(params.values()))
    both_loss = problem.loss(layer(problem.f(params), problem.z0).z) + problem.loss(layer(f_other, problem.z0).z)
    both = torch.autograd.grad(both_loss, list(params.values()))

    expected = {name: a + b for name, a, b in zip(names, first, second)}
    assert max_rel_error(dict(zip(names, both)), expected) < 1e-12


def test_expanded_gradient_input() -> None:
    # The gradient of z.sum() arrives as an expanded tensor with stride 0.
    problem, params = _tanh()
    grads = []
    for weights in (None, torch.ones_like(problem.z0)):
        out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
        loss = out.z.sum() if weights is None else (weights * out.z).sum()
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    assert max_rel_error(grads[0], grads[1]) < 1e-12


def test_ift_output_fields() -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
    assert out.z_star.is_leaf
    assert out.z_star.requires_grad
    assert out.f_out.requires_grad
    assert torch.equal(out.z.detach(), out.f_out.detach())
    assert out.z.shape == problem.z0.shape


def test_ift_z_is_fixed_point() -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
    with torch.no_grad():
        residual = (problem.f(params)(out.z) - out.z).norm() / out.z.norm()
    assert float(residual) < 1e-10


def test_record_filled_by_backward() -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
    assert out.backward.stats is None
    problem.loss(out.z).backward()
    assert out.backward.stats is not None
    assert bool(out.backward.stats.converged.all())
    assert int(out.backward.stats.nfe.min()) >= 1


@pytest.mark.parametrize("mode", ["phantom", "unrolled"])
def test_record_empty_without_solve(mode: str) -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES[mode])
    problem.loss(out.z).backward()
    assert out.backward.stats is None


def test_phantom_fields() -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["phantom"])
    assert out.z_star.is_leaf
    assert out.f_out is not None
    assert out.f_out.requires_grad


def test_unrolled_fields() -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["unrolled"])
    assert out.z_star is None
    assert out.f_out is None
    assert out.forward_stats.abs_trace.shape == (problem.z0.shape[0], 10)


def test_unrolled_stats_describe_iterations() -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, SolveSpec(tol=1e-3), MODES["unrolled"])
    trace = out.forward_stats.rel_trace
    assert bool((out.forward_stats.rel_residual == trace.min(dim=1).values).all())
    assert bool((out.forward_stats.best_step == trace.argmin(dim=1)).all())
    assert bool(out.forward_stats.converged.all())


def test_backward_miss_logs_warning(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(implicit, "_backward_misses", 0)
    problem, params = _tanh()
    backward = BackwardSpec("ift", SolveSpec("fixed_point", max_nfe=2, tol=1e-12))
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, backward)
    with caplog.at_level(logging.WARNING, logger="deqbench.implicit"):
        problem.loss(out.z).backward()
    assert not bool(out.backward.stats.converged.any())
    assert any("missed tol" in record.getMessage() for record in caplog.records)


def test_backward_miss_warnings_limited(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Misses 1, 2 and 4 are logged, miss 3 only counted; every record keeps its stats.
    monkeypatch.setattr(implicit, "_backward_misses", 0)
    problem, params = _tanh()
    backward = BackwardSpec("ift", SolveSpec("fixed_point", max_nfe=2, tol=1e-12))
    records = []
    with caplog.at_level(logging.WARNING, logger="deqbench.implicit"):
        for _ in range(4):
            out = implicit_solve(problem.f(params), problem.z0, TIGHT, backward)
            problem.loss(out.z).backward()
            records.append(out.backward)
    assert len(caplog.records) == 3
    assert all(record.stats is not None for record in records)


def test_backward_converged_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    problem, params = _tanh()
    out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
    with caplog.at_level(logging.WARNING, logger="deqbench.implicit"):
        problem.loss(out.z).backward()
    assert caplog.records == []


def test_backward_options_reach_solver() -> None:
    # A backward option takes effect: damping 0.5 needs more evaluations.
    problem, params = _tanh()
    nfe = {}
    for damping in (1.0, 0.5):
        spec = SolveSpec("fixed_point", max_nfe=500, tol=1e-10, options={"damping": damping})
        out = implicit_solve(problem.f(params), problem.z0, TIGHT, BackwardSpec("ift", spec))
        problem.loss(out.z).backward()
        nfe[damping] = int(out.backward.stats.nfe.max())
    assert nfe[0.5] > nfe[1.0]


def test_forward_options_reach_solver() -> None:
    problem, params = _tanh()
    nfe = {}
    for damping in (1.0, 0.5):
        spec = SolveSpec("fixed_point", max_nfe=500, tol=1e-10, options={"damping": damping})
        nfe[damping] = int(implicit_solve(problem.f(params), problem.z0, spec, MODES["ift"]).forward_stats.nfe.max())
    assert nfe[0.5] > nfe[1.0]


def test_no_grad_builds_no_graph() -> None:
    problem, params = _tanh()
    with torch.no_grad():
        out = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
    assert not out.z.requires_grad


def test_float32_keeps_dtype() -> None:
    problem, params = _tanh()
    params32 = {name: value.detach().float().requires_grad_() for name, value in params.items()}
    out = implicit_solve(problem.f(params32), problem.z0.float(), SolveSpec(tol=1e-5), MODES["ift"])
    problem.loss(out.z.double()).backward()
    assert out.z.dtype == torch.float32
    assert params32["W"].grad.dtype == torch.float32


def test_layer_holds_specs() -> None:
    layer = ImplicitLayer(TIGHT, MODES["phantom"])
    assert layer.forward_spec is TIGHT
    assert layer.backward_spec is MODES["phantom"]
    assert "phantom" in repr(layer)
    assert list(layer.parameters()) == []


def test_layer_defaults() -> None:
    layer = ImplicitLayer()
    assert layer.forward_spec == SolveSpec()
    assert layer.backward_spec == BackwardSpec()
    assert BackwardRecord().stats is None


def test_spec_from_config() -> None:
    spec = SolveSpec.from_config(TINY.deq.backward, memory=5)
    assert spec.solver == TINY.deq.backward.solver
    assert spec.max_nfe == TINY.deq.backward.max_nfe
    assert spec.tol == TINY.deq.backward.tol
    assert spec.stop_mode == TINY.deq.backward.stop_mode
    assert dict(spec.options) == {"memory": 5}


def test_spec_copies_options() -> None:
    options = {"damping": 0.5}
    spec = SolveSpec("fixed_point", options=options)
    options["damping"] = 0.1
    assert spec.options["damping"] == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"solver": "newton"}, "unknown solver"),
        ({"max_nfe": 0}, "max_nfe"),
        ({"max_nfe": 2.5}, "max_nfe"),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"stop_mode": "max"}, "stop_mode"),
        ({"options": [("damping", 0.5)]}, "options"),
    ],
)
def test_solve_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SolveSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "jfb"}, "backward mode"),
        ({"steps": 0}, "steps"),
        ({"damping": 0.0}, "damping"),
        ({"damping": 1.5}, "damping"),
        ({"solve": "broyden"}, "SolveSpec"),
    ],
)
def test_backward_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackwardSpec(**kwargs)


def test_unknown_solver_option_rejected() -> None:
    problem, params = _tanh()
    spec = SolveSpec("broyden", options={"window": 3})
    with pytest.raises(TypeError, match="window"):
        implicit_solve(problem.f(params), problem.z0, spec, MODES["ift"])


def test_non_flat_state_shape() -> None:
    # The layer and solvers accept z0 of shape (B, ...), not only (B, D).
    problem, params = _tanh()
    batch, dim = problem.z0.shape

    def f_grid(z: torch.Tensor) -> torch.Tensor:
        return problem.cell(z.reshape(batch, dim), params).reshape(batch, 2, dim // 2)

    out = implicit_solve(f_grid, problem.z0.reshape(batch, 2, dim // 2), TIGHT, MODES["ift"])
    flat = implicit_solve(problem.f(params), problem.z0, TIGHT, MODES["ift"])
    assert out.z.shape == (batch, 2, dim // 2)
    assert torch.allclose(out.z.reshape(batch, dim), flat.z, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_matches_cpu(mode: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    problem = problems.conv_cell()
    grads = {}
    for device in ("cpu", "cuda"):
        params = {name: value.detach().to(device).requires_grad_() for name, value in problem.params.items()}
        out = implicit_solve(problem.f(params), problem.z0.to(device), TIGHT, MODES[mode])
        loss = (problem.loss_weights.to(device) * out.z).sum() + 0.5 * (out.z * out.z).sum()
        grads[device] = dict(zip(params, (g.cpu() for g in torch.autograd.grad(loss, list(params.values())))))
    assert max_rel_error(grads["cuda"], grads["cpu"]) < 1e-8
