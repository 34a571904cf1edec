"""Variational dropout: one mask per forward pass, reused by every solver iteration, off in eval mode."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deqbench.models import MDEQClassifier
from deqbench.models.blocks import VariationalDropout2d
from deqbench.scenarios import TINY


def record_masks(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor | None]:
    """Record the mask passed to every VariationalDropout2d call, in call order."""
    seen: list[torch.Tensor | None] = []
    original = VariationalDropout2d.forward

    def recording_forward(self: VariationalDropout2d, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        seen.append(mask)
        return original(self, x, mask)

    monkeypatch.setattr(VariationalDropout2d, "forward", recording_forward)
    return seen


def test_mask_fixed_across_solver_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()
    model.forward_spec = replace(model.forward_spec, max_nfe=5)
    seen = record_masks(monkeypatch)

    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))

    # Two branches with one block each: calls alternate branch 0, branch 1.
    branch0 = seen[0::2]
    assert len(branch0) >= 5
    assert all(mask is not None for mask in branch0)
    assert all(torch.equal(mask, branch0[0]) for mask in branch0)
    assert all(mask is branch0[0] for mask in branch0)


def test_mask_shape_and_values() -> None:
    dropout = VariationalDropout2d(0.25).train()

    mask = dropout.sample_mask(4, 24, device=torch.device("cpu"), dtype=torch.float64)

    assert mask is not None
    assert mask.shape == (4, 24, 1, 1)
    assert mask.dtype == torch.float64
    assert set(mask.unique().tolist()) <= {0.0, 1.0 / 0.75}


def test_masks_differ_between_passes() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()
    injection = model.inject(torch.randn(2, 3, 32, 32))

    first = model.cell.prepare(injection).block_masks
    second = model.cell.prepare(injection).block_masks

    for branch_first, branch_second in zip(first, second):
        # 48 channels at p = 0.25 agree by chance with probability 0.625^48, about 2e-10.
        assert not torch.equal(branch_first[0], branch_second[0])


def test_dropout_off_in_eval_mode() -> None:
    with_dropout = MDEQClassifier(TINY.model, TINY.deq).eval()
    without_dropout = MDEQClassifier(replace(TINY.model, dropout=0.0), TINY.deq).eval()
    without_dropout.load_state_dict(with_dropout.state_dict())
    x = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        context = with_dropout.cell.prepare(with_dropout.inject(x))
        logits = with_dropout(x).logits
        reference = without_dropout(x).logits

    assert all(mask is None for branch in context.block_masks for mask in branch)
    assert torch.equal(logits, reference)


def test_dropout_changes_training_output() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()
    model.forward_spec = replace(model.forward_spec, max_nfe=3)
    x = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        first = model(x).logits
        second = model(x).logits

    assert not torch.equal(first, second)


def test_dropout_rejects_invalid_probability() -> None:
    with pytest.raises(ValueError, match="expected a number in \\[0, 1\\)"):
        VariationalDropout2d(1.0)
