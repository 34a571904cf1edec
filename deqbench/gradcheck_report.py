"""Run the gradient-check suite and write results/gradcheck.json.

    python -m deqbench.gradcheck_report [pytest arguments]

runs pytest in a subprocess on suites/gradcheck (unless the arguments name
a test path themselves) with DEQBENCH_GRADCHECK_ROWS set to a fresh
JSON-lines file. Each test appends one row per check to that file through
suites/gradcheck/recording.py. The report then writes results/gradcheck.json
atomically:

    {"env": capture_env(), "command": [...], "pytest_command": [...],
     "pytest_exit_code": int, "checks": [row, ...], "summary": {...}}

validated against results/schemas/gradcheck.schema.json. The exit status is
non-zero when pytest failed, when any check failed, or when no check was
recorded. Without rows the previous result file is left as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from deqbench.results import REPO_ROOT, atomic_write_json, capture_env, validate

ROWS_ENV = "DEQBENCH_GRADCHECK_ROWS"
RESULT_PATH = REPO_ROOT / "results" / "gradcheck.json"
DEFAULT_TARGETS = ("suites/gradcheck",)

# Fields of every check row. Rows may add more, such as test, mode and detail.
ROW_FIELDS = (
    "solver",
    "backward_solver",
    "problem",
    "reference",
    "dtype",
    "max_rel_error",
    "tolerance",
    "passed",
    "forward_nfe",
    "backward_nfe",
)


def pytest_command(args: Sequence[str]) -> list[str]:
    """Return the pytest command line, with DEFAULT_TARGETS added unless ``args`` names an existing path."""
    names_path = any(Path(arg.split("::")[0]).exists() for arg in args if not arg.startswith("-"))
    targets = [] if names_path else list(DEFAULT_TARGETS)
    return [sys.executable, "-m", "pytest", *targets, *args]


def run_pytest(command: Sequence[str], rows_path: Path) -> int:
    """Run ``command`` from the repository root with the rows file named in the environment."""
    env = dict(os.environ)
    env[ROWS_ENV] = str(rows_path)
    return subprocess.run(list(command), cwd=REPO_ROOT, env=env, check=False).returncode


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read the JSON-lines rows file. A missing file means no rows."""
    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Count the checks and give the worst ratio error / tolerance per reference.

    The ratio covers the upper-bound checks only (``bound`` "max", the
    default): for a "min" check a large ratio is a pass.
    """
    failed = [row for row in rows if not row["passed"]]
    worst: dict[str, float | None] = {}
    for row in rows:
        if row.get("bound", "max") != "max":
            continue
        error = row["max_rel_error"]
        ratio = None if error is None else error / row["tolerance"]
        current = worst.get(row["reference"], 0.0)
        worst[row["reference"]] = None if ratio is None or current is None else max(current, ratio)
    return {
        "checks": len(rows),
        "passed": len(rows) - len(failed),
        "failed": len(failed),
        "problems": sorted({row["problem"] for row in rows}),
        "solvers": sorted({row["solver"] for row in rows} | {row["backward_solver"] for row in rows}),
        "worst_error_to_tolerance": worst,
    }


def build_report(
    rows: Sequence[dict[str, Any]], args: Sequence[str], pytest_exit_code: int
) -> dict[str, Any]:
    """Assemble the result document. The checks run on the CPU, so env describes the CPU."""
    return {
        "env": capture_env(device="cpu"),
        "command": ["python", "-m", "deqbench.gradcheck_report", *args],
        "pytest_command": ["python", *pytest_command(args)[1:]],
        "pytest_exit_code": int(pytest_exit_code),
        "checks": list(rows),
        "summary": summarize(rows),
    }


def exit_status(pytest_exit_code: int, rows: Sequence[dict[str, Any]]) -> int:
    """Return 0 only when pytest passed, at least one check ran and every check passed."""
    if pytest_exit_code != 0:
        return pytest_exit_code
    if not rows or not all(row["passed"] for row in rows):
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite, write results/gradcheck.json and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = pytest_command(args)

    # Rows go to a fresh file that only this run writes.
    with tempfile.TemporaryDirectory(prefix="deqbench-gradcheck-") as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        pytest_exit_code = run_pytest(command, rows_path)
        rows = read_rows(rows_path)

    if not rows:
        print(
            f"gradcheck: no checks were recorded, so {RESULT_PATH} was left unchanged. "
            "Check the pytest output above for collection errors or an empty selection.",
            file=sys.stderr,
        )
        return exit_status(pytest_exit_code, rows)

    report = build_report(rows, args, pytest_exit_code)
    validate(report, "gradcheck")
    atomic_write_json(RESULT_PATH, report)
    summary = report["summary"]
    print(f"gradcheck: {summary['passed']} of {summary['checks']} checks passed; wrote {RESULT_PATH}")
    if pytest_exit_code != 0:
        print(f"gradcheck: pytest failed with exit code {pytest_exit_code}; see its output above", file=sys.stderr)
    return exit_status(pytest_exit_code, rows)


if __name__ == "__main__":
    sys.exit(main())
