"""Multiscale fusion of the MDEQ cell: every branch receives the sum of all branches at its resolution.

Branch 0 has the highest resolution and branch i has 1 / 2^i of it per side.
Into branch i go its own block output, an upsampled copy of every branch
j > i and a downsampled copy of every branch j < i. After the sum each branch
applies ReLU, a weight-normed 1x1 convolution and a GroupNorm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from deqbench.models.blocks import WeightNormConv2d


class Upsample(nn.Module):
    """From a lower-resolution branch: 1x1 conv (no bias), GroupNorm, nearest upsampling by 2^levels."""

    def __init__(self, in_channels: int, out_channels: int, levels: int, groups: int) -> None:
        super().__init__()
        self.scale = 2**levels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(groups, out_channels, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        # (N, C_j, H_j, W_j) -> (N, C_i, H_j * 2^levels, W_j * 2^levels)
        return F.interpolate(self.norm(self.conv(x)), scale_factor=self.scale, mode="nearest")


class Downsample(nn.Module):
    """From a higher-resolution branch: ``levels`` stride-2 3x3 convs (no bias), each with GroupNorm.

    Every convolution but the last keeps the input's channel count and is
    followed by a ReLU. The last one maps to the target branch's channels.
    """

    def __init__(self, in_channels: int, out_channels: int, levels: int, groups: int) -> None:
        super().__init__()
        steps: list[nn.Module] = []
        for k in range(levels):
            last = k == levels - 1
            width = out_channels if last else in_channels
            steps.append(nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1, bias=False))
            steps.append(nn.GroupNorm(groups, width, affine=True))
            if not last:
                steps.append(nn.ReLU())
        self.net = nn.Sequential(*steps)

    def forward(self, x: Tensor) -> Tensor:
        # (N, C_j, H_j, W_j) -> (N, C_i, H_j / 2^levels, W_j / 2^levels)
        return self.net(x)


class PostFusion(nn.Module):
    """ReLU, weight-normed 1x1 conv (no bias) and GroupNorm applied to one branch's fused sum."""

    def __init__(self, channels: int, *, groups: int, affine: bool, weight_norm: bool) -> None:
        super().__init__()
        if channels % groups != 0:
            raise ValueError(
                f"channels = {channels} is not divisible by fusion_norm_groups = {groups}; "
                "choose a group count that divides every branch's channels"
            )
        self.conv = WeightNormConv2d(channels, channels, 1, weight_norm=weight_norm)
        self.norm = nn.GroupNorm(groups, channels, affine=affine)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.norm(self.conv(F.relu(x), weight))


class MultiscaleFusion(nn.Module):
    """The fusion step of f over all branches.

    ``resample[i][j]`` maps branch j to branch i's shape (an identity for i == j).
    ``post[i]`` is applied to branch i's fused sum. The resampling
    GroupNorms are affine, and the post-fusion GroupNorm is affine only when
    ``post_affine`` is set.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        *,
        groups: int,
        post_groups: int,
        post_affine: bool,
        weight_norm: bool,
    ) -> None:
        super().__init__()
        for i, width in enumerate(channels):
            if width % groups != 0:
                raise ValueError(
                    f"channels[{i}] = {width} is not divisible by group_norm_groups = {groups}; "
                    "choose channels that are multiples of the group count"
                )

        self.resample = nn.ModuleList()
        for i in range(len(channels)):
            row = nn.ModuleList()
            for j in range(len(channels)):
                if j > i:
                    row.append(Upsample(channels[j], channels[i], levels=j - i, groups=groups))
                elif j < i:
                    row.append(Downsample(channels[j], channels[i], levels=i - j, groups=groups))
                else:
                    row.append(nn.Identity())
            self.resample.append(row)

        self.post = nn.ModuleList(
            PostFusion(width, groups=post_groups, affine=post_affine, weight_norm=weight_norm) for width in channels
        )

    def forward(self, branches: list[Tensor], post_weights: list[Tensor]) -> list[Tensor]:
        # NOTE: with a single branch the public MDEQ code skips fusion and the
        # post-fusion layer. Here the post-fusion layer still applies. Every
        # CIFAR-10 scenario has 2 or 4 branches.

        # branches[j]: (N, C_j, H / 2^j, W / 2^j); the output has the same shapes
        fused = []
        for i, row in enumerate(self.resample):
            total = branches[i]
            for j, resample in enumerate(row):
                if j != i:
                    total = total + resample(branches[j])
            fused.append(self.post[i](total, post_weights[i]))
        return fused
