"""The classifier's forward modes, statistics, runtime solver overrides and input checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deqbench.implicit import SolveSpec
from deqbench.models import MDEQClassifier
from deqbench.scenarios import TINY, DEQConfig, ModelConfig
from deqbench.solvers.base import SolverStats, StopReason


def parameter_grads(model: MDEQClassifier) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_two_calls_in_one_graph(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    # Two augmented views through one model: the gradient of the summed loss
    # equals the sum of the two gradients taken one call at a time.
    model = MDEQClassifier(small_config, small_deq).double().train()
    views = [torch.randn(2, 3, 8, 8, dtype=torch.float64) for _ in range(2)]

    separate: list[dict[str, torch.Tensor]] = []
    for seed, view in enumerate(views):
        model.zero_grad()
        torch.manual_seed(seed)  # same dropout masks in both runs
        model(view).logits.square().sum().backward()
        separate.append(parameter_grads(model))

    model.zero_grad()
    total = 0
    for seed, view in enumerate(views):
        torch.manual_seed(seed)
        total = total + model(view).logits.square().sum()
    total.backward()
    combined = parameter_grads(model)

    assert combined.keys() == separate[0].keys()
    assert torch.count_nonzero(combined["cell.branches.0.0.conv1.weight_v"]) > 0
    for name, grad in combined.items():
        torch.testing.assert_close(grad, separate[0][name] + separate[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_warmup_backpropagates_to_stem_and_cell() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()

    output = model(torch.randn(2, 3, 32, 32), mode="warmup")
    output.logits.square().sum().backward()

    assert output.backward is None
    assert torch.count_nonzero(model.stem[0].weight.grad) > 0
    assert torch.count_nonzero(model.stem[3].weight.grad) > 0
    for conv in model.cell.weight_norm_convs():
        assert torch.count_nonzero(conv.weight_v.grad) > 0
        assert torch.count_nonzero(conv.weight_g.grad) > 0


def test_warmup_stats_describe_unrolled_steps() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).eval()

    with torch.no_grad():
        stats = model(torch.randn(2, 3, 32, 32), mode="warmup").forward_stats

    assert isinstance(stats, SolverStats)
    assert stats.nfe.tolist() == [TINY.deq.warmup_layers] * 2
    assert stats.abs_trace.shape == (2, TINY.deq.warmup_layers)
    assert stats.stop_reason == [StopReason.LIMIT] * 2
    assert torch.equal(stats.abs_residual, stats.abs_trace.min(dim=1).values)
    assert torch.all(stats.rel_trace[:, 0] > 0.99)  # from z0 = 0 the first step's relative residual is 1


def test_warmup_equals_unrolled_cell(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    model = MDEQClassifier(small_config, small_deq).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    with torch.no_grad():
        output = model(x, mode="warmup")
        problem = model.equilibrium_problem(x)
        z = problem.z0
        for _ in range(small_deq.warmup_layers):
            z = problem.f(z)

    for branch, expected in zip(output.state, problem.layout.split(z)):
        torch.testing.assert_close(branch, expected)


def test_implicit_stats_forward_and_backward() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).train()

    output = model(torch.randn(2, 3, 32, 32))
    stats_before_backward = output.backward.stats
    output.logits.square().sum().backward()

    assert isinstance(output.forward_stats, SolverStats)
    assert output.forward_stats.nfe.shape == (2,)
    assert int(output.forward_stats.nfe.max()) <= TINY.deq.forward.max_nfe
    assert stats_before_backward is None
    assert isinstance(output.backward.stats, SolverStats)
    assert int(output.backward.stats.nfe.max()) <= TINY.deq.backward.max_nfe


def test_forward_spec_override_limits_nfe() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).eval()
    x = torch.randn(2, 3, 32, 32)

    model.forward_spec = replace(model.forward_spec, max_nfe=2)
    with torch.no_grad():
        short = model(x).forward_stats
    model.forward_spec = replace(model.forward_spec, max_nfe=30, tol=1e-12)
    with torch.no_grad():
        long = model(x).forward_stats

    assert int(short.nfe.max()) <= 2
    assert int(long.nfe.max()) > 2


def test_constructor_spec_override() -> None:
    spec = SolveSpec.from_config(replace(TINY.deq.forward, max_nfe=3))

    model = MDEQClassifier(TINY.model, TINY.deq, forward_spec=spec)

    assert model.forward_spec == spec
    assert model.backward_spec.mode == TINY.deq.backward_mode
    assert model.backward_spec.solve == SolveSpec.from_config(TINY.deq.backward)


def test_unrolled_config_tracks_forward_budget(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    deq = replace(small_deq, backward_mode="unrolled")
    model = MDEQClassifier(small_config, deq).train()

    output = model(torch.randn(2, 3, 8, 8))
    output.logits.square().sum().backward()

    assert model.backward_spec.mode == "unrolled"
    assert model.backward_spec.steps == deq.forward.max_nfe
    assert output.forward_stats.nfe.tolist() == [deq.forward.max_nfe] * 2
    assert torch.count_nonzero(model.cell.weight_norm_convs()[0].weight_v.grad) > 0


def test_phantom_config_steps_and_damping(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    deq = replace(small_deq, backward_mode="phantom", phantom_steps=3, phantom_damping=0.5)
    model = MDEQClassifier(small_config, deq).train()

    output = model(torch.randn(2, 3, 8, 8), jacobian_samples=1)
    (output.logits.square().sum() + output.jacobian_loss).backward()

    assert model.backward_spec.steps == 3
    assert model.backward_spec.damping == 0.5
    assert output.jacobian_loss.grad_fn is not None
    assert torch.count_nonzero(model.cell.weight_norm_convs()[0].weight_v.grad) > 0


def test_output_shapes_tiny() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq).eval()

    with torch.no_grad():
        output = model(torch.randn(2, 3, 32, 32))

    assert output.logits.shape == (2, TINY.model.num_classes)
    assert [tuple(s.shape) for s in output.state] == [(2, 24, 32, 32), (2, 24, 16, 16)]


def test_runs_without_default_tensor_type(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    # The original code relied on a CUDA default tensor type for its dropout
    # masks; here masks and state follow the input's device and dtype.
    assert torch.get_default_dtype() == torch.float32
    model = MDEQClassifier(small_config, small_deq).double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    context = model.cell.prepare(model.inject(x))
    output = model(x)
    output.logits.sum().backward()

    assert context.block_masks[0][0].dtype == torch.float64
    assert context.block_masks[0][0].device == x.device
    assert output.logits.dtype == torch.float64
    assert torch.isfinite(output.logits).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    device = torch.device("cuda")
    model = MDEQClassifier(small_config, small_deq).to(device).train()
    x = torch.randn(2, 3, 8, 8, device=device)

    context = model.cell.prepare(model.inject(x))
    output = model(x, jacobian_samples=1)
    (output.logits.sum() + output.jacobian_loss).backward()

    assert context.block_masks[0][0].device.type == "cuda"
    assert output.logits.device.type == "cuda"
    assert model.cell.weight_norm_convs()[0].weight_v.grad is not None


def test_rejects_unknown_mode(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    model = MDEQClassifier(small_config, small_deq)

    with pytest.raises(ValueError, match="'implicit', 'warmup'"):
        model(torch.randn(1, 3, 8, 8), mode="unrolled")


def test_rejects_negative_jacobian_samples(small_config: ModelConfig, small_deq: DEQConfig) -> None:
    model = MDEQClassifier(small_config, small_deq)

    with pytest.raises(ValueError, match="integer >= 0"):
        model(torch.randn(1, 3, 8, 8), jacobian_samples=-1)


def test_rejects_indivisible_image_size() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq)

    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 3, 31, 32))


def test_rejects_wrong_channel_count() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq)

    with pytest.raises(ValueError, match="expected \\(B, 3, H, W\\)"):
        model(torch.randn(1, 1, 32, 32))


def test_rejects_group_count_not_dividing_channels() -> None:
    config = replace(TINY.model, channels=(12, 24))

    with pytest.raises(ValueError, match="not divisible by group_norm_groups = 8"):
        MDEQClassifier(config, TINY.deq)
