"""equalize-layers: cross-layer equalization of a chain of layers, for INT8 (opt-in).

    # l₂(φ(l₁(x))) -> l₂'(φ(l₁'(x)))
    l₁': W₁'[c] = W₁[c] / s_c,  b₁'[c] = b₁[c] / s_c;   l₂': W₂'[o, c] = W₂[o, c] · s_c

Exact in real arithmetic for any ``s_c > 0`` when φ is positively homogeneous per channel,
``φ(x / s) = φ(x) / s``: ReLU, leaky ReLU, PReLU (any slopes: each element keeps its sign), or
no activation at all. Not ReLU6 (its clip point does not scale), SiLU, GELU, hardswish… And
only where nothing else reads l₁'s or φ's output (a branch point, a residual sum would see
the scaled channels), where l₂ reads the channels as l₁ wrote them (both convs of one
dimensionality, or both linear layers: the same channel axis), and where l₂ pads with zeros
or copies (a pad *value* would have to scale too).

Fused layers carry the spread of their folded batch norms' scales: per-channel weight ranges
that differ by orders of magnitude, which per-tensor INT8 cannot represent. Equalization
moves that spread between neighbours. ``s`` is data-free quantization's choice, made for a
whole chain ``l₁ → φ → l₂ → φ → … → lₙ`` at once: each pair is balanced with
``s_c = √(r₁_c · r₂_c) / r₂_c`` (``r₁_c``: the range of l₁'s output channel ``c``, ``r₂_c``: of
l₂'s input channel ``c``, over its group's outputs for a grouped or depthwise l₂) and the pairs
are swept until the scales settle (:func:`fxfuse.kernels.equalization_scales`).

It runs after fusion, on the fused layers, when ``FusionOptions(equalize=True)``
(``fxfuse.optimize(model, equalize=True)``). The scales are computed from the weights' values:
not with live weights (the compile backend), which change between calls.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from fxfuse import kernels
from fxfuse.dialects import aten, inherits_forward, target_name
from fxfuse.effects import value_users
from fxfuse.maps import Layer
from fxfuse.rules import Match, RewriteContext, Rule
from fxfuse.weights import apply, const, evaluate

__all__ = ["EqualizeLayers"]

#: functions and methods with ``φ(x / s) = φ(x) / s`` for every ``s > 0``, elementwise
HOMOGENEOUS_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu_,
        torch.relu,
        torch.relu_,
        F.leaky_relu,
        F.leaky_relu_,
        F.prelu,
        torch.prelu,
        aten.relu.default,
        aten.relu_.default,
        aten.leaky_relu.default,
        aten.leaky_relu_.default,
        aten.prelu.default,
        aten._prelu_kernel.default,
    }
)
HOMOGENEOUS_METHODS = frozenset({"relu", "relu_", "prelu"})
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
_SUMS = frozenset(
    {operator.add, operator.iadd, operator.sub, torch.add, aten.add.Tensor, aten.add_.Tensor}
)

#: the node meta key marking layers this rule built (a chain is equalized once)
EQUALIZED = "fxfuse_equalized"


@dataclass
class Chain(Match):
    """``layers[0] → activations[0] → layers[1] → … → layers[-1]`` (``root``: the last)."""

    layers: list[Layer]
    activations: list[tuple[Node, ...]]  # between layers[k] and layers[k + 1], in order
    stop: str | None  # why the chain ends at its last layer
    scales: list[Tensor] = field(default_factory=list)  # set by check


def homogeneous(node: Node, ctx: RewriteContext) -> bool:
    """Whether ``node`` applies a positively homogeneous function elementwise to its first
    argument."""
    if node.op == "call_function":
        return node.target in HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target in HOMOGENEOUS_METHODS
    if node.op == "call_module":
        module = ctx.module(str(node.target))
        return isinstance(module, HOMOGENEOUS_MODULES) and inherits_forward(module)
    return False


def _op_name(node: Node, ctx: RewriteContext) -> str:
    if node.op == "call_module":
        return type(ctx.module(str(node.target))).__name__
    if node.op == "output":
        return "the graph's output"
    return target_name(node)


def _follow(
    layer: Layer, ctx: RewriteContext
) -> tuple[Layer | None, tuple[Node, ...], tuple[Node, str] | None]:
    """The layer ``layer`` hands its channels to (through homogeneous activations), those
    activations, and otherwise the op that stops it with the reason."""
    node, activations = layer.node, []
    while True:
        users = value_users(node)
        if len(users) != 1:
            if not users:
                return None, (), None
            what = "its output" if node is layer.node else "the activation after it"
            return None, (), (node, f"{what} feeds several ops (a branch point)")
        user = users[0]
        if not (homogeneous(user, ctx) and user.args and user.args[0] is node):
            break
        activations.append(user)
        node = user
    following = ctx.layer(user)
    if following is not None and following.input is node:
        reason = _pair_refusal(layer, following)
        if reason is not None:
            return None, (), (user, reason)
        return following, tuple(activations), None
    if user.op == "output":
        return None, (), None
    if user.target in _SUMS:
        return None, (), (user, "its output goes into a sum (a residual): its channels must stay")
    if user.op in ("call_function", "call_method", "call_module") and user.args[:1] == (node,):
        reason = (
            f"{_op_name(user, ctx)} after it is not positively homogeneous per channel "
            "(φ(x/s) ≠ φ(x)/s) nor a layer"
        )
        return None, (), (user, reason)
    return None, (), (user, f"{_op_name(user, ctx)} reads its channels: not a layer")


def _pair_refusal(first: Layer, second: Layer) -> str | None:
    """Why ``first``'s output channels cannot be traded with ``second``'s input channels."""
    if first.transposed or second.transposed:
        return "a transposed conv: not equalized"
    if first.kind != second.kind or first.ndim != second.ndim:
        return f"a {first.describe()} feeds a {second.describe()}: different channel axes"
    if first.out_channels != second.in_channels:
        return "the layers disagree on the number of channels"
    geo = second.geometry
    if geo is not None and geo.padding_mode == "value" and geo.reads_padding:
        return f"the {second.describe()} pads with a value, which would have to scale too"
    return None


def _previous(layer: Layer, ctx: RewriteContext) -> Layer | None:
    """The layer whose channels ``layer`` reads, if :func:`_follow` leads from it to ``layer``."""
    x = layer.input
    for _ in range(len(ctx.graph.nodes)):
        if not (homogeneous(x, ctx) and x.args and isinstance(x.args[0], Node)):
            break
        x = x.args[0]
    before = ctx.layer(x)
    if before is None or x.meta.get(EQUALIZED):
        return None
    following, _, _ = _follow(before, ctx)
    return before if following is not None and following.node is layer.node else None


def _reading(old: Any, new: Node) -> Callable[[Node], Node]:
    """The argument map of a node copy that reads ``new`` where the original read ``old``."""
    return lambda n: new if n is old else n


class EqualizeLayers(Rule[Chain]):
    """``l₂(φ(l₁(x))) -> l₂'(φ(l₁'(x)))``: output channel ``c`` of ``l₁`` ÷ ``s_c``, input
    channel ``c`` of ``l₂`` × ``s_c``, along whole chains."""

    name = "equalize-layers"
    formula = "l₂(φ(l₁(x))) -> l₂'(φ(l₁'(x)))"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[Chain]:
        if not ctx.options.equalize or node.meta.get(EQUALIZED):
            return
        last = ctx.layer(node)
        if last is None:
            return
        following, _, stop = _follow(last, ctx)
        if following is not None:
            return  # not the end of its chain: matched there
        if stop is None and _previous(last, ctx) is None:
            return  # a layer alone, feeding the output: nothing to say
        layers = [last]
        activations: list[tuple[Node, ...]] = []
        while len(layers) <= len(ctx.graph.nodes):
            before = _previous(layers[0], ctx)
            if before is None:
                break
            layers.insert(0, before)
            activations.insert(0, _follow(before, ctx)[1])
        excluded = [stop] if stop is not None and len(layers) > 1 else []
        yield Chain(
            node,
            layers=layers,
            activations=activations,
            stop=None if stop is None else stop[1],
            excluded=excluded,
        )

    def check(self, match: Chain, ctx: RewriteContext) -> str | None:
        if len(match.layers) < 2:
            return match.stop or "no layer after it to trade channel ranges with"
        for layer in match.layers:
            if layer.weight.live or (layer.bias is not None and layer.bias.live):
                return "its weights may change between calls (live weights): not equalized"
        magnitudes = [kernels.channel_magnitudes(evaluate(x.weight)) for x in match.layers]
        groups = [x.groups for x in match.layers]
        scales = kernels.equalization_scales(magnitudes, groups)
        if all(float(s.log().abs().max()) <= 1e-3 for s in scales):
            return "its channel ranges are already balanced"
        match.scales = scales
        return None

    def rewrite(self, match: Chain, ctx: RewriteContext) -> Node:
        value = match.layers[0].input
        last = len(match.layers) - 1
        for k, layer in enumerate(match.layers):
            weight, bias = layer.weight, layer.bias
            if k < last:
                inverse = const(1.0 / match.scales[k])
                weight = apply(kernels.scale_kernel, weight, inverse)
                if bias is not None:
                    bias = apply(kernels.affine_bias, bias, inverse, None, layer.out_channels)
            if k > 0:
                scale = const(match.scales[k - 1])
                weight = apply(kernels.scale_input_channels, weight, scale, groups=layer.groups)
            value = ctx.fused(
                value,
                kind=layer.kind,
                weight=weight,
                bias=bias,
                geometry=layer.geometry,
                like=layer,
                sources=layer.sources,
                name=layer.name,
            )
            value.meta[EQUALIZED] = True
            match.redirects[layer.node] = value  # (shape reads of the old layer: timm's asserts)
            for activation in match.activations[k] if k < last else ():
                value = ctx.graph.node_copy(activation, _reading(activation.args[0], value))
                match.redirects[activation] = value
        return value

    def describe(self, match: Chain) -> str:
        return " -> ".join(layer.describe() for layer in match.layers) + " (equalized)"
