"""Fixtures of the solver suite."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run each test on one intra-op thread, then restore the previous count.

    The problems here are at most 4 x 64 values, so a second thread only adds
    synchronization, which cost several times the work itself on the 2-core
    development machine while other jobs ran.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
