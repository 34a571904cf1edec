"""Divergence: a NaN in the state, a gradient or an evaluation, and solvers that stop converging.

The NaN is injected by wrapping MDEQClassifier.forward, the boundary between
the trainer and the model. Each failure must stop the run with exit status 1,
keep the checkpoint of the last finished epoch untouched and write a result
with status "failed", the reason and the solver statistics of the failing
step. suites/reproduce/test_training.py covers a huge learning rate and the
unconverged limit reached within one run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from deqbench.checkpoints import list_checkpoints, load_checkpoint
from deqbench.cli import EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, main
from deqbench.models.mdeq import MDEQClassifier, MDEQOutput
from deqbench.results import validate
from suites.faults.helpers import SHRUNKEN_TINY, write_tree

EPOCHS = 2
STEPS_PER_EPOCH = 4  # 100 training images in batches of 25
WARMUP_STEPS = 2



def run_args(data: Path, output: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return [
        "reproduce",
        "--data", str(data),
        "--batch-size", "25",
        "--epochs", str(epochs),
        "--warmup-iterations", str(WARMUP_STEPS),
        "--output", str(output),
        "--results", str(output / "result.json"),
        "--threads", "1",
        "--no-plot",
        *SHRUNKEN_TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("data"), train_per_class=10, test_per_class=5)


def corrupt_forward(
    monkeypatch: pytest.MonkeyPatch, training: bool, call: int, corrupt: Callable[[MDEQOutput], MDEQOutput]
) -> None:
    """Apply ``corrupt`` to the output of the ``call``-th forward pass (1-based) in train or eval mode.

    Training makes one forward pass per optimizer step, so in train mode
    ``call`` is the step number. Evaluation makes one per test batch.
    """
    original = MDEQClassifier.forward
    calls = {True: 0, False: 0}

    def forward(self: MDEQClassifier, x: torch.Tensor, **kwargs: Any) -> MDEQOutput:
        output = original(self, x, **kwargs)
        if self.training != training:
            return output
        calls[training] += 1
        return corrupt(output) if calls[training] == call else output

    monkeypatch.setattr(MDEQClassifier, "forward", forward)


def nan_state(output: MDEQOutput) -> MDEQOutput:
    """Make the equilibrium state NaN and keep the logits finite."""
    return dataclasses.replace(output, state=[part * math.nan for part in output.state])


def nan_gradient(output: MDEQOutput) -> MDEQOutput:
    """Keep every forward value finite and make the gradient through the logits NaN."""
    output.logits.register_hook(lambda grad: grad * math.nan)
    return output


def nan_logits(output: MDEQOutput) -> MDEQOutput:
    return dataclasses.replace(output, logits=output.logits * math.nan)


def read_run(output: Path) -> tuple[dict[str, Any], list[str], int]:
    """Return the result file, the checkpoint names (newest first) and the epochs in log.jsonl."""
    result = json.loads((output / "result.json").read_text())
    checkpoints = [path.name for path in list_checkpoints(output / "checkpoints")]
    epochs_logged = len((output / "log.jsonl").read_text().splitlines())
    return result, checkpoints, epochs_logged


def test_nan_state_fails_run(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = STEPS_PER_EPOCH + 2
    args = run_args(data_dir, tmp_path)
    corrupt_forward(monkeypatch, training=True, call=step, corrupt=nan_state)
    status = main(args)
    result, checkpoints, epochs_logged = read_run(tmp_path)
    failure = result["failure"]

    assert status == EXIT_FAILED
    validate(result, "reproduce")
    assert result["verdict"]["status"] == "failed"
    assert "NaN or infinite" in result["verdict"]["reason"]
    assert failure["kind"] == "non_finite"
    assert failure["mode"] == "implicit"
    assert failure["step"] == step
    assert failure["epoch"] == 2
    assert failure["batch"] == 1
    assert failure["forward"]["nfe_max"] <= 6
    assert "rel_residual_max" in failure["forward"]
    assert failure["backward"]["nfe_max"] <= 6
    assert math.isfinite(failure["loss"])
    assert Path(failure["last_good_checkpoint"]).name == "epoch-0001.pt"
    assert checkpoints == ["epoch-0001.pt"]
    assert epochs_logged == 1
    assert result["epochs_completed"] == 1

    weights = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt")["state"]["model"]
    for name, tensor in weights.items():
        assert torch.isfinite(tensor).all(), name

    # The kept checkpoint lets the run continue once the cause is gone.
    monkeypatch.undo()
    resumed = main([*args, "--resume", "--overwrite"])
    result, checkpoints, epochs_logged = read_run(tmp_path)

    assert resumed == EXIT_OK
    assert result["verdict"]["status"] == "not_comparable"
    assert result["failure"] is None
    assert epochs_logged == EPOCHS


def test_nan_gradient_fails_run(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = WARMUP_STEPS + 1
    corrupt_forward(monkeypatch, training=True, call=step, corrupt=nan_gradient)
    status = main(run_args(data_dir, tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    failure = result["failure"]

    assert status == EXIT_FAILED
    validate(result, "reproduce")
    assert failure["kind"] == "non_finite"
    assert failure["step"] == step
    assert failure["mode"] == "implicit"
    assert math.isfinite(failure["loss"])
    assert failure["forward"] is not None
    assert failure["last_good_checkpoint"] is None
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert result["epochs_completed"] == 0


def test_nan_at_first_step(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt_forward(monkeypatch, training=True, call=1, corrupt=nan_logits)
    status = main(run_args(data_dir, tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    failure = result["failure"]

    # Warm-up has no solver, so the statistics are null; NaN is written as null in strict JSON.
    assert status == EXIT_FAILED
    validate(result, "reproduce")
    assert failure["step"] == 1
    assert failure["mode"] == "warmup"
    assert failure["forward"] is None
    assert failure["backward"] is None
    assert failure["loss"] is None
    assert result["accuracy"]["best"] is None
    assert result["history"] == []


def test_nan_in_evaluation_fails_run(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test_batches_per_epoch = 2  # 50 test images in batches of 25
    corrupt_forward(monkeypatch, training=False, call=test_batches_per_epoch + 1, corrupt=nan_state)
    status = main(run_args(data_dir, tmp_path))
    result, checkpoints, epochs_logged = read_run(tmp_path)
    failure = result["failure"]

    # The evaluation after epoch 2 fails, so epoch 2 gets neither a checkpoint nor a log line.
    assert status == EXIT_FAILED
    validate(result, "reproduce")
    assert failure["kind"] == "non_finite"
    assert failure["mode"] == "eval"
    assert "25 of 50 test images" in failure["reason"]
    assert "after epoch 2" in failure["reason"]
    assert failure["step"] == EPOCHS * STEPS_PER_EPOCH
    assert failure["forward"]["nfe_max"] <= 6
    assert Path(failure["last_good_checkpoint"]).name == "epoch-0001.pt"
    assert checkpoints == ["epoch-0001.pt"]
    assert epochs_logged == 1


def test_unconverged_streak_survives_resume(data_dir: Path, tmp_path: Path) -> None:
    # Every implicit step counts as unconverged. Steps 3 and 4 come before the stop, so the limit of 3 falls on step 5.
    args = run_args(data_dir, tmp_path, "--unconverged-residual", "1e-12", "--max-unconverged-steps", "3")
    stopped = main([*args, "--stop-after-steps", str(STEPS_PER_EPOCH)])
    streak = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt")["state"]["unconverged_streak"]
    resumed = main([*args, "--resume"])
    result = json.loads((tmp_path / "result.json").read_text())
    failure = result["failure"]

    assert stopped == EXIT_SIGTERM
    assert streak == STEPS_PER_EPOCH - WARMUP_STEPS
    assert resumed == EXIT_FAILED
    assert failure["kind"] == "unconverged"
    assert failure["step"] == STEPS_PER_EPOCH + 1
    assert failure["unconverged_streak"] == 3
    assert "3 consecutive implicit steps" in failure["reason"]
    assert failure["forward"]["converged_fraction"] == 0.0
    assert result["resumed_from"][0]["step"] == STEPS_PER_EPOCH


def test_unconverged_check_disabled(data_dir: Path, tmp_path: Path) -> None:
    status = main(run_args(data_dir, tmp_path, "--unconverged-residual", "1e-12", "--max-unconverged-steps", "0", epochs=1))
    result = json.loads((tmp_path / "result.json").read_text())

    assert status == EXIT_OK
    assert result["failure"] is None
    assert result["history"][0]["implicit_steps"] == STEPS_PER_EPOCH - WARMUP_STEPS
