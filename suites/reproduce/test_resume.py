"""Stopping and resuming: a run interrupted mid-epoch and resumed ends bit for bit like an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deqbench.checkpoints import list_checkpoints, load_checkpoint
from deqbench.cli import EXIT_OK, EXIT_SIGTERM, main

EPOCHS = 3  # 8 steps each; a stop in epoch 2 leaves a whole epoch to run after the resume


def _final_state(output: Path) -> dict:
    newest = list_checkpoints(output / "checkpoints")[0]
    return load_checkpoint(newest)["state"]


def _history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def _assert_same_run(reference: Path, resumed: Path) -> None:
    """Compare weights bitwise and every per-epoch training and test number except times."""
    expected, actual = _final_state(reference), _final_state(resumed)
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, actual["model"][name]), name
    for ref, res in zip(_history(reference), _history(resumed), strict=True):
        assert res["step_loss"] == ref["step_loss"]
        assert res["train_acc"] == ref["train_acc"]
        assert res["test_acc"] == ref["test_acc"]
        assert res["test_loss"] == ref["test_loss"]
        assert res["nfe"] == ref["nfe"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, small_run_args) -> Path:
    output = tmp_path_factory.mktemp("reference")
    status = main(small_run_args(output, epochs=EPOCHS))
    assert status == EXIT_OK
    return output


@pytest.mark.parametrize("stop_step", [3, 8, 11])
def test_resume_matches_uninterrupted(tmp_path: Path, small_run_args, reference_run: Path, stop_step: int) -> None:
    args = small_run_args(tmp_path, epochs=EPOCHS)
    stopped = main([*args, "--stop-after-steps", str(stop_step)])
    checkpoint_state = _final_state(tmp_path)
    resumed = main([*args, "--resume"])
    result = json.loads((tmp_path / "result.json").read_text())

    assert stopped == EXIT_SIGTERM
    assert checkpoint_state["position"]["step"] == stop_step
    assert resumed == EXIT_OK
    assert result["resumed_from"][0]["step"] == stop_step
    assert result["steps"] == EPOCHS * 8
    _assert_same_run(reference_run, tmp_path)


def test_resume_rejects_other_config(tmp_path: Path, small_run_args) -> None:
    args = small_run_args(tmp_path, epochs=EPOCHS)
    main([*args, "--stop-after-steps", "3"])
    status = main([*args, "--resume", "--set", "deq.forward.max_nfe=5"])

    assert status == 2
    assert not (tmp_path / "result.json").exists()


def test_workers_keep_same_run(tmp_path: Path, small_run_args, reference_run: Path) -> None:
    status = main([*small_run_args(tmp_path, epochs=EPOCHS), "--workers", "2"])

    assert status == EXIT_OK
    _assert_same_run(reference_run, tmp_path)


def _start_and_signal(command: list[str], log: Path, signum: int) -> subprocess.Popen:
    """Start the command and send ``signum`` once the first epoch is logged, so it lands in epoch 2 or 3."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().strip()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    return process


def test_sigterm_then_resume(tmp_path: Path, small_run_args, reference_run: Path) -> None:
    command = [sys.executable, "-m", "deqbench.cli", *small_run_args(tmp_path, epochs=EPOCHS)]
    process = _start_and_signal(command, tmp_path / "log.jsonl", signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == EXIT_SIGTERM, stderr[-2000:]
    assert "resume with: deqbench reproduce" in stdout
    assert "--resume" in stdout
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-2000:]
    _assert_same_run(reference_run, tmp_path)


def test_sigkill_loses_only_epoch(tmp_path: Path, small_run_args, reference_run: Path) -> None:
    command = [sys.executable, "-m", "deqbench.cli", *small_run_args(tmp_path, epochs=EPOCHS)]
    process = _start_and_signal(command, tmp_path / "log.jsonl", signal.SIGKILL)
    process.communicate(timeout=120)
    newest = list_checkpoints(tmp_path / "checkpoints")[0]
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=180)

    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(newest)["state"]["position"]["batch"] == 0
    assert resumed.returncode == EXIT_OK, resumed.stderr[-2000:]
    _assert_same_run(reference_run, tmp_path)
