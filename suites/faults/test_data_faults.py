"""Fault tests of deqbench.data on small ImageFolder trees and tars built in tmp_path.

Every broken input must raise DataError naming the file or folder; the
network is replaced by a stub that fails, so nothing here downloads.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision import transforms

from deqbench import data
from deqbench.data import CLASSES, DataError

IMAGES_PER_CLASS = 2
TOP_FOLDER = "cifar-mini"


# ------------------------------------------------------------------ helpers


def write_image(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> None:
    """Write a noise image of ``size`` (width, height) and PIL ``mode``; the suffix picks PNG or JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.as_posix().encode()))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)  # (H, W, C)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)


def make_tree(root: Path, per_class: int = IMAGES_PER_CLASS) -> Path:
    """Build root/train/<class>/ and root/test/<class>/ with ``per_class`` PNG files each; return root."""
    for split in ("train", "test"):
        for name in CLASSES:
            for index in range(per_class):
                write_image(root / split / name / f"{index:04d}.png")
    return root


def make_tar(source: Path, tar_path: Path) -> Path:
    """Pack ``source`` as the tar's single top folder and return the tar's path."""
    with tarfile.open(tar_path, "w") as archive:
        archive.add(source, arcname=source.name)
    return tar_path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "trees" / TOP_FOLDER)


@pytest.fixture()
def tar_file(tree: Path, tmp_path: Path) -> Path:
    return make_tar(tree, tmp_path / "cifar-mini.tar")


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def load(path: Path, cache_dir: Path | None = None):
    return data.load_cifar10(str(path), augment=False, cache_dir=None if cache_dir is None else str(cache_dir))


def completed_extractions(cache_dir: Path) -> list[Path]:
    if not cache_dir.exists():
        return []
    return [entry for entry in cache_dir.iterdir() if (entry / data.EXTRACTED_MARKER).exists()]


def leftover_partials(cache_dir: Path) -> list[Path]:
    if not cache_dir.exists():
        return []
    return [entry for entry in cache_dir.iterdir() if data.PARTIAL_INFIX in entry.name]


# ----------------------------------------------------------------- paths, tars


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as raised:
        load(missing)
    assert str(missing) in str(raised.value)
    assert "--data" in str(raised.value)


def test_empty_file(tmp_path: Path, cache: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as raised:
        load(empty, cache)
    assert str(empty) in str(raised.value)
    assert "empty" in str(raised.value)


def test_tar_without_members(tmp_path: Path, cache: Path) -> None:
    empty_tar = tmp_path / "nothing.tar"
    with tarfile.open(empty_tar, "w"):
        pass
    with pytest.raises(DataError) as raised:
        load(empty_tar, cache)
    assert str(empty_tar) in str(raised.value)
    assert "no files" in str(raised.value)
    assert completed_extractions(cache) == []


def test_not_a_tar(tmp_path: Path, cache: Path) -> None:
    text = tmp_path / "notes.tar"
    text.write_text("these are not images\n" * 100)
    with pytest.raises(DataError) as raised:
        load(text, cache)
    assert str(text) in str(raised.value)
    assert "not a tar archive" in str(raised.value)


def truncation_points(tar_path: Path) -> dict[str, int]:
    """Byte offsets that cut the tar inside a file, at a header, inside a header and before the end block."""
    with tarfile.open(tar_path) as archive:
        files = [member for member in archive.getmembers() if member.isfile()]
    middle, last = files[len(files) // 2], files[-1]
    padded_size = -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return {
        "inside_file": middle.offset_data + middle.size // 2,
        "at_header": middle.offset,
        "inside_header": middle.offset + tarfile.BLOCKSIZE // 2,
        "before_end_block": last.offset_data + padded_size,
    }


@pytest.mark.parametrize("cut", ["inside_file", "at_header", "inside_header", "before_end_block"])
def test_truncated_tar(cut: str, tar_file: Path, tmp_path: Path, cache: Path) -> None:
    truncated = tmp_path / f"truncated-{cut}.tar"
    offset = truncation_points(tar_file)[cut]
    truncated.write_bytes(tar_file.read_bytes()[:offset])

    with pytest.raises(DataError) as raised:
        load(truncated, cache)
    assert str(truncated) in str(raised.value)
    assert "truncated" in str(raised.value)
    assert completed_extractions(cache) == []
    assert leftover_partials(cache) == []


def unsafe_tar(kind: str, tar_path: Path) -> Path:
    """Write a tar whose single member escapes the extraction folder."""
    with tarfile.open(tar_path, "w") as archive:
        if kind == "parent_path":
            payload = b"escaped"
            member = tarfile.TarInfo("../escaped.txt")
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
        else:
            member = tarfile.TarInfo("link")
            member.type = tarfile.SYMTYPE
            member.linkname = "/etc/passwd"
            archive.addfile(member)
    return tar_path


@pytest.mark.parametrize("kind", ["parent_path", "absolute_symlink"])
def test_unsafe_member(kind: str, tmp_path: Path, cache: Path) -> None:
    hostile = unsafe_tar(kind, tmp_path / f"{kind}.tar")
    with pytest.raises(DataError) as raised:
        load(hostile, cache)
    assert str(hostile) in str(raised.value)
    assert "unsafe member" in str(raised.value)
    assert not (cache / "escaped.txt").exists()
    assert completed_extractions(cache) == []


# ------------------------------------------------------------------- layout


def test_folder_without_test_split(tree: Path) -> None:
    shutil.rmtree(tree / "test")
    with pytest.raises(DataError) as raised:
        load(tree)
    assert str(tree) in str(raised.value)
    assert "no test/" in str(raised.value)


def test_folder_without_splits(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    write_image(bare / "cat" / "0000.png")
    with pytest.raises(DataError) as raised:
        load(bare)
    assert str(bare) in str(raised.value)
    assert "no train/ and test/" in str(raised.value)


def test_tar_without_splits(tmp_path: Path, cache: Path) -> None:
    bare = tmp_path / "bare"
    write_image(bare / "cat" / "0000.png")
    packed = make_tar(bare, tmp_path / "bare.tar")
    with pytest.raises(DataError) as raised:
        load(packed, cache)
    assert str(packed) in str(raised.value)
    assert completed_extractions(cache) == []


def test_tar_of_official_batches(tmp_path: Path, cache: Path) -> None:
    official = tmp_path / data.OFFICIAL_FOLDER
    official.mkdir()
    (official / "data_batch_1").write_bytes(b"not a real batch")
    packed = make_tar(official, tmp_path / "official.tar")
    with pytest.raises(DataError) as raised:
        load(packed, cache)
    assert data.OFFICIAL_FOLDER in str(raised.value)
    assert "omit --data" in str(raised.value)


def test_several_split_folders(tmp_path: Path) -> None:
    parent = tmp_path / "two"
    make_tree(parent / "a", per_class=1)
    make_tree(parent / "b", per_class=1)
    with pytest.raises(DataError) as raised:
        load(parent)
    assert str(parent / "a") in str(raised.value)
    assert str(parent / "b") in str(raised.value)


def test_parent_folder_accepted(tree: Path) -> None:
    train, test, source = load(tree.parent)
    assert len(train) == len(CLASSES) * IMAGES_PER_CLASS
    assert len(test) == len(CLASSES) * IMAGES_PER_CLASS
    assert source.path == str(tree.parent)


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_class_folder(split: str, tree: Path) -> None:
    shutil.rmtree(tree / split / "cat")
    with pytest.raises(DataError) as raised:
        load(tree)
    assert str(tree / split) in str(raised.value)
    assert "missing cat" in str(raised.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_extra_class_folder(split: str, tree: Path) -> None:
    write_image(tree / split / "zebra" / "0000.png")
    with pytest.raises(DataError) as raised:
        load(tree)
    assert str(tree / split) in str(raised.value)
    assert "unexpected zebra" in str(raised.value)


def test_empty_class_folder(tree: Path) -> None:
    for image in (tree / "train" / "dog").iterdir():
        image.unlink()
    with pytest.raises(DataError) as raised:
        load(tree)
    assert str(tree / "train" / "dog") in str(raised.value)
    assert "no image files" in str(raised.value)


def test_hidden_folders_ignored(tree: Path) -> None:
    write_image(tree / "train" / ".ipynb_checkpoints" / "0000.png")
    train, _, _ = load(tree)
    assert train.classes == list(CLASSES)
    assert len(train) == len(CLASSES) * IMAGES_PER_CLASS


def test_labels_follow_cifar_order(tree: Path) -> None:
    train, _, _ = load(tree)
    for path, label in train.samples:
        assert Path(path).parent.name == CLASSES[label]


# ---------------------------------------------------------- per-image checks


def sample_index(dataset, path: Path) -> int:
    return [Path(sample) for sample, _ in dataset.samples].index(path)


def test_corrupted_image(tree: Path) -> None:
    broken = tree / "train" / "cat" / "0000.png"
    broken.write_bytes(b"\x89PNG garbage that no decoder accepts" * 4)
    train, _, _ = load(tree)

    with pytest.raises(DataError) as raised:
        train[sample_index(train, broken)]
    assert str(broken) in str(raised.value)
    assert "cannot be decoded" in str(raised.value)


def test_truncated_jpeg(tree: Path) -> None:
    jpeg = tree / "test" / "ship" / "0000.jpg"
    write_image(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    _, test, _ = load(tree)

    with pytest.raises(DataError) as raised:
        test[sample_index(test, jpeg)]
    assert str(jpeg) in str(raised.value)


def test_wrong_size_image(tree: Path) -> None:
    wide = tree / "train" / "frog" / "0001.png"
    write_image(wide, size=(33, 32))
    train, _, _ = load(tree)

    with pytest.raises(DataError) as raised:
        train[sample_index(train, wide)]
    assert str(wide) in str(raised.value)
    assert "33x32" in str(raised.value)


def test_wrong_mode_image(tree: Path) -> None:
    transparent = tree / "train" / "bird" / "0000.png"
    write_image(transparent, mode="RGBA")
    train, _, _ = load(tree)

    with pytest.raises(DataError) as raised:
        train[sample_index(train, transparent)]
    assert str(transparent) in str(raised.value)
    assert "RGBA" in str(raised.value)


def test_grayscale_image_converted(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    write_image(gray, mode="L")
    image = data.load_checked_image(str(gray))
    pixels = np.asarray(image)  # (H, W, 3)
    assert image.mode == "RGB"
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


# Python 3.12+ warns when forking a process that runs threads, as torch's
# thread pool does; the forked DataLoader worker here only decodes images.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_stops_loader(workers: int, tree: Path) -> None:
    broken = tree / "train" / "horse" / "0001.png"
    broken.write_bytes(b"definitely not an image")
    train, _, _ = load(tree)
    loader = DataLoader(train, batch_size=4, shuffle=False, num_workers=workers)

    with pytest.raises(DataError) as raised:
        for _ in loader:
            pass
    assert str(broken) in str(raised.value)


# --------------------------------------------------------- tar cache reuse


def test_tar_extracted_once(tar_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = tarfile.TarFile.extractall

    def counting_extractall(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", counting_extractall)
    first_train, _, first = load(tar_file, cache)
    second_train, _, second = load(tar_file, cache)

    digest = hashlib.sha256(tar_file.read_bytes()).hexdigest()
    assert len(calls) == 1
    assert first == second
    assert first.sha256 == digest
    assert first.extracted_to == str(cache.resolve() / digest[:16])
    assert first.source == "imagefolder"
    assert first.note == ""
    assert first.num_train == len(CLASSES) * IMAGES_PER_CLASS
    assert second_train.samples == first_train.samples


def test_data_source_to_dict(tar_file: Path, cache: Path) -> None:
    _, _, source = load(tar_file, cache)
    recorded = source.to_dict()
    assert recorded["path"] == str(tar_file)
    assert recorded["num_test"] == len(CLASSES) * IMAGES_PER_CLASS
    assert set(recorded) == {"source", "path", "sha256", "extracted_to", "num_train", "num_test", "note"}


def test_interrupted_publish(tar_file: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_rename(source, target):
        raise OSError("simulated crash while renaming")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(DataError) as raised:
        load(tar_file, cache)
    assert "simulated crash" in str(raised.value)
    assert completed_extractions(cache) == []
    assert leftover_partials(cache) == []

    monkeypatch.undo()
    train, _, _ = load(tar_file, cache)
    assert len(train) == len(CLASSES) * IMAGES_PER_CLASS


def test_dead_partial_removed(tar_file: Path, cache: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    digest = hashlib.sha256(tar_file.read_bytes()).hexdigest()
    stale = cache / f".{digest[:16]}{data.PARTIAL_INFIX}{socket.gethostname()}+{dead_pid}+abc"
    (stale / "half").mkdir(parents=True)

    load(tar_file, cache)
    assert not stale.exists()


def test_unmarked_cache_folder(tar_file: Path, cache: Path) -> None:
    digest = hashlib.sha256(tar_file.read_bytes()).hexdigest()
    foreign = cache / digest[:16]
    foreign.mkdir(parents=True)
    with pytest.raises(DataError) as raised:
        load(tar_file, cache)
    assert str(foreign) in str(raised.value)
    assert "delete that folder" in str(raised.value)


# ----------------------------------------------------------- cache folder


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEQBENCH_CACHE", str(tmp_path / "custom"))
    assert data.default_cache_dir() == (tmp_path / "custom").resolve()


def test_cache_dir_default_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEQBENCH_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_cache_dir() == (tmp_path / ".cache" / "deqbench").resolve()


needs_checkout = pytest.mark.skipif(not (data.REPO_ROOT / ".git").exists(), reason="needs a git checkout")


@needs_checkout
def test_cache_dir_inside_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    inside = data.REPO_ROOT / "cache"
    monkeypatch.setenv("DEQBENCH_CACHE", str(inside))
    with pytest.raises(DataError) as raised:
        data.default_cache_dir()
    assert str(inside) in str(raised.value)
    assert "DEQBENCH_CACHE" in str(raised.value)


@needs_checkout
def test_cache_argument_inside_repository(tar_file: Path) -> None:
    inside = data.REPO_ROOT / "cache"
    with pytest.raises(DataError) as raised:
        load(tar_file, inside)
    assert str(inside) in str(raised.value)
    assert not inside.exists()


# -------------------------------------------------------- official archive


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch):
    """Replace urllib's urlopen, the network boundary of torchvision's download, with a failing stub."""
    attempts: list[str] = []
    failure: list[BaseException] = [urllib.error.URLError("[Errno -3] Temporary failure in name resolution")]

    def fail_request(request, *args, **kwargs):
        attempts.append(getattr(request, "full_url", str(request)))
        raise failure[0]

    def fail_connection(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(urllib.request, "urlopen", fail_request)
    monkeypatch.setattr(socket, "create_connection", fail_connection)
    return attempts, failure


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
    ids=["dns", "refused", "timeout"],
)
def test_official_offline(error: BaseException, offline, tmp_path: Path) -> None:
    attempts, failure = offline
    failure[0] = error
    root = tmp_path / "torchvision-root"

    started = time.perf_counter()
    with pytest.raises(DataError) as raised:
        data.load_cifar10(None, root=str(root), augment=False)
    elapsed = time.perf_counter() - started

    message = str(raised.value)
    assert attempts, "the download was never attempted"
    assert elapsed < data.DOWNLOAD_TIMEOUT_S
    assert str(root / data.OFFICIAL_ARCHIVE) in message
    assert str(root / data.OFFICIAL_FOLDER) in message
    assert "--data PATH" in message
    assert "download failed" in message
    assert socket.getdefaulttimeout() is None


def test_official_download_disabled(offline, tmp_path: Path) -> None:
    attempts, _ = offline
    root = tmp_path / "torchvision-root"
    with pytest.raises(DataError) as raised:
        data.load_cifar10(None, root=str(root), augment=False, download=False)
    assert attempts == []
    assert "download is disabled" in str(raised.value)
    assert str(root / data.OFFICIAL_ARCHIVE) in str(raised.value)


def test_official_corrupted_archive(offline, tmp_path: Path) -> None:
    root = tmp_path / "torchvision-root"
    root.mkdir()
    (root / data.OFFICIAL_ARCHIVE).write_bytes(b"half a download")
    with pytest.raises(DataError) as raised:
        data.load_cifar10(None, root=str(root), augment=False)
    assert str(root / data.OFFICIAL_ARCHIVE) in str(raised.value)
    assert "MD5" in str(raised.value)


# ------------------------------------------------------------- transforms


def test_transforms_without_augmentation() -> None:
    train_transform, test_transform = data.build_transforms(augment=False)
    kinds = [type(step) for step in train_transform.transforms]
    assert kinds == [transforms.ToTensor, transforms.Normalize]
    assert [type(step) for step in test_transform.transforms] == kinds


def test_transforms_with_augmentation() -> None:
    train_transform, test_transform = data.build_transforms(augment=True)
    crop, flip = train_transform.transforms[:2]
    assert isinstance(crop, transforms.RandomCrop)
    assert crop.size == (32, 32)
    assert crop.padding == 4
    assert isinstance(flip, transforms.RandomHorizontalFlip)
    assert not any(isinstance(step, transforms.RandomCrop) for step in test_transform.transforms)


def test_normalization_values(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    write_image(path)
    image = data.load_checked_image(str(path))
    _, test_transform = data.build_transforms(augment=False)

    normalized = test_transform(image)  # (3, 32, 32)
    raw = transforms.functional.to_tensor(image)  # (3, 32, 32), values in [0, 1]
    mean = torch.tensor(data.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(3, 1, 1)
    assert normalized.shape == (3, 32, 32)
    assert torch.allclose(normalized, (raw - mean) / std)


# ----------------------------------------------------------------- subsets


@pytest.fixture()
def labelled(tmp_path: Path):
    train, _, _ = load(make_tree(tmp_path / "labelled", per_class=4))
    return train


def test_subset_deterministic(labelled) -> None:
    first = data.subset(labelled, 15, seed=3)
    again = data.subset(labelled, 15, seed=3)
    other = data.subset(labelled, 15, seed=4)
    assert first.indices == again.indices
    assert first.indices != other.indices


def test_subset_class_balanced(labelled) -> None:
    chosen = data.subset(labelled, 25, seed=0)
    counts = Counter(labelled.targets[index] for index in chosen.indices)
    assert len(chosen) == 25
    assert len(set(chosen.indices)) == 25
    assert set(counts) == set(range(len(CLASSES)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_subset_too_large(labelled) -> None:
    with pytest.raises(DataError) as raised:
        data.subset(labelled, len(labelled) + 1, seed=0)
    assert str(len(labelled) + 1) in str(raised.value)
    assert str(len(labelled)) in str(raised.value)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_subset_invalid_size(size, labelled) -> None:
    with pytest.raises(DataError) as raised:
        data.subset(labelled, size, seed=0)
    assert repr(size) in str(raised.value)


def test_subset_none_returns_dataset(labelled) -> None:
    assert data.subset(labelled, None, seed=0) is labelled


def test_subset_without_targets() -> None:
    plain = TensorDataset(torch.arange(20))
    chosen = data.subset(plain, 7, seed=1)
    assert len(chosen) == 7
    assert chosen.indices == sorted(set(chosen.indices))


def test_subset_of_subset(labelled) -> None:
    outer = data.subset(labelled, 30, seed=0)
    inner = data.subset(outer, 10, seed=0)
    counts = Counter(labelled.targets[outer.indices[index]] for index in inner.indices)
    assert isinstance(inner, Subset)
    assert set(counts.values()) == {1}
