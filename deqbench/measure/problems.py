"""Fixed-point problems for the solver benchmark: the TINY cell on a batch of CIFAR-10 images.

Three problems share one batch of images:

- ``tiny_init``: the TINY classifier at initialization in eval mode. Its cell
  is not contractive, and no solver reaches a relative residual of 1e-3 on
  it. The stem's BatchNorm statistics are at their initial values and its
  convolutions are drawn from N(0, 0.01), so the injection is tiny and the
  state-to-state path dominates.
- ``tiny_contractive``: the same weights with changes that make the image,
  not the state, dominate every branch. First, the stem's BatchNorm running
  statistics are recomputed on the benchmark batch, which brings the
  injection from an RMS of about 3e-3 to about 0.7. Second, four kinds of
  gain change by a factor s (default 4). The gain of every block's second
  convolution is divided by s, so the injection outweighs it inside the
  GroupNorm that follows. In branch 0 that GroupNorm's affine gain is
  multiplied by s, so it outweighs the block's skip connection. The
  GroupNorm gains on every upsampling path are divided by s and those after
  the last convolution of every downsampling path multiplied by s, so
  branch 0 dominates the fusion. On eight CIFAR-10 test images plain
  fixed-point iteration then contracts by about 0.7 per step
  (power-iteration estimate of the spectral radius 0.68).
- ``checkpoint``: a trained model's cell, when a checkpoint path is given.

All problems are evaluated without autograd unless a caller enables it, in
eval mode, so dropout is off and f is deterministic.
"""

from __future__ import annotations

import copy
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from deqbench.results import REPO_ROOT
from deqbench.scenarios import TINY

DEFAULT_JPEG_TAR = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar"
DEFAULT_REBALANCE = 4.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Problem:
    """One fixed-point problem z = f(z) with the model that defines it."""

    name: str
    description: str
    images: str  # where the input images came from
    model: torch.nn.Module  # MDEQClassifier in eval mode
    x: Tensor  # (B, 3, 32, 32) normalized images
    labels: Tensor  # (B,) class indices, used by the training-step timing
    f: Callable[[Tensor], Tensor]  # (B, D) -> (B, D)
    z0: Tensor  # (B, D) zeros

    @property
    def batch_size(self) -> int:
        return int(self.z0.shape[0])

    @property
    def state_size(self) -> int:
        return int(self.z0.shape[1])


def default_data_path() -> Path | None:
    """Return $DEQBENCH_DATA, else the shared JPEG tar beside the repository, or None when neither exists."""
    path = Path(os.environ.get("DEQBENCH_DATA", DEFAULT_JPEG_TAR))
    return path if path.exists() else None


def load_images(count: int, data: Path | None, *, seed: int = 0) -> tuple[Tensor, Tensor, str]:
    """Return ``count`` normalized test images (B, 3, 32, 32), their labels (B,) and where they came from.

    ``data`` is a tar or a directory with test/<class>/ folders in ImageFolder
    layout. Images are taken round-robin over the classes in sorted order,
    the first files of each class first. Without data the images are drawn
    from N(0, 1), which matches the scale of normalized images.
    """
    if count < 1:
        raise ValueError(f"count = {count!r} is invalid; expected an integer >= 1")
    if data is None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(count, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (count,), generator=generator)
        return images, labels, "random N(0, 1) images: no CIFAR-10 copy found (set DEQBENCH_DATA)"

    from deqbench.data import build_transforms

    _, test_transform = build_transforms(augment=False)
    files = _read_test_images(Path(data), count)
    images = torch.stack([test_transform(image) for image, _ in files])
    labels = torch.tensor([label for _, label in files])
    return images, labels, f"CIFAR-10 test images from {data}: {count}, taken round-robin over the 10 classes"


def _read_test_images(data: Path, count: int) -> list[tuple[object, int]]:
    """Decode ``count`` test images from a tar or directory, round-robin over the sorted class folders."""
    from PIL import Image

    # Collect the file names per class: .../test/<class>/<file>.
    by_class: dict[str, list[str]] = {}
    archive = tarfile.open(data) if data.is_file() else None
    names = archive.getnames() if archive is not None else [str(p.relative_to(data)) for p in data.rglob("*")]
    for name in names:
        parts = Path(name).parts
        if len(parts) >= 3 and parts[-3] == "test" and name.lower().endswith(IMAGE_SUFFIXES):
            by_class.setdefault(parts[-2], []).append(name)
    if not by_class:
        raise ValueError(f"no test/<class>/ images found in {data}; pass a CIFAR-10 tar or ImageFolder directory")

    # Round-robin selection keeps the batch balanced over the classes.
    classes = sorted(by_class)
    queues = [sorted(by_class[c]) for c in classes]
    chosen: list[tuple[str, int]] = []
    for position in range(max(len(q) for q in queues)):
        chosen += [(q[position], label) for label, q in enumerate(queues) if position < len(q)]
    if len(chosen) < count:
        raise ValueError(f"{data} contains {len(chosen)} test images but {count} were requested; request at most {len(chosen)}")

    # Decode, from the tar in memory or from the files.
    decoded = []
    for name, label in chosen[:count]:
        if archive is not None:
            payload = archive.extractfile(name).read()
            image = Image.open(io.BytesIO(payload)).convert("RGB")
        else:
            image = Image.open(data / name).convert("RGB")
        decoded.append((image, label))
    if archive is not None:
        archive.close()
    return decoded


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """Return the TINY classifier at initialization (seeded) in eval mode."""
    from deqbench.models.mdeq import MDEQClassifier

    torch.manual_seed(seed)
    return MDEQClassifier(TINY.model, TINY.deq).eval()


@torch.no_grad()
def make_contractive(model: torch.nn.Module, x: Tensor, rebalance: float = DEFAULT_REBALANCE) -> torch.nn.Module:
    """Return a copy of ``model`` whose cell contracts on images ``x`` (see the module docstring)."""
    if not rebalance >= 1.0:
        raise ValueError(f"rebalance = {rebalance!r} is invalid; expected a number >= 1 (1 keeps the fusion as is)")
    model = copy.deepcopy(model)

    # Stem BatchNorm statistics from this batch: a cumulative average over one pass.
    batch_norms = [m for m in model.stem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in batch_norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.stem.train()
    model.stem(x)
    model.stem.eval()

    # Inside each block the injection outweighs the state's convolution path.
    for blocks in model.cell.branches:
        for block in blocks:
            conv = block.conv2
            (conv.weight_g if conv.weight_norm else conv.weight).div_(rebalance)

    # In branch 0 the normalized injection outweighs the skip connection.
    for block in model.cell.branches[0]:
        block.norm2.weight.mul_(rebalance)

    # Lower-resolution branches weigh less in higher ones, and branch 0 more in the rest.
    fusion = model.cell.fusion
    for i, row in enumerate(fusion.resample):
        for j, resample in enumerate(row):
            if j > i:
                resample.norm.weight.div_(rebalance)
            elif j < i:
                resample.net[-1].weight.mul_(rebalance)
    return model.eval()


def make_problem(name: str, description: str, images: str, model: torch.nn.Module, x: Tensor, labels: Tensor) -> Problem:
    """Build the equilibrium map of ``model`` on images ``x``, with weights computed once."""
    with torch.no_grad():
        equilibrium = model.equilibrium_problem(x)
    return Problem(name, description, images, model, x, labels, equilibrium.f, equilibrium.z0)


def tiny_problems(
    batch_size: int = 8,
    data: Path | None = None,
    *,
    rebalance: float = DEFAULT_REBALANCE,
    checkpoint: Path | None = None,
    seed: int = 0,
) -> list[Problem]:
    """Return the benchmark problems: tiny_init, tiny_contractive and, with a checkpoint, checkpoint."""
    x, labels, source = load_images(batch_size, data, seed=seed)
    model = tiny_model(seed)

    problems = [
        make_problem("tiny_init", "TINY cell at initialization, eval mode (not contractive)", source, model, x, labels),
        make_problem(
            "tiny_contractive",
            f"TINY cell at initialization, stem BatchNorm statistics from the batch, rebalanced towards the injection by s = {rebalance:g}",
            source,
            make_contractive(model, x, rebalance),
            x,
            labels,
        ),
    ]
    if checkpoint is not None:
        trained = load_trained_tiny(checkpoint)
        problems.append(make_problem("checkpoint", f"TINY cell trained, from {checkpoint}", source, trained, x, labels))
    return problems


def load_trained_tiny(path: Path) -> torch.nn.Module:
    """Load a TINY classifier from a trainer checkpoint; the model weights are under state['model']."""
    from deqbench.checkpoints import load_checkpoint

    payload = load_checkpoint(path)
    state = payload["state"]
    weights = state.get("model") if isinstance(state, dict) else None
    if weights is None:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint {path} has no 'model' entry in its state (found {keys}); pass a trainer checkpoint")
    model = tiny_model()
    model.load_state_dict(weights)
    return model.eval()


def spectral_radius_estimate(f: Callable[[Tensor], Tensor], z: Tensor, iterations: int = 30, seed: int = 0) -> float:
    """Estimate the largest |eigenvalue| of df/dz at z by power iteration; the largest over the batch.

    J and its transpose have the same eigenvalues, so the iteration uses
    vector-Jacobian products v -> J^T v through one graph of f at z. The
    estimate is the ratio ||J^T v|| / ||v|| of the last iterate; for a
    non-normal J it can overshoot the spectral radius within the first
    iterations and settles as they grow.
    """
    generator = torch.Generator(device=z.device).manual_seed(seed)
    v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    ratio = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)

    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        fz = f(z_leaf)
        for _ in range(iterations):
            (jtv,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True)
            ratio = jtv.norm(dim=1)
            v = jtv / (ratio[:, None] + 1e-30)
    return float(ratio.max())
