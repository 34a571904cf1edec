"""Every committed result under results/reproduce_cifar validates and has a consistent verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqbench.results import REPO_ROOT, validate
from deqbench.train.report import TOLERANCE_PP

RESULT_FILES = sorted((REPO_ROOT / "results" / "reproduce_cifar").glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", RESULT_FILES, ids=[path.name for path in RESULT_FILES])
def test_result_matches_schema(path: Path) -> None:
    validate(_load(path), "reproduce")


@pytest.mark.parametrize("path", RESULT_FILES, ids=[path.name for path in RESULT_FILES])
def test_result_accuracy_from_history(path: Path) -> None:
    result = _load(path)
    accuracies = [record["test_acc"] for record in result["history"]]
    if not accuracies:
        pytest.skip(f"{path.name} finished no epoch")

    assert result["accuracy"]["best"] == max(accuracies)
    assert result["accuracy"]["final"] == accuracies[-1]
    for target in result["targets"]:
        assert target["delta"] == pytest.approx(result["accuracy"]["best"] - target["value"])


@pytest.mark.parametrize("path", RESULT_FILES, ids=[path.name for path in RESULT_FILES])
def test_full_budget_verdict_consistent(path: Path) -> None:
    result = _load(path)
    verdict = result["verdict"]
    if result["budget"]["name"] != "full":
        pytest.skip(f"{path.name} ran the {result['budget']['name']!r} budget, which no published number covers")
    if verdict["status"] == "failed":
        pytest.skip(f"{path.name} failed: {verdict['reason']}")
    if result["data"]["source"] != "official":
        assert verdict["status"] == "not_comparable"
        return

    within = result["accuracy"]["best"] >= verdict["target"] - TOLERANCE_PP
    assert verdict["tolerance_pp"] == TOLERANCE_PP
    assert (verdict["status"] == "reproduced") == within


@pytest.mark.parametrize("path", RESULT_FILES, ids=[path.name for path in RESULT_FILES])
def test_partial_budget_not_comparable(path: Path) -> None:
    result = _load(path)
    if result["budget"]["name"] == "full":
        pytest.skip(f"{path.name} ran the full budget")

    assert result["verdict"]["status"] in ("not_comparable", "failed")
