"""The MDEQ classifier for CIFAR-10: stem, equilibrium cell f, state flattening and head.

The layer structure follows the public MDEQ code (github.com/locuslab/deq,
MDEQ-Vision/lib/models/mdeq_core.py and mdeq.py at 7a97162), so the trainable
parameter counts equal the original's: 158,890 for TINY and 11,097,438 for
LARGE with the default non-affine post-fusion GroupNorm.

Shapes: B is the batch size and H x W the image size. The stem has stride 1,
so the state of branch i is (B, C_i, H / 2^i, W / 2^i). D is the flattened
state length per sample: 30,720 for TINY and 61,440 for LARGE on 32 x 32
images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqbench.implicit import BackwardRecord, BackwardSpec, SolveSpec, implicit_solve
from deqbench.jacobian import hutchinson_frobenius
from deqbench.models.blocks import ResidualBlock, WeightNormConv2d
from deqbench.models.fusion import MultiscaleFusion
from deqbench.scenarios import DEQConfig, ModelConfig
from deqbench.solvers import SolverStats

MODES = ("implicit", "warmup")


@dataclass(frozen=True)
class StateLayout:
    """Offsets and shapes of the branch states inside the flattened (B, D) solver state."""

    shapes: tuple[tuple[int, int, int], ...]  # (C_i, H_i, W_i) per branch, highest resolution first

    @classmethod
    def for_image(cls, channels: tuple[int, ...], height: int, width: int) -> StateLayout:
        """Return the layout for a stride-1 stem: branch i has 1 / 2^i of the image size per side."""
        return cls(tuple((c, height >> i, width >> i) for i, c in enumerate(channels)))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Values per sample in each branch, C_i * H_i * W_i."""
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def size(self) -> int:
        """The flattened length D per sample."""
        return sum(self.sizes)

    def flatten(self, branches: list[Tensor]) -> Tensor:
        """Concatenate per-branch states (B, C_i, H_i, W_i) into one (B, D) tensor."""
        batch = branches[0].shape[0]
        # each (B, C_i, H_i, W_i) -> (B, C_i * H_i * W_i), then concatenated to (B, D)
        return torch.cat([branch.reshape(batch, -1) for branch in branches], dim=1)

    def split(self, z: Tensor) -> list[Tensor]:
        """Split a (B, D) tensor back into per-branch states (B, C_i, H_i, W_i)."""
        if z.dim() != 2 or z.shape[1] != self.size:
            raise ValueError(
                f"state has shape {tuple(z.shape)}; expected (B, {self.size}) for branch shapes {self.shapes}"
            )

        batch = z.shape[0]
        parts = torch.split(z, self.sizes, dim=1)
        # each (B, C_i * H_i * W_i) -> (B, C_i, H_i, W_i)
        return [part.reshape(batch, *shape) for part, shape in zip(parts, self.shapes)]


@dataclass
class CellContext:
    """Inputs of f other than the state, computed once per forward pass and reused by every iteration."""

    injection: Tensor  # (B, C_0, H, W), added inside branch 0's first block
    block_weights: list[list[dict[str, Tensor]]]  # [branch][block] normalized conv weights by name
    block_masks: list[list[Tensor | None]]  # [branch][block] dropout mask (B, C_i, 1, 1), None when off
    post_weights: list[Tensor]  # [branch] normalized post-fusion 1x1 conv weight


class MDEQCell(nn.Module):
    """The equilibrium map f(z, x): one residual block stack per branch, then multiscale fusion."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.channels = config.channels

        self.branches = nn.ModuleList()
        for width in config.channels:
            blocks = nn.ModuleList(
                ResidualBlock(
                    width,
                    expansion=config.expansion,
                    groups=config.group_norm_groups,
                    dropout=config.dropout,
                    weight_norm=config.weight_norm,
                )
                for _ in range(config.blocks_per_branch)
            )
            self.branches.append(blocks)

        self.fusion = MultiscaleFusion(
            config.channels,
            groups=config.group_norm_groups,
            post_groups=config.fusion_norm_groups,
            post_affine=config.fusion_norm_affine,
            weight_norm=config.weight_norm,
        )

    def weight_norm_convs(self) -> list[WeightNormConv2d]:
        """Return every weight-normed convolution of f, blocks first, then post-fusion."""
        convs = [conv for blocks in self.branches for block in blocks for conv in block.weight_norm_convs().values()]
        return convs + [post.conv for post in self.fusion.post]

    def prepare(self, injection: Tensor) -> CellContext:
        """Normalize the weights and draw the dropout masks for one forward pass."""
        batch = injection.shape[0]

        # Weight norm once per forward pass, with autograd history to the gains and directions.
        block_weights = [
            [{name: conv.compute_weight() for name, conv in block.weight_norm_convs().items()} for block in blocks]
            for blocks in self.branches
        ]
        post_weights = [post.conv.compute_weight() for post in self.fusion.post]

        # One mask per block, on the injection's device and dtype; None in eval mode.
        block_masks = [
            [
                block.dropout.sample_mask(batch, width, device=injection.device, dtype=injection.dtype)
                for block in blocks
            ]
            for blocks, width in zip(self.branches, self.channels)
        ]

        return CellContext(injection, block_weights, block_masks, post_weights)

    def forward(self, state: list[Tensor], context: CellContext) -> list[Tensor]:
        # state[i]: (B, C_i, H_i, W_i); the output has the same shapes
        block_outputs = []
        for i, blocks in enumerate(self.branches):
            y = state[i]
            for k, block in enumerate(blocks):
                # Only the first block of branch 0 receives the injection.
                injection = context.injection if (i == 0 and k == 0) else None
                y = block(y, injection, context.block_weights[i][k], context.block_masks[i][k])
            block_outputs.append(y)

        return self.fusion(block_outputs, context.post_weights)


class Bottleneck(nn.Module):
    """The head's bottleneck block (expansion 4) with non-affine BatchNorms inside.

    1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv to 4 * planes, BN; the
    shortcut is a 1x1 conv with affine BN when the width changes. Add, ReLU.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=False)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, affine=False)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, affine=False)

        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ClassificationHead(nn.Module):
    """Bottleneck per branch, a stride-2 cascade from branch 0 down to the last branch, pooling, linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = [h * Bottleneck.expansion for h in config.head_channels]

        self.bottlenecks = nn.ModuleList(Bottleneck(c, h) for c, h in zip(config.channels, config.head_channels))
        self.downsamples = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1, bias=True),
                nn.BatchNorm2d(widths[i + 1]),
                nn.ReLU(),
            )
            for i in range(len(widths) - 1)
        )
        self.final = nn.Sequential(
            nn.Conv2d(widths[-1], config.final_channels, kernel_size=1, bias=True),
            nn.BatchNorm2d(config.final_channels),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(config.final_channels, config.num_classes)

    def forward(self, state: list[Tensor]) -> Tensor:
        # state[i]: (B, C_i, H_i, W_i) -> y: (B, 4 * head_i, H_i, W_i) along the cascade
        y = self.bottlenecks[0](state[0])
        for i, downsample in enumerate(self.downsamples):
            y = self.bottlenecks[i + 1](state[i + 1]) + downsample(y)

        # (B, final, H_last, W_last) -> global average pool -> (B, final) -> (B, classes)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)


@dataclass
class MDEQOutput:
    """The classifier's output and the statistics of its equilibrium solve."""

    logits: Tensor  # (B, num_classes)
    forward_stats: SolverStats | None  # forward solve, or the unrolled warm-up steps
    backward: BackwardRecord | None  # filled by the implicit layer when backward runs; None in warm-up
    jacobian_loss: Tensor | None  # scalar, batch mean of ||df/dz||_F^2 / D; None unless requested
    state: list[Tensor]  # equilibrium per branch, (B, C_i, H_i, W_i)


@dataclass
class EquilibriumProblem:
    """The fixed-point map of one batch on the flattened state, and its starting point."""

    f: Callable[[Tensor], Tensor]  # (B, D) -> (B, D)
    z0: Tensor  # (B, D) zeros
    layout: StateLayout
    context: CellContext


class MDEQClassifier(nn.Module):
    """Multiscale deep equilibrium classifier (Bai, Koltun, Kolter, NeurIPS 2020).

    ``forward_spec`` and ``backward_spec`` default to the scenario's DEQConfig
    and are public attributes, so a benchmark can change the solver, its
    budget or the backward mode between calls. Each call builds its own
    closure, masks and weights, so one module may be called several times in
    one graph.
    """

    def __init__(
        self,
        model: ModelConfig,
        deq: DEQConfig,
        *,
        forward_spec: SolveSpec | None = None,
        backward_spec: BackwardSpec | None = None,
    ) -> None:
        super().__init__()
        _check_model_config(model)
        self.config = model
        self.deq = deq
        self.forward_spec = forward_spec if forward_spec is not None else SolveSpec.from_config(deq.forward)
        self.backward_spec = backward_spec if backward_spec is not None else _backward_spec_from_config(deq)

        c0 = model.channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, c0, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(),
            nn.Conv2d(c0, c0, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(),
        )
        self.stem_extra: nn.Module | None = None
        if model.stem_extra_1x1:
            self.stem_extra = nn.Sequential(nn.Conv2d(c0, c0, kernel_size=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())

        self.cell = MDEQCell(model)
        self.head = ClassificationHead(model)
        _init_like_original(self)

    def inject(self, x: Tensor) -> Tensor:
        """Map images (B, 3, H, W) to the injection into branch 0, (B, C_0, H, W)."""
        injection = self.stem(x)
        if self.stem_extra is not None:
            injection = self.stem_extra(injection)
        return injection

    def equilibrium_problem(self, x: Tensor) -> EquilibriumProblem:
        """Build f: (B, D) -> (B, D) for images x, with weights and dropout masks fixed for this call."""
        _check_images(x, self.config.num_branches)
        injection = self.inject(x)
        layout = StateLayout.for_image(self.config.channels, injection.shape[2], injection.shape[3])
        context = self.cell.prepare(injection)

        def f(z: Tensor) -> Tensor:
            # (B, D) -> [(B, C_i, H_i, W_i)] -> f -> (B, D)
            return layout.flatten(self.cell(layout.split(z), context))

        z0 = injection.new_zeros(injection.shape[0], layout.size)
        return EquilibriumProblem(f, z0, layout, context)

    def forward(self, x: Tensor, *, mode: str = "implicit", jacobian_samples: int = 0) -> MDEQOutput:
        """Classify images x (B, 3, H, W); H and W divisible by 2^(num_branches - 1).

        mode="implicit" solves for the equilibrium with ``forward_spec`` and
        differentiates it with ``backward_spec``. mode="warmup" applies f
        ``deq.warmup_layers`` times from zero, weight-tied, and backpropagates
        through every step. jacobian_samples > 0 adds the Hutchinson estimate
        of ||df/dz||_F^2 / D at the equilibrium (at the last warm-up iterate in
        warm-up mode).
        """
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r} is invalid; expected one of {MODES}")
        if isinstance(jacobian_samples, bool) or not isinstance(jacobian_samples, int) or jacobian_samples < 0:
            raise ValueError(
                f"jacobian_samples = {jacobian_samples!r} is invalid; expected an integer >= 0 (0 skips the estimate)"
            )

        problem = self.equilibrium_problem(x)
        backward: BackwardRecord | None = None
        z_star: Tensor | None = None
        f_out: Tensor | None = None

        if mode == "implicit":
            result = implicit_solve(problem.f, problem.z0, self.forward_spec, self.backward_spec)
            backward = result.backward
            z_star, f_out = result.z_star, result.f_out
        else:
            # Warm-up is the implicit layer's unrolled mode: every step is tracked by autograd.
            warmup = BackwardSpec(mode="unrolled", steps=self.deq.warmup_layers)
            result = implicit_solve(problem.f, problem.z0, self.forward_spec, warmup)
        z, stats = result.z, result.forward_stats

        jacobian_loss = None
        if jacobian_samples > 0:
            jacobian_loss = _jacobian_loss(problem.f, z, z_star, f_out, jacobian_samples)

        state = problem.layout.split(z)
        return MDEQOutput(self.head(state), stats, backward, jacobian_loss, state)


def _backward_spec_from_config(deq: DEQConfig) -> BackwardSpec:
    """Build the backward pass of a DEQConfig.

    The unrolled mode tracks as many iterations as the forward budget allows
    (deq.forward.max_nfe), so it is the backpropagation-through-the-solver
    baseline. The phantom mode takes deq.phantom_steps damped steps.
    """
    steps = deq.forward.max_nfe if deq.backward_mode == "unrolled" else deq.phantom_steps
    return BackwardSpec(
        mode=deq.backward_mode,
        solve=SolveSpec.from_config(deq.backward),
        steps=steps,
        damping=deq.phantom_damping,
    )


def _jacobian_loss(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    z_star: Tensor | None,
    f_out: Tensor | None,
    samples: int,
) -> Tensor:
    """Return the batch mean of the Hutchinson estimate of ||df/dz||_F^2 / D at the equilibrium.

    It reuses the implicit layer's extra evaluation f(z*) when there is one.
    Otherwise (warm-up, unrolled backward, or no autograd) it evaluates f once
    more at a detached copy of z; without autograd the result carries no graph.
    """
    if torch.is_grad_enabled() and z_star is not None and f_out is not None:
        return hutchinson_frobenius(f_out, z_star, samples).mean()

    grad_enabled = torch.is_grad_enabled()
    with torch.enable_grad():
        z_star = z.detach().requires_grad_()
        f_out = f(z_star)
        estimate = hutchinson_frobenius(f_out, z_star, samples, create_graph=grad_enabled)
    return estimate.mean()


def _check_model_config(model: ModelConfig) -> None:
    """Reject configurations the architecture cannot build, naming the key and the fix."""
    if len(model.channels) != model.num_branches or len(model.head_channels) != model.num_branches:
        raise ValueError(
            f"model.channels = {model.channels} and model.head_channels = {model.head_channels} "
            f"must each have num_branches = {model.num_branches} entries"
        )
    if model.blocks_per_branch < 1:
        raise ValueError(f"model.blocks_per_branch = {model.blocks_per_branch} is invalid; expected an integer >= 1")


def _check_images(x: Tensor, num_branches: int) -> None:
    """Reject inputs that are not (B, 3, H, W) floats with H and W divisible by 2^(num_branches - 1)."""
    factor = 2 ** (num_branches - 1)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(x.shape)}; expected (B, 3, H, W)")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"image size {x.shape[2]} x {x.shape[3]} is invalid for {num_branches} branches; "
            f"height and width must be multiples of {factor}"
        )
    if not x.is_floating_point():
        raise ValueError(f"images have dtype {x.dtype}; expected a floating-point dtype (convert with x.float())")


def _init_like_original(model: nn.Module) -> None:
    """Initialize like the public MDEQ code: every plain conv from N(0, 0.01), affine BatchNorms to (1, 0).

    The original draws weight-normed weights from N(0, 0.01) as well, but it
    writes them into a tensor that weight norm recomputes from its gain and
    direction, so those convolutions keep PyTorch's default initialization.
    WeightNormConv2d is not an nn.Conv2d and is left alone to match.
    GroupNorms and the final linear layer keep PyTorch's defaults.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.normal_(module.bias, 0.0, 0.01)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


__all__ = [
    "MODES",
    "CellContext",
    "ClassificationHead",
    "EquilibriumProblem",
    "MDEQCell",
    "MDEQClassifier",
    "MDEQOutput",
    "StateLayout",
]
