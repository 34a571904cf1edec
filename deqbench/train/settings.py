"""Settings and outcome of a training run, its stop-signal handler and its failure exception."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from deqbench.scenarios import Scenario
from deqbench.train.schedule import RunPlan

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainSettings:
    """Everything one training run needs besides its data."""

    scenario: Scenario  # the configuration trained, overrides and budget applied
    plan: RunPlan
    seed: int
    output_dir: Path  # receives log.jsonl and checkpoints/
    fingerprint: dict[str, Any]  # identifies the configuration; checkpoints of another one are rejected
    workers: int = 0  # DataLoader worker processes per training process
    max_unconverged_steps: int = 50  # consecutive unconverged implicit steps before the run fails; 0 disables
    # A step is unconverged when no sample's forward or backward solve ends below this relative residual.
    unconverged_residual: float = 0.5
    stop_after_steps: int | None = None  # behave as if SIGTERM arrived during this optimizer step (1-based); for tests
    resume: bool = False
    # Test images per forward pass and process; None uses the training shard size, whose memory is known to fit.
    eval_batch_size: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_NAME


@dataclass
class TrainOutcome:
    """Final status and measurements of a run, from which the result file is built."""

    status: str  # "completed", "interrupted" or "failed"
    history: list[dict[str, Any]]  # one record per finished epoch, as written to log.jsonl
    wall_time_s: float  # over all segments of a resumed run
    steps: int  # optimizer steps done
    checkpoint: Path | None  # the newest checkpoint written or resumed from
    failure: dict[str, Any] | None = None  # kind, reason and solver statistics of the failing step
    signal_number: int | None = None  # signal that interrupted the run; None for the test hook
    resumed_from: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, Any] = field(default_factory=dict)


class StopSignals:
    """Turns SIGINT and SIGTERM into a request to stop after the current step.

    A second SIGINT raises KeyboardInterrupt at once, for a user who does not
    want to wait for the step to end. Handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s; stopping after the current step", signal.Signals(signum).name)


class RunFailed(Exception):
    """Training diverged: a non-finite loss or state, or too many steps without a converged solve."""

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure["reason"])
        self.failure = failure
