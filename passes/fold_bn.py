"""fold-bn: an eval-mode batch norm after a conv, transposed conv or linear layer; and after a
sum of them.

A batch norm with running statistics is the per-channel affine ``a · y + t`` with
``a = γ / sqrt(var + eps)`` and ``t = β − μ · a``; folded into the layer before it::

    # bn(layer(x)) -> layer'(x)
    W' = W · a   (per output channel; dim 1 per group for a transposed conv)
    b' = b · a + t

After a sum of layers that cannot merge (different inputs, a merge that would cost too much),
the same affine distributes over the sum::

    # bn(Σ cᵢ·layerᵢ(xᵢ) + k) -> Σ layerᵢ'(xᵢ)
    Wᵢ' = Wᵢ · a·cᵢ,   b' = Σ bᵢ·a·cᵢ + a·k + t

With ``FusionOptions(keep_post_sum_bn=True)`` a batch norm after a sum of branches stays as it
is (QARepVGG): the branches still merge, the batch norm is neither folded into the merged conv
nor distributed over the branches nor folded forward (``fold-affine-into-layer``).

A batch norm normalizes dim 1. That is a conv's channel axis for the batched inputs fxfuse
assumes for convs; it is a linear layer's feature axis only where the program proves the
output is 2-d (:mod:`fxfuse.layout`), so a linear layer folds only then.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.fx import Node

from fxfuse import kernels
from fxfuse.dialects import bind, target_name
from fxfuse.effects import value_users
from fxfuse.maps import Affine, Combination, Layer, per_channel
from fxfuse.rules import Match, RewriteContext, Rule
from fxfuse.weights import Weight, apply, mul

__all__ = ["FoldBn", "FoldBnIntoBranches", "kept_after_sum"]

#: node meta key: a batch norm that read a sum of branches when fusion began
POST_SUM_BN = "fxfuse_post_sum_bn"
KEPT_AFTER_SUM = (
    "a batch norm after a sum of branches is kept (FusionOptions(keep_post_sum_bn=True))"
)
_marked: weakref.WeakSet[RewriteContext] = weakref.WeakSet()


def mark_post_sum_batch_norms(ctx: RewriteContext) -> None:
    """Mark, once per graph and before any branch merges away, every batch norm reading a sum
    of two or more branches (what ``keep_post_sum_bn`` keeps)."""
    if ctx in _marked:
        return
    _marked.add(ctx)
    for node in ctx.graph.nodes:
        bn = ctx.affine(node)
        combo = None if bn is None else ctx.combination(bn.input)
        if combo is not None and len(combo.terms) >= 2:
            node.meta[POST_SUM_BN] = True


def kept_after_sum(node: Node, ctx: RewriteContext) -> bool:
    """Whether ``node`` is a batch norm after a sum that the options say to keep."""
    return ctx.options.keep_post_sum_bn and bool(node.meta.get(POST_SUM_BN))


def _others(node: Node, but: Node) -> str:
    others = [u.name for u in value_users(node) if u is not but]
    return ", ".join(others[:3]) + (" …" if len(others) > 3 else "")


def _producer(node: Node, ctx: RewriteContext) -> str:
    """``cat (torch.cat)``, ``relu (ReLU)``, ``x (a graph input)``: what made a value."""
    if node.op == "placeholder":
        return f"{node.name} (a graph input)"
    if node.op == "call_module":
        return f"{node.name} ({type(ctx.module(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    return f"{node.name} ({node.op} {node.target})"


def channel_axis_reason(layer: Layer, bn: Affine, value: Node, ctx: RewriteContext) -> str | None:
    """Why ``bn``'s dim 1 may not be ``layer``'s channel axis at ``value`` (its output), or
    ``None``: for a conv it is (batched layout); a linear layer's features are its last dim,
    dim 1 only for a 2-d output, which the program must prove."""
    rank = ctx.rank(value)
    shape = ctx.shape(value)
    if layer.kind == "linear":
        if rank != 2:
            return (
                "a Linear's output may have more than two dims, and batch norm normalizes dim "
                "1, not the features; fxfuse folds it where the program fixes the rank "
                "(flatten(x, 1), x.view(n, -1), a global pool)"
            )
        return None
    if bn.ranks is not None and layer.ndim + 2 not in bn.ranks:
        return f"a {layer.ndim}-d layer's output cannot feed this batch norm"
    if (rank is not None and rank != layer.ndim + 2) or (
        shape is not None and len(shape) != layer.ndim + 2
    ):
        return (
            f"the {layer.describe()} output has {rank or len(shape or ())} dims: batch norm "
            "would normalize dim 1, which is not its channel dim"
        )
    return None


def folded(
    ctx: RewriteContext, layer: Layer, scale: Weight, shift: Weight | None, extra: tuple[str, ...]
) -> Node:
    """A new layer computing ``scale · layer(x) + shift``."""
    weight = apply(
        kernels.scale_kernel, layer.weight, scale, transposed=layer.transposed, groups=layer.groups
    )
    bias = apply(kernels.affine_bias, layer.bias, scale, shift, layer.out_channels)
    return ctx.fused(
        layer.input,
        kind=layer.kind,
        weight=weight,
        bias=bias,
        geometry=layer.geometry,
        like=layer,
        sources=layer.sources + extra,
        name=layer.name,
    )


@dataclass
class LayerBatchNorm(Match):
    layer: Layer | None  # None: the batch norm reads something no layer can absorb
    bn: Affine
    reshape: Node | None = None  # a reshape between them that keeps the features last
    refused: str | None = None  # why the reshape between them may move the features


_RESHAPES = frozenset({"flatten", "reshape", "view"})


def _feature_reshape(node: Node, ctx: RewriteContext) -> tuple[Layer, Node, str | None] | None:
    """``node = reshape(linear(x))`` that keeps the features as the last dim, only user of the
    linear layer's output: LeViT's ``bn(linear(x).flatten(0, 1))``; with the reason where the
    program does not show that it keeps them."""
    if node.op not in ("call_method", "call_function") or target_name(node) not in _RESHAPES:
        return None
    if not node.args or not isinstance(node.args[0], Node):
        return None
    layer = ctx.layer(node.args[0])
    if layer is None or layer.kind != "linear" or len(value_users(layer.node)) != 1:
        return None
    args = bind(torch.flatten, node) if target_name(node) == "flatten" else None
    if args is not None:
        rank = ctx.rank(layer.node)
        end = args["end_dim"]
        if rank is None and isinstance(end, int) and end >= 0:
            return (
                layer,
                node,
                f"{node.name} keeps the {layer.describe()}'s features last only for some ranks "
                "of its input, and the program does not fix that rank",
            )
        if rank is None or not isinstance(end, int) or end % rank == rank - 1:
            return None
        return layer, node, None
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if shape and shape[-1] == layer.out_channels:
        return layer, node, None
    return None


class FoldBn(Rule[LayerBatchNorm]):
    """``bn(layer(x)) -> layer'(x)``: ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β``."""

    name = "fold-bn"
    formula = "bn(conv(x)) -> conv'(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[LayerBatchNorm]:
        if ctx.options.keep_post_sum_bn:  # (the fuse stage's first rule: before any merge)
            mark_post_sum_batch_norms(ctx)
        bn = ctx.affine(node)
        if bn is None:
            return
        layer = ctx.layer(bn.input)
        reshaped = _feature_reshape(bn.input, ctx) if layer is None else None
        if layer is not None:
            yield LayerBatchNorm(node, layer=layer, bn=bn, absorbed=[layer.node])
        elif reshaped is not None:
            layer, reshape, refused = reshaped
            yield LayerBatchNorm(node, layer=layer, bn=bn, reshape=reshape, refused=refused)
        elif ctx.combination(bn.input) is None:  # a sum is fold-bn-into-branches' to explain
            yield LayerBatchNorm(node, layer=None, bn=bn)

    def check(self, match: LayerBatchNorm, ctx: RewriteContext) -> str | None:
        layer, bn = match.layer, match.bn
        if bn.fixed is not None:
            return bn.fixed
        if kept_after_sum(match.root, ctx):
            return KEPT_AFTER_SUM
        if match.refused is not None:
            return match.refused
        if layer is None:
            refused = ctx.refusal(bn.input)
            if refused is not None:
                return refused
            return f"its input {_producer(bn.input, ctx)} is not a conv or linear layer"
        if len(value_users(layer.node)) != 1:
            return (
                f"the {layer.describe()} output also feeds {_others(layer.node, bn.node)}, "
                "which must keep reading the unnormalized value"
            )
        if bn.channels != layer.out_channels:
            return (
                f"batch norm has {bn.channels} channels but the {layer.describe()} "
                f"produces {layer.out_channels}"
            )
        return channel_axis_reason(layer, bn, match.reshape or layer.node, ctx)

    def rewrite(self, match: LayerBatchNorm, ctx: RewriteContext) -> Node:
        layer, bn = match.layer, match.bn
        assert layer is not None and bn.scale is not None
        new = folded(ctx, layer, bn.scale, bn.shift, bn.sources)
        if match.reshape is not None:  # the same reshape, of the folded layer
            old, folded_layer = layer.node, new
            new = ctx.graph.node_copy(match.reshape, lambda n: folded_layer if n is old else n)
            match.redirects[old] = folded_layer  # (``reshape_as(linear_out)`` reads its shape)
        return new

    def describe(self, match: LayerBatchNorm) -> str:
        layer = match.layer.describe() if match.layer is not None else "?"
        return f"{layer} + batch norm -> {layer}"


@dataclass
class BatchNormOfSum(Match):
    bn: Affine
    combination: Combination
    layers: list[Layer | None]


class FoldBnIntoBranches(Rule[BatchNormOfSum]):
    """``bn(Σ cᵢ·layerᵢ(xᵢ)) -> Σ layerᵢ'(xᵢ)``: ``Wᵢ' = Wᵢ·cᵢ·γ/σ``, shift into one bias."""

    name = "fold-bn-into-branches"
    formula = "bn(Σ cᵢ·convᵢ(xᵢ)) -> Σ convᵢ'(xᵢ)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[BatchNormOfSum]:
        bn = ctx.affine(node)
        if bn is None or len(value_users(bn.input)) != 1:
            return
        combo = ctx.combination(bn.input)
        if combo is None:
            return
        layers = [ctx.layer(term) for _, term in combo.terms]
        if any(layer is not None for layer in layers):
            # the sum has the batch norm's shape; each branch's shape is its new layer's
            yield BatchNormOfSum(
                node, bn=bn, combination=combo, layers=layers, absorbed=[combo.root]
            )

    def check(self, match: BatchNormOfSum, ctx: RewriteContext) -> str | None:
        bn, combo = match.bn, match.combination
        if bn.fixed is not None:
            return bn.fixed
        if kept_after_sum(match.root, ctx):
            return KEPT_AFTER_SUM
        if combo.anchor is not None:
            return (
                f"the sum before it updates {combo.anchor.name} in place, which other code "
                "sees; the batch norm cannot move into it"
            )
        first = next(layer for layer in match.layers if layer is not None)
        from_end = first.ndim + 1
        for (coefficient, term), layer in zip(combo.terms, match.layers, strict=True):
            if layer is None or len(value_users(term)) != 1:
                return (
                    f"the sum before it also adds {term.name}, which is not a conv the "
                    "batch norm can fold into"
                )
            if layer.out_channels != bn.channels or layer.ndim != first.ndim:
                return (
                    f"batch norm has {bn.channels} channels, {layer.describe()} has "
                    f"{layer.out_channels}"
                )
            if not per_channel(coefficient, bn.channels, from_end):
                return f"the scale on {layer.describe()} is not per output channel"
        for constant in combo.constants:
            if not per_channel(constant, bn.channels, from_end):
                return "a constant in the sum is not per channel"
        promoted = combo.promotion(first.dtype)
        if promoted is not None:
            return promoted
        if (
            combo.max_rank > first.ndim + 1
            and ctx.rank(combo.root) is None
            and first.kind == "linear"
        ):
            return "a scale of higher rank would change the output's rank"
        return channel_axis_reason(first, bn, combo.root, ctx)

    def rewrite(self, match: BatchNormOfSum, ctx: RewriteContext) -> Node:
        bn, combo = match.bn, match.combination
        assert bn.scale is not None
        channels = bn.channels
        shift: Weight | None = bn.shift
        for constant in combo.constants:  # a·k + t
            shift = apply(kernels.affine_bias, constant, bn.scale, shift, channels)
        total: Node | None = None
        for (coefficient, _), layer in zip(combo.terms, match.layers, strict=True):
            assert layer is not None
            scale = mul(bn.scale, apply(kernels.channel_vector, coefficient, channels))
            node = folded(ctx, layer, scale, shift if total is None else None, bn.sources)
            match.redirects[layer.node] = node
            total = node if total is None else ctx.call(operator.add, total, node)
        assert total is not None
        return total

    def describe(self, match: BatchNormOfSum) -> str:
        parts = " + ".join(layer.describe() for layer in match.layers if layer is not None)
        return f"batch norm of ({parts}) -> {parts}"
