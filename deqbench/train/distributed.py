"""Distributed data parallel training under torchrun.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each worker's environment.
Without them (or with WORLD_SIZE=1) training runs in one process and every
helper here reduces to a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """The process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # torch device string this process trains on, e.g. "cuda:1"
    backend: str | None = None  # "gloo" or "nccl" once a process group exists

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True for the one process that writes logs, checkpoints and results."""
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """Return (rank, world_size, local_rank) from torchrun's environment variables, (0, 1, 0) without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world_size, local_rank


def resolve_device(requested: str) -> str:
    """Map "auto", "cpu" or "cuda" to the device type to train on; "cuda" without a GPU raises ValueError."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch finds no CUDA device; use --device cpu or auto")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}; choose auto, cpu or cuda")
    return requested


def init_distributed(device_type: str) -> DistContext:
    """Join the process group that torchrun set up, or return a single-process context.

    Uses nccl on CUDA (one GPU per process, picked by LOCAL_RANK) and gloo on
    the CPU. The rendezvous address comes from MASTER_ADDR and MASTER_PORT.
    """
    rank, world_size, local_rank = env_world()
    if world_size <= 1:
        device = "cuda:0" if device_type == "cuda" else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(0)
        return DistContext(device=device)

    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    logger.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Tensor, ctx: DistContext) -> Tensor:
    """Sum a float64 tensor over processes, in place, and return it."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: Tensor, ctx: DistContext) -> Tensor:
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Send rank 0's picklable ``value`` to every process and return it."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(function: Callable[[], T], ctx: DistContext) -> T | None:
    """Call ``function`` on rank 0 only and raise its exception on every process.

    Without this, an error on rank 0 would leave the other processes waiting
    in their next collective until the process group times out. Returns the
    function's value on rank 0 and None elsewhere.
    """
    value: T | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            value = function()
        except Exception as caught:  # re-raised below, on every process
            error = caught
    error = broadcast_object(error, ctx)
    if error is not None:
        raise error
    return value


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Collect one picklable value per process, in rank order, on every process."""
    if not ctx.distributed:
        return [value]
    boxes: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(boxes, value)
    return boxes


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all processes.

    torch.nn.SyncBatchNorm does the same on GPUs but rejects CPU tensors
    (torch 2.14). This version sums per-channel moments with a differentiable
    all_reduce, so it also runs under gloo. Shards may differ in size. Outside
    a distributed training step it is a plain BatchNorm2d with the same
    state_dict keys, so checkpoints move freely between the two.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        # Per-channel sums over this shard; x: (N, C, H, W), moments: (3, C).
        channels = x.shape[1]
        count = torch.full((channels,), float(x.numel() // channels), dtype=x.dtype, device=x.device)
        moments = torch.stack([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        moments = differentiable_all_reduce(moments)

        # Global mean and biased variance, as F.batch_norm uses for normalizing.
        total = moments[2]
        mean = moments[0] / total
        var = (moments[1] / total - mean * mean).clamp_min(0.0)

        # Running statistics take the unbiased variance, as in nn.BatchNorm2d.
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())

        # Normalize; the (C,) vectors broadcast as (1, C, 1, 1).
        scale = torch.rsqrt(var + self.eps)
        y = (x - mean[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_batch_norm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm2d by a cross-process one: SyncBatchNorm on CUDA, CrossProcessBatchNorm2d on the CPU."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossProcessBatchNorm2d):
        converted = CrossProcessBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert_cpu(child))
    return converted
