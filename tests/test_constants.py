"""fold-constants: ops on weights and buffers are evaluated once, so the fusing rules see them."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops, relative_error

warnings.filterwarnings("ignore", category=UserWarning)


class FrozenBN(nn.Module):
    """A batch norm computed from buffers on every call (like torchvision's
    FrozenBatchNorm2d), written so that the math stays in the captured graph."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(channels) + 0.5)
        self.register_buffer("bias", torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        scale = (
            self.weight.reshape(1, -1, 1, 1)
            * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        )
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


def test_a_batch_norm_computed_from_buffers_folds_under_export() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBN(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fxfuse.optimize(torch.export.export(model, (x,)))
    assert fused.fxfuse_report.counts["fold-constants"] >= 5
    assert fused.fxfuse_report.counts["merge-branches"] == 1
    with torch.no_grad():
        assert relative_error(model(x), fused.module()(x)) <= 1e-5
    ops = count_ops(fused.module(), x)
    assert ops["conv"] == 1 and ops["mul"] == 0 and ops["add"] == 0


class StandardizedConv(nn.Module):
    """Weight standardization (BiT/NFNet style): the kernel is computed from the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self.bn(torch.conv2d(x, w))


def test_a_standardized_kernel_becomes_a_constant_and_the_bn_folds() -> None:
    model = StandardizedConv().eval()
    fused = fxfuse.optimize(model)
    x = torch.randn(2, 3, 8, 8)
    assert fused.fxfuse_report.counts["fold-bn"] == 1
    with torch.no_grad():
        assert relative_error(model(x), fused(x)) <= 1e-5
    assert count_ops(fused, x)["batch_norm"] == 0


class RandomScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.ones(4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rand_like(self.s)


def test_random_ops_are_never_folded() -> None:
    fused = fxfuse.optimize(RandomScale().eval())
    assert fused.fxfuse_report.counts["fold-constants"] == 0
    assert "rand_like" in fused.code


class Expanding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.ones(4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.s.expand(4, 64, 64).contiguous()


def test_ops_that_would_materialize_large_constants_stay() -> None:
    fused = fxfuse.optimize(Expanding().eval())
    assert "expand" in fused.code
