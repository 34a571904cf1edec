"""The real CIFAR-10 images through deqbench.data: extraction, cache reuse, sizes, labels, batches.

The tar is extracted once into default_cache_dir() (outside the repository)
and reused by later runs, so only the first run pays for the extraction.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import functional

from deqbench import data
from deqbench.data import CLASSES

pytestmark = pytest.mark.data

STATS_SAMPLE = 2000  # test images used for the channel statistics


@pytest.fixture(scope="module")
def loaded(cifar_jpeg_tar: Path):
    """(train, test, source) of the real copy without augmentation; extracts on the first run only."""
    return data.load_cifar10(str(cifar_jpeg_tar), augment=False)


def split_root(test_dataset) -> Path:
    return Path(test_dataset.root).parent


def decode(path: str | Path) -> torch.Tensor:
    """Decode an image file with PIL alone into a (3, 32, 32) tensor in [0, 1]."""
    with Image.open(path) as image:
        return functional.to_tensor(image.convert("RGB"))


def test_tar_extraction_reused(cifar_jpeg_tar: Path, loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    if cifar_jpeg_tar.is_dir():
        pytest.skip("DEQBENCH_DATA is a directory, so nothing is extracted")
    _, _, first = loaded
    marker = Path(first.extracted_to) / data.EXTRACTED_MARKER
    marker_before = marker.stat()
    extractions = []
    original = tarfile.TarFile.extractall

    def counting_extractall(self, *args, **kwargs):
        extractions.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", counting_extractall)
    _, _, second = data.load_cifar10(str(cifar_jpeg_tar), augment=False)

    assert extractions == []
    assert second == first
    assert marker.stat().st_ino == marker_before.st_ino
    assert marker.stat().st_mtime_ns == marker_before.st_mtime_ns
    assert Path(first.extracted_to).parent == data.default_cache_dir()


def test_source_record(cifar_jpeg_tar: Path, loaded) -> None:
    _, _, source = loaded
    assert source.source == "imagefolder"
    assert source.path == str(cifar_jpeg_tar.resolve())
    if cifar_jpeg_tar.is_file():
        digest = data.file_sha256(cifar_jpeg_tar)
        assert source.sha256 == digest
        assert source.note == (data.JPEG_COPY_NOTE if digest == data.JPEG_COPY_SHA256 else "")


def test_split_sizes(loaded) -> None:
    train, test, source = loaded
    assert len(train) == data.NUM_TRAIN
    assert len(test) == data.NUM_TEST
    assert (source.num_train, source.num_test) == (data.NUM_TRAIN, data.NUM_TEST)


def test_classes_balanced(loaded) -> None:
    train, test, _ = loaded
    assert set(Counter(train.targets).values()) == {data.NUM_TRAIN // len(CLASSES)}
    assert set(Counter(test.targets).values()) == {data.NUM_TEST // len(CLASSES)}


def test_class_label_order(loaded) -> None:
    train, test, _ = loaded
    assert train.classes == list(CLASSES)
    assert test.class_to_idx == {name: index for index, name in enumerate(CLASSES)}
    folders = {Path(path).parent.name: label for path, label in test.samples}
    assert folders == test.class_to_idx


def test_known_file_label(loaded) -> None:
    _, test, _ = loaded
    known = split_root(test) / "test" / "cat" / "0000.jpg"
    index = [Path(path) for path, _ in test.samples].index(known)

    image, label = test[index]  # image: (3, 32, 32)
    expected = functional.normalize(decode(known), data.CIFAR10_MEAN, data.CIFAR10_STD)
    assert label == CLASSES.index("cat")
    assert torch.equal(image, expected)


def test_batch_shape(loaded) -> None:
    _, test, _ = loaded
    loader = DataLoader(test, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    images, labels = next(iter(loader))
    assert images.shape == (64, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.shape == (64,)
    assert int(labels.min()) >= 0
    assert int(labels.max()) < len(CLASSES)


def test_augmented_batch_shape(cifar_jpeg_tar: Path) -> None:
    train, _, _ = data.load_cifar10(str(cifar_jpeg_tar), augment=True)
    images, _ = next(iter(DataLoader(train, batch_size=32, shuffle=True)))
    assert images.shape == (32, 3, 32, 32)


def test_normalized_statistics(loaded) -> None:
    _, test, _ = loaded
    chosen = data.subset(test, STATS_SAMPLE, seed=0)
    normalized = torch.cat([images for images, _ in DataLoader(chosen, batch_size=500)])  # (N, 3, 32, 32)
    raw = torch.stack([decode(test.samples[index][0]) for index in chosen.indices])  # (N, 3, 32, 32)

    mean = torch.tensor(data.CIFAR10_MEAN)
    std = torch.tensor(data.CIFAR10_STD)
    channel_mean = normalized.mean(dim=(0, 2, 3))
    channel_std = normalized.std(dim=(0, 2, 3))
    assert torch.allclose(channel_mean, (raw.mean(dim=(0, 2, 3)) - mean) / std, atol=1e-4)
    assert torch.allclose(channel_std, raw.std(dim=(0, 2, 3)) / std, atol=1e-4)
    # The constants centre this data: the standard error of a channel mean over
    # 2,000 images is about 0.03 in normalized units, so 0.1 is over 3 errors.
    assert bool((channel_mean.abs() < 0.1).all()), channel_mean
    # MDEQ's std constants are below the pixel std of CIFAR-10, so the spread exceeds 1.
    assert bool((channel_std > 1.0).all()), channel_std


def test_balanced_subset(loaded) -> None:
    train, _, _ = loaded
    chosen = data.subset(train, 1000, seed=0)
    counts = Counter(train.targets[index] for index in chosen.indices)
    assert isinstance(chosen, Subset)
    assert set(counts.values()) == {1000 // len(CLASSES)}
    assert np.all(np.diff(chosen.indices) > 0)
