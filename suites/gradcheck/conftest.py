"""Fixtures of the gradient-check suite."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import torch

from suites.gradcheck import recording


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run each test on one intra-op thread, then restore the previous count.

    The problems here have at most a few hundred state entries per sample, so
    a second thread only adds synchronization. On the 2-core development
    machine, busy with other jobs, one conv-cell evaluation took 2 ms with two
    threads and 0.2 ms with one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def record_check(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """Return recording.record_check with the current test id added to each row."""

    def record(**fields: Any) -> dict[str, Any]:
        return recording.record_check(test=request.node.nodeid, **fields)

    return record
