"""CI smoke run: the real TINY scenario trains on real CIFAR-10 JPEGs through the whole command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqbench.cli import EXIT_OK, main
from deqbench.results import validate

WINDOW = 4  # optimizer steps averaged at the start and at the end


@pytest.mark.data
def test_tiny_loss_decreases(tmp_path: Path, cifar_jpeg_tar: Path) -> None:
    # 64 images in batches of 16 for 3 epochs: 12 steps, the last 3 implicit.
    status = main([
        "reproduce",
        "--scenario", "TINY",
        "--data", str(cifar_jpeg_tar),
        "--train-subset", "64",
        "--test-subset", "32",
        "--batch-size", "16",
        "--epochs", "3",
        "--warmup-iterations", "9",
        "--threads", "1",
        "--output", str(tmp_path),
        "--results", str(tmp_path / "result.json"),
    ])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [loss for record in records for loss in record["step_loss"]]
    result = json.loads((tmp_path / "result.json").read_text())

    assert status == EXIT_OK
    assert len(losses) == 12
    assert sum(losses[-WINDOW:]) / WINDOW < sum(losses[:WINDOW]) / WINDOW
    validate(result, "reproduce")
    assert result["config"]["model"]["channels"] == [24, 24]
    assert result["config"]["deq"]["forward"]["max_nfe"] == 18
    assert result["history"][-1]["implicit_steps"] == 3
    assert result["data"]["source"] == "imagefolder"
    assert result["verdict"]["status"] == "not_comparable"
