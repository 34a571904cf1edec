"""CIFAR-10 for training: torchvision's official archive, ImageFolder directories and tars.

``load_cifar10`` returns a train and a test dataset plus a ``DataSource`` that
records where the images came from. Every problem with the data raises
``DataError``, whose message names the file or folder and the fix. Cheap
checks (folders, class lists, non-empty classes) run when the data is
opened. Per-image checks (decodable, 32x32, RGB or grayscale) run when an
image is loaded, so a bad file stops training with its path instead of
being skipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import lzma
import os
import shutil
import socket
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

logger = logging.getLogger(__name__)

# Label order of CIFAR-10 (batches.meta of the official archive); it is also
# the alphabetical order, so ImageFolder's sorted class folders agree with it.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Normalization of tools/cls_train.py in locuslab/mdeq and in locuslab/deq
# (MDEQ-Vision). The standard deviations are smaller than the per-pixel ones
# of CIFAR-10 (about 0.247, 0.243, 0.262), so normalized pixels have a
# standard deviation near 1.2; they are kept to match the original runs.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

NUM_TRAIN = 50_000  # images in the CIFAR-10 training split
NUM_TEST = 10_000  # images in the CIFAR-10 test split
IMAGE_SIZE = (32, 32)  # (width, height) in pixels, as PIL reports it
ALLOWED_MODES = ("RGB", "L")  # PIL modes; grayscale is converted to 3 equal channels

JPEG_COPY_SHA256 = "de9e0b24671dc87fc3ebdfcc047206e0d709d7db25d8866aea7317872c2a79f2"
JPEG_COPY_NOTE = "JPEG re-encoding of CIFAR-10 (quality 75); not pixel-identical to the official archive"

OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
OFFICIAL_FOLDER = "cifar-10-batches-py"
DOWNLOAD_TIMEOUT_S = 10.0  # seconds a connect or read of the official download may block

EXTRACTED_MARKER = ".deqbench-extracted.json"  # written last into a completed extraction
PARTIAL_INFIX = ".partial+"  # extraction folders in progress: .<sha16>.partial+<host>+<pid>+<random>
SPLIT_SEARCH_DEPTH = 3  # folder levels searched for the one containing train/ and test/
HASH_CHUNK_BYTES = 1 << 20

REPO_ROOT = Path(__file__).resolve().parent.parent

# Exceptions that PIL raises on undecodable or truncated image files.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
# Exceptions that mean the tar itself is damaged, as opposed to a failed write.
TAR_DAMAGE_ERRORS = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)


class DataError(ValueError):
    """Missing, damaged or wrongly laid out CIFAR-10 data; the message names the path and the fix."""


@dataclass(frozen=True)
class DataSource:
    """Origin of a run's images, recorded in result files."""

    source: str  # "official" (torchvision CIFAR-10 archive) or "imagefolder" (directory or tar)
    path: str  # absolute path of the tar or directory, or the torchvision root
    sha256: str | None  # hex digest of the tar when the data is a file, else None
    extracted_to: str | None  # cache folder the tar was extracted into, else None
    num_train: int  # images in the training split
    num_test: int  # images in the test split
    note: str  # caveat about the copy, e.g. that it is the JPEG re-encoding; "" when none

    def to_dict(self) -> dict[str, Any]:
        """Convert every field to plain JSON types."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- transforms


def build_transforms(augment: bool) -> tuple[transforms.Compose, transforms.Compose]:
    """Return (train, test) transforms: optional crop and flip, then ToTensor and Normalize.

    ``augment`` adds RandomCrop(32, padding=4) and RandomHorizontalFlip to the
    training transform only, as the LARGE configurations of MDEQ do.
    """
    to_tensor = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    return transforms.Compose(augmentation + to_tensor), transforms.Compose(list(to_tensor))


# --------------------------------------------------------------- cache folder


def default_cache_dir() -> Path:
    """Return $DEQBENCH_CACHE, else ~/.cache/deqbench, as an absolute path outside the repository."""
    configured = os.environ.get("DEQBENCH_CACHE")
    path = Path(configured) if configured else Path("~/.cache/deqbench")
    path = path.expanduser().resolve()
    _reject_repository_path(path)
    return path


def _reject_repository_path(path: Path) -> None:
    """Raise DataError when ``path`` lies inside this git checkout, where extracted images do not belong."""
    if not (REPO_ROOT / ".git").exists():
        return
    if path == REPO_ROOT or REPO_ROOT in path.parents:
        raise DataError(
            f"cache folder {path} is inside the repository {REPO_ROOT}, where 60,000 extracted images "
            "must not land; set DEQBENCH_CACHE or --cache-dir to a folder outside it, "
            "for example ~/.cache/deqbench"
        )


# ----------------------------------------------------------- official archive


@contextmanager
def _default_socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every blocking socket call inside the block, so an offline machine fails in seconds.

    torchvision's download passes no timeout to urllib. The default is
    process-wide, so it is set only when no default exists and is restored after.
    """
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _load_official(
    root: str, train_transform: Callable, test_transform: Callable, download: bool
) -> tuple[Dataset, Dataset, DataSource]:
    """Open torchvision's CIFAR10 under ``root``, downloading it when allowed and missing."""
    root_path = Path(root).expanduser().resolve()

    # URLError, timeouts and refused connections are all OSError subclasses.
    try:
        with _default_socket_timeout(DOWNLOAD_TIMEOUT_S):
            train = datasets.CIFAR10(str(root_path), train=True, transform=train_transform, download=download)
        test = datasets.CIFAR10(str(root_path), train=False, transform=test_transform, download=False)
    except (OSError, RuntimeError, *TAR_DAMAGE_ERRORS) as error:
        raise DataError(_official_missing_message(root_path, download, error)) from error

    source = DataSource(
        source="official",
        path=str(root_path),
        sha256=None,
        extracted_to=None,
        num_train=len(train),
        num_test=len(test),
        note="",
    )
    return train, test, source


def _official_missing_message(root: Path, download: bool, error: BaseException) -> str:
    """Explain why the official archive could not be opened and where to put it."""
    archive = root / OFFICIAL_ARCHIVE
    if archive.exists() and not check_integrity(str(archive), datasets.CIFAR10.tgz_md5):
        cause = f"{archive} exists but is incomplete or corrupted (its MD5 does not match); replace it"
    elif archive.exists():
        cause = f"{archive} is intact but could not be extracted or read ({type(error).__name__}: {error})"
    elif download:
        cause = f"the download failed ({type(error).__name__}: {error})"
    else:
        cause = f"download is disabled ({type(error).__name__}: {error})"
    return (
        f"CIFAR-10 could not be loaded from {root} (--data-root): {cause}. Put the official archive at {archive} "
        f"or its extracted folder at {root / OFFICIAL_FOLDER}, or pass --data PATH with an "
        "ImageFolder directory or tar that contains train/ and test/ class folders."
    )


# ------------------------------------------------------------- tar extraction


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_tar_file(path: Path) -> None:
    """Reject an empty file or one that is not a tar archive, before hashing it."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); copy the CIFAR-10 tar again or pass another --data PATH")
    if not tarfile.is_tarfile(path):
        raise DataError(
            f"{path} is not a tar archive (or is truncated inside its first header); "
            "pass a tar of train/ and test/ class folders or a directory"
        )


def _extract_once(tar_path: Path, sha256: str, cache_dir: Path) -> tuple[Path, Path]:
    """Extract the tar into cache_dir/<sha256[:16]> unless a completed copy is there.

    Returns (extraction folder, folder containing train/ and test/). The tar is
    extracted into a private temporary folder which gets the completion
    marker and is then renamed into place, so an interrupted extraction is
    never mistaken for a complete one.
    """
    final = cache_dir / sha256[:16]
    split_root = _completed_split_root(final, sha256)
    if split_root is not None:
        return final, split_root
    if final.exists():
        raise DataError(
            f"{final} exists but is not a completed extraction of {tar_path} (missing or invalid {EXTRACTED_MARKER}); "
            "delete that folder and run again"
        )

    # Extract, check the layout and mark completion inside a private folder.
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(cache_dir, sha256[:16])
    partial = Path(tempfile.mkdtemp(prefix=_partial_prefix(sha256[:16]), dir=cache_dir))
    try:
        member_count = _extract_checked(tar_path, partial)
        split_root = _find_split_root(partial, tar_path)
        marker = {
            "sha256": sha256,
            "source": str(tar_path),
            "members": member_count,
            "split_root": split_root.relative_to(partial).as_posix(),
        }
        (partial / EXTRACTED_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _publish(partial, final, sha256)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    split_root = _completed_split_root(final, sha256)
    assert split_root is not None  # _publish returns only after final contains a valid marker
    return final, split_root


def _completed_split_root(folder: Path, sha256: str) -> Path | None:
    """Return the train/test folder recorded by a completed extraction of ``sha256``, or None."""
    try:
        marker = json.loads((folder / EXTRACTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("sha256") != sha256:
        return None
    relative = marker.get("split_root")
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts:
        return None
    return folder / relative


def _partial_prefix(sha16: str) -> str:
    """Name prefix of this process's in-progress extraction folders."""
    return f".{sha16}{PARTIAL_INFIX}{socket.gethostname()}+{os.getpid()}+"


def _remove_dead_partials(cache_dir: Path, sha16: str) -> None:
    """Delete extraction folders left behind by processes of this host that no longer run."""
    host_prefix = f".{sha16}{PARTIAL_INFIX}{socket.gethostname()}+"
    for entry in cache_dir.iterdir():
        if not entry.name.startswith(host_prefix):
            continue
        pid_text = entry.name[len(host_prefix) :].split("+", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            logger.warning("removing %s, an extraction interrupted by process %s", entry, pid_text)
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Return whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    return True


def _extract_checked(tar_path: Path, destination: Path) -> int:
    """Extract every member with tarfile's "data" filter; return the member count.

    tarfile stops without an error when a tar is cut at a header boundary, so
    the end-of-archive block is checked explicitly before extracting.
    """
    try:
        with tarfile.open(tar_path, mode="r:*") as archive:
            members = archive.getmembers()
            if not members:
                raise DataError(f"{tar_path} is a tar archive with no files; pass a tar of train/ and test/ class folders")
            _check_end_of_archive(archive, tar_path)
            archive.extractall(destination, members=members, filter="data")
    except tarfile.FilterError as error:
        raise DataError(
            f"{tar_path} contains an unsafe member ({error}); "
            "rebuild the tar with relative paths of plain files and folders only"
        ) from error
    except TAR_DAMAGE_ERRORS as error:
        raise DataError(
            f"{tar_path} is truncated or corrupted ({type(error).__name__}: {error}); copy it again"
        ) from error
    except OSError as error:
        raise DataError(
            f"extracting {tar_path} into {destination} failed ({error}); check the free space and permissions "
            "there, or set DEQBENCH_CACHE or --cache-dir to another folder"
        ) from error
    return len(members)


def _check_end_of_archive(archive: tarfile.TarFile, tar_path: Path) -> None:
    """Raise DataError unless a zero block follows the last member, as every complete tar has."""
    assert archive.fileobj is not None  # set for every archive opened from a path
    archive.fileobj.seek(archive.offset)
    block = archive.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise DataError(
            f"{tar_path} is truncated: it ends after {len(archive.getmembers())} members without the "
            "end-of-archive block; copy it again"
        )


def _publish(partial: Path, final: Path, sha256: str) -> None:
    """Rename a completed extraction into place; a concurrent process that got there first wins."""
    try:
        os.rename(partial, final)
    except OSError as error:
        if _completed_split_root(final, sha256) is None:
            raise DataError(
                f"moving the extraction {partial} to {final} failed ({error}); "
                f"check the permissions of {final.parent}, or set DEQBENCH_CACHE or --cache-dir to another folder"
            ) from error
        shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------ image folders


def _find_split_root(folder: Path, origin: Path) -> Path:
    """Return the one folder under ``folder`` (itself included) that contains train/ and test/.

    Searches SPLIT_SEARCH_DEPTH levels, skipping hidden folders and never
    descending into train/ or test/, which contain thousands of files.
    """
    complete: list[Path] = []
    partial: list[str] = []
    for current, names in _walk_folders(folder, SPLIT_SEARCH_DEPTH):
        splits = [name for name in ("train", "test") if name in names]
        if len(splits) == 2:
            complete.append(current)
        elif splits:
            missing = "test" if splits == ["train"] else "train"
            partial.append(f"{current} has {splits[0]}/ but no {missing}/")

    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        listed = ", ".join(str(path) for path in complete)
        raise DataError(f"{origin} contains several folders with train/ and test/ ({listed}); pass one of them as --data")
    if partial:
        raise DataError(f"{origin} is incomplete: {'; '.join(partial)}; add the missing split folder")
    hint = ""
    if any(OFFICIAL_FOLDER in names for _, names in _walk_folders(folder, SPLIT_SEARCH_DEPTH)):
        hint = (
            f" It contains the official {OFFICIAL_FOLDER} folder instead: put the official archive or that folder "
            "under the torchvision root (--data-root) and omit --data."
        )
    raise DataError(
        f"{origin} contains no train/ and test/ folders; expected an ImageFolder layout such as "
        f"cifar10/train/<class>/*.png and cifar10/test/<class>/*.png.{hint}"
    )


def _walk_folders(top: Path, depth: int) -> Iterator[tuple[Path, set[str]]]:
    """Yield (folder, names of its visible subfolders) down to ``depth`` levels below ``top``."""
    for current, subfolders, _files in os.walk(top):
        level = len(Path(current).relative_to(top).parts)
        names = {name for name in subfolders if not name.startswith(".")}
        yield Path(current), names
        descend = level < depth and not {"train", "test"} & names
        subfolders[:] = sorted(names) if descend else []


def _check_class_folders(split_dir: Path) -> None:
    """Raise DataError unless ``split_dir`` contains exactly the 10 CIFAR-10 class folders."""
    present = {entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")}
    missing = [name for name in CLASSES if name not in present]
    extra = sorted(present - set(CLASSES))
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    raise DataError(
        f"{split_dir} must contain exactly the CIFAR-10 class folders {', '.join(CLASSES)} ({'; '.join(problems)}); "
        "rename, add or remove folders so that train/ and test/ contain the same 10 classes"
    )


def load_checked_image(path: str) -> Image.Image:
    """Open one image file as RGB, raising DataError when it is undecodable, not 32x32 or of another mode."""
    fix = "replace or delete the file (re-extract it if it came from a tar)"

    # Image.open reads only the header, so size and mode are checked before decoding.
    try:
        image = Image.open(path)
    except IMAGE_DECODE_ERRORS as error:
        raise DataError(f"image {path} cannot be decoded ({type(error).__name__}: {error}); {fix}") from error

    with image:
        if image.size != IMAGE_SIZE:
            raise DataError(f"image {path} is {image.size[0]}x{image.size[1]} pixels, expected 32x32; {fix}")
        if image.mode not in ALLOWED_MODES:
            raise DataError(f"image {path} has PIL mode {image.mode!r}, expected one of {ALLOWED_MODES}; {fix}")
        try:
            image.load()
            return image.convert("RGB")
        except IMAGE_DECODE_ERRORS as error:
            raise DataError(f"image {path} cannot be decoded ({type(error).__name__}: {error}); {fix}") from error


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder with CIFAR-10's label order whose loader raises DataError on a bad image."""

    def __init__(self, root: Path, transform: Callable | None = None) -> None:
        super().__init__(str(root), transform=transform, loader=load_checked_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Return CIFAR-10's classes in label order; the folders were checked beforehand."""
        return list(CLASSES), {name: index for index, name in enumerate(CLASSES)}


def _open_split(split_dir: Path, transform: Callable) -> CheckedImageFolder:
    """Check one split's class folders, index its images and reject empty classes."""
    _check_class_folders(split_dir)
    dataset = CheckedImageFolder(split_dir, transform=transform)

    counts = Counter(dataset.targets)
    empty = [name for index, name in enumerate(CLASSES) if counts[index] == 0]
    if empty:
        folders = ", ".join(str(split_dir / name) for name in empty)
        raise DataError(f"no image files in {folders}; add the images (extensions {', '.join(datasets.folder.IMG_EXTENSIONS)})")
    return dataset


def _load_image_folder(
    data: Path, train_transform: Callable, test_transform: Callable, cache_dir: Path | None
) -> tuple[Dataset, Dataset, DataSource]:
    """Open a directory, or a tar extracted once into the cache, as ImageFolder train and test splits."""
    sha256 = extracted_to = None
    note = ""
    if data.is_dir():
        split_root = _find_split_root(data, data)
    else:
        _check_tar_file(data)
        sha256 = file_sha256(data)
        cache = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
        _reject_repository_path(cache)
        extracted, split_root = _extract_once(data, sha256, cache)
        extracted_to = str(extracted)
        note = JPEG_COPY_NOTE if sha256 == JPEG_COPY_SHA256 else ""

    train = _open_split(split_root / "train", train_transform)
    test = _open_split(split_root / "test", test_transform)
    if (len(train), len(test)) != (NUM_TRAIN, NUM_TEST):
        logger.warning(
            "%s contains %d training and %d test images; CIFAR-10 has %d and %d",
            split_root, len(train), len(test), NUM_TRAIN, NUM_TEST,
        )

    source = DataSource("imagefolder", str(data), sha256, extracted_to, len(train), len(test), note)
    return train, test, source


# --------------------------------------------------------------- public API


def load_cifar10(
    data: str | None,
    *,
    root: str = "./data",
    augment: bool,
    download: bool = True,
    cache_dir: str | None = None,
) -> tuple[Dataset, Dataset, DataSource]:
    """Return (train, test, source) for CIFAR-10.

    data=None opens torchvision's CIFAR10 under ``root`` (downloading it when
    ``download`` is true). Otherwise ``data`` is a directory or tar containing
    train/<class>/ and test/<class>/ image folders; a tar is extracted once
    into ``cache_dir`` (default: ``default_cache_dir()``) and reused.
    """
    train_transform, test_transform = build_transforms(augment)
    if data is None:
        return _load_official(root, train_transform, test_transform, download)

    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist; pass --data with a tar or a directory containing train/ and "
            f"test/ class folders, or omit --data to use the official archive under {root}"
        )
    return _load_image_folder(path, train_transform, test_transform, cache_dir)


def subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """Return ``n`` samples of ``dataset`` chosen by ``seed``, class-balanced when labels are known.

    n=None returns the dataset itself. With labels, classes take turns giving
    one of their shuffled samples, so every class gets n // classes or one
    more until a class runs out. The indices come back sorted.
    """
    if n is None:
        return dataset
    total = len(dataset)  # type: ignore[arg-type]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"subset size must be a positive integer or None; got {n!r}")
    if n > total:
        raise DataError(f"subset size {n} is larger than the dataset's {total} samples; pass at most {total}")

    generator = torch.Generator().manual_seed(seed)
    targets = _targets_of(dataset)
    if targets is None:
        chosen = torch.randperm(total, generator=generator)[:n].tolist()
    else:
        chosen = _balanced_indices(targets, n, generator)
    return Subset(dataset, sorted(chosen))


def _targets_of(dataset: Dataset) -> list[int] | None:
    """Return the label of every sample without loading images, or None when the dataset has no targets."""
    if isinstance(dataset, Subset):
        parent = _targets_of(dataset.dataset)
        return None if parent is None else [parent[index] for index in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return [int(label) for label in targets]


def _balanced_indices(targets: list[int], n: int, generator: torch.Generator) -> list[int]:
    """Take shuffled indices from each class in turn until ``n`` are chosen."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    queues = []
    for label in sorted(by_class):
        indices = by_class[label]
        order = torch.randperm(len(indices), generator=generator).tolist()
        queues.append([indices[position] for position in order])

    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for queue in queues:
            if depth < len(queue) and len(chosen) < n:
                chosen.append(queue[depth])
        depth += 1
    return chosen
