"""Result files of the benchmarks: the schemas, the committed records and the plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from deqbench.measure.memory import growth_checks
from deqbench.measure.plots import plot_memory, plot_solvers
from deqbench.measure.speed import nfe_comparison
from deqbench.results import REPO_ROOT, load_schema, validate

RESULTS = REPO_ROOT / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        pytest.fail(f"{path} is missing; run `nox -s {'memory' if name == 'memory' else 'bench'}` to write it")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["memory", "solvers"])
def test_schema_is_valid(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema(name))


@pytest.mark.parametrize("name", ["memory", "solvers"])
def test_committed_record_valid(name: str) -> None:
    validate(_load(name), name)


@pytest.mark.parametrize("name", ["memory", "solvers"])
def test_committed_plot_present(name: str) -> None:
    path = RESULTS / f"{name}.png"

    assert path.exists(), f"{path} is missing; rerun the session that writes {name}.json"
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_memory_schema_rejects_missing_key() -> None:
    data = _load("memory")
    del data["runs"][0]["saved_tensor_bytes"]

    with pytest.raises(jsonschema.ValidationError, match="saved_tensor_bytes"):
        validate(data, "memory")


def test_memory_schema_rejects_negative_bytes() -> None:
    data = _load("memory")
    data["runs"][0]["peak_rss_bytes"] = -1

    with pytest.raises(jsonschema.ValidationError):
        validate(data, "memory")


def test_solvers_schema_rejects_library() -> None:
    data = _load("solvers")
    data["runs"][0]["library"] = "jaxopt"

    with pytest.raises(jsonschema.ValidationError):
        validate(data, "solvers")


def test_memory_points_forced_limit() -> None:
    for run in _load("memory")["runs"]:
        assert run["forward_nfe"] == run["f_max_iter"], run


def test_memory_checks_match_runs() -> None:
    data = _load("memory")

    assert data["checks"] == growth_checks(data["runs"])


def test_memory_acceptance_holds() -> None:
    """IFT saved bytes grow at most 5% from 4 to 64 forward evaluations; unrolled at least 8-fold."""
    checks = _load("memory")["checks"]

    assert {(c["model"], c["backward"]) for c in checks} >= {("TINY", "ift"), ("TINY", "unrolled")}
    for check in checks:
        assert check["passed"], check


def test_solver_checks_match_runs() -> None:
    data = _load("solvers")
    tightest = min(run["tolerance"] for run in data["runs"])

    assert data["checks"] == nfe_comparison(data, tightest)


def test_solver_overhead_consistent() -> None:
    data = _load("solvers")
    f_time = {p["name"]: p["f_eval_time_s"] for p in data["problems"]}
    for run in data["runs"]:
        expected = run["wall_time_min_s"] / (run["nfe"] * f_time[run["problem"]])
        assert run["overhead_ratio"] == pytest.approx(expected), run["solver"]


def test_solver_trace_covers_nfe() -> None:
    for run in _load("solvers")["runs"]:
        assert len(run["trace"]) == run["nfe"], (run["library"], run["solver"], run["problem"])


def test_plots_from_records(tmp_path: Path) -> None:
    memory_png, solvers_png = tmp_path / "memory.png", tmp_path / "solvers.png"
    plot_memory(_load("memory"), memory_png)
    plot_solvers(_load("solvers"), solvers_png)

    assert memory_png.read_bytes()[:8] == PNG_SIGNATURE
    assert solvers_png.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_memory_single_model(tmp_path: Path) -> None:
    data = copy.deepcopy(_load("memory"))
    data["runs"] = [run for run in data["runs"] if run["model"] == "TINY"]
    plot_memory(data, tmp_path / "tiny.png")

    assert (tmp_path / "tiny.png").read_bytes()[:8] == PNG_SIGNATURE


def test_solver_acceptance_holds() -> None:
    """Every solver reaches 1e-5 on the contractive TINY cell with no more NFE than torchdeq's same solver."""
    checks = _load("solvers")["checks"]
    contractive = {c["solver"] for c in checks if c["problem"] == "tiny_contractive"}

    assert contractive == {"fixed_point", "anderson", "broyden"}
    for check in checks:
        assert check["passed"] is not False, check
