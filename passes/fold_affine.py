"""fold-affine-into-layer: a per-channel affine map before a layer folds into it.

    # layer(a·x + t) -> layer'(x)
    W'[o, i] = W[o, i] · a[i];   b' = b + Σ_{i, taps} W[o, i] · t[i]

The affine map is an eval-mode batch norm (timm's ``NormLinear`` heads: ``BatchNorm1d`` →
``Linear``), a constant scale and shift (``x * s + t``), or YOLOR's implicit knowledge
(``ImplicitA``: ``conv(x + a)``). Where the layer reads no padding this is exact. Where it does,
the padded positions hold zeros *after* the map, which are ``−t/a`` before it: exact only when
the map sends zero to zero (``t = 0``), when the padding copies values (reflect, replicate,
circular commute with a per-channel map), or when the padding was written as the map's image of
zero — DBB's ``BNAndPadLayer``, ``pad_v(BN(x)) = BN(pad₀(x))`` with ``v = BN(0) = t``.

A batch norm normalizes dim 1: before a conv that is its input channels (batched layout); before
a linear layer, its features only when the program proves the input is 2-d.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from torch.fx import Node

from fxfuse import kernels
from fxfuse.effects import value_users
from fxfuse.maps import Layer, per_channel, same_values
from fxfuse.rules import Match, RewriteContext, Rule
from fxfuse.weights import Weight, apply

from .fold_bn import KEPT_AFTER_SUM, kept_after_sum

__all__ = ["FoldAffineIntoLayer"]


@dataclass
class AffineLayer(Match):
    layer: Layer
    source: Node  # what the affine map reads
    scale: Weight | None
    shift: Weight | None
    label: str
    sources: tuple[str, ...]
    rank: int  # the rank of the map's own constants (a (1, C, 1, 1) scale: 4)
    batch_norm: bool


class FoldAffineIntoLayer(Rule[AffineLayer]):
    """``layer(a·x + t) -> layer'(x)``: ``W' = W·a`` per input channel, ``b' = b + W·t``."""

    name = "fold-affine-into-layer"
    formula = "layer(a·x + t) -> layer'(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[AffineLayer]:
        layer = ctx.layer(node)
        if layer is None or layer.transposed:
            return
        x = layer.input
        bn = ctx.affine(x)
        if bn is not None and bn.fixed is None:
            yield AffineLayer(
                node,
                layer=layer,
                source=bn.input,
                scale=bn.scale,
                shift=bn.shift,
                label="batch norm",
                sources=bn.sources,
                rank=0,
                batch_norm=True,
            )
            return
        combo = ctx.combination(x)
        if combo is None or len(combo.terms) != 1 or combo.anchor is not None:
            return
        ((coefficient, source),) = combo.terms
        shift = None
        for constant in combo.constants:
            shift = constant if shift is None else apply(kernels.add, shift, constant)
        rank = combo.max_rank
        yield AffineLayer(
            node,
            layer=layer,
            source=source,
            scale=coefficient,
            shift=shift,
            label="scale and shift",
            sources=(),
            rank=rank,
            batch_norm=False,
        )

    def check(self, match: AffineLayer, ctx: RewriteContext) -> str | None:
        layer = match.layer
        mapped = layer.input
        if len(value_users(mapped)) != 1:
            return f"the {match.label} before it also feeds another op"
        if match.batch_norm and kept_after_sum(mapped, ctx):
            return KEPT_AFTER_SUM
        channels = layer.in_channels
        if match.batch_norm:
            if layer.kind == "linear" and ctx.rank(match.source) != 2:
                return (
                    "a batch norm normalizes dim 1, a Linear's features only where the program "
                    "fixes its input as 2-d"
                )
        else:
            from_end = 1 if layer.kind == "linear" else layer.ndim + 1
            for w in (match.scale, match.shift):
                if w is not None and not per_channel(w, channels, from_end):
                    return f"the {match.label} is not per input channel"
            rank = ctx.rank(match.source)
            if layer.kind == "linear" and match.rank > 1 and (rank is None or rank < match.rank):
                return "a scale of more than one dim would change the rank of the input"
            if layer.kind != "linear" and match.rank > layer.ndim + 2:
                return f"a scale of {match.rank} dims would add dims to the output"
        combo_dtype = ctx.combination(mapped)
        if combo_dtype is not None:
            promoted = combo_dtype.promotion(layer.dtype)
            if promoted is not None:
                return promoted
        geo = layer.geometry
        if geo is None or not geo.reads_padding or match.shift is None:
            return None
        if geo.padding_mode in ("reflect", "replicate", "circular"):
            return None
        if geo.padding_mode == "value":
            assert geo.pad_value is not None
            if same_values(geo.pad_value, match.shift, channels):
                return None
            return (
                f"the {layer.describe()} pads with values other than the {match.label}'s "
                "image of zero"
            )
        return (
            f"the {layer.describe()} pads with zeros, which the {match.label} would have to "
            "send to zero (it shifts them); pad with its image of zero, or fold it after a layer"
        )

    def rewrite(self, match: AffineLayer, ctx: RewriteContext) -> Node:
        layer = match.layer
        weight, bias = layer.weight, layer.bias
        if match.shift is not None:
            bias = apply(kernels.input_shift_bias, weight, bias, match.shift, groups=layer.groups)
        if match.scale is not None:
            weight = apply(kernels.scale_input_channels, weight, match.scale, groups=layer.groups)
        geo = layer.geometry
        if geo is not None and geo.padding_mode == "value":
            geo = replace(geo, padding_mode="zeros", pad_value=None)
        new = ctx.fused(
            match.source,
            kind=layer.kind,
            weight=weight,
            bias=bias,
            geometry=geo,
            like=layer,
            sources=match.sources + layer.sources,
            name=layer.name,
        )
        return new

    def describe(self, match: AffineLayer) -> str:
        return f"{match.label} + {match.layer.describe()} -> {match.layer.describe()}"
