"""The torchdeq 0.1.0 baseline: its solvers and IFT backward on deqbench's fixed-point maps.

torchdeq is not a dependency of deqbench. The ``bench`` nox session installs
it into .nox/torchdeq-0.1.0 and puts that folder on PYTHONPATH for that
session only. Elsewhere ``available()`` is False and the comparison is skipped.

Facts about torchdeq 0.1.0 that the adapter relies on (read from its source):

- Solvers have the signature ``solver(func, x0, max_iter, tol, stop_mode, ...)``
  and return (best iterate, sampled states, stats). The stop test takes the
  largest residual over the batch, so the whole batch runs until every
  sample meets the tolerance.
- Function evaluations per solve, with line search off (the default):
  ``fixed_point_iter`` max_iter, ``anderson`` max_iter (two before its loop),
  ``broyden`` max_iter + 1 (one at the starting point). ``max_iter_for`` maps
  an evaluation budget onto max_iter accordingly.
- Defaults kept here: Anderson m = 6, lam = 1e-4, tau = 1; Broyden with
  every update stored and no line search; fixed-point iteration with tau = 1.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

# deqbench solver name -> torchdeq solver name
SOLVER_NAMES = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def available() -> bool:
    """Return whether torchdeq can be imported."""
    return importlib.util.find_spec("torchdeq") is not None


def version() -> str | None:
    """Return the installed torchdeq version, or None when it is not installed."""
    if not available():
        return None
    from importlib import metadata

    try:
        return metadata.version("torchdeq")
    except metadata.PackageNotFoundError:
        return "unknown"


def _torchdeq() -> Any:
    try:
        import torchdeq
    except ImportError as error:
        raise ImportError(
            "torchdeq is not installed; run `nox -s bench`, which installs torchdeq 0.1.0 into "
            ".nox/torchdeq-0.1.0, or put such a folder on PYTHONPATH"
        ) from error
    return torchdeq


def max_iter_for(solver: str, max_nfe: int) -> int:
    """Return the torchdeq max_iter that spends at most ``max_nfe`` evaluations of f."""
    if solver not in SOLVER_NAMES:
        raise ValueError(f"solver = {solver!r} is invalid; expected one of {tuple(SOLVER_NAMES)}")
    if solver == "broyden":
        return max(max_nfe - 1, 1)
    if solver == "anderson":
        # Anderson evaluates f twice before its loop whatever max_iter is.
        return max(max_nfe, 2)
    return max_nfe


def solve(solver: str, f: Callable[[Tensor], Tensor], z0: Tensor, *, max_nfe: int, tol: float) -> tuple[Tensor, Tensor]:
    """Solve z = f(z) with torchdeq's solver at its default options and the relative stop test.

    Returns the best iterate (shape of z0) and the lowest relative residual
    per sample that torchdeq reports, (B,).
    """
    torchdeq = _torchdeq()
    solver_fn = torchdeq.solver.get_solver(SOLVER_NAMES[solver])
    z, _, info = solver_fn(f, z0, max_iter=max_iter_for(solver, max_nfe), tol=tol, stop_mode="rel")
    return z, info["rel_lowest"]


@dataclass
class CountedSolver:
    """A torchdeq solver wrapped so that the calls of its map are counted (registered by name)."""

    name: str  # registered torchdeq name, e.g. "deqbench_counted_broyden"
    calls: list[int] = field(default_factory=list)  # map calls of each solve since the last reset


def counted_solver(solver: str) -> CountedSolver:
    """Register (once) a torchdeq solver that counts its map's calls per solve and return its record.

    torchdeq's IFT backward calls the solver named in get_deq(b_solver=...)
    with the vector-Jacobian map; registering a counting wrapper through
    torchdeq.solver.register_solver is how its backward evaluations are counted.
    """
    torchdeq = _torchdeq()
    record = _COUNTED.get(solver)
    if record is not None:
        return record

    record = CountedSolver(name=f"deqbench_counted_{solver}")
    inner = torchdeq.solver.get_solver(SOLVER_NAMES[solver])

    def run(func: Callable[[Tensor], Tensor], x0: Tensor, **kwargs: Any) -> Any:
        record.calls.append(0)

        def counted(y: Tensor) -> Tensor:
            record.calls[-1] += 1
            return func(y)

        return inner(counted, x0, **kwargs)

    torchdeq.solver.register_solver(record.name, run)
    _COUNTED[solver] = record
    return record


_COUNTED: dict[str, CountedSolver] = {}


def make_deq(solver: str, *, forward_nfe: int, backward_nfe: int, tol: float) -> tuple[Any, CountedSolver]:
    """Build torchdeq's implicit layer with exact IFT backward (autograd.Function form).

    The same solver runs the forward and the backward solve, both with the
    relative stop test at ``tol`` and budgets mapped onto max_iter. Returns
    the module, in training mode so that it tracks gradients, and the
    counting record of its backward solver.
    """
    torchdeq = _torchdeq()
    backward_solver = counted_solver(solver)
    deq = torchdeq.get_deq(
        ift=True,
        f_solver=SOLVER_NAMES[solver],
        b_solver=backward_solver.name,
        f_max_iter=max_iter_for(solver, forward_nfe),
        b_max_iter=max_iter_for(solver, backward_nfe),
        f_tol=tol,
        b_tol=tol,
        f_stop_mode="rel",
        b_stop_mode="rel",
    )
    return deq.train(), backward_solver
