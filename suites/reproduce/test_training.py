"""The trainer end to end on real images: log, checkpoints, result file, plot and failure handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqbench.checkpoints import list_checkpoints
from deqbench.cli import EXIT_FAILED, EXIT_OK, main
from deqbench.results import validate

EPOCH_KEYS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_acc", "test_loss", "nfe", "residual",
    "converged_fraction", "epoch_time_s", "eval_time_s", "peak_memory_bytes", "step_loss",
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, small_run_args) -> tuple[int, Path]:
    output = tmp_path_factory.mktemp("run")
    return main(small_run_args(output)), output


def test_run_exits_ok(finished_run: tuple[int, Path]) -> None:
    status, _ = finished_run

    assert status == EXIT_OK


def test_log_one_line_per_epoch(finished_run: tuple[int, Path]) -> None:
    _, output = finished_run
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]

    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        missing = [key for key in EPOCH_KEYS if key not in record]
        assert not missing
        assert len(record["step_loss"]) == 8


def test_log_warmup_then_implicit(finished_run: tuple[int, Path]) -> None:
    _, output = finished_run
    first, second = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]

    assert first["warmup_steps"] == 4
    assert first["implicit_steps"] == 4
    assert second["implicit_steps"] == 8
    assert second["nfe"]["forward_max"] <= 6
    assert second["nfe"]["backward_max"] <= 6
    assert second["nfe"]["forward_mean"] > 0


def test_result_validates(finished_run: tuple[int, Path]) -> None:
    _, output = finished_run
    result = json.loads((output / "result.json").read_text())

    validate(result, "reproduce")
    assert result["budget"]["name"] == "custom"
    assert result["verdict"]["status"] == "not_comparable"
    assert result["config"]["deq"]["warmup_iterations"] == 4
    assert result["config"]["model"]["channels"] == [8, 8]
    assert result["budget"]["schedule"]["total_steps"] == 16
    assert result["budget"]["schedule"]["scaled"] is True
    assert result["accuracy"]["best"] == max(record["test_acc"] for record in result["history"])
    assert result["env"]["world_size"] == 1


def test_plot_written(finished_run: tuple[int, Path]) -> None:
    _, output = finished_run

    assert (output / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_per_epoch(finished_run: tuple[int, Path]) -> None:
    _, output = finished_run

    assert [path.name for path in list_checkpoints(output / "checkpoints")] == ["epoch-0002.pt", "epoch-0001.pt"]


def test_learning_rate_reaches_minimum(finished_run: tuple[int, Path]) -> None:
    _, output = finished_run
    last = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()][-1]

    # The last of 16 steps runs at step 15 of the cosine from 1e-3 to 1e-6.
    assert last["lr"] < 2e-5


def test_unconverged_run_fails(tmp_path: Path, small_run_args) -> None:
    args = small_run_args(
        tmp_path,
        "--warmup-iterations", "8",
        "--unconverged-residual", "1e-12",
        "--max-unconverged-steps", "2",
    )
    status = main(args)
    result = json.loads((tmp_path / "result.json").read_text())

    assert status == EXIT_FAILED
    validate(result, "reproduce")
    assert result["verdict"]["status"] == "failed"
    assert result["failure"]["kind"] == "unconverged"
    assert result["failure"]["step"] == 10
    assert result["failure"]["forward"]["converged_fraction"] == 0.0
    assert result["failure"]["backward"]["nfe_max"] <= 6
    assert result["epochs_completed"] == 1
    assert Path(result["failure"]["last_good_checkpoint"]).exists()
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["epoch-0001.pt"]


def test_non_finite_run_fails(tmp_path: Path, small_run_args) -> None:
    status = main(small_run_args(tmp_path, "--set", "train.lr=1e30", "--set", "train.lr_min=1e30"))
    result = json.loads((tmp_path / "result.json").read_text())

    assert status == EXIT_FAILED
    validate(result, "reproduce")
    assert result["failure"]["kind"] == "non_finite"
    assert result["verdict"]["status"] == "failed"
    assert "NaN or infinite" in result["verdict"]["reason"]


def test_overwrite_replaces_result(tmp_path: Path, small_run_args) -> None:
    args = small_run_args(tmp_path, "--epochs", "1", "--train-subset", "50", "--test-subset", "20")
    first = main(args)
    rejected = main(args)
    replaced = main([*args, "--overwrite"])

    assert first == EXIT_OK
    assert rejected == 2
    assert replaced == EXIT_OK
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1


def test_jacobian_penalty_until_stop_epoch(tmp_path: Path, small_run_args) -> None:
    status = main(small_run_args(
        tmp_path,
        "--set", "jacobian_reg.weight=0.4",
        "--set", "jacobian_reg.probability=1.0",
        "--set", "jacobian_reg.stop_epoch=1",
        "--set", "jacobian_reg.samples=1",
    ))
    first, second = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]

    assert status == EXIT_OK
    assert first["jacobian_steps"] == 8
    assert first["jacobian_loss_mean"] > 0
    assert second["jacobian_steps"] == 0
    assert second["jacobian_loss_mean"] is None
