"""Nox sessions for deqbench.

All sessions share one virtual environment, .nox/deqbench, because an
environment with torch and torchvision takes several GB and over a minute to
build. It is created on first use and the project is reinstalled (editable,
with the test extras) only when pyproject.toml changes. Extra arguments after
``--`` are forwarded to the command each session runs.

    nox -s tests              # the CI suite
    nox -s gradcheck          # IFT gradients against references -> results/gradcheck.json
    nox -s reproduce_cifar    # train a CIFAR-10 scenario -> results/reproduce_cifar/
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
SHARED_ENV = ROOT / ".nox" / "deqbench"
STAMP = SHARED_ENV / "deqbench-install.sha256"

nox.options.sessions = ["tests"]
nox.options.error_on_external_run = True


def _bin(name: str) -> str:
    scripts = "Scripts" if sys.platform == "win32" else "bin"
    return str(SHARED_ENV / scripts / name)


def shared_env(session: nox.Session, *extra: str) -> None:
    """Create or refresh the shared environment, then put it first on PATH.

    Sessions call its programs by full path (``_bin``), because nox looks
    commands up on the PATH it started with, not on ``session.env``.

    ``extra`` names additional packages (for example the benchmark baseline);
    they are part of the install stamp, so adding one triggers a reinstall.
    """
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(" ".join(extra).encode())
    wanted = digest.hexdigest()

    if not Path(_bin("python")).exists():
        session.run(sys.executable, "-m", "venv", str(SHARED_ENV), external=True)
    if not STAMP.exists() or STAMP.read_text().strip() != wanted:
        session.run(_bin("python"), "-m", "pip", "install", "-q", "--upgrade", "pip", external=True)
        session.run(_bin("python"), "-m", "pip", "install", "-q", "-e", ".[test]", *extra, external=True)
        STAMP.write_text(wanted + "\n")

    session.env["PATH"] = os.pathsep.join([str(Path(_bin("python")).parent), os.environ.get("PATH", "")])
    session.env["VIRTUAL_ENV"] = str(SHARED_ENV)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the CI suite: every suite except the slow and GPU markers."""
    shared_env(session)
    args = session.posargs or ["-m", "not slow and not gpu"]
    session.run(_bin("python"), "-m", "pytest", *args, external=True)


@nox.session(venv_backend="none")
def gradcheck(session: nox.Session) -> None:
    """Check IFT gradients for every solver and rewrite results/gradcheck.json."""
    shared_env(session)
    session.run(_bin("python"), "-m", "deqbench.gradcheck_report", *session.posargs, external=True)


@nox.session(venv_backend="none")
def reproduce_cifar(session: nox.Session) -> None:
    """Train a CIFAR-10 scenario (default TINY, full budget) and write its verdict."""
    shared_env(session)
    session.run(_bin("deqbench"), "reproduce", *session.posargs, external=True)


TORCHDEQ_TARGET = ROOT / ".nox" / "torchdeq-0.1.0"


@nox.session(venv_backend="none")
def memory(session: nox.Session) -> None:
    """Measure training-step memory, IFT against unrolled -> results/memory.json and memory.png."""
    shared_env(session)
    # One intra-op thread: on a shared 2-core machine two threads oversubscribe and time unpredictably.
    session.env["OMP_NUM_THREADS"] = "1"
    session.run(_bin("python"), "-m", "pytest", "suites/bench/test_memory.py", "-m", "slow", "-q", external=True)
    session.run(_bin("python"), "-m", "deqbench.measure", "memory", *session.posargs, external=True)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Time the solvers against torchdeq 0.1.0 -> results/solvers.json and solvers.png.

    torchdeq is installed without dependencies into .nox/torchdeq-0.1.0 and
    is on PYTHONPATH for this session only; it needs just torch and numpy.
    """
    shared_env(session)
    if not (TORCHDEQ_TARGET / "torchdeq-0.1.0.dist-info").exists():
        session.run(
            _bin("python"), "-m", "pip", "install", "-q", "--no-deps", "--target", str(TORCHDEQ_TARGET), "torchdeq==0.1.0",
            external=True,
        )
    session.env["PYTHONPATH"] = os.pathsep.join(p for p in [str(TORCHDEQ_TARGET), os.environ.get("PYTHONPATH", "")] if p)
    session.env["OMP_NUM_THREADS"] = "1"  # as in the memory session
    (ROOT / ".benchmarks").mkdir(exist_ok=True)
    session.run(
        _bin("python"), "-m", "pytest", "suites/bench/test_speed.py", "-m", "slow", "-q",
        "--benchmark-json", str(ROOT / ".benchmarks" / "bench.json"),
        external=True,
    )
    session.run(_bin("python"), "-m", "deqbench.measure", "bench", *session.posargs, external=True)
