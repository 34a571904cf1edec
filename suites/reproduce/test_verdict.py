"""The verdict rules: only a full run on the official data can reproduce a published accuracy."""

from __future__ import annotations

import math

from deqbench.train.report import TOLERANCE_PP, accuracy_summary, decide_verdict, json_safe


def _verdict(**changes: object) -> dict:
    arguments = {
        "run_status": "completed",
        "budget_name": "full",
        "data_source": "official",
        "data_note": "",
        "best_accuracy": 84.0,
        "target_value": 83.83,
    }
    arguments.update(changes)
    return decide_verdict(**arguments)  # type: ignore[arg-type]


def test_verdict_reproduced_within_tolerance() -> None:
    assert _verdict(best_accuracy=83.83 - TOLERANCE_PP)["status"] == "reproduced"
    assert _verdict(best_accuracy=90.0)["status"] == "reproduced"


def test_verdict_not_reproduced_below() -> None:
    verdict = _verdict(best_accuracy=83.83 - TOLERANCE_PP - 0.01)

    assert verdict["status"] == "not_reproduced"
    assert "outside the tolerance" in verdict["reason"]


def test_verdict_smoke_not_comparable() -> None:
    verdict = _verdict(budget_name="smoke", best_accuracy=99.0)

    assert verdict["status"] == "not_comparable"
    assert "'smoke'" in verdict["reason"]


def test_verdict_jpeg_not_comparable() -> None:
    verdict = _verdict(data_source="imagefolder", data_note="JPEG re-encoding")

    assert verdict["status"] == "not_comparable"
    assert "'imagefolder'" in verdict["reason"]
    assert "JPEG" in verdict["reason"]


def test_verdict_failed_keeps_reason() -> None:
    verdict = _verdict(run_status="failed", failure_reason="loss became NaN", best_accuracy=None)

    assert verdict["status"] == "failed"
    assert verdict["reason"] == "loss became NaN"


def test_accuracy_best_and_final() -> None:
    history = [{"epoch": 1, "test_acc": 30.0}, {"epoch": 2, "test_acc": 45.0}, {"epoch": 3, "test_acc": 41.0}]

    assert accuracy_summary(history) == {"best": 45.0, "final": 41.0, "best_epoch": 2}
    assert accuracy_summary([]) == {"best": None, "final": None, "best_epoch": None}


def test_json_safe_replaces_non_finite() -> None:
    cleaned = json_safe({"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf, "e": "x"}})

    assert cleaned == {"a": None, "b": [1.0, None], "c": {"d": None, "e": "x"}}
