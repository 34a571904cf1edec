"""Fixed-point solvers behind one contract, registered by name.

Importing this package registers "fixed_point", "anderson" and "broyden";
``get_solver(name)`` returns one of them.
"""

from deqbench.solvers import anderson as _anderson  # noqa: F401  (registers "anderson")
from deqbench.solvers import broyden as _broyden  # noqa: F401  (registers "broyden")
from deqbench.solvers import fixed_point as _fixed_point  # noqa: F401  (registers "fixed_point")
from deqbench.solvers._common import RESIDUAL_EPS
from deqbench.solvers.base import (
    SOLVERS,
    STOP_MODES,
    FixedPointMap,
    Solver,
    SolverResult,
    SolverStats,
    StopReason,
    check_solve_arguments,
    get_solver,
    register_solver,
)

__all__ = [
    "RESIDUAL_EPS",
    "SOLVERS",
    "STOP_MODES",
    "FixedPointMap",
    "Solver",
    "SolverResult",
    "SolverStats",
    "StopReason",
    "check_solve_arguments",
    "get_solver",
    "register_solver",
]
