"""A run with default paths never reuses an earlier run's result or checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from deqbench.train import reproduce
from deqbench.train.reproduce import ReproduceRequest, UsageError, prepare


@pytest.fixture()
def default_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    results_dir = tmp_path / "results" / "reproduce_cifar"
    runs_dir = tmp_path / "runs"
    monkeypatch.setattr(reproduce, "DEFAULT_RESULTS_DIR", results_dir)
    monkeypatch.setattr(reproduce, "DEFAULT_RUNS_DIR", runs_dir)
    return results_dir, runs_dir


def test_first_run_keeps_default_name(default_dirs: tuple[Path, Path]) -> None:
    results_dir, runs_dir = default_dirs

    prepared = prepare(ReproduceRequest(budget="smoke"))

    assert prepared.results_path == results_dir / "TINY-smoke.json"
    assert prepared.output_dir == runs_dir / "TINY-smoke"


def test_existing_result_gets_numbered_name(default_dirs: tuple[Path, Path]) -> None:
    results_dir, runs_dir = default_dirs
    results_dir.mkdir(parents=True)
    (results_dir / "TINY-smoke.json").write_text("{}")
    (results_dir / "TINY-smoke-2.json").write_text("{}")

    prepared = prepare(ReproduceRequest(budget="smoke"))

    assert prepared.results_path == results_dir / "TINY-smoke-3.json"
    assert prepared.output_dir == runs_dir / "TINY-smoke-3"
    assert (results_dir / "TINY-smoke.json").read_text() == "{}"


def test_existing_checkpoints_get_numbered_name(default_dirs: tuple[Path, Path]) -> None:
    results_dir, runs_dir = default_dirs
    (runs_dir / "TINY-smoke" / "checkpoints").mkdir(parents=True)

    prepared = prepare(ReproduceRequest(budget="smoke"))

    assert prepared.output_dir == runs_dir / "TINY-smoke-2"
    assert prepared.results_path == results_dir / "TINY-smoke-2.json"


def test_explicit_results_path_is_rejected(default_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    taken = tmp_path / "mine.json"
    taken.write_text("{}")

    with pytest.raises(UsageError, match="mine.json already exists"):
        prepare(ReproduceRequest(budget="smoke", results=str(taken)))


def test_overwrite_keeps_default_name(default_dirs: tuple[Path, Path]) -> None:
    results_dir, _ = default_dirs
    results_dir.mkdir(parents=True)
    (results_dir / "TINY-smoke.json").write_text("{}")

    prepared = prepare(ReproduceRequest(budget="smoke", overwrite=True))

    assert prepared.results_path == results_dir / "TINY-smoke.json"


def test_resume_command_drops_stop_after_steps() -> None:
    from deqbench.cli import _resume_command

    command = _resume_command(["reproduce", "--stop-after-steps", "2", "--budget", "smoke", "--stop-after-steps=3"], None)

    assert "--stop-after-steps" not in command
    assert command == "deqbench reproduce --budget smoke --resume"
