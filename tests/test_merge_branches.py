"""merge-branches: summed branches on the same input become one conv (pad-and-add)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from fxfuse import FusionOptions
from fxfuse.zoo import conv_bn
from tests.helpers import declined, fuse_and_check, identity_branches


class Branches(nn.Module):
    """``combine(x, [branch(x) for branch in branches])``: the sum is written by the test."""

    def __init__(
        self,
        branches: list[nn.Module],
        combine: Callable[[Tensor, list[Tensor]], Tensor] | None = None,
    ):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.combine = combine

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        if self.combine is not None:
            return self.combine(x, outs)
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total


def x4(channels: int = 4, size: int = 9) -> Tensor:
    return torch.randn(2, channels, size, size)


def test_3x3_plus_1x1_is_one_3x3() -> None:
    model = Branches([conv_bn(4, 6, 3, padding=1), conv_bn(4, 6, 1)])
    fused, before, _after = fuse_and_check(model, x4(), convs=1)
    assert before["conv"] == 2
    assert fused.fxfuse_report.counts["merge-branches"] == 1
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_asymmetric_1xk_and_kx1_pad_into_kxk(k: int) -> None:
    p = k // 2
    model = Branches(
        [
            conv_bn(4, 4, k, padding=p),
            conv_bn(4, 4, (1, k), padding=(0, p)),
            conv_bn(4, 4, (k, 1), padding=(p, 0)),
        ]
    )
    fuse_and_check(model, x4(size=11), convs=1)


def test_kernels_of_different_sizes() -> None:
    model = Branches(
        [
            conv_bn(4, 4, 5, padding=2),
            conv_bn(4, 4, 3, padding=1),
            conv_bn(4, 4, 1),
            conv_bn(4, 4, (1, 5), padding=(0, 2)),
        ]
    )
    fused, _, _ = fuse_and_check(model, x4(), convs=1)
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (5, 5)


@pytest.mark.parametrize("stride", [2, 3])
def test_strided_branches(stride: int) -> None:
    model = Branches([conv_bn(4, 6, 3, stride, 1), conv_bn(4, 6, 1, stride)])
    for size in (9, 10):  # odd and even sizes: alignment bugs show at only one
        fuse_and_check(model, x4(size=size), convs=1)


def test_asymmetric_padding_from_f_pad_aligns() -> None:
    # An even kernel padded (0, 1) on the left/right by F.pad beside a 3x3 reading (1, 1).
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.even = nn.Conv2d(4, 4, 2)
            self.odd = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.odd(x) + self.even(F.pad(x, (0, 1, 0, 1)))

    _fused, _, after = fuse_and_check(Block(), x4(), convs=1)
    assert after["constant_pad_nd"] == 0  # symmetric after the merge: the conv pads


def test_padding_same_with_even_kernel_beside_odd() -> None:
    model = Branches([nn.Conv2d(4, 4, 4, padding="same"), nn.Conv2d(4, 4, 3, padding=1)])
    fuse_and_check(model, x4(), convs=1)


def test_crop_feeding_a_branch_becomes_negative_padding() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.square = conv_bn(4, 4, 3)
            self.hor = conv_bn(4, 4, (1, 3))

        def forward(self, x: Tensor) -> Tensor:
            return self.square(x) + self.hor(x[:, :, 1:-1])

    fuse_and_check(Block(), x4(), convs=1)


def test_dilated_3x3_beside_3x3_and_1x1_is_one_5x5() -> None:
    model = Branches(
        [conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 3, padding=2, dilation=2), conv_bn(4, 4, 1)]
    )
    fused, _, _ = fuse_and_check(model, x4(size=11), convs=1)
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (5, 5) and conv.dilation == (1, 1) and conv.padding == (2, 2)


def test_branches_sharing_a_dilation_keep_it() -> None:
    model = Branches([conv_bn(4, 4, 3, padding=2, dilation=2), conv_bn(4, 4, 1)])
    fused, _, _ = fuse_and_check(model, x4(size=11), convs=1)
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (3, 3) and conv.dilation == (2, 2)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_same_padding_mode_merges(mode: str) -> None:
    model = Branches(
        [
            nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode),
            nn.Conv2d(4, 4, 5, padding=2, padding_mode=mode),
        ]
    )
    fused, _, _ = fuse_and_check(model, x4(), convs=1)
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.padding_mode == mode


def test_branch_reading_no_padding_merges_with_any_mode() -> None:
    model = Branches(
        [
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
            nn.Conv2d(4, 4, 1, padding_mode="circular"),
        ]
    )
    fuse_and_check(model, x4(), convs=1)


@pytest.mark.parametrize(
    "combine",
    [
        lambda x, o: o[0] - o[1],
        lambda x, o: torch.add(o[0], o[1], alpha=0.25),
        lambda x, o: torch.sub(o[1], o[0], alpha=2),
        lambda x, o: 2.0 * o[0] + o[1] / 4,
        lambda x, o: -(o[0] + 3 * o[1]),
        lambda x, o: o[1].add(o[0]).mul(0.5),
        lambda x, o: 0.5 * (o[0] + (o[1] - x)),
    ],
    ids=["sub", "add-alpha", "sub-alpha", "scalars", "neg", "methods", "nested"],
)
def test_sums_written_any_way(combine: Callable[[Tensor, list[Tensor]], Tensor]) -> None:
    model = Branches([conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)], combine)
    fuse_and_check(model, x4(), convs=1)


def test_sum_chain_in_any_order() -> None:
    model = Branches(
        [conv_bn(4, 4, 1), conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, (3, 1), padding=(1, 0))],
        lambda x, o: o[2] + (x + (o[0] + o[1])),
    )
    fused, _, _ = fuse_and_check(model, x4(), convs=1)
    assert identity_branches(fused) == 1


class Scaled(nn.Module):
    """``a·conv3x3(x) + b·conv1x1(x)`` with scales of every kind a model holds."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.kind = kind
        if kind == "buffer":
            self.register_buffer("a", torch.rand(4, 1, 1) + 0.5)
            self.register_buffer("b", torch.rand(1, 4, 1, 1) - 1.0)
        elif kind == "parameter":
            self.a = nn.Parameter(torch.rand(4, 1, 1))
            self.b = nn.Parameter(torch.rand(1))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "float":
            return 0.3 * self.conv3(x) + self.conv1(x) * -1.5
        return self.a * self.conv3(x) + self.conv1(x) * self.b


@pytest.mark.parametrize("kind", ["float", "buffer", "parameter"])
def test_constant_scales_on_branches(kind: str) -> None:
    fuse_and_check(Scaled(kind), x4(), convs=1)


def test_single_scaled_conv_absorbs_its_scale() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.register_buffer("s", torch.rand(4, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x) * self.s + 1.0

    _fused, _, after = fuse_and_check(Block(), x4(), convs=1)
    assert after["mul"] == 0 and after["add"] == 0


def test_batch_norm_after_the_sum_folds_into_the_merged_conv() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.a(x) + self.b(x) + x)

    fuse_and_check(Block(), x4(), convs=1, batch_norms=0)


def test_groups_merge_at_the_coarser_grouping_when_cheaper() -> None:
    model = Branches(
        [nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, groups=4)]
    )
    fused, _, _ = fuse_and_check(model, x4(8), convs=1)
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 2


def test_linear_branches_merge() -> None:
    model = Branches([nn.Linear(6, 6), nn.Linear(6, 6)], lambda x, o: o[0] + 2 * o[1] + x)
    fused, _, _ = fuse_and_check(model, torch.randn(3, 6))
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1


def test_other_inputs_stay_in_the_sum() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 4, 1)
            self.register_buffer("s", torch.rand(4, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            y = torch.relu(x)
            return self.a(x) + self.s * self.c(y) + self.b(x) - y

    fused, _, _ = fuse_and_check(Block(), x4(), convs=2)
    assert fused.fxfuse_report.counts["merge-branches"] >= 1


# -- near misses ----------------------------------------------------------------------------------


def test_branches_that_only_add_up_by_broadcasting_are_declined() -> None:
    # On a 3x3 input an unpadded 3x3 gives 1x1 and broadcasts against the 1x1 conv's 3x3.
    model = Branches([nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)])
    fused, _, _ = fuse_and_check(model, x4(size=3), convs=2)
    (reason,) = declined(fused, "merge-branches")
    assert "misaligned windows" in reason


def test_misaligned_stride_windows_are_declined_with_reason() -> None:
    # Stride 2: a 2x2 (no padding) and a 3x3 (padding 1) agree in size only for even inputs.
    model = Branches([nn.Conv2d(4, 4, 3, 2, padding=1), nn.Conv2d(4, 4, 2, 2)])
    fused, _, _ = fuse_and_check(model, x4(size=10), convs=2)
    (reason,) = declined(fused, "merge-branches")
    assert "misaligned windows" in reason


def test_branch_output_with_another_consumer_stays() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            shared = self.b(x)
            return self.a(x) + shared + self.c(x), shared

    fused, _, _ = fuse_and_check(Block(), x4(), convs=2)
    (reason,) = declined(fused, "merge-branches")
    assert "also feeds" in reason


def test_mixed_padding_modes_that_read_padding_are_declined() -> None:
    model = Branches(
        [nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding=1)]
    )
    fused, _, _ = fuse_and_check(model, x4(), convs=2)
    (reason,) = declined(fused, "merge-branches")
    assert "padding modes" in reason and "reflect" in reason


def test_merge_that_would_raise_flops_is_declined() -> None:
    # A depthwise 3x3 merged with a dense 1x1 would be a dense 3x3: ~9C/(C+9) the work.
    model = Branches([nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)])
    fused, _, _ = fuse_and_check(model, x4(16), convs=2)
    (reason,) = declined(fused, "merge-branches")
    assert "multiply-adds" in reason and "max_flops_ratio" in reason


def test_flops_limit_is_an_option() -> None:
    model = Branches([nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)])
    fuse_and_check(model, x4(16), convs=1, options=FusionOptions(max_flops_ratio=100))


def test_identity_with_strided_convs_is_declined() -> None:
    # Only a 1x1 input makes these shapes agree; the merged conv would be wrong elsewhere.
    model = Branches([nn.Conv2d(4, 4, 3, 2, padding=1)], lambda x, o: o[0] + x)
    fused, _, _ = fuse_and_check(model, x4(size=1), convs=1)
    (reason,) = declined(fused, "merge-branches")
    assert "stride" in reason


def test_scale_that_is_not_per_channel_is_not_folded() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.register_buffer("mask", torch.rand(1, 1, 9, 9))

        def forward(self, x: Tensor) -> Tensor:
            return self.mask * self.a(x) + self.b(x)

    fused, _, _ = fuse_and_check(Block(), x4(), convs=2)
    assert fused.fxfuse_report.counts["merge-branches"] == 0


def test_fused_model_is_idempotent_under_a_second_run() -> None:
    model = Branches([conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)], lambda x, o: o[0] + o[1] + x)
    fused, _, _ = fuse_and_check(model, x4(), convs=1)
    again = fxfuse.optimize(fused)
    assert not again.fxfuse_report.rewrites
    x = x4()
    assert torch.equal(again(x), fused(x))
