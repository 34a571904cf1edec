"""Building blocks of the MDEQ cell: weight-normed convolutions, variational dropout, residual block.

The cell f is evaluated once per solver iteration, many times per forward
pass. The values that depend only on the parameters or on the random state
are therefore computed once per forward pass and passed into f. These are
the normalized weights of every weight-normed convolution and the dropout
masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormConv2d(nn.Module):
    """A bias-free 2-D convolution whose weight is ``g * v / ||v||`` with one gain per output channel.

    The module does not compute its weight inside ``forward``. The caller gets
    it once from ``compute_weight()`` and passes it to every call, so a solve
    of many iterations normalizes the weight once. With ``weight_norm=False``
    the convolution has a plain ``weight`` parameter and ``compute_weight()``
    returns it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = kernel_size // 2
        self.weight_norm = weight_norm

        # PyTorch's default Conv2d initialization (Kaiming uniform, a = sqrt(5)).
        # The gain starts at ||v||, so the effective weight equals this draw.
        direction = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(direction, a=math.sqrt(5))

        if weight_norm:
            # weight_v: (C_out, C_in, k, k); weight_g: (C_out, 1, 1, 1)
            self.weight_v = nn.Parameter(direction)
            self.weight_g = nn.Parameter(_norm_per_output_channel(direction).detach().clone())
        else:
            self.weight = nn.Parameter(direction)

    def compute_weight(self) -> Tensor:
        """Return the effective weight (C_out, C_in, k, k), with autograd history to the parameters."""
        if not self.weight_norm:
            return self.weight
        return self.weight_v * (self.weight_g / _norm_per_output_channel(self.weight_v))

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)


def _norm_per_output_channel(v: Tensor) -> Tensor:
    """Return the L2 norm of each output channel's kernel, shape (C_out, 1, 1, 1)."""
    # (C_out, C_in, k, k) -> (C_out, C_in * k * k) -> (C_out,) -> (C_out, 1, 1, 1)
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, 1, 1, 1)


class VariationalDropout2d(nn.Module):
    """Dropout of whole channels with one mask per sample, reused by every solver iteration.

    ``sample_mask`` draws a mask of shape (N, C, 1, 1) with entries 0 or
    1 / (1 - p). The caller draws it once per forward pass and passes it to
    ``forward`` on every evaluation of f. In eval mode or with p = 0 there is
    no mask (None) and ``forward`` returns its input.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p = {p!r} is invalid; expected a number in [0, 1)")
        self.p = p

    def sample_mask(self, batch_size: int, channels: int, *, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """Draw a mask (N, C, 1, 1) on the input's device and dtype, or None when dropout is off."""
        if not self.training or self.p == 0.0:
            return None

        # Created on the caller's device and dtype, so no default tensor type is needed.
        keep = torch.full((batch_size, channels, 1, 1), 1.0 - self.p, device=device, dtype=dtype)
        return torch.bernoulli(keep) / (1.0 - self.p)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return x
        return x * mask


class ResidualBlock(nn.Module):
    """The residual block of one branch of f, with the input injection added inside.

    conv3x3 C -> expansion*C (weight norm, no bias), GroupNorm, ReLU,
    conv3x3 expansion*C -> C (weight norm, no bias), variational dropout,
    add the injection, GroupNorm, add the block input, ReLU, GroupNorm.
    All three GroupNorms are affine.
    """

    def __init__(self, channels: int, *, expansion: int, groups: int, dropout: float, weight_norm: bool) -> None:
        super().__init__()
        hidden = expansion * channels
        for name, width in (("channels", channels), ("hidden channels", hidden)):
            if width % groups != 0:
                raise ValueError(
                    f"{name} = {width} is not divisible by group_norm_groups = {groups}; "
                    "choose channels so that channels and expansion * channels are multiples of the group count"
                )

        self.conv1 = WeightNormConv2d(channels, hidden, 3, weight_norm=weight_norm)
        self.norm1 = nn.GroupNorm(groups, hidden, affine=True)
        self.conv2 = WeightNormConv2d(hidden, channels, 3, weight_norm=weight_norm)
        self.dropout = VariationalDropout2d(dropout)
        self.norm2 = nn.GroupNorm(groups, channels, affine=True)
        self.norm3 = nn.GroupNorm(groups, channels, affine=True)

    def weight_norm_convs(self) -> dict[str, WeightNormConv2d]:
        """Return the block's weight-normed convolutions by attribute name."""
        return {"conv1": self.conv1, "conv2": self.conv2}

    def forward(
        self,
        x: Tensor,
        injection: Tensor | None,
        weights: dict[str, Tensor],
        mask: Tensor | None,
    ) -> Tensor:
        # x: (N, C, H, W); hidden activations: (N, expansion * C, H, W)
        out = F.relu(self.norm1(self.conv1(x, weights["conv1"])))

        out = self.dropout(self.conv2(out, weights["conv2"]), mask)
        if injection is not None:
            out = out + injection
        out = self.norm2(out)

        out = F.relu(out + x)
        return self.norm3(out)
