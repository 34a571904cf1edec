"""The MDEQ classifier and its parts."""

from deqbench.models.mdeq import (
    CellContext,
    EquilibriumProblem,
    MDEQCell,
    MDEQClassifier,
    MDEQOutput,
    StateLayout,
)

__all__ = [
    "CellContext",
    "EquilibriumProblem",
    "MDEQCell",
    "MDEQClassifier",
    "MDEQOutput",
    "StateLayout",
]
