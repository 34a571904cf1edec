"""Fixtures of the benchmark suite: toy fixed-point problems and the TINY-cell problems."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deqbench.measure.problems import Problem, load_images, make_contractive, make_problem, tiny_model


def tanh_problem(batch: int = 4, dim: int = 64, norm: float = 0.9, seed: int = 0) -> Problem:
    """z = tanh(W z + x) with ||W||_2 = norm in float32: a contraction with a unique fixed point."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=generator)
    w = w * (norm / torch.linalg.matrix_norm(w, ord=2))
    x = torch.randn(batch, dim, generator=generator)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + x)

    # model, x and labels are unused by the solve measurements.
    return Problem("tanh", "toy contraction", "random", torch.nn.Identity(), x, torch.zeros(batch), f, torch.zeros(batch, dim))


@pytest.fixture
def toy_problem() -> Problem:
    return tanh_problem()


@pytest.fixture(scope="module")
def cifar_batch(cifar_jpeg_tar: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight CIFAR-10 test images (8, 3, 32, 32), normalized, and their labels."""
    images, labels, _ = load_images(8, cifar_jpeg_tar)
    return images, labels


@pytest.fixture(scope="module")
def contractive_problem(cifar_batch: tuple[torch.Tensor, torch.Tensor]) -> Problem:
    """The benchmark's tiny_contractive problem on eight real images."""
    images, labels = cifar_batch
    model = make_contractive(tiny_model(seed=0), images)
    return make_problem("tiny_contractive", "TINY cell made contractive", "CIFAR-10 test images", model, images, labels)
