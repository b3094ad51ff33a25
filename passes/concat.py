"""merge-concat: layers that read one input, concatenated on channels, are one layer.

    # cat([layer₁(x), layer₂(x), …], dim=1) -> layer'(x)
    W' = cat(place(W₁), place(W₂), …)   (output channels stacked)   b' = cat(b₁, b₂, …)

DBB's transform IV, and Inception-style heads. Each kernel is placed inside the common window
(as :mod:`.merge_branches` does) — exact when every branch has the same stride and output size,
and branches that read padding share what it holds. A 1×1 beside a 3×3 becomes a 3×3 with
zeros, which costs multiply-adds: the merge is declined where it would cost more than
``FusionOptions.max_flops_ratio`` times the branches. Grouped branches are not concatenated
(their groups would interleave).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.fx import Node

from fxfuse import kernels
from fxfuse.dialects import aten, bind
from fxfuse.effects import value_users
from fxfuse.geometry import Geometry
from fxfuse.kernels import align_windows
from fxfuse.maps import Layer, one_pad_value
from fxfuse.rules import Match, RewriteContext, Rule
from fxfuse.weights import apply, const

__all__ = ["MergeConcat"]

_CATS = frozenset({torch.cat, torch.concat, aten.cat.default})


@dataclass
class Concatenation(Match):
    layers: list[Layer | None]
    parts: list[Node]
    dim: int


class MergeConcat(Rule[Concatenation]):
    """``cat([layerᵢ(x)], dim=1) -> layer'(x)``: kernels placed in one window, stacked."""

    name = "merge-concat"
    formula = "cat([conv_a(x), conv_b(x)], 1) -> conv'(x)"
    ops = frozenset({"call_function"})

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[Concatenation]:
        if node.target not in _CATS:
            return
        args = bind(node.target, node)  # type: ignore[arg-type]
        if args is None or not isinstance(args["tensors"], (list, tuple)):
            return
        parts = list(args["tensors"])
        if len(parts) < 2 or not all(isinstance(p, Node) for p in parts):
            return
        layers = [ctx.layer(p) for p in parts]
        if sum(layer is not None for layer in layers) < 2:
            return
        yield Concatenation(node, layers=layers, parts=parts, dim=args["dim"])

    def check(self, match: Concatenation, ctx: RewriteContext) -> str | None:
        layers = match.layers
        for part, layer in zip(match.parts, layers, strict=True):
            if layer is None:
                return f"{part.name} is not a layer on the same input"
            if len(value_users(part)) != 1 or part in match.parts[match.parts.index(part) + 1 :]:
                return f"the {layer.describe()} output also feeds another op"
        first = layers[0]
        assert first is not None
        rank = first.ndim + 2
        if first.kind == "linear":
            if match.dim not in (-1, 1) or (match.dim == 1 and ctx.rank(match.root) != 2):
                return "it does not concatenate the features of a linear layer"
        elif match.dim not in (1, 1 - rank):
            return f"it concatenates dim {match.dim}, not the channels"
        for layer in layers:
            assert layer is not None
            if layer.input is not first.input:
                return f"the {layer.describe()} reads {layer.input.name}, not {first.input.name}"
            if layer.kind != first.kind or layer.transposed:
                return f"mixes a {first.describe()} and a {layer.describe()}"
            if layer.dtype != first.dtype or layer.device != first.device:
                return "branches differ in dtype or device"
            if layer.groups != 1:
                return f"the {layer.describe()} is grouped: stacked groups would interleave"
            if (
                layer.geometry is not None
                and first.geometry is not None
                and layer.geometry.stride != first.geometry.stride
            ):
                return "strides differ"
        if first.geometry is not None:
            for dim in range(first.ndim):
                windows = [layer.geometry.windows(layer.kernel_size)[dim] for layer in layers]  # type: ignore[union-attr]
                if len({w.size_offset for w in windows}) > 1:
                    return f"misaligned windows along spatial dim {dim}: output sizes differ"
            geometries = [layer.geometry for layer in layers if layer is not None]
            reading = [geo for geo in geometries if geo is not None and geo.reads_padding]
            if len({geo.padding_mode for geo in reading}) > 1 or not one_pad_value(
                [geo.pad_value for geo in reading], first.in_channels
            ):
                return "branches read padding that holds different values"
        ratio = _cost(layers) / sum(layer.macs for layer in layers)  # type: ignore[union-attr]
        if ratio > ctx.options.max_flops_ratio:
            return (
                f"the stacked layer would cost {ratio:.2f}× the branches' multiply-adds "
                f"(limit {ctx.options.max_flops_ratio:g}×, FusionOptions.max_flops_ratio)"
            )
        return None

    def rewrite(self, match: Concatenation, ctx: RewriteContext) -> Node:
        layers = [layer for layer in match.layers if layer is not None]
        first = layers[0]
        geometry: Geometry | None = None
        blocks = []
        if first.geometry is None:
            blocks = [layer.weight for layer in layers]
        else:
            windows = [
                align_windows([layer.geometry.windows(layer.kernel_size)[d] for layer in layers])  # type: ignore[union-attr]
                for d in range(first.ndim)
            ]
            extent = tuple(w.kernel for w in windows)
            for i, layer in enumerate(layers):
                offsets = tuple(w.offsets[i] for w in windows)
                steps = tuple(w.steps[i] for w in windows)
                blocks.append(apply(kernels.place_kernel, layer.weight, extent, offsets, steps))
            reading = next(
                (layer.geometry for layer in layers if layer.geometry.reads_padding), first.geometry
            )  # type: ignore[union-attr]
            geometry = Geometry(
                first.geometry.stride,
                tuple((w.left, w.right) for w in windows),
                tuple(w.dilation for w in windows),
                1,
                reading.padding_mode,  # type: ignore[union-attr]
                pad_value=reading.pad_value,  # type: ignore[union-attr]
            )
        weight = apply(kernels.stack_outputs, *blocks)
        biases = tuple(layer.bias if layer.bias is not None else const(0.0) for layer in layers)
        counts = tuple(layer.out_channels for layer in layers)
        bias = apply(kernels.stack_biases, biases, counts)
        return ctx.fused(
            first.input,
            kind=first.kind,
            weight=weight,
            bias=bias,
            geometry=geometry,
            like=first,
            sources=[s for layer in layers for s in layer.sources],
            name=first.name,
            requires_grad=any(layer.requires_grad for layer in layers),
        )

    def describe(self, match: Concatenation) -> str:
        parts = ", ".join(layer.describe() for layer in match.layers if layer is not None)
        return f"cat({parts}) -> one layer"


def _cost(layers: list[Layer | None]) -> int:
    first = layers[0]
    assert first is not None
    if first.geometry is None:
        return sum(layer.macs for layer in layers)  # type: ignore[union-attr]
    taps = math.prod(
        align_windows([layer.geometry.windows(layer.kernel_size)[d] for layer in layers]).kernel  # type: ignore[union-attr]
        for d in range(first.ndim)
    )
    return sum(layer.out_channels for layer in layers) * first.in_channels * taps  # type: ignore[union-attr]
