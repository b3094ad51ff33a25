"""identity-to-kernel: the input itself, a BN of it, or a scale of it, as a branch kernel."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms
from tests.helpers import declined, fuse_and_check, identity_branches


class WithIdentity(nn.Module):
    def __init__(self, channels: int, groups: int, kind: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(channels)
        self.register_buffer("s", torch.rand(channels, 1, 1))
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.kind == "identity":
            return y + x
        if self.kind == "batch_norm":
            return self.bn(x) + y
        return y - self.s * x


@pytest.mark.parametrize("kind", ["identity", "batch_norm", "scale"])
@pytest.mark.parametrize("groups", [1, 2, 8], ids=["dense", "grouped", "depthwise"])
def test_identity_branch_becomes_a_kernel(kind: str, groups: int) -> None:
    fused, _, _ = fuse_and_check(WithIdentity(8, groups, kind), torch.randn(2, 8, 6, 6), convs=1)
    assert identity_branches(fused) == 1
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == groups


def test_linear_plus_identity() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.fc(x)

    fuse_and_check(Block(), torch.randn(3, 5))


def test_training_mode_batch_norm_branch_stays_and_says_why() -> None:
    block = randomize_batch_norms(WithIdentity(4, 1, "batch_norm").eval())
    block.bn.train()
    fused = fxfuse.optimize(block)
    assert any("batch statistics" in r for r in declined(fused, "merge-branches"))
    assert count_ops(fused, torch.randn(2, 4, 6, 6))["batch_norm"] == 1


def test_identity_needs_as_many_outputs_as_inputs() -> None:
    # 4 -> 1 channels, and the identity broadcasts the single output channel: not a conv.
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) + x

    fused, _, _ = fuse_and_check(Block(), torch.randn(2, 4, 6, 6), convs=1)
    (reason,) = declined(fused, "merge-branches")
    assert "in = out channels" in reason
