"""Per-branch state shapes, the flattened length per sample, and flatten/split."""

from __future__ import annotations

import pytest
import torch

from deqbench.models import MDEQClassifier, StateLayout
from deqbench.scenarios import LARGE, TINY

# State per sample on 32 x 32 images, from the original code.
EXPECTED = {
    "TINY": (TINY, ((24, 32, 32), (24, 16, 16)), 30_720),
    "LARGE": (LARGE, ((32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)), 61_440),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_layout_shapes_and_length(name: str) -> None:
    scenario, shapes, length = EXPECTED[name]
    layout = StateLayout.for_image(scenario.model.channels, 32, 32)

    assert layout.shapes == shapes
    assert layout.size == length


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cell_output_matches_layout(name: str) -> None:
    scenario, shapes, length = EXPECTED[name]
    model = MDEQClassifier(scenario.model, scenario.deq).eval()

    with torch.no_grad():
        problem = model.equilibrium_problem(torch.randn(1, 3, 32, 32))
        fz = problem.f(problem.z0)

    assert problem.z0.shape == (1, length)
    assert fz.shape == (1, length)
    assert [tuple(b.shape[1:]) for b in problem.layout.split(fz)] == list(shapes)


def test_flatten_split_round_trip() -> None:
    layout = StateLayout.for_image(TINY.model.channels, 32, 32)
    branches = [torch.randn(3, *shape) for shape in layout.shapes]

    z = layout.flatten(branches)
    back = layout.split(z)

    assert z.shape == (3, layout.size)
    assert len(back) == len(branches)
    for original, restored in zip(branches, back):
        assert torch.equal(original, restored)
    assert torch.equal(layout.flatten(back), z)


def test_flatten_orders_branches_by_offset() -> None:
    layout = StateLayout.for_image((2, 4), 4, 4)
    branches = [torch.full((1, *shape), float(i)) for i, shape in enumerate(layout.shapes)]

    z = layout.flatten(branches)

    assert layout.sizes == (32, 16)
    assert torch.all(z[:, :32] == 0)
    assert torch.all(z[:, 32:] == 1)


def test_split_rejects_wrong_length() -> None:
    layout = StateLayout.for_image(TINY.model.channels, 32, 32)

    with pytest.raises(ValueError, match="expected \\(B, 30720\\)"):
        layout.split(torch.zeros(2, 100))


def test_state_starts_at_zero() -> None:
    model = MDEQClassifier(TINY.model, TINY.deq)

    problem = model.equilibrium_problem(torch.randn(2, 3, 32, 32))

    assert torch.count_nonzero(problem.z0) == 0
