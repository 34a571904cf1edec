"""Helpers shared by the fault suites: a small ImageFolder tree and a shrunken TINY."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from deqbench.data import CLASSES

# TINY cut down to a few seconds per run.
SHRUNKEN_TINY = [
    "--set", "model.channels=[8,8]",
    "--set", "model.head_channels=[2,4]",
    "--set", "model.final_channels=16",
    "--set", "deq.warmup_layers=3",
    "--set", "deq.forward.max_nfe=6",
    "--set", "deq.backward.max_nfe=6",
]


def write_tree(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """Write root/train/<class>/ and root/test/<class>/ with 32x32 noise PNGs; return root."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)  # (H, W, C)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return root
