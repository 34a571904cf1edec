"""Seconds per training step in warm-up and implicit mode, and the full-run time they project.

The first step of each mode runs untimed, so allocator and thread-pool
start-up are excluded. The rest are timed with time.perf_counter around
forward, backward and the optimizer step, with a CUDA synchronize before
each reading.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deqbench.models.mdeq import MDEQClassifier
from deqbench.scenarios import Scenario
from deqbench.train.metrics import peak_memory_bytes, solver_moments
from deqbench.train.schedule import CIFAR10_TEST_IMAGES, CIFAR10_TRAIN_IMAGES
from deqbench.train.seeding import seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    model: MDEQClassifier,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    mode: str,
    steps: int,
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps on one batch after one untimed step; return seconds and NFE."""
    device = images.device
    seconds: list[float] = []
    forward_nfe: list[float] = []
    backward_nfe: list[float] = []
    model.train()
    for index in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = model(images, mode=mode)
        F.cross_entropy(output.logits, labels).backward()
        optimizer.step()
        _sync(device)
        if index == 0:
            continue
        seconds.append(time.perf_counter() - start)
        if mode == "implicit":
            forward = solver_moments(output.forward_stats)
            forward_nfe.append(forward["nfe_sum"] / forward["samples"])
            if output.backward is not None and output.backward.stats is not None:
                backward = solver_moments(output.backward.stats)
                backward_nfe.append(backward["nfe_sum"] / backward["samples"])
    return {
        "mode": mode,
        "batch_size": int(images.shape[0]),
        "timed_steps": steps,
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "forward_nfe_mean": statistics.fmean(forward_nfe) if forward_nfe else None,
        "backward_nfe_mean": statistics.fmean(backward_nfe) if backward_nfe else None,
    }


@torch.no_grad()
def time_evaluation(model: MDEQClassifier, images: Tensor, repeats: int = 2) -> float:
    """Return the median seconds of one eval-mode implicit forward pass over ``images``, after one untimed pass."""
    model.eval()
    seconds = []
    for index in range(repeats + 1):
        _sync(images.device)
        start = time.perf_counter()
        model(images, mode="implicit")
        _sync(images.device)
        if index:
            seconds.append(time.perf_counter() - start)
    model.train()
    return statistics.median(seconds)


def measure_training(
    scenario: Scenario,
    published: Scenario,
    images: Tensor,
    labels: Tensor,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Time warm-up and implicit steps of ``scenario`` on one batch and project the ``published`` schedule.

    The projection is an estimate. It multiplies the median step times by the
    published step counts and adds one evaluation of the 10,000 test images
    per epoch. When the measured batch differs from the published one, time
    per step is scaled linearly with the batch size.
    """
    seed_everything(seed)
    model = MDEQClassifier(scenario.model, scenario.deq).to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=scenario.train.lr, weight_decay=scenario.train.weight_decay)

    warmup = time_steps(model, optimizer, images, labels, mode="warmup", steps=steps)
    implicit = time_steps(model, optimizer, images, labels, mode="implicit", steps=steps)
    eval_s = time_evaluation(model, images)

    # Projection onto the published schedule.
    batch, published_batch = int(images.shape[0]), published.train.batch_size
    scale = published_batch / batch
    steps_per_epoch = -(-CIFAR10_TRAIN_IMAGES // published_batch)
    total = published.train.epochs * steps_per_epoch
    warmup_steps = min(published.deq.warmup_iterations, total)
    eval_per_epoch = eval_s * CIFAR10_TEST_IMAGES / batch
    projected = scale * (warmup_steps * warmup["median_s"] + (total - warmup_steps) * implicit["median_s"])
    projected += published.train.epochs * eval_per_epoch
    peak, memory_kind = peak_memory_bytes(str(images.device))

    return {
        "scenario": scenario.name,
        "variant": scenario.variant,
        "device": str(images.device),
        "torch_threads": torch.get_num_threads(),
        "warmup": warmup,
        "implicit": implicit,
        "eval_forward_s": eval_s,
        "implicit_to_warmup_ratio": implicit["median_s"] / warmup["median_s"],
        "projection": {
            "published_batch_size": published_batch,
            "batch_scale": scale,
            "total_steps": total,
            "warmup_steps": warmup_steps,
            "eval_s_per_epoch": eval_per_epoch,
            "full_run_s": projected,
            "full_run_h": projected / 3600.0,
            "method": "median step time x published steps, scaled linearly to the published batch, plus one test pass per epoch (estimate)",
        },
        "peak_memory_bytes": peak,
        "peak_memory_kind": memory_kind,
    }
