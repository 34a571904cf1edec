"""Data order that depends only on (seed, epoch), so that runs can stop and resume exactly.

Each epoch shuffles the training images with a permutation drawn from
(seed, epoch). Global batch k is permutation[k*B:(k+1)*B]; in a distributed
run process r takes the r-th of world_size contiguous shards of it, so the
union over processes is the same batch a single process would train on.
Random augmentations are seeded per (seed, epoch, image index) and never
touch the global RNG, so neither the number of loader workers nor a resume
in the middle of an epoch changes a single pixel.
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deqbench.train.schedule import steps_per_epoch


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """Return the shuffled image order of ``epoch`` as int64 indices, a pure function of its arguments."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return rng.permutation(num_images).astype(np.int64)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yield this process's shard of every global batch of one epoch, from batch ``start_batch`` on."""

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_images = num_images
        self.batch_size = batch_size  # global batch, images per optimizer step
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_batches = steps_per_epoch(num_images, batch_size, world_size)
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to draw and the first global batch to yield (earlier ones are skipped)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}]; got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def permutation(self) -> np.ndarray:
        return epoch_permutation(self.num_images, self.seed, self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        for k in range(self.start_batch, self.num_batches):
            batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            shard = np.array_split(batch, self.world_size)[self.rank]
            yield shard.tolist()

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class SeededDataset(Dataset):
    """Wrap a dataset so that each item's random transforms draw from a seed of (seed, epoch, index).

    torchvision's random transforms draw from torch's global RNG; this wrapper
    seeds it per item and restores the previous state afterwards, so loading
    consumes no randomness of the training process.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        saved = torch.get_rng_state()
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        torch.manual_seed(item_seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)


def worker_init(worker_id: int) -> None:
    """Make DataLoader workers ignore SIGINT, so Ctrl-C reaches only the trainer.

    The trainer finishes its step and writes a checkpoint; a worker killed by
    the same Ctrl-C would instead break the loader under it. Workers start
    with SIGINT blocked (see start_workers), and a Ctrl-C that came before
    this point is discarded when the mask is lifted. Worker seeds need no
    setting here because SeededDataset seeds every item.
    """
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_workers(loader: DataLoader) -> Iterator[Any]:
    """Return iter(loader), whose workers start with SIGINT blocked until worker_init ignores it.

    Until then a forked worker runs the trainer's SIGINT handler and a spawned
    one Python's default, which raises KeyboardInterrupt and kills it. A
    SIGINT sent to this process meanwhile stays pending and is handled as
    soon as the workers have started.

    NOTE: tested with the fork start method, the Linux default before Python
    3.14. Spawned workers inherit the mask too; forkserver workers inherit
    the server's mask, which is blocked only if this call started the server.
    """
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
