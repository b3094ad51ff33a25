"""The kernel functions compute in place only on tensors they made: the weights they are given
(a model's own parameters, or values another weight of the same layer still needs) come back
unchanged, in float32 and float64, and the merged kernel is the sum of the placed ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxfuse import kernels
from fxfuse.weights import Apply, apply, const, evaluate, leaf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_and_placed_sum_leave_their_inputs_alone(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    k3, k1 = torch.randn(6, 3, 3, 3, dtype=dtype), torch.randn(6, 3, 1, 1, dtype=dtype)
    s3, s1 = torch.rand(6, dtype=dtype) + 0.5, torch.rand(6, dtype=dtype) + 0.5
    saved = [t.clone() for t in (k3, k1, s3, s1)]
    scaled = kernels.scale_kernel(k3, s3)
    merged = kernels.placed_sum(
        (k3, k1),
        (s3, kernels.ONE),
        in_channels=3,
        groups=(1, 1),
        new_groups=1,
        extent=(3, 3),
        offsets=((0, 0), (1, 1)),
        steps=((1, 1), (1, 1)),
    )
    for before, after in zip(saved, (k3, k1, s3, s1), strict=True):
        assert torch.equal(before, after)
    expected = k3.double() * s3.double().reshape(-1, 1, 1, 1) + F.pad(k1.double(), [1, 1, 1, 1])
    assert torch.equal(merged, expected)
    assert torch.equal(scaled, k3.double() * s3.double().reshape(-1, 1, 1, 1))


def test_a_value_two_weights_share_is_not_changed_by_either() -> None:
    """One layer's weight and bias evaluated with one memo: the shared scaled kernel is
    computed once and read by both, so neither may change it in place."""
    torch.manual_seed(0)
    w = leaf(torch.randn(4, 4, 3, 3))
    scaled = apply(kernels.scale_kernel, w, leaf(torch.rand(4) + 0.5))
    assert isinstance(scaled, Apply)
    merged = apply(
        kernels.placed_sum,
        (scaled, scaled),
        (const(1.0), const(2.0)),
        in_channels=4,
        groups=(1, 1),
        new_groups=1,
        extent=(3, 3),
        offsets=((0, 0), (0, 0)),
        steps=((1, 1), (1, 1)),
    )
    memo: dict[int, torch.Tensor] = {}
    first = evaluate(scaled, memo).clone()
    total = evaluate(merged, memo)
    assert torch.equal(evaluate(scaled, memo), first)
    assert torch.equal(total, first + first * 2)
