"""fold-bn: conv/conv-transpose/linear followed by an eval batch norm becomes one layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from fxfuse.rules import SHAPE_CYCLE
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import FunctionalBNAct
from tests.helpers import declined, fuse_and_check

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _input(ndim: int, channels: int, size: int = 7, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, channels, *[size] * ndim, dtype=dtype)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_in_every_dimension(ndim: int, bias: bool) -> None:
    model = nn.Sequential(CONV[ndim](4, 6, 3, padding=1, bias=bias), BN[ndim](6))
    fused, before, _ = fuse_and_check(model, _input(ndim, 4, 6), convs=1, batch_norms=0)
    assert before["batch_norm"] == 1
    assert fused.fxfuse_report.counts["fold-bn"] == 1


@pytest.mark.parametrize(
    "conv",
    [
        dict(stride=2, padding=1),
        dict(padding=2, dilation=2),
        dict(groups=2, padding=1),
        dict(groups=4, padding=0),
        dict(padding="same"),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=1, padding_mode="replicate"),
        dict(padding=1, padding_mode="circular"),
        dict(kernel_size=(1, 3), padding=(0, 1)),
        dict(kernel_size=4, padding="same"),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_conv_bn_folds_any_geometry(conv: dict) -> None:
    kwargs = {"kernel_size": 3, **conv}
    model = nn.Sequential(nn.Conv2d(4, 8, **kwargs), nn.BatchNorm2d(8))
    fuse_and_check(model, _input(2, 4, 9), convs=1, batch_norms=0)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), [(6, 6, 1), (6, 6, 3), (4, 8, 2)])
def test_conv_transpose_bn_folds_along_dim_one(ndim: int, cin: int, cout: int, groups: int) -> None:
    # in == out with groups is where folding along the wrong dim still "works" shape-wise.
    model = nn.Sequential(
        CONVT[ndim](cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups),
        BN[ndim](cout),
    )
    fuse_and_check(model, _input(ndim, cin, 4), convs=1, batch_norms=0)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_folds(bias: bool) -> None:
    # Flatten (start_dim=1) makes the Linear's input 2-d for every input: features are dim 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7))
    x = torch.randn(4, 5)
    fused, _, after = fuse_and_check(model, x, batch_norms=0)
    assert after["addmm"] + after["mm"] + after["linear"] >= 1
    assert fused.fxfuse_report.counts["fold-bn"] == 1


@pytest.mark.parametrize("example", [False, True])
def test_linear_bn1d_of_unknown_rank_is_declined_with_the_reason(example: bool) -> None:
    # a Linear on (N, L, F) gives (N, L, F'): BatchNorm1d would normalize L, not the features;
    # a 2-d example input shows one rank, it proves nothing about the next input
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))
    x = torch.randn(4, 5)
    kwargs = {"example_inputs": (x,)} if example else {}
    fused, _, _ = fuse_and_check(model, x, batch_norms=1, **kwargs)
    (reason,) = declined(fused, "fold-bn")
    assert "flatten(x, 1)" in reason


def test_bn_without_affine_parameters_folds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    fuse_and_check(model, _input(2, 3), convs=1, batch_norms=0)


class Functional(nn.Module):
    """F.conv2d and F.batch_norm on attributes: the forms dynamo and timm produce."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.conv2d(x, self.weight, None, 1, 1)
        bn = self.bn
        return F.batch_norm(
            y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
        )


def test_functional_conv_and_batch_norm_fold() -> None:
    fuse_and_check(Functional(), _input(2, 3), convs=1, batch_norms=0)


def test_batch_norm_subclass_with_own_forward_folds_through_f_batch_norm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), FunctionalBNAct(6))
    fused, _, _ = fuse_and_check(model, _input(2, 3), convs=1, batch_norms=0)
    assert fused.fxfuse_report.counts["fold-bn"] == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_low_and_high_precision_fold_in_float64(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).to(dtype)
    fused, _, _ = fuse_and_check(model, _input(2, 3, 6, dtype=dtype), convs=1, batch_norms=0)
    assert next(fused.parameters()).dtype == dtype


def test_float16_fold_is_as_exact_as_casting_the_float64_result() -> None:
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
    fused = fxfuse.optimize(model.half())
    reference = fxfuse.optimize(model.double())
    for name, p in fused.named_parameters():
        exact = dict(reference.named_parameters())[name]
        assert torch.equal(p, exact.half()), name


# -- near misses: the pattern is there, the fold is not exact -----------------------------------


class SharedConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(x)
        return self.bn(y), y


def test_conv_output_with_another_consumer_is_not_folded() -> None:
    fused, _, _after = fuse_and_check(SharedConvOutput(), _input(2, 3), convs=1, batch_norms=1)
    (reason,) = declined(fused, "fold-bn")
    assert "also feeds" in reason


def test_training_mode_batch_norm_is_declined_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].train()
    x = _input(2, 3)
    fused = fxfuse.optimize(model)
    (reason,) = declined(fused, "fold-bn")
    assert "batch statistics" in reason and ".eval()" in reason
    assert count_ops(fused, x)["batch_norm"] == 1


def test_batch_norm_without_running_stats_is_declined() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    fused, _, _ = fuse_and_check(model, _input(2, 3), convs=1, batch_norms=1)
    (reason,) = declined(fused, "fold-bn")
    assert "batch statistics" in reason


class WeightFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.bn(F.conv2d(x, w))


def test_conv_whose_weight_is_an_input_is_left_alone() -> None:
    model = randomize_batch_norms(WeightFromInput().eval())
    fused = fxfuse.optimize(model)
    x, w = _input(2, 3), torch.randn(4, 3, 3, 3)
    assert relative_error(model(x, w), fused(x, w)) < 1e-6
    assert count_ops(fused, x, w)["batch_norm"] == 1


def test_linear_on_3d_input_is_declined_when_shapes_are_known() -> None:
    # BatchNorm1d on (N, L, F) normalizes L, not the linear layer's features.
    model = randomize_batch_norms(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).eval())
    x = torch.randn(2, 6, 5)
    fused = fxfuse.optimize(model, example_inputs=(x,))
    assert relative_error(model(x), fused(x)) < 1e-6
    (reason,) = declined(fused, "fold-bn")
    assert "not the features" in reason


# -- fold-bn-into-branches: a batch norm after a sum that does not merge ------------------------


class PostSumBN(nn.Module):
    """A depthwise 3x3 and a dense 1x1 (too costly to merge), then a batch norm."""

    def __init__(self, with_identity: bool = False) -> None:
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.with_identity = with_identity

    def forward(self, x: Tensor) -> Tensor:
        y = self.dw(x) + 0.5 * self.pw(x)
        return self.bn(y + x if self.with_identity else y)


def test_batch_norm_distributes_over_a_sum_that_does_not_merge() -> None:
    fused, _, _ = fuse_and_check(PostSumBN(), _input(2, 16), convs=2, batch_norms=0)
    assert fused.fxfuse_report.counts["fold-bn-into-branches"] == 1


def test_batch_norm_over_a_sum_with_a_non_conv_term_stays() -> None:
    fused, _, _ = fuse_and_check(
        PostSumBN(with_identity=True), _input(2, 16), convs=2, batch_norms=1
    )
    assert any("not a conv" in r for r in declined(fused, "fold-bn-into-branches"))


class AssertingBN(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: checks its input's rank before normalizing."""

    def forward(self, x: Tensor) -> Tensor:
        torch._assert(x.ndim == 4, "expected 4-d input")
        channels = x.shape[1]
        y = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return y * (channels / channels)


def test_reads_of_the_conv_output_shape_do_not_block_the_fold() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), AssertingBN(6))
    fused, _, _ = fuse_and_check(model, _input(2, 3), convs=1, batch_norms=0)
    assert fused.fxfuse_report.counts["fold-bn"] == 1
    code = fused.code
    assert "_assert" in code and "ndim" in code  # the check survives, on the fused conv


def test_shape_reads_of_merged_branches_move_to_the_merged_conv() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> tuple[Tensor, int]:
            a = self.a(x)
            torch._assert(a.dim() == 4, "4-d")
            return a + self.b(x), a.shape[1]

    fused, _, _ = fuse_and_check(Block(), _input(2, 4), convs=1)
    assert fused.fxfuse_report.counts["merge-branches"] == 1
    assert fused(_input(2, 4))[1] == 4


def test_a_sum_that_adds_a_branch_shape_is_declined_not_broken() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            a = self.a(x)
            return a + self.b(x) + a.size(1)

    fused, _, _ = fuse_and_check(Block(), _input(2, 4), convs=2)
    assert declined(fused, "merge-branches") == [SHAPE_CYCLE]
