"""Data order: a pure function of (seed, epoch), sharded per process and resumable mid-epoch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from deqbench.train.sampling import GlobalBatchSampler, SeededDataset, epoch_permutation


def test_permutation_depends_on_seed_and_epoch() -> None:
    base = epoch_permutation(100, seed=1, epoch=0)

    assert np.array_equal(base, epoch_permutation(100, seed=1, epoch=0))
    assert not np.array_equal(base, epoch_permutation(100, seed=1, epoch=1))
    assert not np.array_equal(base, epoch_permutation(100, seed=2, epoch=0))
    assert sorted(base.tolist()) == list(range(100))


def test_shards_cover_global_batches() -> None:
    single = GlobalBatchSampler(70, 16, seed=5)
    ranks = [GlobalBatchSampler(70, 16, seed=5, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_position(epoch=3)

    single_batches = list(single)
    shard_batches = [list(sampler) for sampler in ranks]

    assert len(single_batches) == 5
    for k, batch in enumerate(single_batches):
        assert shard_batches[0][k] + shard_batches[1][k] == batch


def test_resume_skips_done_batches() -> None:
    sampler = GlobalBatchSampler(64, 8, seed=9)
    sampler.set_position(epoch=2)
    whole = list(sampler)
    sampler.set_position(epoch=2, start_batch=3)

    assert list(sampler) == whole[3:]
    assert len(sampler) == len(whole) - 3


class _NoiseImages(Dataset):
    """Constant images passed through a random flip and crop, so the output shows the RNG draws."""

    def __init__(self) -> None:
        self.transform = transforms.Compose([transforms.RandomCrop(8, padding=2), transforms.RandomHorizontalFlip()])
        self.image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image)


def test_augmentation_seeded_per_item() -> None:
    data = SeededDataset(_NoiseImages(), seed=11)
    data.set_epoch(4)
    epoch4 = [data[i] for i in range(16)]
    torch.rand(100)  # global draws in between must not matter
    again = [data[i] for i in range(16)]
    data.set_epoch(5)
    epoch5 = [data[i] for i in range(16)]

    assert all(torch.equal(a, b) for a, b in zip(epoch4, again))
    assert any(not torch.equal(a, b) for a, b in zip(epoch4, epoch5))
    assert any(not torch.equal(epoch4[0], other) for other in epoch4[1:])


def test_augmentation_leaves_global_rng() -> None:
    data = SeededDataset(_NoiseImages(), seed=11)
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    data[3]

    assert torch.equal(torch.rand(5), expected)
