"""Tolerances of the gradient checks, one table per dtype.

Errors are relative 2-norm errors ||g - g_ref|| / ||g_ref||, the largest over
the parameter and input tensors (or over the finite-difference coordinate
sets and directions) of one check.
"""

from __future__ import annotations

TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {
        # Forward and backward solver tolerance (relative residual) of every IFT check.
        "solver_tol": 1e-12,
        # IFT gradient against the dense implicit solve and the closed forms.
        "dense": 1e-8,
        "closed_form": 1e-8,
        # IFT gradient against scipy central differences of a forward solve to 1e-14.
        "finite_difference": 1e-6,
        # Unrolled autograd 80 iterations deep against the dense solve, for
        # problems whose df/dz has spectral radius <= 0.86 at z*, where 0.86^80 is about 6e-6.
        "unrolled_depth80": 1e-4,
        # Phantom gradient: one Jacobian-free step must be at least this far
        # from the exact gradient, and 80 steps with damping 0.5 this close,
        # on problems whose spectral radius at z* is <= 0.6.
        "phantom_one_step_min": 1e-2,
        "phantom_damped80": 1e-6,
    },
    "float32": {
        # Solver tolerance: float32 keeps about 7 digits, so 1e-5 leaves room
        # for rounding in f and in the vector-Jacobian products.
        "solver_tol": 1e-5,
        # IFT gradient in float32 against the float64 dense solve. The error
        # follows the forward and backward residuals, roughly tol / (1 - rho).
        "dense": 1e-3,
    },
}
