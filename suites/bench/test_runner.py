"""Command line of python -m deqbench.measure: argument parsing and the per-point command."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from deqbench.measure.runner import _int_list, build_parser, main


def test_memory_defaults() -> None:
    args = build_parser().parse_args(["memory"])

    assert args.models == {"TINY": 8, "LARGE": 4}
    assert args.limits == [2, 4, 8, 16, 32, 64]
    assert args.threads == 1


def test_memory_models_parsed() -> None:
    args = build_parser().parse_args(["memory", "--models", "tiny:2,LARGE:1", "--limits", "4,64"])

    assert args.models == {"TINY": 2, "LARGE": 1}
    assert args.limits == [4, 64]


@pytest.mark.parametrize("text", ["TINY", "TINY:0", "TINY:x"])
def test_memory_models_rejected(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["memory", "--models", text])

    assert "MODEL:BATCH" in capsys.readouterr().err


def test_bench_tolerances_parsed() -> None:
    args = build_parser().parse_args(["bench", "--tolerances", "1e-3,1e-6", "--no-torchdeq"])

    assert args.tolerances == [1e-3, 1e-6]
    assert args.no_torchdeq


def test_bench_tolerances_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--tolerances", "tight"])

    assert "comma-separated numbers" in capsys.readouterr().err


def test_command_required() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_memory_point_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    point = {"model": "TINY", "backward": "unrolled", "f_max_iter": 2, "batch_size": 1, "threads": 1}
    threads = torch.get_num_threads()
    try:
        status = main(["memory-point", "--point", json.dumps(point)])
    finally:
        torch.set_num_threads(threads)  # the command sets the point's thread count for the whole process
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert status == 0
    assert record["forward_nfe"] == 2
    assert record["threads"] == 1


def test_limits_rejected() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
        _int_list("2,four")
