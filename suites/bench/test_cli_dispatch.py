"""`deqbench memory` and `deqbench bench` reach the measurement runner's parser."""

from __future__ import annotations

import pytest

from deqbench.cli import main


@pytest.mark.parametrize("command", ["memory", "bench"])
def test_measure_command_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])

    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_measure_command_rejects_bad_limits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--limits", "four"])

    assert exit_info.value.code == 2
    assert "'four'" in capsys.readouterr().err
