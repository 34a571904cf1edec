"""Trainable parameter counts against the original MDEQ code, in total and per part."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from deqbench.models import MDEQClassifier
from deqbench.scenarios import LARGE, LARGE_REG, TINY, Scenario

# Measured by building the unmodified public models on the CPU
# (models.mdeq.get_cls_net) and counting parameters with requires_grad.
# "deq" is github.com/locuslab/deq (MDEQ-Vision, non-affine post-fusion
# GroupNorm); "mdeq" is github.com/locuslab/mdeq (affine post-fusion GroupNorm).
ORIGINAL_COUNTS = {
    # (scenario, fusion_norm_affine): (total, stem, stem_extra, cell, head)
    ("TINY", False): (158_890, 5_928, 0, 111_696, 41_266),
    ("LARGE", False): (11_097_438, 10_208, 1_088, 8_715_232, 2_370_910),
    ("LARGE_REG", False): (11_097_438, 10_208, 1_088, 8_715_232, 2_370_910),
    ("TINY", True): (158_986, 5_928, 0, 111_792, 41_266),
    ("LARGE", True): (11_098_398, 10_208, 1_088, 8_716_192, 2_370_910),
}
SCENARIOS = {"TINY": TINY, "LARGE": LARGE, "LARGE_REG": LARGE_REG}


def count_trainable(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build(scenario: Scenario, affine: bool) -> MDEQClassifier:
    return MDEQClassifier(replace(scenario.model, fusion_norm_affine=affine), scenario.deq)


@pytest.mark.parametrize(("name", "affine"), list(ORIGINAL_COUNTS), ids=lambda v: str(v))
def test_parameter_count_matches_original(name: str, affine: bool) -> None:
    total, stem, stem_extra, cell, head = ORIGINAL_COUNTS[(name, affine)]
    model = build(SCENARIOS[name], affine)

    assert count_trainable(model) == total
    assert count_trainable(model.stem) == stem
    assert count_trainable(model.stem_extra) == stem_extra
    assert count_trainable(model.cell) == cell
    assert count_trainable(model.head) == head


@pytest.mark.parametrize("name", ["TINY", "LARGE"])
def test_weight_norm_gains_one_per_channel(name: str) -> None:
    # Weight norm adds one gain per output channel on both block convolutions
    # and on each post-fusion 1x1 convolution.
    config = SCENARIOS[name].model
    expected = sum(config.expansion * c + c + c for c in config.channels)

    model = build(SCENARIOS[name], affine=False)
    gains = sum(conv.weight_g.numel() for conv in model.cell.weight_norm_convs())

    assert gains == expected


def test_weight_norm_off_drops_gains() -> None:
    plain = MDEQClassifier(replace(TINY.model, weight_norm=False), TINY.deq)
    normed = build(TINY, affine=False)
    convs = plain.cell.weight_norm_convs()

    difference = count_trainable(normed.cell) - count_trainable(plain.cell)

    assert difference == sum(conv.weight.shape[0] for conv in convs)
    assert all(not hasattr(conv, "weight_g") for conv in convs)


def test_weight_normed_convs_keep_default_init() -> None:
    model = build(TINY, affine=False)

    for conv in model.cell.weight_norm_convs():
        weight = conv.compute_weight().detach()
        fan_in = weight[0].numel()
        # Kaiming uniform with a = sqrt(5) draws from U(-b, b), b = 1 / sqrt(fan_in).
        bound = fan_in**-0.5
        assert torch.allclose(weight, conv.weight_v.detach())
        assert weight.abs().max() <= bound


def test_plain_convs_drawn_from_normal() -> None:
    # The original code draws every plain convolution's weight from N(0, 0.01).
    model = build(TINY, affine=False)
    weights = [m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.Conv2d)]
    values = torch.cat(weights)

    # Standard error of a sample standard deviation is about std / sqrt(2 n).
    tolerance = 4 * 0.01 / (2 * values.numel()) ** 0.5
    assert abs(values.std().item() - 0.01) < tolerance
