"""conv-bn fold: an eval-mode batch norm after a conv, transposed conv or linear layer.

A batch norm with running statistics is the per-channel affine ``scale · y + shift`` with
``scale = γ / sqrt(var + eps)`` and ``shift = β − μ · scale``; folded into the layer before it::

    W' = W · scale   (per output channel; dim 1 per group for a transposed conv)
    b' = b · scale + shift

After a sum of convs that cannot merge (different inputs, a merge that would cost too much),
the same affine distributes over the sum: ``bn(Σ cᵢ·convᵢ) = Σ (scale·cᵢ)·convᵢ + shift``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import Node

from fxfuse.kernels import batch_norm_affine, scale_output_channels
from fxfuse.ops import (
    BatchNormView,
    Combination,
    ConvView,
    channel_vector,
    constant_value,
    value_users,
)
from fxfuse.rules import Match, RewriteContext, Rule

__all__ = ["DistributeBatchNorm", "FoldBatchNorm"]


@dataclass
class LayerBatchNorm(Match):
    layer: ConvView | None  # None: the batch norm reads something no layer can absorb
    bn: BatchNormView


LINEAR_RANK_UNKNOWN = (
    "a Linear's output may have more than two dims, and batch norm normalizes dim 1, not the "
    "features: pass example_inputs so fxfuse can see it is 2-d"
)


def promotion_reason(combination: Combination, dtype: torch.dtype) -> str:
    wider = [str(d) for d in combination.promoting(dtype)]
    return (
        f"a {', '.join(wider)} constant makes the {dtype} result {wider[0]}; a fused "
        f"layer would keep {dtype}"
    )


def uses_batch_stats_reason(bn: BatchNormView) -> str:
    return (
        "batch norm uses batch statistics (training mode or track_running_stats=False), so it "
        "is not a fixed affine map; call .eval() on a batch norm that tracks running statistics"
    )


def other_users(node: Node, but: Node) -> str:
    others = [u.name for u in value_users(node) if u is not but]
    return ", ".join(others[:3]) + (" …" if len(others) > 3 else "")


def describe_producer(node: Node, ctx: RewriteContext) -> str:
    """``cat (torch.cat)``, ``relu (ReLU)``, ``x (a graph input)``: what made a value."""
    if node.op == "placeholder":
        return f"{node.name} (a graph input)"
    if node.op == "call_module":
        return f"{node.name} ({type(ctx.module(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    return f"{node.name} ({node.op} {node.target})"


def scaled_layer(
    ctx: RewriteContext, layer: ConvView, scale: Tensor, shift: Tensor | None, bn: BatchNormView
) -> Node:
    """A new layer computing ``scale · layer(x) + shift`` (``bn``'s affine, folded)."""
    weight, bias = scale_output_channels(
        layer.weight, layer.bias, scale, shift, transposed=layer.transposed, groups=layer.groups
    )
    return ctx.fused(
        layer.input,
        kind=layer.kind,
        weight=weight,
        bias=bias,
        geometry=layer.geometry,
        like=layer,
        sources=layer.sources + bn.sources,
        name=layer.name,
    )


class FoldBatchNorm(Rule[LayerBatchNorm]):
    """``bn(conv(x)) -> conv'(x)``: ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β``."""

    name = "fold-bn"
    formula = "bn(conv(x)) -> conv'(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[LayerBatchNorm]:
        bn = ctx.batch_norm(node)
        if bn is None:
            return
        layer = ctx.conv(bn.input)
        if layer is not None:
            yield LayerBatchNorm(node, layer=layer, bn=bn, absorbed=[layer.node])
        elif ctx.combination(bn.input) is None:  # a sum is fold-bn-into-branches' to explain
            yield LayerBatchNorm(node, layer=None, bn=bn)

    def check(self, match: LayerBatchNorm, ctx: RewriteContext) -> str | None:
        layer, bn = match.layer, match.bn
        if bn.uses_batch_stats:
            return uses_batch_stats_reason(bn)
        if layer is None:
            return f"its input {describe_producer(bn.input, ctx)} is not a conv or linear layer"
        if len(value_users(layer.node)) != 1:
            return (
                f"the {layer.describe()} output also feeds {other_users(layer.node, bn.node)}, "
                "which must keep reading the unnormalized value"
            )
        if bn.num_features != layer.out_channels:
            return (
                f"batch norm has {bn.num_features} channels but the {layer.describe()} "
                f"produces {layer.out_channels}"
            )
        if bn.ndims is not None and layer.ndim not in bn.ndims:
            return f"a {layer.ndim}-d layer's output cannot feed this batch norm"
        shape = ctx.shape(layer.node)
        if layer.kind == "linear" and shape is None:
            return LINEAR_RANK_UNKNOWN
        if shape is not None and len(shape) != layer.ndim + 2:
            return (
                f"the {layer.describe()} output has shape {tuple(shape)}: batch norm would "
                "normalize dim 1, which is not its channel dim"
            )
        return None

    def rewrite(self, match: LayerBatchNorm, ctx: RewriteContext) -> Node:
        layer, bn = match.layer, match.bn
        assert layer is not None
        assert bn.running_mean is not None and bn.running_var is not None
        scale, shift = batch_norm_affine(
            bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        return scaled_layer(ctx, layer, scale, shift, bn)

    def describe(self, match: LayerBatchNorm) -> str:
        layer = match.layer.describe() if match.layer is not None else "?"
        return f"{layer} + batch norm -> {layer}"


@dataclass
class BatchNormOfSum(Match):
    bn: BatchNormView
    combination: Combination
    layers: list[ConvView | None]


class DistributeBatchNorm(Rule[BatchNormOfSum]):
    """``bn(Σ cᵢ·convᵢ(xᵢ)) -> Σ convᵢ'(xᵢ)``: ``Wᵢ' = Wᵢ·cᵢ·γ/σ``, shift into one bias."""

    name = "fold-bn-into-branches"
    formula = "bn(Σ cᵢ·convᵢ(xᵢ)) -> Σ convᵢ'(xᵢ)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[BatchNormOfSum]:
        bn = ctx.batch_norm(node)
        if bn is None or len(value_users(bn.input)) != 1:
            return
        combo = ctx.combination(bn.input)
        if combo is None:
            return
        layers = [ctx.conv(term) for _, term in combo.terms]
        if any(layer is not None for layer in layers):
            # the sum has the batch norm's shape; each branch's shape is its new layer's
            yield BatchNormOfSum(
                node, bn=bn, combination=combo, layers=layers, absorbed=[combo.root]
            )

    def check(self, match: BatchNormOfSum, ctx: RewriteContext) -> str | None:
        bn = match.bn
        if bn.uses_batch_stats:
            return uses_batch_stats_reason(bn)
        anchor = match.combination.anchor
        if anchor is not None:
            return (
                f"the sum before it updates {anchor.name} in place, which other code sees; "
                "the batch norm cannot move into it"
            )
        first = next(layer for layer in match.layers if layer is not None)
        for (coefficient, term), layer in zip(match.combination.terms, match.layers, strict=True):
            if layer is None or len(value_users(term)) != 1:
                return (
                    f"the sum before it also adds {term.name}, which is not a conv the "
                    "batch norm can fold into"
                )
            if layer.out_channels != bn.num_features or layer.ndim != first.ndim:
                return (
                    f"batch norm has {bn.num_features} channels, {layer.describe()} has "
                    f"{layer.out_channels}"
                )
            if layer.kind == "linear" and ctx.shape(term) is None:
                return LINEAR_RANK_UNKNOWN
            if channel_vector(coefficient, bn.num_features, layer.ndim) is None:
                return f"the scale on {layer.describe()} is not per output channel"
        for coefficient, operand in match.combination.constants:
            value = constant_value(operand, ctx)
            assert value is not None
            if channel_vector(coefficient * value, bn.num_features, first.ndim) is None:
                return "a constant in the sum is not per channel"
        if match.combination.promotes(first.dtype):
            return promotion_reason(match.combination, first.dtype)
        shape = ctx.shape(match.combination.root)
        if shape is not None and len(shape) != first.ndim + 2:
            return f"the sum has shape {tuple(shape)}: batch norm would not normalize its channels"
        return None

    def rewrite(self, match: BatchNormOfSum, ctx: RewriteContext) -> Node:
        bn, combo = match.bn, match.combination
        assert bn.running_mean is not None and bn.running_var is not None
        scale, shift = batch_norm_affine(
            bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        channels = bn.num_features
        ndim = next(layer.ndim for layer in match.layers if layer is not None)
        for coefficient, operand in combo.constants:
            value = constant_value(operand, ctx)
            assert value is not None
            vector = channel_vector(coefficient * value, channels, ndim)
            assert vector is not None
            shift = shift + scale * vector.to(scale.device)
        total: Node | None = None
        for (coefficient, _), layer in zip(combo.terms, match.layers, strict=True):
            assert layer is not None
            vector = channel_vector(coefficient, channels, layer.ndim)
            assert vector is not None
            node = scaled_layer(
                ctx, layer, scale * vector.to(scale.device), shift if total is None else None, bn
            )
            match.redirects[layer.node] = node
            total = node if total is None else ctx.call(operator.add, total, node)
        assert total is not None
        return total

    def describe(self, match: BatchNormOfSum) -> str:
        parts = " + ".join(layer.describe() for layer in match.layers if layer is not None)
        return f"batch norm of ({parts}) -> {parts}"
