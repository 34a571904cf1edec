"""`deqbench reproduce` option checks: every bad input stops before any work with exit status 2."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from deqbench.cli import EXIT_USAGE, build_parser, main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["reproduce", *args])
    return status, capsys.readouterr().err


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--help"])
    text = capsys.readouterr().out

    assert exit_info.value.code == 0
    reproduce = build_parser()._subparsers._group_actions[0].choices["reproduce"]  # type: ignore[union-attr]
    for action in reproduce._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"


def test_help_states_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())

    assert "(default: TINY)" in text
    assert "(default: full)" in text
    assert "(default: 50)" in text
    reproduce = build_parser()._subparsers._group_actions[0].choices["reproduce"]  # type: ignore[union-attr]
    for action in reproduce._actions:
        if not action.option_strings or action.dest == "help":
            continue
        # The formatter appends defaults other than None, booleans and []. The others state theirs in words.
        stated = "default" in (action.help or "")
        appended = action.default not in (None, False, True, [])
        assert stated or appended, f"{action.option_strings} does not state its default"


def test_unknown_scenario_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--scenario", "HUGE"])

    assert exit_info.value.code == EXIT_USAGE
    assert "TINY" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--epochs", "--batch-size", "--train-subset", "--test-subset"])
def test_zero_limit_rejected(capsys: pytest.CaptureFixture[str], option: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", option, "0"])
    err = capsys.readouterr().err

    assert exit_info.value.code == EXIT_USAGE
    assert option in err
    assert ">= 1" in err


def test_jr_paper_needs_large_reg(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, err = _run(capsys, "--scenario", "TINY", "--variant", "jr_paper", "--output", str(tmp_path))

    assert status == EXIT_USAGE
    assert "LARGE_REG (variant jr_paper)" in err


def test_subset_larger_than_cifar(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, err = _run(capsys, "--train-subset", "50001", "--output", str(tmp_path))

    assert status == EXIT_USAGE
    assert "50001" in err
    assert "at most 50000" in err


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("model.chanels=[8,8]", "unknown configuration key 'model.chanels'"),
        ("deq.forward.max_nfe=0", "deq.forward.max_nfe"),
        ("train.lr=-1", "train.lr"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_setting_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path, setting: str, expected: str) -> None:
    status, err = _run(capsys, "--set", setting, "--output", str(tmp_path))

    assert status == EXIT_USAGE
    assert expected in err


def test_setting_conflicts_with_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, err = _run(capsys, "--epochs", "3", "--set", "train.epochs=4", "--output", str(tmp_path))

    assert status == EXIT_USAGE
    assert "conflicts with --epochs 3" in err


def test_existing_result_not_overwritten(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    results = tmp_path / "result.json"
    results.write_text("{}")
    status, err = _run(capsys, "--results", str(results), "--output", str(tmp_path / "run"))

    assert status == EXIT_USAGE
    assert str(results) in err
    assert "--overwrite" in err
    assert results.read_text() == "{}"


def test_resume_without_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, err = _run(capsys, "--resume", "--overwrite", "--output", str(tmp_path), "--results", str(tmp_path / "r.json"))

    assert status == EXIT_USAGE
    assert "--resume found no checkpoint" in err


def test_old_checkpoints_need_resume_or_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch-0001.pt").write_bytes(b"x")
    status, err = _run(capsys, "--output", str(tmp_path), "--results", str(tmp_path / "r.json"))

    assert status == EXIT_USAGE
    assert "--resume" in err
    assert "--overwrite" in err


def test_cuda_without_gpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    status, err = _run(capsys, "--device", "cuda", "--output", str(tmp_path))

    assert status == EXIT_USAGE
    assert "--device cpu" in err


def test_missing_data_fails_fast(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    start = time.perf_counter()
    status, err = _run(
        capsys,
        "--data-root", str(tmp_path / "no-cifar"),
        "--no-download",
        "--output", str(tmp_path / "run"),
        "--results", str(tmp_path / "r.json"),
    )
    elapsed = time.perf_counter() - start

    assert status == EXIT_USAGE
    assert "CIFAR-10 could not be loaded" in err
    assert elapsed < 30
    assert not (tmp_path / "r.json").exists()


def test_missing_data_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, err = _run(capsys, "--data", str(tmp_path / "nothing.tar"), "--output", str(tmp_path / "run"))

    assert status == EXIT_USAGE
    assert re.search(r"data path .*nothing\.tar does not exist", err)
