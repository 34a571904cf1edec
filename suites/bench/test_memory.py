"""Memory measurement: the saved-tensor counter, one measured point, the subprocess harness, the checks."""

from __future__ import annotations

import pytest
import torch

from deqbench.implicit import BackwardSpec, SolveSpec, implicit_solve
from deqbench.measure.memory import (
    MeasurementError,
    MemoryPoint,
    SavedTensorCounter,
    current_rss_bytes,
    growth_checks,
    measure_point,
    peak_rss_bytes,
    run_point_in_subprocess,
)
from deqbench.results import validate


def test_counter_dedupes_views() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    with SavedTensorCounter() as counter:
        base = x * 2.0  # saves nothing for x * scalar
        # Two views of one storage, each saved by its own op.
        y = torch.sin(base[:8]) + torch.cos(base[8:])
    y.sum().backward()

    assert counter.saved_count == 1
    assert counter.saved_bytes == base.untyped_storage().nbytes()


def test_counter_excludes_parameters() -> None:
    layer = torch.nn.Linear(32, 32, bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    with SavedTensorCounter(layer.parameters()) as counter:
        out = torch.tanh(layer(x))

    assert counter.parameter_bytes == layer.weight.untyped_storage().nbytes()
    # Saved: x (for the weight gradient) and tanh's output.
    assert counter.saved_bytes == x.untyped_storage().nbytes() + out.untyped_storage().nbytes()


def test_counter_ignores_code_outside() -> None:
    x = torch.randn(8, 8, requires_grad=True)
    with SavedTensorCounter() as counter:
        pass
    torch.tanh(x).sum().backward()

    assert counter.saved_bytes == 0
    assert counter.saved_count == 0


def _saved_bytes(mode: str, steps: int) -> int:
    """Bytes saved by implicit_solve on z = tanh(W z + x) with `steps` forward evaluations."""
    w = torch.nn.Parameter(torch.randn(64, 64) * 0.05)
    x = torch.randn(4, 64)
    forward = SolveSpec("fixed_point", max_nfe=steps, tol=1e-30, stop_mode="rel", options={"stall_window": steps + 1})
    backward = BackwardSpec(mode=mode, solve=SolveSpec("fixed_point", max_nfe=30, tol=1e-6), steps=steps)
    with SavedTensorCounter([w]) as counter:
        out = implicit_solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros(4, 64), forward, backward)
        loss = out.z.square().sum()
    loss.backward()
    return counter.saved_bytes


def test_ift_saved_bytes_flat() -> None:
    assert _saved_bytes("ift", 32) == _saved_bytes("ift", 2)


def test_unrolled_saved_bytes_linear() -> None:
    per_step = _saved_bytes("unrolled", 3) - _saved_bytes("unrolled", 2)

    assert per_step > 0
    assert _saved_bytes("unrolled", 32) == _saved_bytes("unrolled", 2) + 30 * per_step


def test_rss_sees_allocation() -> None:
    before = current_rss_bytes()
    block = torch.ones(64 * 2**20)  # 256 MiB of float32, every page written
    during = current_rss_bytes()
    peak = peak_rss_bytes()
    del block

    assert during - before >= 200 * 2**20
    assert peak >= during


def test_current_rss_below_peak() -> None:
    assert 0 < current_rss_bytes() <= peak_rss_bytes()


def test_point_check_rejects_mode() -> None:
    with pytest.raises(ValueError, match="backward = 'adjoint' is invalid"):
        MemoryPoint("TINY", "adjoint", 4, 2).check()


def test_point_check_rejects_limit() -> None:
    with pytest.raises(ValueError, match="f_max_iter = 0 is invalid"):
        MemoryPoint("TINY", "ift", 0, 2).check()


def _record(model: str, backward: str, limit: int, saved: int) -> dict[str, object]:
    return {"model": model, "backward": backward, "f_max_iter": limit, "saved_tensor_bytes": saved}


def test_growth_checks_pass() -> None:
    runs = [
        _record("TINY", "ift", 4, 100),
        _record("TINY", "ift", 64, 104),
        _record("TINY", "unrolled", 4, 100),
        _record("TINY", "unrolled", 64, 900),
    ]
    checks = {c["backward"]: c for c in growth_checks(runs)}

    assert checks["ift"]["passed"]
    assert checks["unrolled"]["passed"]
    assert checks["unrolled"]["saved_bytes_ratio"] == pytest.approx(9.0)


def test_growth_checks_fail() -> None:
    runs = [
        _record("TINY", "ift", 4, 100),
        _record("TINY", "ift", 64, 106),
        _record("TINY", "unrolled", 4, 100),
        _record("TINY", "unrolled", 64, 700),
    ]
    checks = {c["backward"]: c for c in growth_checks(runs)}

    assert not checks["ift"]["passed"]
    assert not checks["unrolled"]["passed"]


def test_growth_checks_skip_missing() -> None:
    assert growth_checks([_record("TINY", "ift", 4, 100)]) == []


def test_point_in_process_valid() -> None:
    run = measure_point(MemoryPoint("TINY", "ift", 2, 1))
    data = {"env": {"commit": {}, "torch": "", "device": "cpu", "cpu_model": "", "cpu_count": 1}, "method": _METHOD, "runs": [run]}

    validate(data, "memory")
    assert run["forward_nfe"] == 2
    assert run["peak_rss_bytes"] >= run["baseline_rss_bytes"]
    assert run["solver_state_bytes"] > 0


_METHOD = {"saved_tensor_bytes": "", "peak_rss_bytes": "", "forward_limit": "", "isolation": ""}


def test_subprocess_point_forced_nfe() -> None:
    run = run_point_in_subprocess(MemoryPoint("TINY", "unrolled", 3, 1), timeout_s=300)

    assert run["forward_nfe"] == 3
    assert run["solver"] == "unrolled"
    assert run["saved_tensor_bytes"] > 0


def test_subprocess_failure_raises() -> None:
    with pytest.raises(MeasurementError, match="exit status"):
        run_point_in_subprocess(MemoryPoint("TINY", "ift", 2, 1, solver="newton"), timeout_s=300)


@pytest.mark.slow
def test_tiny_ift_flat_unrolled_grows() -> None:
    """The acceptance check on TINY at batch 2: IFT within 5% from 4 to 64 evaluations, unrolled at least 8-fold."""
    runs = [
        run_point_in_subprocess(MemoryPoint("TINY", backward, limit, 2), timeout_s=600)
        for backward in ("ift", "unrolled")
        for limit in (4, 64)
    ]
    checks = {c["backward"]: c for c in growth_checks(runs)}

    assert checks["ift"]["passed"], checks["ift"]
    assert checks["unrolled"]["passed"], checks["unrolled"]


@pytest.mark.gpu
def test_cuda_peak_recorded() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    run = run_point_in_subprocess(MemoryPoint("TINY", "ift", 4, 2, device="cuda"), timeout_s=300)

    assert run["cuda_max_allocated_bytes"] > 0
