"""Weight norm: the normalized weights are computed once per forward pass, whatever the solver's budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deqbench.models import MDEQClassifier
from deqbench.models.blocks import WeightNormConv2d
from deqbench.scenarios import TINY


def count_weight_computations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count WeightNormConv2d.compute_weight calls in a one-element list, the running total."""
    calls = [0]
    original = WeightNormConv2d.compute_weight

    def counting_compute_weight(self: WeightNormConv2d) -> torch.Tensor:
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(WeightNormConv2d, "compute_weight", counting_compute_weight)
    return calls


@pytest.mark.parametrize("max_nfe", [2, 8])
def test_weights_normalized_once_per_pass(monkeypatch: pytest.MonkeyPatch, max_nfe: int) -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()
    model.forward_spec = replace(model.forward_spec, max_nfe=max_nfe)
    model.backward_spec = replace(model.backward_spec, solve=replace(model.backward_spec.solve, max_nfe=max_nfe))
    convs = len(model.cell.weight_norm_convs())
    calls = count_weight_computations(monkeypatch)

    output = model(torch.randn(2, 3, 32, 32))
    after_forward = calls[0]
    output.logits.sum().backward()

    # Two weight-normed convolutions per block, one post-fusion convolution per branch.
    assert convs == TINY.model.num_branches * (2 * TINY.model.blocks_per_branch + 1)
    assert after_forward == convs
    assert calls[0] == convs


def test_weights_normalized_once_in_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()
    calls = count_weight_computations(monkeypatch)

    model(torch.randn(2, 3, 32, 32), mode="warmup").logits.sum().backward()

    assert calls[0] == len(model.cell.weight_norm_convs())


def test_normalized_weight_formula() -> None:
    conv = WeightNormConv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight_g.mul_(torch.linspace(0.5, 2.0, 6).reshape(-1, 1, 1, 1))

    weight = conv.compute_weight().detach()
    norms = weight.reshape(6, -1).norm(dim=1)
    direction = conv.weight_v.detach()
    direction_norms = direction.reshape(6, -1).norm(dim=1)

    assert weight.shape == (6, 4, 3, 3)
    assert torch.allclose(norms, conv.weight_g.detach().flatten())
    assert torch.allclose(weight / norms.reshape(-1, 1, 1, 1), direction / direction_norms.reshape(-1, 1, 1, 1))


def test_weight_gradient_reaches_gain_and_direction() -> None:
    conv = WeightNormConv2d(4, 6, 3)
    x = torch.randn(2, 4, 5, 5)

    conv(x, conv.compute_weight()).square().sum().backward()

    assert conv.weight_g.grad is not None
    assert conv.weight_v.grad is not None
    assert torch.count_nonzero(conv.weight_g.grad) == 6
    assert torch.count_nonzero(conv.weight_v.grad) > 0
