"""Row recording for results/gradcheck.json.

Any test, in this suite or another, records one gradient check with

    from suites.gradcheck.recording import record_check
    record_check(solver="broyden", backward_solver="broyden", problem="mdeq_small",
                 reference="dense", dtype="float64", max_rel_error=err, tolerance=tol,
                 forward_nfe=fwd, backward_nfe=bwd)

and then asserts on the returned row's "passed". Tests in suites/gradcheck
can use the ``record_check`` fixture instead, which adds the test id. Rows
are appended as JSON lines to the file named by DEQBENCH_GRADCHECK_ROWS;
without that variable (a plain pytest run) they are only returned.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from deqbench.gradcheck_report import ROWS_ENV

DTYPES = ("float64", "float32")
BOUNDS = ("max", "min")


def record_check(
    *,
    solver: str,
    backward_solver: str,
    problem: str,
    reference: str,
    dtype: str,
    max_rel_error: float,
    tolerance: float,
    forward_nfe: int,
    backward_nfe: int,
    bound: str = "max",
    passed: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build one check row, append it to the rows file if one is named, and return it.

    ``bound`` is "max" when the error must stay at or below the tolerance and
    "min" when it must reach at least the tolerance (a check that two
    gradients differ). ``passed`` defaults to that comparison. A non-finite
    error is stored as null and never passes. ``extra`` adds fields such as
    ``test``, ``mode`` or ``detail`` (JSON values).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}; got {bound!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number; got {tolerance!r}")

    # A NaN or Inf error cannot go into JSON and cannot pass.
    error = float(max_rel_error)
    finite = math.isfinite(error)
    if passed is None:
        passed = finite and (error <= tolerance if bound == "max" else error >= tolerance)
    row = {
        "solver": solver,
        "backward_solver": backward_solver,
        "problem": problem,
        "reference": reference,
        "dtype": dtype,
        "max_rel_error": error if finite else None,
        "tolerance": float(tolerance),
        "passed": bool(passed and finite),
        "forward_nfe": int(forward_nfe),
        "backward_nfe": int(backward_nfe),
        "bound": bound,
        **extra,
    }

    # One write call per line, in append mode, so rows of one run never interleave.
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
    return row
