"""Bad input to `deqbench reproduce`: rejected with exit status 2 before any data is read or file written.

Each case passes a real CIFAR-10-shaped tar with its own --cache-dir, so an
option check that ran after the data step would leave an extracted copy
behind. suites/reproduce/test_cli.py covers the scenario choice, zero sizes,
unknown --set keys and existing results or checkpoints.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from deqbench.cli import EXIT_USAGE, main
from deqbench.data import CLASSES
from suites.faults.helpers import write_tree

TRAIN_PER_CLASS = 2
TEST_PER_CLASS = 1


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree") / "cifar-mini", TRAIN_PER_CLASS, TEST_PER_CLASS)


@pytest.fixture(scope="module")
def data_tar(data_tree: Path) -> Path:
    tar_path = data_tree.parent / "cifar-mini.tar"
    with tarfile.open(tar_path, "w") as archive:
        archive.add(data_tree, arcname=data_tree.name)
    return tar_path


class Paths:
    """Everything a run may create under one test's tmp_path."""

    def __init__(self, root: Path) -> None:
        self.output = root / "run"
        self.results = root / "result.json"
        self.cache = root / "cache"

    def options(self, data: Path) -> list[str]:
        # --stop-after-steps keeps a run short if a check under test stops rejecting its input.
        return [
            "--data", str(data),
            "--cache-dir", str(self.cache),
            "--output", str(self.output),
            "--results", str(self.results),
            "--stop-after-steps", "1",
        ]

    def created(self) -> list[str]:
        return [str(path) for path in (self.output, self.results, self.cache) if path.exists()]


# (case id, options, [the value, the allowed values, the fix] as they must appear in the message)
PREPARE_CASES = [
    ("forward-solver", ["--set", "deq.forward.solver=newton"], ["'newton'", "'broyden', 'anderson', 'fixed_point'", "--set"]),
    ("backward-solver", ["--set", "deq.backward.solver=lbfgs"], ["'lbfgs'", "'broyden', 'anderson', 'fixed_point'", "--set"]),
    ("backward-mode", ["--set", "deq.backward_mode=exact"], ["'exact'", "'ift', 'unrolled', 'phantom'", "--set"]),
    ("stop-mode", ["--set", "deq.forward.stop_mode=max"], ["'max'", "'abs' or 'rel'", "--set"]),
    ("forward-max-nfe", ["--set", "deq.forward.max_nfe=-3"], ["-3", "integer >= 1", "--set"]),
    ("backward-max-nfe", ["--set", "deq.backward.max_nfe=0"], ["= 0", "integer >= 1", "--set"]),
    ("forward-tol-zero", ["--set", "deq.forward.tol=0"], ["0.0", "positive number", "--set"]),
    ("backward-tol-negative", ["--set", "deq.backward.tol=-1e-3"], ["-0.001", "positive number", "--set"]),
    ("tol-nan", ["--set", "deq.forward.tol=NaN"], ["NaN", "finite", "pass a finite value"]),
    ("lr-infinite", ["--set", "train.lr=Infinity"], ["Infinity", "finite", "pass a finite value"]),
    ("lr-negative", ["--set", "train.lr=-0.1"], ["-0.1", "positive number", "--set"]),
    ("set-batch-size", ["--set", "train.batch_size=0"], [" 0 ", "integer >= 1", "--set train.batch_size"]),
    ("set-epochs", ["--set", "train.epochs=-2"], ["-2", "integer >= 1", "--set train.epochs"]),
    ("set-epochs-fraction", ["--set", "train.epochs=1.5"], ["1.5", "integer", "--set train.epochs"]),
    ("set-warmup", ["--set", "deq.warmup_iterations=-1"], ["-1", "integer >= 0", "--set deq.warmup_iterations"]),
    ("set-seed", ["--set", "train.seed=-7"], ["-7", "integer >= 0", "--set train.seed"]),
    ("residual-zero", ["--unconverged-residual", "0"], ["0.0", "> 0", "--max-unconverged-steps 0"]),
    ("residual-negative", ["--unconverged-residual", "-0.5"], ["-0.5", "> 0", "--max-unconverged-steps 0"]),
    ("residual-nan", ["--unconverged-residual", "nan"], ["nan", "finite", "--max-unconverged-steps 0"]),
    ("residual-infinite", ["--unconverged-residual", "inf"], ["inf", "finite", "--max-unconverged-steps 0"]),
    ("measure-with-resume", ["--measure-steps", "2", "--resume"], ["--measure-steps", "--resume", "drop one"]),
    ("measure-with-stop", ["--measure-steps", "2", "--stop-after-steps", "3"], ["--measure-steps", "--stop-after-steps", "drop one"]),
    ("set-twice", ["--set", "train.lr=0.1", "--set", "train.lr=0.2"], ["train.lr", "given twice", "set each key once"]),
    ("set-against-flag", ["--batch-size", "25", "--set", "train.batch_size=20"], ["train.batch_size=20", "--batch-size 25", "give one of them"]),
    ("seed-against-flag", ["--seed", "1", "--set", "train.seed=2"], ["train.seed=2", "--seed 1", "give one of them"]),
]


@pytest.mark.parametrize(
    ("options", "expected"), [case[1:] for case in PREPARE_CASES], ids=[case[0] for case in PREPARE_CASES]
)
def test_option_rejected_before_work(
    options: list[str], expected: list[str], data_tar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(tmp_path)
    status = main(["reproduce", *paths.options(data_tar), *options])
    out, err = capsys.readouterr()

    assert status == EXIT_USAGE
    assert err.startswith("deqbench reproduce: error: ")
    for text in expected:
        assert text in err
    assert out == ""
    assert paths.created() == []


# Rejected by argparse, which exits through SystemExit(2) before deqbench code runs.
PARSER_CASES = [
    ("unknown-scenario", ["--scenario", "HUGE"], ["'HUGE'", "'TINY', 'LARGE', 'LARGE_REG'"]),
    ("unknown-budget", ["--budget", "tiny"], ["'tiny'", "'full', 'smoke'"]),
    ("unknown-device", ["--device", "tpu"], ["'tpu'", "'auto', 'cpu', 'cuda'"]),
    ("negative-epochs", ["--epochs", "-1"], ["--epochs", "-1", "integer >= 1"]),
    ("negative-batch-size", ["--batch-size", "-5"], ["--batch-size", "-5", "integer >= 1"]),
    ("fractional-epochs", ["--epochs", "2.5"], ["--epochs", "'2.5'", "not an integer"]),
    ("negative-unconverged-steps", ["--max-unconverged-steps", "-1"], ["--max-unconverged-steps", "-1", "integer >= 0"]),
    ("negative-workers", ["--workers", "-1"], ["--workers", "-1", "integer >= 0"]),
    ("negative-seed", ["--seed", "-1"], ["--seed", "-1", "integer >= 0"]),
    ("zero-threads", ["--threads", "0"], ["--threads", "0", "integer >= 1"]),
    ("zero-stop-step", ["--stop-after-steps", "0"], ["--stop-after-steps", "0", "integer >= 1"]),
    ("zero-measure-steps", ["--measure-steps", "0"], ["--measure-steps", "0", "integer >= 1"]),
]


@pytest.mark.parametrize(
    ("options", "expected"), [case[1:] for case in PARSER_CASES], ids=[case[0] for case in PARSER_CASES]
)
def test_parser_rejects_before_work(
    options: list[str], expected: list[str], data_tar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", *paths.options(data_tar), *options])
    err = capsys.readouterr().err

    assert exit_info.value.code == EXIT_USAGE
    for text in expected:
        assert text in err
    assert paths.created() == []


@pytest.mark.parametrize("split", ["train", "test"])
def test_subset_larger_than_data(split: str, data_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    available = len(CLASSES) * (TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS)
    paths = Paths(tmp_path)
    status = main(["reproduce", *paths.options(data_tree), f"--{split}-subset", str(available + 1)])
    err = capsys.readouterr().err

    # The image count of --data is known only once it is opened, so this check follows the data step.
    assert status == EXIT_USAGE
    assert f"--{split}-subset {available + 1}" in err
    assert f"the {available} images of {data_tree}" in err
    assert f"pass at most {available}" in err
    assert not paths.output.exists()
    assert not paths.results.exists()


def console_command() -> str:
    """Return the path of the installed `deqbench` console script beside this interpreter."""
    found = shutil.which("deqbench", path=str(Path(sys.executable).parent))
    assert found is not None, f"no deqbench script beside {sys.executable}; install the project with pip install -e ."
    return found


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--epochs", "0"], "argument --epochs: 0 is invalid"),
        (["--set", "deq.backward_mode=exact"], "invalid deq.backward_mode = 'exact'"),
    ],
    ids=["parser", "prepare"],
)
def test_console_exit_status(options: list[str], expected: str, data_tar: Path, tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    completed = subprocess.run(
        [console_command(), "reproduce", *paths.options(data_tar), *options],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )

    assert completed.returncode == EXIT_USAGE
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""
    assert paths.created() == []
