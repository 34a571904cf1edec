"""Signals during training: SIGINT, a second SIGINT, Ctrl-C to the process group and kill -9.

Each signal arrives at a chosen point, so every case is deterministic.
In-process runs send it to themselves from a wrapped training step.
Subprocess runs either pause at a step until the test sends it, or have a
DataLoader worker send it. After the stop, --resume must end with the
weights and per-epoch numbers of an uninterrupted run. suites/reproduce/test_resume.py covers the
--stop-after-steps hook, SIGTERM and a kill -9 at a moment set by timing.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from deqbench.checkpoints import list_checkpoints, load_checkpoint
from deqbench.cli import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, main
from deqbench.train.loop import Trainer
from suites.faults.helpers import SHRUNKEN_TINY, write_tree

EPOCHS = 2
STEPS_PER_EPOCH = 4  # 100 training images in batches of 25
WARMUP_STEPS = 2


# Runs `deqbench reproduce` with the arguments after the first three. Mode
# "pause" writes MARKER and waits at the start of optimizer step AT
# (1-based) until a signal reaches the trainer's handler. Mode "worker-ctrl-c" makes
# DataLoader worker 0, in the middle of its first batch of epoch AT (1-based),
# send SIGINT to the whole process group, as a terminal's Ctrl-C does.
DRIVER = """
import os, signal, sys, time
from pathlib import Path
import torch.utils.data
from deqbench.cli import main
from deqbench.train.loop import Trainer
from deqbench.train.sampling import SeededDataset

mode, marker, at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

if mode == "pause":
    train_step = Trainer._train_step

    def paused_step(self, images, labels):
        if self.step + 1 == at:
            marker.write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while self.signals.received is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return train_step(self, images, labels)

    Trainer._train_step = paused_step
else:
    get_item = SeededDataset.__getitem__

    def interrupted_get_item(self, index):
        worker = torch.utils.data.get_worker_info()
        if self.epoch + 1 == at and worker is not None and worker.id == 0 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.killpg(0, signal.SIGINT)
        return get_item(self, index)

    SeededDataset.__getitem__ = interrupted_get_item

sys.exit(main(sys.argv[4:]))
"""


def run_args(data: Path, output: Path | None, *extra: str) -> list[str]:
    """Build the arguments of a shrunken TINY run; ``output`` None keeps the default output and result paths."""
    paths = [] if output is None else ["--output", str(output), "--results", str(output / "result.json")]
    return [
        "reproduce",
        "--data", str(data),
        "--batch-size", "25",
        "--epochs", str(EPOCHS),
        "--warmup-iterations", str(WARMUP_STEPS),
        *paths,
        "--threads", "1",
        "--no-plot",
        *SHRUNKEN_TINY,
        *extra,
    ]


def newest_state(output: Path) -> dict[str, Any]:
    return load_checkpoint(list_checkpoints(output / "checkpoints")[0])["state"]


def history(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Compare the final weights bitwise and every per-epoch training and test number except times."""
    expected, actual = newest_state(reference), newest_state(resumed)
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, actual["model"][name]), name
    for ref, res in zip(history(reference), history(resumed), strict=True):
        assert res["step_loss"] == ref["step_loss"]
        assert res["train_acc"] == ref["train_acc"]
        assert res["test_acc"] == ref["test_acc"]
        assert res["test_loss"] == ref["test_loss"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("data"), train_per_class=10, test_per_class=5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    output = tmp_path_factory.mktemp("reference")
    status = main(run_args(data_dir, output))
    assert status == EXIT_OK
    return output


class EscapedSignal(Exception):
    """A signal reached the test's own handler instead of the trainer's."""


@pytest.fixture
def guarded_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM that the trainer does not catch into a test error instead of a pytest abort."""

    def escaped(signum: int, frame: object) -> None:
        raise EscapedSignal(f"{signal.Signals(signum).name} was not caught by the trainer")

    previous = {signum: signal.signal(signum, escaped) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signal_at_step(monkeypatch: pytest.MonkeyPatch, step: int, *signums: int) -> None:
    """Send ``signums`` to this process at the start of optimizer step ``step`` (1-based), one after another.

    Each signal is sent only after the trainer's handler has run for the
    previous one, because the kernel merges a signal that is still pending.
    """
    original = Trainer._train_step

    def train_step(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        if self.step + 1 == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
                deadline = time.monotonic() + 10
                while self.signals.received != signum and time.monotonic() < deadline:
                    pass
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


@pytest.mark.parametrize(
    ("signum", "step", "expected_status"),
    [(signal.SIGINT, 6, EXIT_SIGINT), (signal.SIGTERM, 2, EXIT_SIGTERM)],
    ids=["sigint-epoch-2", "sigterm-warmup"],
)
def test_signal_checkpoint_then_resume(
    signum: int,
    step: int,
    expected_status: int,
    data_dir: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    guarded_signals: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = run_args(data_dir, tmp_path)
    signal_at_step(monkeypatch, step, signum)
    stopped = main(args)
    out = capsys.readouterr().out
    position = newest_state(tmp_path)["position"]
    epochs_logged = len(history(tmp_path))
    result_after_stop = (tmp_path / "result.json").exists()

    assert stopped == expected_status
    assert f"interrupted after step {step}" in out
    assert "--resume" in out
    assert position == {"epoch": (step - 1) // STEPS_PER_EPOCH, "batch": step % STEPS_PER_EPOCH, "step": step}
    assert epochs_logged == (step - 1) // STEPS_PER_EPOCH
    assert not result_after_stop

    monkeypatch.undo()
    resumed = main([*args, "--resume"])
    result = json.loads((tmp_path / "result.json").read_text())

    assert resumed == EXIT_OK
    assert result["resumed_from"][0]["step"] == step
    assert result["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_run(reference, tmp_path)


def test_resume_command_keeps_free_name(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An earlier result under the default name makes the new run take TINY-custom-2.
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "results" / "reproduce_cifar" / "TINY-custom.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    stopped = main(run_args(data_dir, None, "--stop-after-steps", "2"))
    out = capsys.readouterr().out
    command = shlex.split(out.split("resume with: ", 1)[1].splitlines()[0])

    assert stopped == EXIT_SIGTERM
    assert command[:2] == ["deqbench", "reproduce"]
    assert (tmp_path / "runs" / "TINY-custom-2" / "checkpoints").is_dir()

    # The printed command drops the test hook, which would stop the resumed run again.
    assert "--stop-after-steps" not in command
    resumed = main(command[1:])

    assert resumed == EXIT_OK
    assert (tmp_path / "results" / "reproduce_cifar" / "TINY-custom-2.json").exists()
    assert earlier.read_text() == "{}"
    assert not (tmp_path / "runs" / "TINY-custom").exists()


def test_second_sigint_aborts(
    data_dir: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    guarded_signals: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = run_args(data_dir, tmp_path)
    signal_at_step(monkeypatch, 6, signal.SIGINT, signal.SIGINT)
    aborted = main(args)
    err = capsys.readouterr().err
    checkpoints = [path.name for path in list_checkpoints(tmp_path / "checkpoints")]

    # The abort skips the checkpoint of the stopped step, so epoch 2 starts over.
    assert aborted == EXIT_SIGINT
    assert "aborted by Ctrl-C" in err
    assert "--resume" in err
    assert checkpoints == ["epoch-0001.pt"]
    assert not (tmp_path / "result.json").exists()

    monkeypatch.undo()
    resumed = main([*args, "--resume"])

    assert resumed == EXIT_OK
    assert_same_run(reference, tmp_path)


def start_driver(mode: str, at: int, args: list[str], directory: Path) -> tuple[subprocess.Popen, Path]:
    """Start DRIVER in its own session, so that its process group contains only it and its workers."""
    marker = directory / "marker"
    stdout = open(directory / "stdout.txt", "w", encoding="utf-8")
    stderr = open(directory / "stderr.txt", "w", encoding="utf-8")
    with stdout, stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, mode, str(marker), str(at), *args],
            stdout=stdout,
            stderr=stderr,
            cwd=directory,
            start_new_session=True,
        )
    return process, marker


def start_paused(args: list[str], pause_step: int, directory: Path) -> subprocess.Popen:
    """Start `deqbench reproduce` and return once it waits at optimizer step ``pause_step``."""
    process, marker = start_driver("pause", pause_step, args, directory)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), (directory / "stderr.txt").read_text()[-3000:]
    return process


def test_ctrl_c_reaches_workers(data_dir: Path, reference: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    args = run_args(data_dir, output, "--workers", "2")
    process, marker = start_driver("worker-ctrl-c", 2, args, tmp_path)
    status = process.wait(timeout=120)
    out = (tmp_path / "stdout.txt").read_text()
    err = (tmp_path / "stderr.txt").read_text()

    # Worker 0 loads batch 0 of epoch 2 when the signal comes. Workers must ignore SIGINT, because one killed
    # by it would stall the loader, and forked workers that kept the trainer's handler would each log it.
    assert marker.exists(), err[-3000:]
    assert status == EXIT_SIGINT, err[-3000:]
    assert f"interrupted after step {STEPS_PER_EPOCH + 1}" in out
    assert "Traceback" not in err
    assert err.count("received SIGINT") == 1
    assert newest_state(output)["position"]["step"] == STEPS_PER_EPOCH + 1

    resumed = main([*args, "--resume"])

    assert resumed == EXIT_OK
    assert_same_run(reference, output)


def test_kill_mid_epoch_two(data_dir: Path, reference: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    args = run_args(data_dir, output)
    process = start_paused(args, STEPS_PER_EPOCH + 2, tmp_path)

    os.kill(process.pid, signal.SIGKILL)
    status = process.wait(timeout=60)
    checkpoints = [path.name for path in list_checkpoints(output / "checkpoints")]
    position = newest_state(output)["position"]

    assert status == -signal.SIGKILL
    assert checkpoints == ["epoch-0001.pt"]
    assert position == {"epoch": 1, "batch": 0, "step": STEPS_PER_EPOCH}
    assert len(history(output)) == 1
    assert not (output / "result.json").exists()

    # A kill during the log append can leave half a line, which the resume drops by rewriting the log.
    with open(output / "log.jsonl", "a", encoding="utf-8") as log:
        log.write('{"epoch": 2, "step_lo')
    resumed = main([*args, "--resume"])
    result = json.loads((output / "result.json").read_text())

    assert resumed == EXIT_OK
    assert result["resumed_from"][0]["step"] == STEPS_PER_EPOCH
    assert [record["epoch"] for record in history(output)] == list(range(1, EPOCHS + 1))
    assert_same_run(reference, output)
