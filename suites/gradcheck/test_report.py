"""The gradcheck result file: row recording, report assembly, exit status and the schema."""

from __future__ import annotations

import json
import math
import os
import sys

import jsonschema
import pytest

from deqbench import gradcheck_report
from deqbench.results import REPO_ROOT, validate
from suites.gradcheck import recording

pytestmark = pytest.mark.gradcheck

ROW = dict(
    solver="broyden",
    backward_solver="anderson",
    problem="tanh_rho0.9",
    reference="dense",
    dtype="float64",
    tolerance=1e-8,
    forward_nfe=12,
    backward_nfe=11,
)


# Read at import, before the fixture below removes the variable for each test.
INSIDE_REPORT_RUN = bool(os.environ.get(gradcheck_report.ROWS_ENV))


@pytest.fixture(autouse=True)
def _no_rows_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the made-up rows of these tests out of a report run's rows file."""
    monkeypatch.delenv(gradcheck_report.ROWS_ENV, raising=False)


def test_committed_result_matches_schema() -> None:
    if INSIDE_REPORT_RUN:
        pytest.skip("inside a report run, which validates the file it writes before replacing this one")
    with open(REPO_ROOT / "results" / "gradcheck.json", encoding="utf-8") as handle:
        data = json.load(handle)
    validate(data, "gradcheck")


def test_record_check_appends_rows(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv(gradcheck_report.ROWS_ENV, str(path))
    recording.record_check(max_rel_error=1e-12, **ROW)
    recording.record_check(max_rel_error=1e-3, **ROW)
    rows = gradcheck_report.read_rows(path)
    assert [row["passed"] for row in rows] == [True, False]


def test_record_check_without_file() -> None:
    row = recording.record_check(max_rel_error=1e-12, **ROW)
    assert row["passed"]


def test_record_check_nan_fails() -> None:
    row = recording.record_check(max_rel_error=math.nan, **ROW)
    assert row["max_rel_error"] is None
    assert not row["passed"]


def test_record_check_lower_bound() -> None:
    # A "min" check passes when the error reaches its tolerance.
    assert recording.record_check(max_rel_error=0.5, bound="min", **ROW)["passed"]
    assert not recording.record_check(max_rel_error=1e-9, bound="min", **ROW)["passed"]


def test_record_check_passed_override() -> None:
    row = recording.record_check(max_rel_error=0.5, passed=True, **ROW)
    assert row["passed"]


def test_record_check_rejects_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        recording.record_check(max_rel_error=0.0, **{**ROW, "dtype": "bfloat16"})


def test_report_matches_schema() -> None:
    rows = [recording.record_check(max_rel_error=1e-12, test="t", mode="ift", **ROW)]
    report = gradcheck_report.build_report(rows, ["-k", "tanh"], 0)
    validate(report, "gradcheck")
    assert report["command"][-2:] == ["-k", "tanh"]


def test_schema_rejects_missing_field() -> None:
    row = recording.record_check(max_rel_error=1e-12, **ROW)
    del row["backward_nfe"]
    report = gradcheck_report.build_report([row], [], 0)
    with pytest.raises(jsonschema.ValidationError):
        validate(report, "gradcheck")


def test_summary_counts() -> None:
    rows = [
        recording.record_check(max_rel_error=1e-12, **ROW),
        recording.record_check(max_rel_error=1e-3, **ROW),
        recording.record_check(max_rel_error=1e-9, **{**ROW, "reference": "finite_difference", "tolerance": 1e-6}),
    ]
    rows.append(recording.record_check(max_rel_error=0.5, bound="min", **{**ROW, "tolerance": 1e-2}))
    summary = gradcheck_report.summarize(rows)
    assert summary["checks"] == 4
    assert summary["failed"] == 1
    assert summary["worst_error_to_tolerance"]["dense"] == pytest.approx(1e5)
    assert summary["worst_error_to_tolerance"]["finite_difference"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "pytest_code, errors, expected",
    [(0, [1e-12], 0), (0, [1e-12, 1.0], 1), (0, [], 1), (1, [1e-12], 1), (2, [], 2)],
)
def test_exit_status(pytest_code: int, errors: list, expected: int) -> None:
    rows = [recording.record_check(max_rel_error=e, **ROW) for e in errors]
    assert gradcheck_report.exit_status(pytest_code, rows) == expected


def test_pytest_command_default_targets() -> None:
    command = gradcheck_report.pytest_command(["-k", "broyden"])
    assert command[:3] == [sys.executable, "-m", "pytest"]
    assert command[3:] == [*gradcheck_report.DEFAULT_TARGETS, "-k", "broyden"]


def test_pytest_command_keeps_given_path() -> None:
    command = gradcheck_report.pytest_command(["suites/gradcheck/test_report.py::test_summary_counts"])
    assert command[3:] == ["suites/gradcheck/test_report.py::test_summary_counts"]


def test_main_end_to_end(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One real check through a pytest subprocess, written to a temporary result file.
    result = tmp_path / "gradcheck.json"
    monkeypatch.setattr(gradcheck_report, "RESULT_PATH", result)
    selected = "suites/gradcheck/test_ift.py::test_ift_vs_closed_form[affine_rho0.9-broyden-broyden]"
    status = gradcheck_report.main([selected, "-q", "-p", "no:cacheprovider"])
    data = json.loads(result.read_text())
    assert status == 0
    assert len(data["checks"]) == 1
    assert data["checks"][0]["reference"] == "closed_form"
    validate(data, "gradcheck")


def test_main_keeps_file_without_rows(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pytest run that records nothing (here: a stand-in that runs no test).
    result = tmp_path / "gradcheck.json"
    monkeypatch.setattr(gradcheck_report, "RESULT_PATH", result)
    monkeypatch.setattr(gradcheck_report, "run_pytest", lambda command, rows_path: 0)
    status = gradcheck_report.main(["-k", "nothing"])
    assert status == 1
    assert not result.exists()
