"""Progress reporting hooks of the trainer, and the tqdm bars the command line passes in.

The trainer calls a Progress object and never writes to the terminal itself;
NullProgress keeps library use and non-zero ranks silent.
"""

from __future__ import annotations

from typing import Any


class Progress:
    """Hooks the trainer calls on the main process; every method may be a no-op."""

    def run_started(self, total_steps: int, done_steps: int) -> None: ...

    def epoch_started(self, epoch: int, epochs: int, steps: int, done_steps: int) -> None: ...

    def step_done(self, postfix: dict[str, Any]) -> None: ...

    def epoch_done(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullProgress(Progress):
    """Reports nothing."""


class TqdmProgress(Progress):
    """Two tqdm bars on stderr: the whole run with its ETA, and the current epoch with loss, accuracy and NFE."""

    def __init__(self) -> None:
        self.run_bar: Any = None
        self.epoch_bar: Any = None

    def run_started(self, total_steps: int, done_steps: int) -> None:
        from tqdm.auto import tqdm

        self.run_bar = tqdm(total=total_steps, initial=done_steps, desc="run", unit="step", position=0, dynamic_ncols=True)

    def epoch_started(self, epoch: int, epochs: int, steps: int, done_steps: int) -> None:
        from tqdm.auto import tqdm

        if self.epoch_bar is not None:
            self.epoch_bar.close()
        self.epoch_bar = tqdm(
            total=steps,
            initial=done_steps,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            position=1,
            leave=False,
            dynamic_ncols=True,
        )

    def step_done(self, postfix: dict[str, Any]) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.set_postfix(postfix, refresh=False)
            self.epoch_bar.update(1)
        if self.run_bar is not None:
            self.run_bar.update(1)

    def epoch_done(self, record: dict[str, Any]) -> None:
        if self.run_bar is not None:
            self.run_bar.set_postfix({"test_acc": f"{record['test_acc']:.2f}%"}, refresh=True)

    def close(self) -> None:
        for bar in (self.epoch_bar, self.run_bar):
            if bar is not None:
                bar.close()
        self.epoch_bar = self.run_bar = None
