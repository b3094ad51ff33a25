"""conv-bn fold: an eval-mode batch norm after a conv, transposed conv or linear layer.

A batch norm with running statistics is the per-channel affine ``scale · y + shift`` with
``scale = γ / sqrt(var + eps)`` and ``shift = β − μ · scale``; folded into the layer before it::

    W' = W · scale   (per output channel; dim 1 per group for a transposed conv)
    b' = b · scale + shift
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.fx import Node

from fxfuse.kernels import batch_norm_affine, scale_output_channels
from fxfuse.ops import BatchNormView, ConvView
from fxfuse.rules import Match, RewriteContext, Rule

__all__ = ["FoldBatchNorm"]


@dataclass
class LayerBatchNorm(Match):
    layer: ConvView
    bn: BatchNormView


def uses_batch_stats_reason(bn: BatchNormView) -> str:
    return (
        "batch norm uses batch statistics (training mode or track_running_stats=False), so it "
        "is not a fixed affine map; call .eval() on a batch norm that tracks running statistics"
    )


def other_users(node: Node, but: Node) -> str:
    others = [u.name for u in node.users if u is not but]
    return ", ".join(others[:3]) + (" …" if len(others) > 3 else "")


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
            yield LayerBatchNorm(node, layer=layer, bn=bn)

    def check(self, match: LayerBatchNorm, ctx: RewriteContext) -> str | None:
        layer, bn = match.layer, match.bn
        if bn.uses_batch_stats:
            return uses_batch_stats_reason(bn)
        if len(layer.node.users) != 1:
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
        if shape is not None and len(shape) != layer.ndim + 2:
            return (
                f"the {layer.describe()} output has shape {tuple(shape)}: batch norm would "
                "normalize dim 1, which is not its channel dim"
            )
        return None

    def rewrite(self, match: LayerBatchNorm, ctx: RewriteContext) -> Node:
        layer, bn = match.layer, match.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale, shift = batch_norm_affine(
            bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
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

    def describe(self, match: LayerBatchNorm) -> str:
        return f"{match.layer.describe()} + batch norm -> {match.layer.describe()}"
