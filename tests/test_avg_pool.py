"""Average pooling as a layer (passes/avg_pool.py): the recipe for a new kind of layer is one
recognizer, its registration and these tests — a positive, a near miss and a property."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import QARepVGGBlockV2
from tests.helpers import fuse_and_check

POOLS = ("avg_pool1d", "avg_pool2d", "avg_pool3d")


def _pools(counts: dict[str, int]) -> int:
    return sum(counts[name] for name in POOLS)


class PoolBranch(nn.Module):
    """A conv-bn beside an average pool (then a batch norm), summed on one input."""

    def __init__(
        self,
        channels: int,
        k: int,
        stride: int,
        padding: int,
        count_include_pad: bool = True,
        functional: bool = False,
        ndim: int = 2,
    ):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1]
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1]
        self.conv = conv(channels, channels, k, stride, padding)
        self.pool = pool(k, stride, padding, count_include_pad=count_include_pad)
        self.bn = bn(channels)
        self.functional = functional
        self.args = (k, stride, padding, False, count_include_pad)
        self.ndim = ndim

    def forward(self, x: Tensor) -> Tensor:
        if self.functional:
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.ndim - 1]
            pooled = pool(x, *self.args)
        else:
            pooled = self.pool(x)
        return self.conv(x) + self.bn(pooled)


def test_qarepvgg_v2_block_leaves_no_pooling_op() -> None:
    x = torch.randn(2, 8, 9, 10)
    _, before, after = fuse_and_check(QARepVGGBlockV2(8), x, convs=1)
    assert _pools(before) == 1 and _pools(after) == 0
    fuse_and_check(QARepVGGBlockV2(8).double(), x.double()[:1], convs=1)  # float64, batch 1


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_a_pool_branch_merges_with_a_conv(functional: bool) -> None:
    x = torch.randn(1, 4, 11, 8, dtype=torch.float64)
    block = PoolBranch(4, 3, 2, 1, functional=functional).double()
    _, _, after = fuse_and_check(block, x, convs=1)
    assert _pools(after) == 0


def test_count_include_pad_false_with_padding_is_left_with_the_reason() -> None:
    """Border windows then divide by fewer taps: no constant kernel; the pool stays."""
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    block = PoolBranch(4, 3, 1, 1, count_include_pad=False).double()
    fused, _, after = fuse_and_check(block, x, batch_norms=None)
    assert _pools(after) == 1
    reasons = [d.reason for d in fused.fxfuse_report.declines]
    assert any("count_include_pad=False" in r for r in reasons), fused.fxfuse_report
    # without padding every window is full: count_include_pad does not matter
    _, _, after = fuse_and_check(PoolBranch(4, 3, 1, 0, count_include_pad=False).double(), x)
    assert _pools(after) == 0 and after["conv"] == 1


def test_ceil_mode_is_left() -> None:
    class Ceil(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 2, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) + F.avg_pool2d(x, 2, 2, ceil_mode=True)

    x = torch.randn(1, 4, 8, 8)  # even: no partial window, but ceil_mode is not read as a conv
    fused, _, after = fuse_and_check(Ceil(), x, batch_norms=None)
    assert _pools(after) == 1
    assert any("ceil_mode" in d.reason for d in fused.fxfuse_report.declines)


@given(
    ndim=st.sampled_from([1, 2, 3]),
    k=st.integers(1, 4),
    stride=st.integers(1, 2),
    data=st.data(),
    functional=st.booleans(),
    extra=st.integers(0, 3),
    batch=st.integers(1, 3),
)
def test_pool_branches_merge_exactly(
    ndim: int, k: int, stride: int, data: st.DataObject, functional: bool, extra: int, batch: int
) -> None:
    k = min(k, 3) if ndim == 3 else k
    padding = data.draw(st.integers(0, k // 2), label="padding")
    channels = data.draw(st.integers(1, 4), label="channels")
    torch.manual_seed(k * 10 + stride)
    block = PoolBranch(channels, k, stride, padding, True, functional, ndim).double().eval()
    block = randomize_batch_norms(block)
    x = torch.randn(batch, channels, *[k + extra + d for d in range(ndim)], dtype=torch.float64)
    fused = fxfuse.optimize(block)
    note(str(fused.fxfuse_report))
    with torch.no_grad():
        assert relative_error(block(x), fused(x)) <= 1e-10
    counts = count_ops(fused, x)
    assert _pools(counts) == 0 and counts["conv"] == 1 and counts["batch_norm"] == 0


def test_a_pool_beside_a_conv_that_reads_through_an_explicit_pad_merges() -> None:
    """The pool's channel count comes from the conv reading the same input through ``F.pad``
    (fixed by the program, as a conv reading it directly would fix it)."""

    class PaddedSibling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(F.pad(x, [1, 1, 1, 1])) + F.avg_pool2d(x, 3, 1, 1)

    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    _, _, after = fuse_and_check(PaddedSibling().double(), x, convs=1)
    assert _pools(after) == 0
