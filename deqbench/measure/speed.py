"""Solver speed on the TINY cell, deqbench against torchdeq 0.1.0 on the same f, z0 and tolerance.

Three measurements per problem:

- ``solve_runs``: each solver of each library at each tolerance. One traced
  solve records, for every call of f, the relative residual
  ||f(z) - z|| / ||f(z)|| of each sample at the point f was called on; this
  trace is computed by a wrapper around f, identically for both libraries,
  so NFE-to-tolerance does not depend on how a library books its steps.
  Then ``repeats`` timed solves run with a wrapper that only counts calls.
- ``train_step_runs``: one training step (forward solve, extra f call, head,
  cross-entropy, IFT backward solve) per solver and library, timed.
- ``gradient_agreement``: the parameter gradients of that step under both
  libraries' IFT, compared by relative error and cosine similarity.

Times are wall-clock (time.perf_counter) over repeats after one untimed
warm-up run, with torch's intra-op threads as configured by the caller.
Records give the median; the overhead ratio uses minima, because load from
other jobs only ever adds time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from deqbench.measure import baseline
from deqbench.measure.problems import Problem, spectral_radius_estimate
from deqbench.scenarios import TINY

SOLVERS = ("fixed_point", "anderson", "broyden")
LIBRARIES = ("deqbench", "torchdeq")
TOLERANCES = (1e-3, 1e-5)

# Added to ||f(z)|| in the wrapper's relative residual, as in deqbench's solvers.
RESIDUAL_EPS = 1e-12


@dataclass
class CountingMap:
    """f wrapped to count its calls and, when ``record`` is set, each sample's relative residual per call."""

    f: Callable[[Tensor], Tensor]
    record: bool = False
    calls: int = 0
    residuals: list[Tensor] = field(default_factory=list)  # per call, (B,) relative residual at the input

    def __call__(self, z: Tensor) -> Tensor:
        fz = self.f(z)
        self.calls += 1
        if self.record:
            with torch.no_grad():
                # (B, ...) -> (B, D) for the per-sample norms
                step = (fz - z).flatten(1).norm(dim=1)
                self.residuals.append((step / (fz.flatten(1).norm(dim=1) + RESIDUAL_EPS)).cpu())
        return fz


def library_solve(library: str, solver: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Return solve(f, z0, *, max_nfe, tol) -> (z, reported rel residual (B,)) for one library's solver."""
    if library == "torchdeq":
        return lambda f, z0, *, max_nfe, tol: baseline.solve(solver, f, z0, max_nfe=max_nfe, tol=tol)
    if library != "deqbench":
        raise ValueError(f"library = {library!r} is invalid; expected one of {LIBRARIES}")

    from deqbench.solvers import get_solver

    solve = get_solver(solver)

    def run(f: Callable[[Tensor], Tensor], z0: Tensor, *, max_nfe: int, tol: float) -> tuple[Tensor, Tensor]:
        result = solve(f, z0, max_nfe=max_nfe, tol=tol, stop_mode="rel")
        return result.z, result.stats.rel_residual

    return run


def time_f(f: Callable[[Tensor], Tensor], z0: Tensor, repeats: int = 20) -> float:
    """Return the fastest of ``repeats`` batched f evaluations without autograd, in seconds.

    The minimum, not the median, because other jobs on a shared machine only
    ever add time; the overhead ratio divides by this figure.
    """
    with torch.no_grad():
        z = f(f(z0))  # warm-up, and a state away from zero
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f(z)
            times.append(time.perf_counter() - start)
    return min(times)


def _median_iqr(times: list[float]) -> tuple[float, float]:
    if len(times) < 2:
        return times[0], 0.0
    quartiles = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), quartiles[2] - quartiles[0]


def _nfe_to_tolerance(residuals: list[Tensor], tol: float) -> int | None:
    """Return the first call count after which every sample has had a residual <= tol, or None."""
    if not residuals:
        return None
    trace = torch.stack(residuals, dim=1)  # (B, calls)
    below = (trace <= tol).cumsum(dim=1) > 0  # (B, calls): reached at or before this call
    everyone = below.all(dim=0)  # (calls,)
    hits = everyone.nonzero()
    return int(hits[0]) + 1 if len(hits) else None


def describe_problem(problem: Problem, *, power_iterations: int = 30, max_nfe: int = 60) -> dict[str, Any]:
    """Return the problem record: sizes, f time and a spectral-radius estimate at deqbench Broyden's solution."""
    from deqbench.solvers import get_solver

    f_time = time_f(problem.f, problem.z0)
    with torch.no_grad():
        z = get_solver("broyden")(problem.f, problem.z0, max_nfe=max_nfe, tol=1e-6, stop_mode="rel").z
    radius = spectral_radius_estimate(problem.f, z, iterations=power_iterations)
    return {
        "name": problem.name,
        "description": problem.description,
        "images": problem.images,
        "batch_size": problem.batch_size,
        "state_size": problem.state_size,
        "f_eval_time_s": f_time,
        "contraction_estimate": radius,
    }


def solve_run(
    problem: Problem,
    library: str,
    solver: str,
    tol: float,
    *,
    max_nfe: int,
    f_time: float,
    repeats: int = 3,
) -> dict[str, Any]:
    """Measure one solve: trace, NFE, time, residuals and overhead (see solvers.schema.json)."""
    solve = library_solve(library, solver)

    # Traced solve, untimed: residual per call of f, and the returned iterate.
    traced = CountingMap(problem.f, record=True)
    with torch.no_grad():
        z, reported = solve(traced, problem.z0, max_nfe=max_nfe, tol=tol)
        fz = problem.f(z)
    verified = (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + RESIDUAL_EPS)

    # Timed solves with a counting-only wrapper.
    times = []
    for _ in range(repeats):
        counted = CountingMap(problem.f)
        with torch.no_grad():
            start = time.perf_counter()
            solve(counted, problem.z0, max_nfe=max_nfe, tol=tol)
            times.append(time.perf_counter() - start)
    wall, iqr = _median_iqr(times)

    # Largest residual over the batch after each call, for the plots.
    worst = torch.stack(traced.residuals, dim=1).max(dim=0).values.tolist()
    final = float(reported.max())
    return {
        "library": library,
        "solver": solver,
        "problem": problem.name,
        "tolerance": tol,
        "max_nfe": max_nfe,
        "nfe": counted.calls,
        "nfe_to_tolerance": _nfe_to_tolerance(traced.residuals, tol),
        "wall_time_s": wall,
        "wall_time_iqr_s": iqr,
        "wall_time_min_s": min(times),
        "final_rel_residual": final,
        "verified_rel_residual": float(verified.max()),
        "overhead_ratio": min(times) / (counted.calls * f_time),
        "reached": bool(final <= tol),
        "trace": [[i + 1, value if value == value else None] for i, value in enumerate(worst)],
    }


@dataclass(frozen=True)
class StepBudget:
    """Budgets of one training step: TINY's forward and backward limits and tolerance by default."""

    forward_nfe: int = TINY.deq.forward.max_nfe  # evaluations of f
    backward_nfe: int = TINY.deq.backward.max_nfe  # vector-Jacobian products
    tol: float = TINY.deq.forward.tol  # relative residual, both solves


def deqbench_step(problem: Problem, solver: str, budget: StepBudget) -> tuple[list[Tensor], int, int]:
    """Run one forward and backward step with deqbench's IFT; return the gradients and both NFEs.

    The step is the classifier's implicit forward spelled out (stem and
    weights, implicit_solve, head) so that f can be wrapped and counted the
    same way as in ``torchdeq_step``.
    """
    from deqbench.implicit import BackwardSpec, SolveSpec, implicit_solve

    model = problem.model
    forward = SolveSpec(solver, budget.forward_nfe, budget.tol, "rel")
    backward = BackwardSpec(mode="ift", solve=SolveSpec(solver, budget.backward_nfe, budget.tol, "rel"))
    model.zero_grad(set_to_none=True)

    # Stem and weights with autograd, then the solve with deqbench's IFT and the head.
    equilibrium = model.equilibrium_problem(problem.x)
    counted = CountingMap(equilibrium.f)
    output = implicit_solve(counted, equilibrium.z0, forward, backward)
    forward_calls = counted.calls
    logits = model.head(equilibrium.layout.split(output.z))
    F.cross_entropy(logits, problem.labels).backward()

    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    backward_nfe = int(output.backward.stats.nfe.max()) if output.backward.stats is not None else 0
    # The forward NFE leaves out the one tracked f call at the solution.
    return grads, forward_calls - 1, backward_nfe


def torchdeq_step(problem: Problem, solver: str, budget: StepBudget) -> tuple[list[Tensor], int, int]:
    """Run the same step with torchdeq's IFT on deqbench's f, stem and head; return gradients and NFEs.

    The forward NFE counts f calls before the backward, less torchdeq's one
    tracked call at the solution. The backward NFE counts the calls of its
    backward solver's map. torchdeq's backward also evaluates f once more at
    the solution to rebuild the graph it differentiates, and neither count
    includes that call.
    """
    model = problem.model
    deq, backward_solver = baseline.make_deq(
        solver, forward_nfe=budget.forward_nfe, backward_nfe=budget.backward_nfe, tol=budget.tol
    )
    model.zero_grad(set_to_none=True)
    backward_solver.calls.clear()

    # Stem and weights with autograd, then torchdeq's solve and the head.
    equilibrium = model.equilibrium_problem(problem.x)
    counted = CountingMap(equilibrium.f)
    z_out, _ = deq(counted, equilibrium.z0)
    forward_calls = counted.calls
    logits = model.head(equilibrium.layout.split(z_out[-1]))
    F.cross_entropy(logits, problem.labels).backward()

    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return grads, forward_calls - 1, sum(backward_solver.calls)


def train_step_runs(
    problem: Problem, solver: str, budget: StepBudget, *, repeats: int = 3, libraries: tuple[str, ...] = LIBRARIES
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Time one training step per library and compare the libraries' gradients.

    Returns the train-step records and the gradient record (None without torchdeq).
    """
    steps = {"deqbench": deqbench_step, "torchdeq": torchdeq_step}
    records, grads = [], {}
    for library in libraries:
        step = steps[library]

        # Warm-up run: gradients and NFEs; then timed runs.
        grads[library], forward_nfe, backward_nfe = step(problem, solver, budget)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step(problem, solver, budget)
            times.append(time.perf_counter() - start)
        wall, iqr = _median_iqr(times)
        records.append(
            {
                "library": library,
                "solver": solver,
                "problem": problem.name,
                "tolerance": budget.tol,
                "batch_size": problem.batch_size,
                "wall_time_s": wall,
                "wall_time_iqr_s": iqr,
                "forward_nfe": forward_nfe,
                "backward_nfe": backward_nfe,
            }
        )

    agreement = None
    if "deqbench" in grads and "torchdeq" in grads:
        agreement = {"solver": solver, "problem": problem.name, "tolerance": budget.tol}
        agreement.update(compare_gradients(grads["deqbench"], grads["torchdeq"]))
    return records, agreement


def compare_gradients(ours: list[Tensor], theirs: list[Tensor]) -> dict[str, float]:
    """Return relative error and cosine similarity of two gradient lists, over all parameters at once."""
    a = torch.cat([g.flatten().double() for g in ours])  # (P,)
    b = torch.cat([g.flatten().double() for g in theirs])  # (P,)
    a_norm, b_norm = float(a.norm()), float(b.norm())
    return {
        "rel_error": float((a - b).norm()) / max(b_norm, 1e-300),
        "cosine": float(a @ b) / max(a_norm * b_norm, 1e-300),
        "deqbench_grad_norm": a_norm,
        "torchdeq_grad_norm": b_norm,
    }


METHOD = {
    "nfe": "calls of f on the whole batch during one solve, counted by a wrapper around f",
    "nfe_to_tolerance": "first call count after which every sample had a relative residual at or below the tolerance, "
    "the residual being computed by the wrapper at the point f was called on",
    "wall_time_s": "median of `repeats` solves after one untimed traced solve, time.perf_counter, no autograd",
    "f_eval_time_s": "fastest of 20 batched f evaluations without autograd",
    "overhead_ratio": "wall_time_min_s / (nfe * f_eval_time_s), both minima because load from other jobs only adds "
    "time; 1 means the solver costs nothing beyond its evaluations of f",
    "final_rel_residual": "largest over the batch of the lowest relative residual the library reports",
    "verified_rel_residual": "largest over the batch of ||f(z)-z|| / ||f(z)|| recomputed at the returned z",
    "train_step": "forward solve + extra f call + head + cross-entropy + IFT backward solve, model in eval mode "
    "(dropout off, BatchNorm running statistics) so both libraries see the same f; same solver forward and backward; "
    "forward_nfe counts the forward solver's calls of f (the tracked call at the solution left out), backward_nfe "
    "the backward solver's vector-Jacobian products; torchdeq's backward also re-evaluates f once at the solution",
    "gradients": "all parameter gradients of that step flattened into one vector per library",
}


def benchmark(
    problems: list[Problem],
    *,
    solvers: tuple[str, ...] = SOLVERS,
    tolerances: tuple[float, ...] = TOLERANCES,
    max_nfe: int = 60,
    repeats: int = 3,
    with_torchdeq: bool = True,
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every measurement of this module and return the body of solvers.json (without env).

    Solve runs cover every problem; training steps and gradient comparisons
    only the problems other than tiny_init, where no backward solve can
    converge. Training steps run at TINY's budget (18 forward, 20 backward
    evaluations, tolerance 1e-3) and at ``max_nfe`` for both solves with the
    tightest tolerance. ``on_record(kind, record)`` reports progress.
    """
    libraries = LIBRARIES if with_torchdeq else ("deqbench",)
    report: dict[str, Any] = {
        "torchdeq_version": baseline.version() if with_torchdeq else None,
        "method": {**METHOD, "repeats": repeats},
        "problems": [],
        "runs": [],
        "train_steps": [],
        "gradients": [],
    }

    def add(kind: str, record: dict[str, Any]) -> None:
        report[kind].append(record)
        if on_record is not None:
            on_record(kind, record)

    budgets = [StepBudget(), StepBudget(forward_nfe=max_nfe, backward_nfe=max_nfe, tol=min(tolerances))]
    for problem in problems:
        description = describe_problem(problem, max_nfe=max_nfe)
        add("problems", description)

        # Solves at every tolerance, both libraries.
        for solver in solvers:
            for tol in tolerances:
                for library in libraries:
                    run = solve_run(
                        problem, library, solver, tol, max_nfe=max_nfe, f_time=description["f_eval_time_s"], repeats=repeats
                    )
                    add("runs", run)

        # Training steps and gradient agreement on problems whose backward solve can converge.
        if problem.name == "tiny_init":
            continue
        for budget in budgets:
            for solver in solvers:
                records, agreement = train_step_runs(problem, solver, budget, repeats=repeats, libraries=libraries)
                for record in records:
                    add("train_steps", record)
                if agreement is not None:
                    add("gradients", agreement)
    return report


def nfe_comparison(report: dict[str, Any], tol: float = 1e-5) -> list[dict[str, Any]]:
    """Compare NFE to ``tol`` of each solver between the libraries, per problem.

    ``passed`` is True when deqbench reaches the tolerance with no more
    evaluations than torchdeq's same solver, or reaches it where torchdeq
    does not. It is False when deqbench needs more evaluations or misses a
    tolerance that torchdeq reaches, and None when neither library reaches it.
    """
    runs = {(r["problem"], r["library"], r["solver"]): r for r in report["runs"] if r["tolerance"] == tol}
    checks = []
    for (problem, library, solver), ours in sorted(runs.items()):
        theirs = runs.get((problem, "torchdeq", solver))
        if library != "deqbench" or theirs is None:
            continue

        ours_nfe, theirs_nfe = ours["nfe_to_tolerance"], theirs["nfe_to_tolerance"]
        if ours_nfe is None and theirs_nfe is None:
            passed = None
        else:
            passed = ours_nfe is not None and (theirs_nfe is None or ours_nfe <= theirs_nfe)
        checks.append(
            {
                "problem": problem,
                "solver": solver,
                "tolerance": tol,
                "deqbench_nfe": ours_nfe,
                "torchdeq_nfe": theirs_nfe,
                "passed": passed,
            }
        )
    return checks
