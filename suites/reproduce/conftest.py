"""Fixtures of the reproduce suite: a small folder of real CIFAR-10 JPEGs and a shrunken TINY model.

Runs of the trainer here use a few hundred real images copied out of the
JPEG tar into an ImageFolder directory, so each run opens its data in well
under a second instead of scanning all 60,000 files.
"""

from __future__ import annotations

import socket
import tarfile
from pathlib import Path

import pytest

from deqbench.data import CLASSES

# Images per class copied into the small ImageFolder copy.
SMALL_TRAIN_PER_CLASS = 20
SMALL_TEST_PER_CLASS = 10

# TINY with every width cut down and short solver budgets, for trainer tests
# that run many steps; the smoke test uses the real TINY instead.
SHRUNKEN_TINY = [
    "--set", "model.channels=[8,8]",
    "--set", "model.head_channels=[2,4]",
    "--set", "model.final_channels=16",
    "--set", "deq.warmup_layers=3",
    "--set", "deq.forward.max_nfe=6",
    "--set", "deq.backward.max_nfe=6",
]


@pytest.fixture(scope="session")
def small_cifar_dir(tmp_path_factory: pytest.TempPathFactory, cifar_jpeg_tar: Path) -> Path:
    """Copy the first images of each class of the JPEG tar into train/<class>/ and test/<class>/ folders."""
    root = tmp_path_factory.mktemp("small-cifar")
    per_class = {"train": SMALL_TRAIN_PER_CLASS, "test": SMALL_TEST_PER_CLASS}
    copied: dict[tuple[str, str], int] = {}

    # Members look like cifar10-jpeg/<split>/<class>/<name>.jpg.
    with tarfile.open(cifar_jpeg_tar) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in per_class or parts[-2] not in CLASSES:
                continue
            split, label = parts[-3], parts[-2]
            if copied.get((split, label), 0) >= per_class[split]:
                continue
            target = root / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            copied[(split, label)] = copied.get((split, label), 0) + 1
            if len(copied) == 2 * len(CLASSES) and all(copied[key] >= per_class[key[0]] for key in copied):
                break
    return root


@pytest.fixture
def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def small_run_args(small_cifar_dir: Path):
    """Return a function that builds `deqbench reproduce` arguments for a shrunken TINY on the small copy.

    The run trains 200 images in batches of 25 (8 steps per epoch) and tests
    on 100; the first 4 steps are warm-up. ``extra`` arguments are appended;
    for an option that is already in the list, argparse keeps the last value.
    """

    def build(output: Path, *extra: str, epochs: int = 2) -> list[str]:
        return [
            "reproduce",
            "--data", str(small_cifar_dir),
            "--batch-size", "25",
            "--epochs", str(epochs),
            "--warmup-iterations", "4",
            "--output", str(output),
            "--results", str(output / "result.json"),
            "--threads", "1",
            *SHRUNKEN_TINY,
            *extra,
        ]

    return build
