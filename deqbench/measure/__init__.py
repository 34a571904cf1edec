"""Memory and speed of implicit MDEQ layers, side by side with unrolled backprop and torchdeq.

- ``memory``: one training step per (model, backward mode, forward limit),
  each in a fresh process: bytes saved for backward, peak resident memory,
  CUDA peak and the solver's own working memory.
- ``speed``: NFE, wall time and overhead of each solver on the TINY cell,
  a training step per solver, and gradient agreement with torchdeq.
- ``problems``: the TINY-cell fixed-point problems and the images they use.
- ``baseline``: the adapter for torchdeq 0.1.0, an optional dependency.
- ``plots``: the figures beside results/memory.json and results/solvers.json.

Run as ``python -m deqbench.measure memory|bench [options]``, or call
``deqbench.measure.runner.main(argv)``. The nox sessions ``memory`` and
``bench`` run it and write the files under results/.
"""

from deqbench.measure.memory import MemoryPoint, SavedTensorCounter, growth_checks, measure_point, run_point_in_subprocess
from deqbench.measure.speed import CountingMap, benchmark, nfe_comparison

__all__ = [
    "CountingMap",
    "MemoryPoint",
    "SavedTensorCounter",
    "benchmark",
    "growth_checks",
    "measure_point",
    "nfe_comparison",
    "run_point_in_subprocess",
]
