"""Solver speed measurement: counting, NFE to tolerance, the torchdeq adapter and the benchmarks.

Tests marked ``slow`` run in ``nox -s bench``, where torchdeq 0.1.0 is on
PYTHONPATH; those that need it skip elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deqbench.checkpoints import save_checkpoint
from deqbench.measure import baseline
from deqbench.measure.problems import (
    Problem,
    load_images,
    load_trained_tiny,
    make_contractive,
    spectral_radius_estimate,
    tiny_model,
)
from deqbench.measure.speed import (
    CountingMap,
    StepBudget,
    _nfe_to_tolerance,
    compare_gradients,
    deqbench_step,
    library_solve,
    nfe_comparison,
    solve_run,
    torchdeq_step,
)

SOLVERS = ("fixed_point", "anderson", "broyden")


def test_counting_map_counts_calls(toy_problem: Problem) -> None:
    counted = CountingMap(toy_problem.f, record=True)
    z = counted(toy_problem.z0)
    counted(z)

    assert counted.calls == 2
    assert len(counted.residuals) == 2
    assert counted.residuals[0].shape == (toy_problem.batch_size,)


def test_counting_map_residual_value(toy_problem: Problem) -> None:
    counted = CountingMap(toy_problem.f, record=True)
    fz = counted(toy_problem.z0)

    # At z0 = 0 the relative residual ||f(0) - 0|| / ||f(0)|| is 1.
    assert torch.allclose(counted.residuals[0], torch.ones(toy_problem.batch_size))
    assert fz.shape == toy_problem.z0.shape


def test_nfe_to_tolerance_waits_for_batch() -> None:
    residuals = [torch.tensor([1.0, 1.0]), torch.tensor([1e-6, 0.5]), torch.tensor([0.3, 1e-6])]

    # Sample 0 reached at call 2 (its later value no longer matters), sample 1 at call 3.
    assert _nfe_to_tolerance(residuals, 1e-5) == 3


def test_nfe_to_tolerance_never() -> None:
    assert _nfe_to_tolerance([torch.tensor([1.0]), torch.tensor([0.5])], 1e-5) is None


def test_solve_run_toy_record(toy_problem: Problem) -> None:
    run = solve_run(toy_problem, "deqbench", "anderson", 1e-5, max_nfe=50, f_time=1e-4, repeats=2)

    assert run["reached"]
    assert run["nfe"] == len(run["trace"])
    assert run["nfe_to_tolerance"] <= run["nfe"]
    assert run["verified_rel_residual"] <= 1e-4
    assert run["overhead_ratio"] > 0


def test_solve_run_limit_unreached(toy_problem: Problem) -> None:
    run = solve_run(toy_problem, "deqbench", "fixed_point", 1e-5, max_nfe=3, f_time=1e-4, repeats=1)

    assert not run["reached"]
    assert run["nfe"] == 3
    assert run["nfe_to_tolerance"] is None


def test_library_solve_rejects_name() -> None:
    with pytest.raises(ValueError, match="library = 'jaxopt' is invalid"):
        library_solve("jaxopt", "broyden")


def test_compare_gradients_identical() -> None:
    grads = [torch.randn(3, 4), torch.randn(5)]
    result = compare_gradients(grads, [g.clone() for g in grads])

    assert result["rel_error"] == 0.0
    assert result["cosine"] == pytest.approx(1.0)


def test_compare_gradients_scaled() -> None:
    grads = [torch.randn(3, 4), torch.randn(5)]
    result = compare_gradients([1.5 * g for g in grads], grads)

    assert result["rel_error"] == pytest.approx(0.5)
    assert result["cosine"] == pytest.approx(1.0)


def _report(ours: int | None, theirs: int | None) -> dict[str, object]:
    runs = [
        {"problem": "p", "library": "deqbench", "solver": "broyden", "tolerance": 1e-5, "nfe_to_tolerance": ours},
        {"problem": "p", "library": "torchdeq", "solver": "broyden", "tolerance": 1e-5, "nfe_to_tolerance": theirs},
    ]
    return {"runs": runs}


@pytest.mark.parametrize(
    ("ours", "theirs", "passed"),
    [(10, 12, True), (12, 12, True), (13, 12, False), (None, 12, False), (30, None, True), (None, None, None)],
)
def test_nfe_comparison_rule(ours: int | None, theirs: int | None, passed: bool | None) -> None:
    (check,) = nfe_comparison(_report(ours, theirs))

    assert check["passed"] is passed


def test_max_iter_for_budget() -> None:
    assert baseline.max_iter_for("fixed_point", 20) == 20
    assert baseline.max_iter_for("anderson", 20) == 20
    assert baseline.max_iter_for("broyden", 20) == 19


def test_max_iter_for_rejects_solver() -> None:
    with pytest.raises(ValueError, match="solver = 'newton' is invalid"):
        baseline.max_iter_for("newton", 20)


def test_random_images_fallback() -> None:
    images, labels, source = load_images(4, None)

    assert images.shape == (4, 3, 32, 32)
    assert labels.shape == (4,)
    assert source.startswith("random")


def test_load_images_rejects_count() -> None:
    with pytest.raises(ValueError, match="count = 0 is invalid"):
        load_images(0, None)


def test_make_contractive_rejects_factor() -> None:
    with pytest.raises(ValueError, match="rebalance = 0.5 is invalid"):
        make_contractive(tiny_model(), torch.randn(2, 3, 32, 32), 0.5)


def test_trained_tiny_loads(tmp_path: Path) -> None:
    trained = tiny_model(seed=1)
    path = save_checkpoint(tmp_path, 1, {"model": trained.state_dict()}, {"scenario": "TINY"})
    loaded = load_trained_tiny(path)

    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not loaded.training


def test_checkpoint_without_model_rejected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"optimizer": {}}, {"scenario": "TINY"})

    with pytest.raises(ValueError, match="no 'model' entry"):
        load_trained_tiny(path)


@pytest.mark.data
def test_cifar_images_round_robin(cifar_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = cifar_batch

    assert images.shape == (8, 3, 32, 32)
    assert labels.tolist() == list(range(8))
    # Normalized with the CIFAR-10 mean and std: values of order 1, not [0, 1] pixels.
    assert images.min() < -0.5


@pytest.mark.data
def test_contractive_cell_contracts(contractive_problem: Problem) -> None:
    counted = CountingMap(contractive_problem.f, record=True)
    z = contractive_problem.z0
    with torch.no_grad():
        for _ in range(30):
            z = counted(z)

    assert spectral_radius_estimate(contractive_problem.f, z, iterations=15) < 1.0
    assert _nfe_to_tolerance(counted.residuals, 1e-5) is not None


@pytest.mark.data
def test_init_cell_not_contractive(cifar_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = cifar_batch
    with torch.no_grad():
        problem = tiny_model().equilibrium_problem(images)
        z = problem.z0
        for _ in range(10):
            z = problem.f(z)

    assert spectral_radius_estimate(problem.f, z, iterations=10) > 1.0


# ---------------------------------------------------------------- torchdeq and timings (nox -s bench)

torchdeq_needed = pytest.mark.skipif(not baseline.available(), reason="torchdeq not installed; run nox -s bench")


@pytest.mark.slow
@torchdeq_needed
@pytest.mark.parametrize("solver", SOLVERS)
def test_torchdeq_spends_budget(toy_problem: Problem, solver: str) -> None:
    counted = CountingMap(toy_problem.f)
    with torch.no_grad():
        baseline.solve(solver, counted, toy_problem.z0, max_nfe=17, tol=1e-30)

    assert counted.calls == 17


@pytest.mark.slow
@torchdeq_needed
@pytest.mark.parametrize("solver", SOLVERS)
def test_torchdeq_reaches_toy_tolerance(toy_problem: Problem, solver: str) -> None:
    run = solve_run(toy_problem, "torchdeq", solver, 1e-5, max_nfe=100, f_time=1e-4, repeats=1)

    assert run["reached"]


@pytest.mark.slow
@pytest.mark.data
@torchdeq_needed
@pytest.mark.parametrize("solver", SOLVERS)
def test_ift_gradients_agree(contractive_problem: Problem, solver: str) -> None:
    """Both libraries' IFT on the same f at tolerance 1e-5: the gradients agree to about the tolerance."""
    budget = StepBudget(forward_nfe=60, backward_nfe=60, tol=1e-5)
    ours, _, _ = deqbench_step(contractive_problem, solver, budget)
    theirs, _, _ = torchdeq_step(contractive_problem, solver, budget)
    agreement = compare_gradients(ours, theirs)

    assert agreement["cosine"] > 0.999
    assert agreement["rel_error"] < 1e-2


@pytest.mark.slow
@pytest.mark.data
@torchdeq_needed
@pytest.mark.parametrize("solver", SOLVERS)
def test_nfe_not_above_torchdeq(contractive_problem: Problem, solver: str) -> None:
    """deqbench needs no more evaluations than torchdeq's same solver to reach 1e-5."""
    ours = solve_run(contractive_problem, "deqbench", solver, 1e-5, max_nfe=60, f_time=1.0, repeats=1)
    theirs = solve_run(contractive_problem, "torchdeq", solver, 1e-5, max_nfe=60, f_time=1.0, repeats=1)

    assert ours["nfe_to_tolerance"] is not None
    assert theirs["nfe_to_tolerance"] is None or ours["nfe_to_tolerance"] <= theirs["nfe_to_tolerance"]


@pytest.mark.slow
@pytest.mark.data
def test_benchmark_f_eval(benchmark, contractive_problem: Problem) -> None:
    z = contractive_problem.z0
    with torch.no_grad():
        out = benchmark.pedantic(contractive_problem.f, args=(z,), rounds=10, warmup_rounds=2)

    assert out.shape == z.shape


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("library", ("deqbench", "torchdeq"))
@pytest.mark.parametrize("solver", SOLVERS)
def test_benchmark_solve(benchmark, contractive_problem: Problem, library: str, solver: str) -> None:
    if library == "torchdeq" and not baseline.available():
        pytest.skip("torchdeq not installed; run nox -s bench")
    solve = library_solve(library, solver)
    benchmark.extra_info.update({"library": library, "solver": solver, "tolerance": 1e-5})

    with torch.no_grad():
        _, reported = benchmark.pedantic(
            solve, args=(contractive_problem.f, contractive_problem.z0), kwargs={"max_nfe": 60, "tol": 1e-5}, rounds=3, warmup_rounds=1
        )

    assert float(reported.max()) <= 1e-5
