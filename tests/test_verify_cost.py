"""What ``fxfuse.verify``'s defaults cost: forward passes of the reference, counted in passes
at the example's size (a drawn input of twice the elements counts two). Deterministic for a
seed; no timing."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import fxfuse


class _Log(list):  # type: ignore[type-arg]
    """A list every copy of its owner shares (verify runs deep copies of the models)."""

    def __deepcopy__(self, memo: dict[int, object]) -> _Log:
        return self


class Counting(nn.Module):
    """Runs ``model`` and records the number of elements of every input it is called on
    (its copies' calls too)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sizes = _Log()

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.numel())
        return self.model(x)


def test_the_default_check_costs_at_most_forty_passes_of_the_reference() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 24, 24)
    for seed in (0, 1, 2):
        reference = Counting(model)
        report = fxfuse.verify(reference, fxfuse.optimize(model), (x,), seed=seed)
        assert report.examples == 21 and len(report.varied) == 3  # batch, height, width
        assert len(reference.sizes) >= 21  # the example and every drawn input, at least
        passes = sum(reference.sizes) / x.numel()
        assert passes <= 40, f"seed {seed}: {passes:.1f} passes of the reference"
        assert max(int(s.split("x")[0]) for s in report.shapes) > 2  # batch 3 is still drawn
