"""Hypothesis strategies for re-parameterizable structures and their inputs, valid by
construction (groups are drawn first and channels as multiples; nothing is filtered with
``assume``).

- :func:`block_specs` / :func:`blocks`: a sum of branches that all read one input — convs with
  kernels 1, 1×k, k×1 and k×k (k ≤ 7; 1-d and 3-d too), dilation, stride, groups (per branch,
  each a divisor of the block's), explicit ``F.pad``/crop or conv padding, padding modes,
  optional batch norms, constant scales, identity and batch-norm-only branches, and an
  optional batch norm after the sum. Branches may also be the structures of DBB and its
  kin: a batch norm *before* the conv, a 1×1 conv (and batch norm) before it (``1×1 → k×k``),
  the conv split in two whose outputs are concatenated, or an average pool.
- :func:`model_specs` / :func:`models`: blocks stacked into a whole model (channels chain from
  one block to the next), with activations, eval-mode dropout and an optional linear head.
- :func:`model_inputs`, :func:`inputs_like`: inputs a model accepts — batch 1…4, spatial sizes
  odd and even, small and large, values normal, uniform, large, small or all negative, in
  contiguous or channels-last layout. :func:`fxfuse.verify` draws its inputs with these.

In your own suite::

    from hypothesis import given, strategies as st
    from fxfuse.testing.strategies import model_inputs, models

    @given(models(), st.data())
    def test_my_pass(model, data):
        (x,) = data.draw(model_inputs(model.spec))
        ...

Built models are in eval mode, with random weights and random batch-norm statistics (default
statistics hide wrong folds).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from fxfuse.testing import randomize_batch_norms

__all__ = [
    "DISTRIBUTIONS",
    "PADDING_MODES",
    "Axis",
    "BlockSpec",
    "BranchSpec",
    "DrawnModel",
    "InputCase",
    "LayerChain",
    "ModelSpec",
    "block_specs",
    "blocks",
    "build_block",
    "build_inputs",
    "build_model",
    "chain_specs",
    "chains",
    "input_axes",
    "input_cases",
    "input_for",
    "inputs_like",
    "model_inputs",
    "model_specs",
    "models",
    "models_with_inputs",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# --------------------------------------------------------------------------------------------
# Blocks: branches summed on one input
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchSpec:
    """One branch: ``scale · bn(conv(pad(x)))``, or ``scale · x`` / ``scale · bn(x)``.

    ``padding`` is (left, right) per spatial dim, negative for a crop. ``conv_padding`` says
    whether symmetric padding is the conv's own (``padding=p, padding_mode=…``) or an explicit
    ``F.pad``/slice in front of it. ``groups`` is the conv's (``None``: the block's).
    """

    kind: str  # "conv" | "identity" | "batch_norm" | "pool" (an average pool)
    kernel: tuple[int, ...] = (1, 1)
    dilation: tuple[int, ...] = (1, 1)
    padding: tuple[tuple[int, int], ...] = ((0, 0), (0, 0))
    padding_mode: str = "zeros"
    conv_padding: bool = True
    batch_norm: bool = False
    bias: bool = False
    scale: float | str | None = None  # a float, "channel" (a [C, 1, …] buffer) or None
    groups: int | None = None
    pre_batch_norm: bool = False  # a batch norm on the input, before the conv
    chain: str | None = None  # a 1×1 conv before the conv: "conv", or "conv-bn" (then a BN)
    concat: bool = False  # the conv as two, their outputs concatenated on channels


@dataclass(frozen=True)
class BlockSpec:
    """A block of summed branches on one input (see :class:`BranchSpec`).

    Every branch maps an input of size ``n`` (per spatial dim) to ``(n + size_offset) // stride
    + 1``; ``min_size`` is the smallest input size every branch accepts.
    """

    in_channels: int
    out_channels: int
    groups: int
    stride: int
    branches: tuple[BranchSpec, ...]
    post_batch_norm: bool = False
    min_size: int = 1
    seed: int = 0
    ndim: int = 2
    size_offset: tuple[int, ...] = (-1, -1)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def output_size(self, size: int, dim: int) -> int:
        """The block's output size along spatial ``dim`` for an input of ``size``."""
        return (size + self.size_offset[dim]) // self.stride + 1


def _divisors(n: int, at_most: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (at_most is None or d <= at_most)]


@st.composite
def _conv_branch(
    draw: st.DrawFn,
    size_offset: tuple[int, ...],
    mode: str,
    max_kernel: int,
    groups: int,
    out_channels: int = 1,
) -> BranchSpec:
    ndim = len(size_offset)
    # a full k×…×k kernel, a 1×…×1 one, or a line (1×k, k×1: ACNet's) along one dim
    lines = [f"line{i}" for i in range(ndim)] if ndim > 1 else []
    shape = draw(st.sampled_from(["full", "point", *lines]))
    k = draw(st.sampled_from([k for k in (2, 3, 4, 5, 7) if k <= max_kernel] or [1]))
    kernel = tuple(k if shape == "full" or shape == f"line{i}" else 1 for i in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) if kk > 1 else 1 for kk in kernel)
    padding = []
    for kk, d, offset in zip(kernel, dilation, size_offset, strict=True):
        span = d * (kk - 1) + 1
        left = draw(st.integers(max(-2, offset + span - 4), min(span, offset + span + 2)))
        padding.append((left, offset + span - left))
    symmetric = all(left == right >= 0 for left, right in padding)
    # mostly the block's groups; sometimes a divisor of it (the merge then needs a denser conv)
    branch_groups = draw(st.sampled_from([groups] * 3 + _divisors(groups)[:-1]))
    # what the conv reads in its border: a map before it folds into it only where that is its
    # image of zero, so a batch norm before it (or between a 1×1 and it) is drawn only where
    # it reads no zeros (no padding, or a copying mode); and neither stays outside a circular
    # padding of a cropped dim, which is not one padding of the input (the pad stays between)
    zeros = mode == "zeros" and any(a > 0 for pair in padding for a in pair)
    barrier = mode == "circular" and any(a < 0 for pair in padding for a in pair)
    extras = ["none"] * 4 + ["concat"] + ([] if barrier else ["pre-bn", "chain"])
    extra = draw(st.sampled_from(extras))
    chain = None
    if extra == "chain":
        chain = draw(st.sampled_from(["conv"] if zeros else ["conv", "conv-bn"]))
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
        groups=1 if extra == "concat" else branch_groups,
        pre_batch_norm=extra == "pre-bn" and not zeros,
        chain=chain,
        concat=extra == "concat" and out_channels >= 2,
    )


@st.composite
def _pool_branch(draw: st.DrawFn, size_offset: tuple[int, ...]) -> BranchSpec | None:
    """An average pool whose output has the block's size: ``n + 2p − k = offset`` per dim,
    ``p ≤ k // 2`` (torch's bound), counting the padding in (a constant kernel)."""
    kernel, padding = [], []
    for offset in size_offset:
        choices = [k for k in (1, 2, 3, 4, 5) if (offset + k) % 2 == 0 and 0 <= offset + k <= k]
        if not choices:
            return None
        k = draw(st.sampled_from(choices))
        kernel.append(k)
        padding.append(((offset + k) // 2, (offset + k) // 2))
    ndim = len(size_offset)
    return BranchSpec(
        "pool",
        tuple(kernel),
        (1,) * ndim,
        tuple(padding),
        batch_norm=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5, "channel"])),
    )


_SIZE_OFFSETS = {
    1: [(-1,), (-1,), (0,), (-3,), (1,)],
    2: [(-1, -1), (-1, -1), (0, -1), (-3, -2), (1, 1)],
    3: [(-1, -1, -1), (-1, -1, -1), (0, -1, -1), (-3, -2, -1), (1, 1, 1)],
}


@st.composite
def block_specs(
    draw: st.DrawFn,
    *,
    max_channels_per_group: int = 4,
    max_groups: int = 4,
    max_branches: int = 4,
    max_kernel: int = 7,
    padding_modes: tuple[str, ...] = PADDING_MODES,
    ndims: tuple[int, ...] = (2,),
    in_channels: int | None = None,
) -> BlockSpec:
    """Draw a :class:`BlockSpec` whose branches all produce the same output size.

    ``ndims`` are the spatial ranks to draw from (1, 2, 3; 3-d kernels stay ≤ 3).
    ``in_channels`` fixes the input channels (to chain blocks); groups are then drawn from
    its divisors.
    """
    ndim = draw(st.sampled_from(ndims))
    if in_channels is None:
        groups = draw(st.integers(1, max_groups))
        in_channels = groups * draw(st.integers(1, max_channels_per_group))
    else:
        groups = draw(st.sampled_from(_divisors(in_channels, max_groups)))
    square = draw(st.booleans())
    out_channels = in_channels if square else groups * draw(st.integers(1, max_channels_per_group))
    stride = draw(st.sampled_from([1, 1, 2]))
    # "same"-sized output (size_offset -1) is the common case; others need crops or padding.
    size_offset = draw(st.sampled_from(_SIZE_OFFSETS[ndim]))
    mode = draw(st.sampled_from(padding_modes))
    kernel_limit = min(max_kernel, 3) if ndim == 3 else max_kernel
    conv = _conv_branch(size_offset, mode, kernel_limit, groups, out_channels)
    branches = [draw(conv)]
    for _ in range(draw(st.integers(0, max_branches - 1))):
        branches.append(draw(conv))
    if in_channels == out_channels and stride == 1 and all(o == -1 for o in size_offset):
        for kind in draw(st.lists(st.sampled_from(["identity", "batch_norm"]), max_size=2)):
            scale = draw(st.sampled_from([None, 0.5, "channel"]))
            branches.append(
                BranchSpec(kind, (1,) * ndim, (1,) * ndim, ((0, 0),) * ndim, scale=scale)
            )
    if in_channels == out_channels and draw(st.integers(0, 3)) == 0:
        pool = draw(_pool_branch(size_offset))
        if pool is not None:
            branches.append(pool)
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
        ndim,
        size_offset,
    )


_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Branch(nn.Module):
    """One drawn branch as a module (see :class:`BranchSpec`)."""

    def __init__(self, spec: BranchSpec, block: BlockSpec):
        super().__init__()
        self.spec = spec
        ndim = len(spec.kernel)
        channels = block.out_channels
        self.stride = block.stride
        self.conv: nn.Module | None = None
        self.halves: nn.ModuleList | None = None
        self.bn: nn.Module | None = None
        self.pre_bn = _BATCH_NORMS[ndim](block.in_channels) if spec.pre_batch_norm else None
        self.pointwise: nn.Module | None = None
        self.chain_bn: nn.Module | None = None
        groups = spec.groups or block.groups
        if spec.chain is not None:
            self.pointwise = _CONVS[ndim](
                block.in_channels, block.in_channels, 1, groups=groups, bias=False
            )
            if spec.chain == "conv-bn":
                self.chain_bn = _BATCH_NORMS[ndim](block.in_channels)
        if spec.kind == "conv":
            own = tuple(left for left, _ in spec.padding) if spec.conv_padding else 0
            split = (channels // 2, channels - channels // 2) if spec.concat else (channels,)
            convs = [
                _CONVS[ndim](
                    block.in_channels,
                    part,
                    spec.kernel,
                    block.stride,
                    own,
                    spec.dilation,
                    groups,
                    spec.bias,
                    spec.padding_mode if spec.conv_padding else "zeros",
                )
                for part in split
            ]
            if spec.concat:
                self.halves = nn.ModuleList(convs)
            else:
                self.conv = convs[0]
        if spec.batch_norm or spec.kind == "batch_norm":
            self.bn = _BATCH_NORMS[ndim](channels)
        if spec.scale == "channel":
            self.register_buffer("scale", torch.rand(channels, *(1,) * ndim) * 2 - 0.5)
        else:
            self.scale = spec.scale

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        if spec.kind == "pool":
            pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(spec.kernel) - 1]
            padding = tuple(left for left, _ in spec.padding)
            x = pool(x, spec.kernel, self.stride, padding)  # type: ignore[operator]
        if self.pre_bn is not None:
            x = self.pre_bn(x)
        if self.pointwise is not None:
            x = self.pointwise(x)
            if self.chain_bn is not None:
                x = self.chain_bn(x)
        if spec.kind == "conv" and not spec.conv_padding:
            crops = tuple(
                slice(-min(left, 0), min(right, 0) or None) for left, right in spec.padding
            )
            if any(s != slice(0, None) for s in crops):
                x = x[(slice(None), slice(None), *crops)]
            grow = [max(a, 0) for pair in reversed(spec.padding) for a in pair]
            if any(grow):
                mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
                x = F.pad(x, grow, mode=mode)
        if self.conv is not None:
            x = self.conv(x)
        elif self.halves is not None:
            x = torch.cat([conv(x) for conv in self.halves], dim=1)
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
        self.post_bn = _BATCH_NORMS[spec.ndim](spec.out_channels) if spec.post_batch_norm else None

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
    """A random input the block accepts (``extra`` grows the spatial size; spatial dim ``i``
    is ``min_size + extra + i``, so sizes differ between dims)."""
    size = spec.min_size + extra
    generator = torch.Generator().manual_seed(spec.seed + extra)
    sizes = [size + i for i in range(spec.ndim)]
    return torch.randn(batch, spec.in_channels, *sizes, generator=generator, dtype=dtype)


def blocks(**kwargs: Any) -> st.SearchStrategy[Block]:
    """Drawn blocks, built (see :func:`block_specs` for the knobs)."""
    return block_specs(**kwargs).map(build_block)


# --------------------------------------------------------------------------------------------
# Models: blocks stacked, channels chained
# --------------------------------------------------------------------------------------------

ACTIVATIONS = ("relu", "none", "dropout")


@dataclass(frozen=True)
class ModelSpec:
    """Blocks applied in order (block ``i + 1`` reads block ``i``'s channels), each followed by
    an activation; then, optionally, global average pooling and a linear layer (with a batch
    norm after it for ``head == "linear-bn"``). ``min_size`` is the smallest input size per
    spatial dim that every block accepts."""

    blocks: tuple[BlockSpec, ...]
    activations: tuple[str, ...]
    head: str | None
    classes: int
    min_size: tuple[int, ...]
    seed: int = 0

    @property
    def ndim(self) -> int:
        return self.blocks[0].ndim

    @property
    def in_channels(self) -> int:
        return self.blocks[0].in_channels

    def example_input(
        self, batch: int = 2, extra: int = 0, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """A random input of the smallest size the model accepts, grown by ``extra``."""
        generator = torch.Generator().manual_seed(self.seed + extra)
        sizes = [size + extra for size in self.min_size]
        return torch.randn(batch, self.in_channels, *sizes, generator=generator, dtype=dtype)


def _min_input_size(blocks: Sequence[BlockSpec]) -> tuple[int, ...]:
    """Per spatial dim, the smallest input for which every block gets an input it accepts:
    block ``i`` needs ``n ≥ min_size`` and an output ``(n + offset) // stride + 1 ≥`` what
    block ``i + 1`` needs, i.e. ``n ≥ (need − 1)·stride − offset``."""
    need = [1] * blocks[0].ndim
    for block in reversed(blocks):
        need = [
            max(block.min_size, (m - 1) * block.stride - offset)
            for m, offset in zip(need, block.size_offset, strict=True)
        ]
    return tuple(need)


@st.composite
def model_specs(
    draw: st.DrawFn,
    *,
    max_blocks: int = 3,
    max_in_channels: int = 4,
    heads: tuple[str | None, ...] = (None, "linear", "linear-bn"),
    **block_knobs: Any,
) -> ModelSpec:
    """Draw a :class:`ModelSpec`: 1…``max_blocks`` blocks (knobs as for :func:`block_specs`;
    all of one spatial rank) whose channels chain, valid by construction."""
    ndims = block_knobs.pop("ndims", (2,))
    ndim = draw(st.sampled_from(ndims))
    channels = draw(st.integers(1, max_in_channels))
    specs: list[BlockSpec] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        spec = draw(block_specs(in_channels=channels, ndims=(ndim,), **block_knobs))
        specs.append(spec)
        channels = spec.out_channels
    activations = tuple(draw(st.sampled_from(ACTIVATIONS)) for _ in specs)
    return ModelSpec(
        tuple(specs),
        activations,
        draw(st.sampled_from(heads)),
        draw(st.integers(1, 5)),
        _min_input_size(specs),
        draw(st.integers(0, 2**16)),
    )


class DrawnModel(nn.Module):
    """A drawn model (see :class:`ModelSpec`); ``spec`` says what it is and what it accepts."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        for block, activation in zip(spec.blocks, spec.activations, strict=True):
            layers.append(build_block(block, dtype))
            if activation == "relu":
                layers.append(nn.ReLU())
            elif activation == "dropout":
                layers.append(nn.Dropout(0.25))  # the identity in eval mode
        if spec.head is not None:
            torch.manual_seed(spec.seed)
            channels = spec.blocks[-1].out_channels
            pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
            layers += [pool[spec.ndim](1), nn.Flatten(), nn.Linear(channels, spec.classes)]
            if spec.head == "linear-bn":
                layers.append(nn.BatchNorm1d(spec.classes))
        self.layers = nn.Sequential(*layers).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def build_model(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> DrawnModel:
    """The model ``spec`` describes, in eval mode, with random weights and BN statistics."""
    return randomize_batch_norms(DrawnModel(spec, dtype).eval(), spec.seed)


def models(dtype: torch.dtype = torch.float32, **knobs: Any) -> st.SearchStrategy[DrawnModel]:
    """Drawn models, built (knobs as for :func:`model_specs` and :func:`block_specs`)."""
    return model_specs(**knobs).map(lambda spec: build_model(spec, dtype))


# --------------------------------------------------------------------------------------------
# Chains of layers (cross-layer equalization)
# --------------------------------------------------------------------------------------------

#: activations between the layers of a chain: positively homogeneous, so equalization applies
CHAIN_ACTIVATIONS = ("relu", "leaky_relu", "prelu", "prelu1", "none")


@dataclass(frozen=True)
class ChainSpec:
    """Layers ``l₁ → φ₁ → l₂ → … → lₙ``: convs of rank ``ndim`` (``0``: linear layers) with
    ``channels[k] → channels[k+1]``, ``groups[k]`` and ``kernels[k]`` (odd, same padding);
    each layer's output channels scaled by ``10^u``, ``u`` uniform in ``±spread`` (what folded
    batch norms do to a fused layer)."""

    ndim: int
    channels: tuple[int, ...]
    groups: tuple[int, ...]
    kernels: tuple[int, ...]
    activations: tuple[str, ...]
    spread: float
    seed: int


@st.composite
def chain_specs(draw: st.DrawFn, *, max_layers: int = 4) -> ChainSpec:
    """Draw a :class:`ChainSpec` (groups drawn first, channels as multiples, so every layer's
    groups divide its channels; depthwise layers where a layer keeps its width)."""
    ndim = draw(st.sampled_from((0, 1, 2)))
    n = draw(st.integers(2, max_layers))
    unit = draw(st.sampled_from((1, 2, 3)))
    channels = tuple(unit * draw(st.integers(1, 4)) for _ in range(n + 1))
    groups, kernels = [], []
    for k in range(n):
        choices = [1] if ndim == 0 else _divisors(unit)
        if ndim and channels[k] == channels[k + 1]:
            choices.append(channels[k])
        groups.append(draw(st.sampled_from(choices)))
        kernels.append(1 if ndim == 0 else draw(st.sampled_from((1, 3))))
    activations = tuple(draw(st.sampled_from(CHAIN_ACTIVATIONS)) for _ in range(n - 1))
    spread = draw(st.floats(0.0, 2.0))
    return ChainSpec(
        ndim,
        channels,
        tuple(groups),
        tuple(kernels),
        activations,
        spread,
        draw(st.integers(0, 2**16)),
    )


class LayerChain(nn.Module):
    """The chain a :class:`ChainSpec` describes."""

    def __init__(self, spec: ChainSpec, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.spec = spec
        generator = torch.Generator().manual_seed(spec.seed)
        layers: list[nn.Module] = []
        for k, (groups, kernel) in enumerate(zip(spec.groups, spec.kernels, strict=True)):
            cin, cout = spec.channels[k], spec.channels[k + 1]
            layer: nn.Module
            if spec.ndim == 0:
                layer = nn.Linear(cin, cout)
            else:
                conv = {1: nn.Conv1d, 2: nn.Conv2d}[spec.ndim]
                layer = conv(cin, cout, kernel, padding=kernel // 2, groups=groups)
            with torch.no_grad():
                for p in layer.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator))
                u = (2 * torch.rand(cout, generator=generator) - 1) * spec.spread
                layer.weight.mul_((10**u).reshape(-1, *([1] * (layer.weight.dim() - 1))))
            layers.append(layer)
            if k < len(spec.activations):
                layers.append(_chain_activation(spec.activations[k], cout))
        self.layers = nn.Sequential(*layers).to(dtype)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def example(self, batch: int = 2, size: int = 5) -> Tensor:
        """An input it accepts (float64)."""
        spatial = (size,) * self.spec.ndim
        return torch.randn(batch, self.spec.channels[0], *spatial, dtype=torch.float64)


def _chain_activation(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if name in ("prelu", "prelu1"):
        prelu = nn.PReLU(channels if name == "prelu" else 1)
        with torch.no_grad():
            prelu.weight.uniform_(-0.5, 0.5)
        return prelu
    return nn.Identity()


def chains(dtype: torch.dtype = torch.float64, **knobs: Any) -> st.SearchStrategy[LayerChain]:
    """Drawn :class:`LayerChain` models (knobs as for :func:`chain_specs`)."""
    return chain_specs(**knobs).map(lambda spec: LayerChain(spec, dtype))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

DISTRIBUTIONS = ("normal", "uniform", "large", "small", "negative")
_LARGE = {torch.float16: 10.0, torch.bfloat16: 100.0}


@dataclass(frozen=True)
class Axis:
    """A size drawn inputs vary: dim ``dim`` of input ``i`` for each ``(i, dim)`` in
    ``members`` (they share one size), drawn from ``low…high`` around the example's ``size``."""

    kind: str  # "batch" | "spatial"
    members: tuple[tuple[int, int], ...]
    size: int
    low: int
    high: int

    def describe(self) -> str:
        where = ", ".join(f"input {i} dim {d}" for i, d in self.members)
        return f"{self.kind} ({where})"


@dataclass(frozen=True)
class InputCase:
    """One drawn set of inputs, as parameters (hashable and cheap; :func:`build_inputs` makes
    the tensors): a size per :class:`Axis`, a value distribution, a layout and a variant."""

    sizes: tuple[int, ...]
    distribution: str
    channels_last: bool
    variant: int = 0

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        return f"{self.distribution} values{layout}"


def _tensor_inputs(example_inputs: Sequence[Any]) -> list[tuple[int, Tensor]]:
    return [(i, x) for i, x in enumerate(example_inputs) if isinstance(x, Tensor)]


def input_axes(
    example_inputs: Sequence[Any],
    *,
    batch_sizes: tuple[int, int] | None = (1, 4),
    spatial: bool = True,
    larger: Callable[[int], int] | None = None,
) -> tuple[Axis, ...]:
    """The sizes of ``example_inputs`` worth varying, assuming ``N, C, *spatial`` layout.

    The batch is dim 0 of every tensor of rank ≥ 2 whose dim 0 equals the first floating one's
    (``None`` keeps it). Spatial dims are dims 2… of floating tensors of rank ≥ 3; dims of
    different inputs at the same position from the end and of the same size share one axis
    (two images added together stay the same size). Sizes range over ``[s // 2, s + max(4,
    s // 2)]``: odd and even, smaller and larger; ``larger(s)``, if given, is the largest
    instead.
    """
    tensors = _tensor_inputs(example_inputs)
    axes: list[Axis] = []
    floating = [(i, x) for i, x in tensors if x.is_floating_point() and x.dim() >= 2]
    if batch_sizes is not None and floating:
        batch = floating[0][1].shape[0]
        members = tuple((i, 0) for i, x in tensors if x.dim() >= 2 and x.shape[0] == batch)
        axes.append(Axis("batch", members, batch, batch_sizes[0], batch_sizes[1]))
    if spatial:
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, x in floating:
            for d in range(2, x.dim()):
                groups.setdefault((x.dim() - d, x.shape[d]), []).append((i, d))
        for (_, size), members in sorted(groups.items(), key=lambda kv: kv[1][0]):
            high = size + max(4, size // 2) if larger is None else larger(size)
            axes.append(Axis("spatial", tuple(members), size, max(1, size // 2), high))
    return tuple(axes)


def input_cases(
    axes: Sequence[Axis],
    *,
    distributions: Sequence[str] = DISTRIBUTIONS,
    channels_last: bool = True,
) -> st.SearchStrategy[InputCase]:
    """Drawn :class:`InputCase` s. Each size is drawn as an offset from the example's, so a
    counterexample shrinks towards the example's shape (and towards normal values, contiguous
    layout, batch 1)."""
    unknown = set(distributions) - set(DISTRIBUTIONS)
    if unknown or not distributions:
        raise ValueError(
            f"distributions must be some of {DISTRIBUTIONS}, got {list(distributions)}"
        )

    def size(axis: Axis) -> st.SearchStrategy[int]:
        anchor = min(max(axis.size, axis.low), axis.high)
        return st.integers(axis.low - anchor, axis.high - anchor).map(lambda o: anchor + o)

    return st.builds(
        InputCase,
        st.tuples(*(size(axis) for axis in axes)),
        st.sampled_from(tuple(distributions)),
        st.booleans() if channels_last else st.just(False),
        st.integers(0, 3),
    )


def _values(
    shape: Sequence[int], case: InputCase, dtype: torch.dtype, generator: torch.Generator
) -> Tensor:
    kind = case.distribution
    if kind == "uniform":
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "large":
        return values * _LARGE.get(dtype, 1e3)
    if kind == "small":
        return values * 1e-3
    if kind == "negative":
        return -values.abs()
    return values


def build_inputs(
    example_inputs: Sequence[Any], axes: Sequence[Axis], case: InputCase, seed: int = 0
) -> tuple[Any, ...]:
    """The inputs ``case`` describes: the example's, resized along ``axes``, with new values.

    Floating tensors get values from ``case.distribution`` (on their device and dtype, in
    channels-last layout where ``case.channels_last`` and they have rank 4 or 5); other
    tensors keep their values (rows are repeated or dropped to fit a new batch); anything
    else is passed as it is. The same ``case`` and ``seed`` give the same tensors.
    """
    shapes: dict[int, list[int]] = {i: list(x.shape) for i, x in _tensor_inputs(example_inputs)}
    for axis, size in zip(axes, case.sizes, strict=True):
        for i, d in axis.members:
            shapes[i][d] = size
    key = f"{seed}:{case.sizes}:{case.distribution}:{case.channels_last}:{case.variant}"
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    built: list[Any] = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, Tensor):
            built.append(x)
        elif x.is_floating_point():
            t = _values(shapes[i], case, x.dtype, generator).to(device=x.device, dtype=x.dtype)
            if case.channels_last and t.dim() in (4, 5):
                layout = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
                t = t.contiguous(memory_format=layout)
            built.append(t)
        elif x.dim() >= 1 and shapes[i][0] != x.shape[0]:
            rows = torch.arange(shapes[i][0], device=x.device) % max(x.shape[0], 1)
            built.append(x.index_select(0, rows))
        else:
            built.append(x)
    return tuple(built)


def inputs_like(
    example_inputs: Sequence[Any] | Tensor,
    *,
    batch_sizes: tuple[int, int] | None = (1, 4),
    spatial: bool = True,
    distributions: Sequence[str] = DISTRIBUTIONS,
    channels_last: bool = True,
    seed: int = 0,
) -> st.SearchStrategy[tuple[Any, ...]]:
    """Input tuples like ``example_inputs``: other batch sizes and spatial sizes (see
    :func:`input_axes`), value distributions and layouts. A model may reject some of the
    sizes (a linear layer after a flatten); :func:`fxfuse.verify` finds out which by asking
    the model."""
    examples = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    axes = input_axes(examples, batch_sizes=batch_sizes, spatial=spatial)
    cases = input_cases(axes, distributions=distributions, channels_last=channels_last)
    return cases.map(lambda case: build_inputs(examples, axes, case, seed))


def model_inputs(
    spec: ModelSpec | DrawnModel,
    *,
    batch_sizes: tuple[int, int] = (1, 4),
    max_extra: int = 6,
    distributions: Sequence[str] = DISTRIBUTIONS,
    channels_last: bool = True,
    dtype: torch.dtype | None = None,
) -> st.SearchStrategy[tuple[Tensor]]:
    """One-tuples ``(x,)`` the drawn model accepts: batch in ``batch_sizes``, each spatial dim
    from the model's ``min_size`` to ``max_extra`` more, in the model's dtype."""
    if isinstance(spec, DrawnModel):
        dtype = dtype or next(spec.parameters()).dtype
        spec = spec.spec
    example = spec.example_input(batch=batch_sizes[0], dtype=dtype or torch.float32)
    axes = [Axis("batch", ((0, 0),), batch_sizes[0], *batch_sizes)]
    axes += [
        Axis("spatial", ((0, 2 + d),), size, size, size + max_extra)
        for d, size in enumerate(spec.min_size)
    ]
    cases = input_cases(axes, distributions=distributions, channels_last=channels_last)
    seed = spec.seed
    return cases.map(lambda case: build_inputs((example,), axes, case, seed))  # type: ignore[return-value]


@st.composite
def models_with_inputs(
    draw: st.DrawFn, dtype: torch.dtype = torch.float32, **knobs: Any
) -> tuple[DrawnModel, tuple[Tensor]]:
    """A drawn model and an input tuple it accepts."""
    model = draw(models(dtype, **knobs))
    return model, draw(model_inputs(model))
