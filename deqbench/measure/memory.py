"""Memory of one MDEQ training step: bytes saved for backward, peak resident memory, CUDA peak.

A point is one (model, backward mode, forward limit, batch size). Each point
runs in a fresh Python process (``run_point_in_subprocess``), because the
peak resident set size (ru_maxrss) never decreases during a process's life:
a point measured after another would inherit the earlier point's peak.

Inside that process ``measure_point`` builds the model and a random batch,
reads the baseline resident memory, and runs one training step (forward,
cross-entropy loss, backward) with ``SavedTensorCounter`` active during the
forward and loss. After the backward it reads ru_maxrss and, on CUDA,
torch.cuda.max_memory_allocated. The counter references the saved storages
until the forward ends, and the graph references them until the backward.
So the counter cannot raise the peak unless a graph is freed during the
forward, which no backward mode of the MDEQ classifier does (a run with and
without the counter gave the same peak within 2 MB).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from deqbench.scenarios import get_scenario

BACKWARD_MODES = ("ift", "unrolled", "phantom")

# A relative residual cannot fall below about 1e-7 in float32, so a tolerance
# of 1e-30 is never met and the forward solve runs to its evaluation limit.
FORCED_TOL = 1e-30

# Defaults of the sweep: the forward limits of the acceptance check and a
# batch per model that fits in a few GB at 64 unrolled steps.
FORWARD_LIMITS = (2, 4, 8, 16, 32, 64)
DEFAULT_BATCHES = {"TINY": 8, "LARGE": 4}


class MeasurementError(RuntimeError):
    """A measurement subprocess failed or returned no result."""


@dataclass(frozen=True)
class MemoryPoint:
    """One memory measurement: a training step of one model at one forward limit."""

    model: str  # scenario name: TINY, LARGE or LARGE_REG
    backward: str  # "ift", "unrolled" or "phantom"
    f_max_iter: int  # forward function evaluations, all of them used
    batch_size: int  # images per step
    solver: str = "broyden"  # forward solver of ift and phantom; unrolled iterates f directly
    device: str = "cpu"
    seed: int = 0
    threads: int = 1  # torch intra-op threads of the subprocess; measure_point itself keeps the caller's

    def check(self) -> None:
        """Reject values no measurement can use, naming the value and the allowed ones."""
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward = {self.backward!r} is invalid; expected one of {BACKWARD_MODES}")
        for name in ("f_max_iter", "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} is invalid; expected an integer >= 1")


class SavedTensorCounter:
    """Count the unique storages that autograd saves for backward while the context is active.

    Several saved tensors can be views of one storage (a reshape, a slice of
    the flattened state), so the counter keys each tensor by its storage's
    data pointer and adds that storage's full size once. Storages of the
    model's parameters and buffers are kept apart in ``parameter_bytes``:
    they are resident whether or not a graph exists.

    The counter holds a reference to every storage it counted until the
    context exits, so that no counted storage is freed during the forward
    and its address reused by another tensor, which would hide that tensor.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
        self._storages: dict[int, Any] = {}  # data pointer -> storage, activations
        self._parameter_storages: dict[int, Any] = {}  # data pointer -> storage, parameters and buffers
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if storage.nbytes() > 0:
            target = self._parameter_storages if pointer in self._excluded else self._storages
            target[pointer] = storage
        return tensor

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)
        # Sizes are read now; the references are dropped so the storages can be freed.
        self.saved_bytes = sum(storage.nbytes() for storage in self._storages.values())
        self.saved_count = len(self._storages)
        self.parameter_bytes = sum(storage.nbytes() for storage in self._parameter_storages.values())
        self._storages.clear()
        self._parameter_storages.clear()


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


def current_rss_bytes() -> int:
    """Return this process's resident set size now, read from /proc/self/statm (Linux)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # NOTE: without /proc the peak so far is the best available figure.
        return _max_rss_bytes()


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size so far, in bytes.

    ru_maxrss can trail the current resident size by a few hundred KiB,
    because Linux batches RSS counter updates per thread, so the larger of
    the two readings is returned.
    """
    return max(_max_rss_bytes(), current_rss_bytes())


def _max_rss_bytes() -> int:
    """Return ru_maxrss in bytes (the kernel reports KiB on Linux and bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def build_model(point: MemoryPoint) -> torch.nn.Module:
    """Build the point's MDEQ classifier with its forward limit forced and its backward mode set.

    The forward solve gets tol = FORCED_TOL and a stall window and divergence
    factor that cannot trigger, so it uses exactly ``f_max_iter`` evaluations
    unless f returns non-finite values. Unrolled backward applies f
    ``f_max_iter`` times with autograd tracking every step.
    """
    from deqbench.implicit import BackwardSpec, SolveSpec
    from deqbench.models.mdeq import MDEQClassifier

    scenario = get_scenario(point.model)
    model = MDEQClassifier(scenario.model, scenario.deq)

    # Forward: no stop test can end the solve before the limit.
    options = {"stall_window": point.f_max_iter + 1, "divergence_factor": 1e30}
    model.forward_spec = SolveSpec(point.solver, point.f_max_iter, FORCED_TOL, "rel", options)

    # Backward: the scenario's IFT solve, or f_max_iter tracked (unrolled or phantom) steps.
    steps = scenario.deq.phantom_steps if point.backward == "ift" else point.f_max_iter
    model.backward_spec = BackwardSpec(
        mode=point.backward,
        solve=SolveSpec.from_config(scenario.deq.backward),
        steps=steps,
        damping=scenario.deq.phantom_damping,
    )
    return model.to(point.device)


def measure_point(point: MemoryPoint) -> dict[str, Any]:
    """Measure one point in this process and return its run record (see memory.schema.json)."""
    point.check()
    torch.manual_seed(point.seed)
    device = torch.device(point.device)
    cuda = device.type == "cuda"

    # Model and batch; the baseline is read after both exist.
    model = build_model(point).train()
    images = torch.randn(point.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, model.config.num_classes, (point.batch_size,), device=device)
    gc.collect()
    baseline_rss = current_rss_bytes()
    baseline_peak = peak_rss_bytes()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    # One training step; saved tensors are counted during the forward and loss only.
    exclude = [*model.parameters(), *model.buffers()]
    start = time.perf_counter()
    with SavedTensorCounter(exclude) as counter:
        output = model(images)
        loss = F.cross_entropy(output.logits, labels)
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    step_time = time.perf_counter() - start

    # Peaks after the backward, which runs while the graph is still alive.
    peak_rss = peak_rss_bytes()
    cuda_peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    forward_stats = output.forward_stats
    backward_stats = output.backward.stats if output.backward is not None else None

    return {
        "model": point.model,
        "backward": point.backward,
        "f_max_iter": point.f_max_iter,
        "batch_size": point.batch_size,
        "device": point.device,
        "solver": "unrolled" if point.backward == "unrolled" else point.solver,
        "forward_nfe": int(forward_stats.nfe.max()),
        "saved_tensor_bytes": counter.saved_bytes,
        "saved_tensor_count": counter.saved_count,
        "saved_parameter_bytes": counter.parameter_bytes,
        "peak_rss_bytes": peak_rss,
        "baseline_rss_bytes": baseline_rss,
        "baseline_peak_rss_bytes": baseline_peak,
        "solver_state_bytes": int(forward_stats.solver_state_bytes),
        "backward_solver_state_bytes": int(backward_stats.solver_state_bytes) if backward_stats is not None else None,
        "cuda_max_allocated_bytes": cuda_peak,
        "step_time_s": step_time,
        "threads": torch.get_num_threads(),
    }


def run_point_in_subprocess(point: MemoryPoint, *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Measure ``point`` in a fresh interpreter and return its run record.

    The child runs ``python -m deqbench.measure memory-point`` and prints one
    JSON line on stdout. A non-zero exit status, a timeout or a missing line
    raises MeasurementError with the tail of the child's stderr.
    """
    point.check()
    command = [sys.executable, "-m", "deqbench.measure", "memory-point", "--point", json.dumps(asdict(point))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        raise MeasurementError(f"memory point {asdict(point)} timed out after {timeout_s:.0f} s") from error

    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise MeasurementError(
            f"memory point {asdict(point)} failed with exit status {done.returncode}; "
            f"stderr ends with:\n{done.stderr[-2000:]}"
        )
    return json.loads(lines[-1])


def sweep(
    batches: dict[str, int] | None = None,
    limits: Iterable[int] = FORWARD_LIMITS,
    backwards: Iterable[str] = ("ift", "unrolled"),
    *,
    solver: str = "broyden",
    device: str = "cpu",
    threads: int = 1,
    timeout_s: float = 600.0,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every (model, backward, limit) point, each in its own subprocess.

    ``batches`` maps a scenario name to its batch size (default TINY 8,
    LARGE 4). ``on_run`` is called with each run record as it arrives, for
    progress output in the runner.
    """
    batches = DEFAULT_BATCHES if batches is None else batches
    runs = []
    template = MemoryPoint("TINY", "ift", f_max_iter=1, batch_size=1, solver=solver, device=device, threads=threads)
    for model, batch in batches.items():
        for backward in backwards:
            for limit in limits:
                point = replace(template, model=model, backward=backward, f_max_iter=limit, batch_size=batch)
                run = run_point_in_subprocess(point, timeout_s=timeout_s)
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    return runs


def growth_checks(runs: list[dict[str, Any]], low: int = 4, high: int = 64) -> list[dict[str, Any]]:
    """Compare saved bytes at forward limits ``low`` and ``high`` for each model and backward mode.

    Acceptance: IFT grows by at most 5% from ``low`` to ``high`` evaluations,
    unrolled backpropagation by at least 8-fold. Pairs missing a limit are skipped.
    """
    saved = {(r["model"], r["backward"], r["f_max_iter"]): r["saved_tensor_bytes"] for r in runs}
    thresholds = {"ift": ("at most", 1.05), "unrolled": ("at least", 8.0)}
    checks = []
    for model, backward in sorted({(r["model"], r["backward"]) for r in runs}):
        if (model, backward, low) not in saved or (model, backward, high) not in saved or backward not in thresholds:
            continue
        ratio = saved[(model, backward, high)] / saved[(model, backward, low)]
        rule, bound = thresholds[backward]
        passed = ratio <= bound if rule == "at most" else ratio >= bound
        checks.append(
            {
                "model": model,
                "backward": backward,
                "from_f_max_iter": low,
                "to_f_max_iter": high,
                "saved_bytes_ratio": ratio,
                "requirement": f"ratio {rule} {bound:g}",
                "passed": bool(passed),
            }
        )
    return checks
