"""Hypothesis strategies that draw re-parameterizable structures, valid by construction.

A drawn :class:`BlockSpec` is a sum of branches that all read one input: convs with kernels
1, 1×k, k×1 and k×k (k ≤ 7), dilation, stride, groups, explicit ``F.pad``/crop or conv padding,
padding modes, optional batch norms, constant scales, identity and batch-norm-only branches,
and an optional batch norm after the sum. Groups are drawn first and channels as multiples;
every branch gets the same output size by construction (not filtered with ``assume``)::

    from hypothesis import given
    from fxfuse.testing.strategies import blocks

    @given(blocks())
    def test_my_pass(block): ...

Build with :func:`build_block`; :func:`input_for` gives an input the block accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from fxfuse.testing import randomize_batch_norms

__all__ = ["BlockSpec", "BranchSpec", "block_specs", "blocks", "build_block", "input_for"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class BranchSpec:
    """One branch: ``scale · bn(conv(pad(x)))``, or ``scale · x`` / ``scale · bn(x)``.

    ``padding`` is (left, right) per spatial dim, negative for a crop. ``conv_padding`` says
    whether symmetric padding is the conv's own (``padding=p, padding_mode=…``) or an explicit
    ``F.pad``/slice in front of it.
    """

    kind: str  # "conv" | "identity" | "batch_norm"
    kernel: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    padding_mode: str = "zeros"
    conv_padding: bool = True
    batch_norm: bool = False
    bias: bool = False
    scale: float | str | None = None  # a float, "channel" (a [C, 1, 1] buffer) or None


@dataclass(frozen=True)
class BlockSpec:
    """A block of summed branches on one input (see :class:`BranchSpec`)."""

    in_channels: int
    out_channels: int
    groups: int
    stride: int
    branches: tuple[BranchSpec, ...]
    post_batch_norm: bool = False
    min_size: int = 1  # smallest spatial input size every branch accepts
    seed: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)


@st.composite
def _conv_branch(
    draw: st.DrawFn, size_offset: tuple[int, int], mode: str, max_kernel: int
) -> BranchSpec:
    shape = draw(st.sampled_from(["square", "row", "column", "point"]))
    k = draw(st.sampled_from([k for k in (2, 3, 4, 5, 7) if k <= max_kernel] or [1]))
    kernel = {"square": (k, k), "row": (1, k), "column": (k, 1), "point": (1, 1)}[shape]
    dilation = tuple(draw(st.integers(1, 2)) if kk > 1 else 1 for kk in kernel)
    padding = []
    for kk, d, offset in zip(kernel, dilation, size_offset, strict=True):
        span = d * (kk - 1) + 1
        left = draw(st.integers(max(-2, offset + span - 4), min(span, offset + span + 2)))
        padding.append((left, offset + span - left))
    symmetric = all(left == right >= 0 for left, right in padding)
    return BranchSpec(
        "conv",
        kernel,
        dilation,
        tuple(padding),
        mode,
        conv_padding=symmetric and draw(st.booleans()),
        batch_norm=draw(st.booleans()),
        bias=draw(st.booleans()),
        scale=draw(st.sampled_from([None, None, -0.5, 2.0, "channel"])),
    )


@st.composite
def block_specs(
    draw: st.DrawFn,
    *,
    max_channels_per_group: int = 4,
    max_groups: int = 4,
    max_branches: int = 4,
    max_kernel: int = 7,
    padding_modes: tuple[str, ...] = PADDING_MODES,
) -> BlockSpec:
    """Draw a :class:`BlockSpec` whose branches all produce the same output size."""
    groups = draw(st.integers(1, max_groups))
    in_channels = groups * draw(st.integers(1, max_channels_per_group))
    square = draw(st.booleans())
    out_channels = in_channels if square else groups * draw(st.integers(1, max_channels_per_group))
    stride = draw(st.sampled_from([1, 1, 2]))
    # "same"-sized output (size_offset -1) is the common case; others need crops or padding.
    size_offset = draw(st.sampled_from([(-1, -1), (-1, -1), (0, -1), (-3, -2), (1, 1)]))
    mode = draw(st.sampled_from(padding_modes))
    branches = [draw(_conv_branch(size_offset, mode, max_kernel))]
    for _ in range(draw(st.integers(0, max_branches - 1))):
        branches.append(draw(_conv_branch(size_offset, mode, max_kernel)))
    if in_channels == out_channels and stride == 1 and size_offset == (-1, -1):
        for kind in draw(st.lists(st.sampled_from(["identity", "batch_norm"]), max_size=2)):
            branches.append(BranchSpec(kind, scale=draw(st.sampled_from([None, 0.5, "channel"]))))
    order = draw(st.permutations(range(len(branches))))
    min_size = 2 + max(
        sum(max(a, 0) for a in pair) + b.dilation[i] * (b.kernel[i] - 1) + 1
        for b in branches
        for i, pair in enumerate(b.padding)
    )
    return BlockSpec(
        in_channels,
        out_channels,
        groups,
        stride,
        tuple(branches[i] for i in order),
        draw(st.booleans()),
        min_size,
        draw(st.integers(0, 2**16)),
    )


class Branch(nn.Module):
    """One drawn branch as a module (see :class:`BranchSpec`)."""

    def __init__(self, spec: BranchSpec, block: BlockSpec):
        super().__init__()
        self.spec = spec
        channels = block.out_channels
        self.conv: nn.Conv2d | None = None
        self.bn: nn.BatchNorm2d | None = None
        if spec.kind == "conv":
            own = tuple(left for left, _ in spec.padding) if spec.conv_padding else 0
            self.conv = nn.Conv2d(
                block.in_channels,
                channels,
                spec.kernel,
                block.stride,
                own,
                spec.dilation,
                block.groups,
                spec.bias,
                spec.padding_mode if spec.conv_padding else "zeros",
            )
        if spec.batch_norm or spec.kind == "batch_norm":
            self.bn = nn.BatchNorm2d(channels)
        if spec.scale == "channel":
            self.register_buffer("scale", torch.rand(channels, 1, 1) * 2 - 0.5)
        else:
            self.scale = spec.scale

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        if self.conv is not None and not spec.conv_padding:
            (top, bottom), (left, right) = spec.padding
            rows = slice(-min(top, 0), min(bottom, 0) or None)
            cols = slice(-min(left, 0), min(right, 0) or None)
            if rows != slice(0, None) or cols != slice(0, None):
                x = x[:, :, rows, cols]
            grow = (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0))
            if any(grow):
                mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
                x = F.pad(x, grow, mode=mode)
        if self.conv is not None:
            x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.scale is not None:
            x = x * self.scale
        return x


class Block(nn.Module):
    """A drawn block: the sum of its branches, then an optional batch norm."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        self.branches = nn.ModuleList(Branch(b, spec) for b in spec.branches)
        self.post_bn = nn.BatchNorm2d(spec.out_channels) if spec.post_batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        total = self.branches[0](x)
        for branch in self.branches[1:]:
            total = total + branch(x)
        return total if self.post_bn is None else self.post_bn(total)


def build_block(spec: BlockSpec, dtype: torch.dtype = torch.float32) -> Block:
    """The block ``spec`` describes, in eval mode, with weights and BN statistics drawn from
    ``spec.seed``."""
    torch.manual_seed(spec.seed)
    block = Block(spec).to(dtype).eval()
    return randomize_batch_norms(block, spec.seed)


def input_for(
    spec: BlockSpec, extra: int = 0, batch: int = 2, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A random input the block accepts (``extra`` grows the spatial size)."""
    size = spec.min_size + extra
    generator = torch.Generator().manual_seed(spec.seed + extra)
    return torch.randn(batch, spec.in_channels, size, size + 1, generator=generator, dtype=dtype)


def blocks(**kwargs: int | tuple[str, ...]) -> st.SearchStrategy[Block]:
    """Drawn blocks, built (see :func:`block_specs` for the knobs)."""
    return block_specs(**kwargs).map(build_block)  # type: ignore[arg-type]
