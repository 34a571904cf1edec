"""Hutchinson estimate of ||df/dz||_F^2 / D against the exact Jacobian of a small float64 cell."""

from __future__ import annotations

import pytest
import torch

from deqbench.jacobian import hutchinson_frobenius
from deqbench.models import MDEQCell, MDEQClassifier, StateLayout
from deqbench.scenarios import DEQConfig, ModelConfig


def small_cell_map(config: ModelConfig, batch: int) -> tuple[MDEQCell, StateLayout, object]:
    """Return a float64 cell on 4 x 4 images, its layout and f: (B, D) -> (B, D)."""
    cell = MDEQCell(config).double().eval()
    layout = StateLayout.for_image(config.channels, 4, 4)
    injection = torch.randn(batch, config.channels[0], 4, 4, dtype=torch.float64)
    context = cell.prepare(injection)

    def f(z: torch.Tensor) -> torch.Tensor:
        return layout.flatten(cell(layout.split(z), context))

    return cell, layout, f


def test_estimate_matches_exact_norm(small_config: ModelConfig) -> None:
    batch, probes = 2, 400
    _, layout, f = small_cell_map(small_config, batch)
    z = torch.randn(batch, layout.size, dtype=torch.float64)

    # Exact per-sample ||J_b||_F^2 / D from the dense Jacobian (B, D, B, D).
    jacobian = torch.autograd.functional.jacobian(f, z)
    exact = torch.stack([jacobian[b, :, b, :].square().sum() for b in range(batch)]) / layout.size

    z_star = z.clone().requires_grad_()
    f_out = f(z_star)
    estimates = torch.stack([hutchinson_frobenius(f_out, z_star, 1).detach() for _ in range(probes)])  # (probes, B)
    mean = estimates.mean(dim=0)
    standard_error = estimates.std(dim=0) / probes**0.5

    for b in range(batch):
        assert abs(mean[b] - exact[b]) < 4 * standard_error[b], f"sample {b}: {mean[b]:.6g} vs exact {exact[b]:.6g}"


def test_samples_do_not_mix(small_config: ModelConfig) -> None:
    # The per-sample estimate assumes sample b's output depends only on sample b's state.
    batch = 2
    _, layout, f = small_cell_map(small_config, batch)
    jacobian = torch.autograd.functional.jacobian(f, torch.randn(batch, layout.size, dtype=torch.float64))

    assert torch.count_nonzero(jacobian[0, :, 1, :]) == 0
    assert torch.count_nonzero(jacobian[1, :, 0, :]) == 0


def test_estimate_gradient_reaches_cell(small_config: ModelConfig) -> None:
    cell, layout, f = small_cell_map(small_config, 2)
    z_star = torch.randn(2, layout.size, dtype=torch.float64, requires_grad=True)

    hutchinson_frobenius(f(z_star), z_star, 2).mean().backward()

    for conv in cell.weight_norm_convs():
        assert conv.weight_v.grad is not None
        assert conv.weight_g.grad is not None
        assert torch.count_nonzero(conv.weight_v.grad) > 0
        assert torch.count_nonzero(conv.weight_g.grad) > 0


def test_estimate_without_graph_is_constant(small_config: ModelConfig) -> None:
    _, layout, f = small_cell_map(small_config, 2)
    z_star = torch.randn(2, layout.size, dtype=torch.float64, requires_grad=True)

    estimate = hutchinson_frobenius(f(z_star), z_star, 1, create_graph=False)

    assert estimate.shape == (2,)
    assert estimate.grad_fn is None
    assert torch.all(estimate > 0)


def test_estimate_of_linear_map_is_exact_scale() -> None:
    # For f(z) = a z the Jacobian is a I, so ||J||_F^2 / D = a^2 for every probe count.
    z_star = torch.randn(3, 50, dtype=torch.float64, requires_grad=True)
    scale = 0.5

    estimates = torch.stack([hutchinson_frobenius(scale * z_star, z_star, 1).detach() for _ in range(2000)])

    assert torch.allclose(estimates.mean(dim=0), torch.full((3,), scale**2, dtype=torch.float64), rtol=0.05)


def test_estimate_rejects_invalid_samples() -> None:
    z_star = torch.randn(2, 5, requires_grad=True)

    with pytest.raises(ValueError, match="expected an integer >= 1"):
        hutchinson_frobenius(2 * z_star, z_star, 0)


def test_estimate_rejects_shape_mismatch() -> None:
    z_star = torch.randn(2, 5, requires_grad=True)

    with pytest.raises(ValueError, match="pass f\\(z_star\\) and z_star itself"):
        hutchinson_frobenius(z_star.sum(dim=1), z_star, 1)


def test_estimate_rejects_detached_output() -> None:
    z_star = torch.randn(2, 5)

    with pytest.raises(ValueError, match="requires_grad_"):
        hutchinson_frobenius(2 * z_star, z_star, 1)


def test_classifier_jacobian_loss_trains_stem_and_cell(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    model = MDEQClassifier(small_config, small_deq).double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    output = model(x, jacobian_samples=2)
    output.jacobian_loss.backward()

    assert output.jacobian_loss.dim() == 0
    assert output.jacobian_loss > 0
    assert torch.count_nonzero(model.stem[0].weight.grad) > 0
    for conv in model.cell.weight_norm_convs():
        assert torch.count_nonzero(conv.weight_v.grad) > 0


@pytest.mark.parametrize("mode", ["implicit", "warmup"])
def test_classifier_jacobian_loss_absent_by_default(small_config: ModelConfig, small_deq: DEQConfig, mode: str) -> None:
    model = MDEQClassifier(small_config, small_deq)

    output = model(torch.randn(2, 3, 8, 8), mode=mode)

    assert output.jacobian_loss is None


def test_classifier_jacobian_loss_in_eval_without_grad(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    model = MDEQClassifier(small_config, small_deq).eval()

    with torch.no_grad():
        output = model(torch.randn(2, 3, 8, 8), jacobian_samples=1)

    assert output.jacobian_loss is not None
    assert output.jacobian_loss.grad_fn is None
    assert torch.isfinite(output.jacobian_loss)
