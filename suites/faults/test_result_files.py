"""Result files: never replaced without --overwrite, and a crash while writing one keeps the previous file.

Checkpoint writes use the same atomic_write_bytes; their crash cases are in
test_checkpoint_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

import pytest

import deqbench.results
from deqbench.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from deqbench.results import atomic_write_json
from suites.faults.helpers import SHRUNKEN_TINY, write_tree

STEPS_PER_EPOCH = 4  # 100 training images in batches of 25


PREVIOUS = {"run": "previous", "accuracy": 12.5}


def run_args(data: Path, output: Path, results: Path, *extra: str) -> list[str]:
    return [
        "reproduce",
        "--data", str(data),
        "--batch-size", "25",
        "--epochs", "1",
        "--warmup-iterations", "2",
        "--output", str(output),
        "--results", str(results),
        "--threads", "1",
        *SHRUNKEN_TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("data") / "cifar-mini", train_per_class=10, test_per_class=5)


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    path = tmp_path / "result.json"
    atomic_write_json(path, PREVIOUS)
    return path


def temporaries(directory: Path) -> list[str]:
    """List leftover temporary files of atomic_write_bytes (.<name>.<random>.tmp)."""
    return sorted(path.name for path in directory.glob(".*.tmp"))


def fail_replace_of(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make os.replace onto a file called ``name`` raise ENOSPC, as a full disk would; other renames work."""
    original = os.replace

    def replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        original(source, target)

    monkeypatch.setattr(deqbench.results.os, "replace", replace)


# ------------------------------------------------------------ atomic writes


def test_crash_in_replace_keeps_previous(previous: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_replace_of(monkeypatch, previous.name)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(previous, {"run": "new"})

    assert json.loads(previous.read_text()) == PREVIOUS
    assert temporaries(previous.parent) == []


def test_crash_in_write_keeps_previous(previous: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fsync runs after the bytes are written and before the rename, where a failing disk reports its error.
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(deqbench.results.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_json(previous, {"run": "new"})

    assert json.loads(previous.read_text()) == PREVIOUS
    assert temporaries(previous.parent) == []


def test_unserializable_keeps_previous(previous: Path) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        atomic_write_json(previous, {"accuracy": float("nan")})

    assert json.loads(previous.read_text()) == PREVIOUS
    assert temporaries(previous.parent) == []


def test_crash_leaves_no_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "new.json"
    fail_replace_of(monkeypatch, target.name)
    with pytest.raises(OSError):
        atomic_write_json(target, {"run": "new"})

    assert not target.exists()
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------- through the CLI


def test_second_run_rejected_before_work(
    previous: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_tar = tmp_path / "cifar-mini.tar"
    with tarfile.open(data_tar, "w") as archive:
        archive.add(data_dir, arcname=data_dir.name)
    output, cache = tmp_path / "run", tmp_path / "cache"
    status = main([*run_args(data_tar, output, previous), "--cache-dir", str(cache)])
    err = capsys.readouterr().err

    assert status == EXIT_USAGE
    assert f"result file {previous} already exists" in err
    assert "--overwrite" in err
    assert "--results PATH" in err
    assert json.loads(previous.read_text()) == PREVIOUS
    assert not output.exists()
    assert not cache.exists()


def test_result_write_crash_keeps_previous(
    previous: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    args = run_args(data_dir, output, previous, "--overwrite")
    fail_replace_of(monkeypatch, previous.name)
    status = main(args)
    err = capsys.readouterr().err

    # Training finished and checkpointed; only the last rename failed.
    assert status == EXIT_FAILED
    assert "No space left on device" in err
    assert str(previous) in err
    assert "--resume" in err
    assert json.loads(previous.read_text()) == PREVIOUS
    assert temporaries(previous.parent) == []
    assert (output / "checkpoints" / "epoch-0001.pt").exists()

    # --resume from the final checkpoint trains nothing and writes the result.
    monkeypatch.undo()
    resumed = main([*args, "--resume"])
    result = json.loads(previous.read_text())

    assert resumed == EXIT_OK
    assert result["steps"] == STEPS_PER_EPOCH
    assert result["resumed_from"][0]["step"] == STEPS_PER_EPOCH
    assert result["epochs_completed"] == 1
    assert len((output / "log.jsonl").read_text().splitlines()) == 1
    assert (previous.with_suffix(".png")).exists()


def test_failed_result_needs_overwrite(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, results = tmp_path / "run", tmp_path / "result.json"
    args = run_args(data_dir, output, results, "--set", "train.lr=1e30", "--set", "train.lr_min=1e30", "--no-plot")
    failed = main(args)
    failed_result = results.read_bytes()
    capsys.readouterr()
    rejected = main(args)
    err = capsys.readouterr().err

    assert failed == EXIT_FAILED
    assert json.loads(failed_result)["verdict"]["status"] == "failed"
    assert rejected == EXIT_USAGE
    assert f"result file {results} already exists" in err
    assert results.read_bytes() == failed_result
