"""Every op fxfuse rewrites, read as a linear (affine) map, whatever dialect it came in.

- :class:`Layer`: ``node = W ⋆ pad(input) + b`` — a conv, transposed conv, linear layer, average
  pooling (a depthwise kernel of ``1/kᵈ``), or a layer fxfuse built itself; pads and crops
  between the layer and its input are part of its geometry (:mod:`fxfuse.geometry`).
- :class:`Affine`: ``node = a · input + t`` per channel (dim 1) — an eval-mode batch norm, in any
  dialect; training-mode ones are views too, so a rule can say why it declines them.
- :class:`Combination`: ``node = Σ cᵢ · termᵢ + constants`` through ``+ − *`` by constants and
  ``torch.add(alpha=)``, broadcasting per channel; identity and scale terms included.

Views read the graph; they never change it. Weights are :class:`~fxfuse.weights.Weight`
expressions of the graph's constants. A view that recognizes its op but cannot read it (a conv
with forward hooks, weights computed from an activation, a stride computed at run time) returns
a :class:`Refusal` saying why, so the rule that wanted it reports the true reason.

New kinds of layer are added with :func:`register_layer` (see ``passes/avg_pool.py``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from fxfuse import kernels
from fxfuse.dialects import (
    BATCH_NORM_FUNCTIONS,
    CONV_FUNCTIONS,
    CONV_TRANSPOSE_FUNCTIONS,
    LINEAR_FUNCTIONS,
    TUPLE_BATCH_NORMS,
    Resolver,
    aten,
    bind,
    has_hooks,
    inherits_forward,
    module_path_of,
    target_name,
)
from fxfuse.effects import register_pure, value_users
from fxfuse.geometry import Geometry, Padding, as_ints, conv_padding, pad_input, peel_padding
from fxfuse.weights import Const, Weight, apply, const, evaluate, is_one, mul, reciprocal

__all__ = [
    "Affine",
    "Chain",
    "Combination",
    "FusedLayer",
    "Layer",
    "Refusal",
    "as_affine",
    "as_chain",
    "as_combination",
    "as_layer",
    "channels_of",
    "fused_layer",
    "one_pad_value",
    "per_channel",
    "register_layer",
]


@dataclass(frozen=True)
class Refusal:
    """``node`` is an op of the kind asked for, but fxfuse cannot read it as a map: ``reason``."""

    node: Node
    reason: str


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A conv, transposed conv or linear layer: ``node = W ⋆ pad(input) + b`` with ``geometry``.

    ``input`` is the value actually read, after any pads/crops folded into
    ``geometry.padding``. ``dtype`` is the layer's output dtype; ``barrier``: where peeling
    pads/crops stopped short, the value under the op that did not fold, and why."""

    node: Node
    input: Node
    weight: Weight
    bias: Weight | None
    geometry: Geometry | None  # None for a linear layer
    kind: str  # "conv" | "conv_transpose" | "linear"
    dtype: torch.dtype
    device: torch.device
    sources: tuple[str, ...]
    requires_grad: bool
    name: str  # a module path for the layer (a hint for naming what replaces it)
    barrier: tuple[Node, str] | None = None
    label: str = ""  # what to call it ("3x3 avg-pool"); default: from its geometry

    @property
    def transposed(self) -> bool:
        return self.kind == "conv_transpose"

    @property
    def groups(self) -> int:
        return 1 if self.geometry is None else self.geometry.groups

    @property
    def ndim(self) -> int:
        return 0 if self.geometry is None else self.geometry.ndim

    @property
    def out_channels(self) -> int:
        w = self.weight.shape
        return int(w[1]) * self.groups if self.transposed else int(w[0])

    @property
    def in_channels(self) -> int:
        w = self.weight.shape
        return int(w[0]) if self.transposed else int(w[1]) * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def pointwise(self) -> bool:
        """A map of each position on its own: a linear layer, or a 1×1 conv with stride 1 that
        reads no padding."""
        geo = self.geometry
        if geo is None:
            return True
        return (
            not self.transposed
            and all(k == 1 for k in self.kernel_size)
            and all(s == 1 for s in geo.stride)
            and not any(a or b for a, b in geo.padding)
        )

    @property
    def macs(self) -> int:
        """Multiply-adds per output position (the cost rules compare)."""
        return self.out_channels * self.in_channels // self.groups * math.prod(self.kernel_size)

    def describe(self) -> str:
        """``3x3 conv``, ``1x1 conv s2 g4``, ``linear``: what a person would call it."""
        if self.label:
            return self.label
        if self.geometry is None:
            return "linear"
        geo = self.geometry
        text = "x".join(map(str, self.kernel_size)) + (
            " conv_transpose" if self.transposed else " conv"
        )
        for label, values in (("s", geo.stride), ("d", geo.dilation)):
            if any(v != 1 for v in values):
                text += f" {label}" + "x".join(
                    map(str, sorted(set(values)) if len(set(values)) == 1 else values)
                )
        if geo.groups != 1:
            text += f" g{geo.groups}"
        return text


@dataclass(frozen=True, eq=False)
class FusedLayer:
    """A conv or linear layer fxfuse has built; its weights are expressions, computed exactly
    (float64) at emission — or on every call, for live weights.

    It sits in the graph as ``fused_layer(x, layer)`` while rules run, so a later rule reads
    the exact weights rather than a rounded copy."""

    kind: str  # "conv" | "conv_transpose" | "linear"
    weight: Weight
    bias: Weight | None
    geometry: Geometry | None
    dtype: torch.dtype
    device: torch.device
    sources: tuple[str, ...]  # module paths of every op folded into it
    name: str  # where emission would like to put the module (a dotted path)
    requires_grad: bool = False

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.weight.shape)
        return f"FusedLayer({self.kind} {shape} -> {self.name})"


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSES = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register_pure
def fused_layer(x: Tensor, layer: FusedLayer) -> Tensor:
    """Reference semantics of a :class:`FusedLayer` (used only before emission)."""
    weight = evaluate(layer.weight).to(device=layer.device, dtype=layer.dtype)
    bias = None
    if layer.bias is not None:
        bias = evaluate(layer.bias).to(device=layer.device, dtype=layer.dtype)
    return run_layer(x, weight, bias, layer.kind, layer.geometry)


def run_layer(
    x: Tensor, weight: Tensor, bias: Tensor | None, kind: str, geo: Geometry | None
) -> Tensor:
    """``weight ⋆ pad(x) + bias`` for a layer of ``kind`` and ``geo``metry."""
    if kind == "linear" or geo is None:
        return F.linear(x, weight, bias)
    if kind == "conv_transpose":
        padding = tuple(left for left, _ in geo.padding)
        return _CONV_TRANSPOSES[geo.ndim](
            x, weight, bias, geo.stride, padding, geo.output_padding, geo.groups, geo.dilation
        )
    value = None if geo.pad_value is None else evaluate(geo.pad_value)
    x = pad_input(x, geo.padding, geo.padding_mode, value)
    return _CONVS[geo.ndim](x, weight, bias, geo.stride, 0, geo.dilation, geo.groups)


Recognizer = Callable[[Node, Resolver], "Layer | Refusal | None"]
_RECOGNIZERS: list[Recognizer] = []


def register_layer(recognizer: Recognizer) -> Recognizer:
    """Teach every rule a new kind of layer: ``recognizer(node, ctx)`` returns a
    :class:`Layer`, a :class:`Refusal`, or ``None`` when ``node`` is not its kind of op.
    Usable as a decorator; later registrations are asked first."""
    _RECOGNIZERS.insert(0, recognizer)
    return recognizer


def as_layer(node: Node, ctx: Resolver) -> Layer | Refusal | None:
    """View ``node`` as a layer with constant weights."""
    if node.op not in ("call_module", "call_function"):
        return None
    for recognizer in _RECOGNIZERS:
        found = recognizer(node, ctx)
        if found is not None:
            return found
    return None


def _float_weight(weight: Any) -> str | None:
    """Why ``weight`` cannot be folded, or ``None``."""
    if not isinstance(weight, Tensor):
        return "it has no weight tensor"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "its weights are not initialized (a lazy module)"
    if weight.device.type == "meta":
        return "its weights are on the meta device"
    if not weight.is_floating_point():
        return f"its weights are {weight.dtype}, not floating point"
    return None


def _peeled(
    node: Node, x: Node, pairs: tuple[tuple[int, int], ...], mode: str, ctx: Resolver
) -> tuple[Node, Padding, tuple[Node, str] | None]:
    return peel_padding(x, Padding(pairs, mode), ctx, reader=node)


@register_layer
def _fused(node: Node, ctx: Resolver) -> Layer | None:
    if node.op != "call_function" or node.target is not fused_layer:
        return None
    x, layer = node.args
    assert isinstance(x, Node) and isinstance(layer, FusedLayer)
    geo, barrier = layer.geometry, None
    if layer.kind == "conv" and geo is not None and geo.padding_mode != "value":
        # its input may be a pad that did not fold before
        x, padding, barrier = _peeled(node, x, geo.padding, geo.padding_mode, ctx)
        geo = replace(
            geo, padding=padding.pairs, padding_mode=padding.mode, pad_value=padding.value
        )
    return Layer(
        node,
        x,
        layer.weight,
        layer.bias,
        geo,
        layer.kind,
        layer.dtype,
        layer.device,
        layer.sources,
        layer.requires_grad,
        layer.name,
        barrier,
    )


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class _ModuleLayer:
    """What a layer module's view takes from the module alone (computed once per module):
    a refusal to give before looking at the call (``early``) or after (``late``), or the
    layer's weights and geometry."""

    early: str | None = None
    late: str | None = None
    weight: Weight | None = None
    bias: Weight | None = None
    kind: str = ""
    common: dict[str, Any] = field(default_factory=dict)
    geometry: Geometry | None = None  # (a transposed conv's; a conv's depends on its input)
    padding: tuple[tuple[int, int], ...] = ()


def _module_layer_of(path: str, module: nn.Module, ctx: Resolver) -> _ModuleLayer:
    kind_name = type(module).__name__
    if has_hooks(module):
        return _ModuleLayer(early=f"{path} ({kind_name}) runs forward hooks: left alone")
    methods = ("_conv_forward",) if isinstance(module, _CONV_MODULES) else ()
    if not inherits_forward(module, *methods):
        return _ModuleLayer(early=f"{path} ({kind_name}) redefines forward: not a plain layer")
    why = _float_weight(module.weight)
    if why is not None:
        return _ModuleLayer(late=f"{path}: {why}")
    weight = ctx.module_weight(path, "weight")
    bias = None if module.bias is None else ctx.module_weight(path, "bias")
    if weight is None or (module.bias is not None and bias is None):
        return _ModuleLayer(late=f"{path}'s parameters are changed in place during the forward")
    common = dict(
        dtype=module.weight.dtype,
        device=module.weight.device,
        sources=(path,),
        requires_grad=module.weight.requires_grad,
        name=path,
    )
    if isinstance(module, nn.Linear):
        return _ModuleLayer(weight=weight, bias=bias, kind="linear", common=common)
    n = len(module.kernel_size)
    if isinstance(module, _ConvTransposeNd):
        if module.padding_mode != "zeros":
            return _ModuleLayer(late=f"{path}: transposed conv with {module.padding_mode} padding")
        geo = _transposed_geometry(
            module.stride, module.padding, module.output_padding, module.dilation, module.groups, n
        )
        if isinstance(geo, str):
            return _ModuleLayer(late=f"{path}: {geo}")
        return _ModuleLayer(
            weight=weight, bias=bias, kind="conv_transpose", common=common, geometry=geo
        )
    pairs = conv_padding(module.padding, module.kernel_size, module.dilation)
    return _ModuleLayer(weight=weight, bias=bias, kind="conv", common=common, padding=pairs)


@register_layer
def _module_layer(node: Node, ctx: Resolver) -> Layer | Refusal | None:
    if node.op != "call_module":
        return None
    path = str(node.target)
    module = ctx.module(path)
    if not isinstance(module, (nn.Linear, _ConvNd)):
        return None
    found = ctx.derived(("module-layer", path), lambda: _module_layer_of(path, module, ctx))
    if found.early is not None:
        return Refusal(node, found.early)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
        return Refusal(node, f"{path} is called with extra arguments")
    if found.late is not None:
        return Refusal(node, found.late)
    x, weight, bias, common = node.args[0], found.weight, found.bias, found.common
    assert weight is not None
    if found.kind != "conv":
        return Layer(node, x, weight, bias, found.geometry, found.kind, **common)
    assert isinstance(module, _ConvNd)
    source, padding, barrier = _peeled(node, x, found.padding, module.padding_mode, ctx)
    geo = Geometry(
        tuple(module.stride),
        padding.pairs,
        tuple(module.dilation),
        module.groups,
        padding.mode,
        pad_value=padding.value,
    )
    return Layer(node, source, weight, bias, geo, "conv", barrier=barrier, **common)


def _transposed_geometry(
    stride: Any, padding: Any, output_padding: Any, dilation: Any, groups: Any, n: int
) -> Geometry | str:
    if isinstance(padding, str) or not isinstance(groups, int):
        return "padding or groups computed at run time"
    try:
        return Geometry(
            as_ints(stride, n),
            tuple((p, p) for p in as_ints(padding, n)),
            as_ints(dilation, n),
            groups,
            "zeros",
            True,
            as_ints(output_padding, n),
        )
    except TypeError as error:
        return f"geometry computed at run time ({error})"


@register_layer
def _function_layer(node: Node, ctx: Resolver) -> Layer | Refusal | None:
    """``F.conv2d``/``torch.conv2d``/``aten.conv2d``/``aten.convolution``/``F.linear``…"""
    if node.op != "call_function":
        return None
    fn = node.target
    if fn is aten.convolution.default:
        args = bind(fn, node)
        if args is None or not isinstance(args["transposed"], bool):
            return Refusal(node, f"{node.name}: its arguments do not bind")
        n = len(args["stride"])
        fn = (_CONV_TRANSPOSES if args["transposed"] else _CONVS).get(n)
        if fn is None:
            return Refusal(node, f"{node.name}: a {n}-d convolution")
    elif fn in CONV_FUNCTIONS or fn in CONV_TRANSPOSE_FUNCTIONS or fn in LINEAR_FUNCTIONS:
        args = bind(fn, node)  # type: ignore[arg-type]
        if args is None:
            return Refusal(node, f"{node.name}: its arguments do not bind")
    else:
        return None
    if not isinstance(args["input"], Node):
        return None
    weight = ctx.weight(args["weight"])
    if weight is None:
        return Refusal(node, f"{node.name}'s weight is computed from its input or changes")
    raw = _weight_tensor(weight)
    why = _float_weight(raw)
    if why is not None:
        return Refusal(node, f"{node.name}: {why}")
    bias = None if args["bias"] is None else ctx.weight(args["bias"])
    if args["bias"] is not None and bias is None:
        return Refusal(node, f"{node.name}'s bias is computed from its input or changes")
    nodes = [a for a in (args["weight"], args["bias"]) if isinstance(a, Node)]
    sources = tuple(dict.fromkeys(module_path_of(n) for n in [node, *nodes]))
    path = module_path_of(node)
    base = str(getattr(fn, "__name__", "conv")).split(".")[0]
    common = dict(
        dtype=weight.dtype,
        device=weight.device,
        sources=sources,
        requires_grad=raw.requires_grad if raw is not None else False,
        name=f"{path}.{base}" if path else base,
    )
    x = args["input"]
    if fn in LINEAR_FUNCTIONS:
        return Layer(node, x, weight, bias, None, "linear", **common)  # type: ignore[arg-type]
    if fn in CONV_TRANSPOSE_FUNCTIONS or fn in _CONV_TRANSPOSES.values():
        n = weight.dim() - 2
        geo = _transposed_geometry(
            args["stride"],
            args["padding"],
            args["output_padding"],
            args["dilation"],
            args["groups"],
            n,
        )
        if isinstance(geo, str):
            return Refusal(node, f"{node.name}: {geo}")
        return Layer(node, x, weight, bias, geo, "conv_transpose", **common)  # type: ignore[arg-type]
    n = weight.dim() - 2
    if not isinstance(args["groups"], int) or isinstance(args["groups"], bool):
        return Refusal(node, f"{node.name}: groups computed at run time")
    try:  # stride, padding and dilation must be static (a traced int is a node)
        dilation = as_ints(args["dilation"], n)
        pairs = conv_padding(args["padding"], weight.shape[2:], dilation)
        stride = as_ints(args["stride"], n)
    except TypeError as error:
        return Refusal(node, f"{node.name}: geometry computed at run time ({error})")
    source, padding, barrier = _peeled(node, x, pairs, "zeros", ctx)
    geo = Geometry(
        stride, padding.pairs, dilation, args["groups"], padding.mode, pad_value=padding.value
    )
    return Layer(node, source, weight, bias, geo, "conv", barrier=barrier, **common)  # type: ignore[arg-type]


def _weight_tensor(weight: Weight) -> Tensor | None:
    """A tensor standing for ``weight`` when checking its kind (dtype, device, grad)."""
    from fxfuse.weights import Leaf

    if isinstance(weight, Leaf | Const):
        return weight.tensor
    return torch.empty(0, dtype=weight.dtype, device=weight.device)


# --------------------------------------------------------------------------------------------
# Batch norm: a per-channel affine map
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """``node = a · input + t`` per channel (dim 1): a batch norm with running statistics.

    ``uses_batch_stats``: training mode or no running statistics (not a fixed map: rules
    decline it). ``ranks``: the input ranks the op accepts (``BatchNorm2d``: 4), ``None`` for
    any."""

    node: Node
    input: Node
    scale: Weight | None
    shift: Weight | None
    channels: int
    uses_batch_stats: bool
    ranks: frozenset[int] | None
    sources: tuple[str, ...]
    label: str = "batch norm"

    def describe(self) -> str:
        return self.label

    @property
    def fixed(self) -> str | None:
        """Why it is not a fixed affine map, or ``None`` when it is."""
        if not self.uses_batch_stats:
            return None
        return (
            "batch norm uses batch statistics (training mode or track_running_stats=False), "
            "so it is not a fixed affine map; call .eval() on a batch norm that tracks running "
            "statistics"
        )


_BN_RANKS = {
    nn.BatchNorm1d: frozenset({2, 3}),
    nn.BatchNorm2d: frozenset({4}),
    nn.BatchNorm3d: frozenset({5}),
}


def as_affine(node: Node, ctx: Resolver) -> Affine | Refusal | None:
    """View ``node`` as a batch norm (an affine map when it uses running statistics)."""
    if node.op == "call_module":
        return _module_batch_norm(node, ctx)
    fn, value = node.target, node
    if (
        node.op == "call_function"
        and fn is operator.getitem
        and node.args[1] == 0
        and isinstance(node.args[0], Node)
        and node.args[0].target in TUPLE_BATCH_NORMS
    ):
        node = node.args[0]  # aten's batch norms return (output, mean, invstd): view output
        fn = node.target
    elif fn in TUPLE_BATCH_NORMS:
        return None  # the tuple itself is not the normalized value; its [0] is
    if node.op != "call_function" or fn not in BATCH_NORM_FUNCTIONS:
        return None
    args = bind(fn, node)  # type: ignore[arg-type]
    if args is None or not isinstance(args["input"], Node):
        return None
    training = args.get("training", False)  # _native_batch_norm_legit_no_training: False
    eps = ctx.number(args["eps"])
    if eps is None or not isinstance(training, bool):
        return Refusal(value, f"{value.name}: eps or training flag computed at run time")
    weights = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        arg = args[name]
        weights[name] = None if arg is None else ctx.weight(arg)
        if arg is not None and weights[name] is None:
            return Refusal(value, f"{value.name}'s {name} is computed at run time or changes")
    nodes = [a for a in args.values() if isinstance(a, Node) and a is not args["input"]]
    sources = tuple(dict.fromkeys(module_path_of(n) for n in [node, *nodes]))
    return _affine_of_batch_norm(value, args["input"], weights, eps, training, None, sources, ctx)


def _module_batch_norm(node: Node, ctx: Resolver) -> Affine | Refusal | None:
    module = ctx.module(str(node.target))
    if not isinstance(module, _BatchNorm):
        return None
    path = str(node.target)
    if has_hooks(module):
        return Refusal(node, f"{path} ({type(module).__name__}) runs forward hooks: left alone")
    if not (inherits_forward(module) or isinstance(module, nn.SyncBatchNorm)):
        return Refusal(node, f"{path} ({type(module).__name__}) redefines forward")
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
        return Refusal(node, f"{path} is called with extra arguments")
    weights = {
        name: None if getattr(module, name) is None else ctx.module_weight(path, name)
        for name in ("running_mean", "running_var", "weight", "bias")
    }
    ranks = next((r for cls, r in _BN_RANKS.items() if isinstance(module, cls)), None)
    return _affine_of_batch_norm(
        node, node.args[0], weights, float(module.eps), module.training, ranks, (path,), ctx
    )


def _affine_of_batch_norm(
    node: Node,
    x: Node,
    weights: dict[str, Weight | None],
    eps: float,
    training: bool,
    ranks: frozenset[int] | None,
    sources: tuple[str, ...],
    ctx: Resolver,
) -> Affine:
    mean, var = weights["running_mean"], weights["running_var"]
    channels = next(
        (w.numel() for w in (mean, weights["weight"], weights["bias"]) if w is not None), -1
    )
    if mean is None or var is None:
        return Affine(node, x, None, None, channels, True, ranks, sources)
    # (a training-mode one uses batch statistics; its running ones are read all the same, so
    # that a faulty rule folding it anyway makes a model the validator can tell apart)
    weight, bias = weights["weight"], weights["bias"]

    def maps() -> tuple[Weight, Weight]:
        scale = apply(kernels.bn_scale, var, weight, eps)
        return scale, apply(kernels.bn_shift, mean, scale, bias)

    scale, shift = ctx.derived(("batch-norm", mean, var, weight, bias, eps), maps)
    return Affine(node, x, scale, shift, channels, training, ranks, sources)


# --------------------------------------------------------------------------------------------
# Linear combinations: sums, differences and constant scales
# --------------------------------------------------------------------------------------------

_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add.Scalar}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub.Scalar}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIV = {operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div.Scalar}
_NEG = {operator.neg, torch.neg, aten.neg.default}
_IN_PLACE = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    aten.add_.Tensor,
    aten.add_.Scalar,
    aten.sub_.Tensor,
    aten.sub_.Scalar,
    aten.mul_.Tensor,
    aten.mul_.Scalar,
    aten.div_.Tensor,
    aten.div_.Scalar,
}
_ADD |= {aten.add_.Tensor, aten.add_.Scalar}
_SUB |= {aten.sub_.Tensor, aten.sub_.Scalar}
_MUL |= {aten.mul_.Tensor, aten.mul_.Scalar}
_DIV |= {aten.div_.Tensor, aten.div_.Scalar}
_METHODS = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "neg": torch.neg,
    # in place: ``a.add_(b)`` is ``a += b``
    "add_": operator.iadd,
    "sub_": operator.isub,
    "mul_": operator.imul,
    "div_": operator.itruediv,
}
_ONE = const(1.0)
_MINUS_ONE = const(-1.0)


@dataclass
class Combination:
    """``root = anchor + Σ coefficient_i · term_i + Σ constant_j``, flattened through
    single-use nodes.

    Coefficients are weights that broadcast against the terms (0-d for a scalar); constants
    are weights added to the sum. ``interior`` are the add/sub/mul nodes that disappear with
    the root.

    ``anchor``: when the root is an in-place ``a += …`` (or ``a -= …``) whose ``a`` others can
    see (a view of another tensor, a graph input, a value read again later), ``a`` must still
    be updated in place: it is not a term, and a rewrite of the root must end in ``a += …``.
    An in-place op on a value nobody else sees is just a sum."""

    root: Node
    terms: list[tuple[Weight, Node]] = field(default_factory=list)
    constants: list[Weight] = field(default_factory=list)
    interior: list[Node] = field(default_factory=list)
    anchor: Node | None = None
    # (dtype, rank) of the constant tensors it scales or adds by: a float64 scale on a float32
    # value makes the result float64, unless the scale is 0-d (PyTorch's type promotion)
    constant_dtypes: set[tuple[torch.dtype, int]] = field(default_factory=set)

    def promoting(self, dtype: torch.dtype) -> list[torch.dtype]:
        """The constants' dtypes that make a ``dtype`` sum another dtype (torch's rules: a 0-d
        tensor of the same category does not promote a dimensioned one)."""
        value = torch.empty((1,), dtype=dtype, device="meta")
        wider = []
        for d, rank in sorted(self.constant_dtypes, key=str):
            other = torch.empty((1,) * max(rank, 0), dtype=d, device="meta")
            if torch.result_type(value, other) != dtype:
                wider.append(d)
        return wider

    def promotion(self, dtype: torch.dtype) -> str | None:
        """Why the sum's dtype is not ``dtype`` (a constant promotes it), or ``None``."""
        wider = self.promoting(dtype)
        if not wider:
            return None
        names = ", ".join(str(d) for d in wider)
        return (
            f"a {names} constant makes the {dtype} result {wider[0]}; a fused layer would "
            f"keep {dtype}"
        )

    @property
    def max_rank(self) -> int:
        """The largest rank of its coefficients and constants: the sum has at least it."""
        return max([w.dim() for w, _ in self.terms] + [w.dim() for w in self.constants] + [0])


def per_channel(weight: Weight, channels: int, from_end: int) -> bool:
    """Whether ``weight`` broadcasts as one value per channel (or one for all) against a value
    whose channel axis is ``from_end`` dims from its end (``ndim + 1`` for a conv's output,
    1 for a linear layer's features): ``(C,)``, ``(C, 1, 1)``, ``(1, C, 1, 1)``…"""
    if weight.numel() == 1:
        return True
    shape = list(weight.shape)
    if len(shape) < from_end or weight.numel() != channels:
        return False
    return shape[len(shape) - from_end] == channels


def _linear_fn(node: Node) -> Any:
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op == "call_function":
        return node.target
    return None


def _in_place_target(node: Node) -> Node | None:
    """The value an in-place ``a += b`` (``a.add_(b)``, ``a *= c`` …) updates, else ``None``."""
    if _linear_fn(node) in _IN_PLACE and node.args and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def _scale_shape(w: Weight) -> bool:
    """A scalar, or ``(…1, C, 1, …, 1)``: something that can scale channels."""
    dims = list(w.shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    return all(s == 1 for s in dims[1:])


def _linear_operands(node: Node, ctx: Resolver) -> list[tuple[Weight, Any]] | None:
    """``node`` as ``Σ factor · operand`` if it is an add/sub/neg or a scale by a constant."""
    fn = _linear_fn(node)
    if fn is None:
        return None
    kwargs = node.kwargs
    if fn in _ADD or fn in _SUB:
        if len(node.args) != 2 or set(kwargs) - {"alpha"}:
            return None
        alpha = ctx.number(kwargs.get("alpha", 1))
        if alpha is None:
            return None
        a, b = node.args
        factor = const(-alpha if fn in _SUB else alpha)
        return _operands([(_ONE, a), (factor, b)], ctx)
    if fn in _NEG:
        return (
            _operands([(_MINUS_ONE, node.args[0])], ctx)
            if len(node.args) == 1 and not kwargs
            else None
        )
    if fn in _MUL or fn in _DIV:
        if len(node.args) != 2 or set(kwargs) - {"rounding_mode"} or kwargs.get("rounding_mode"):
            return None
        a, b = node.args
        wa = None if isinstance(a, Node) and ctx.weight(a) is None else ctx.weight(a)
        wb = None if isinstance(b, Node) and ctx.weight(b) is None else ctx.weight(b)
        if fn in _DIV:
            if wb is None or not isinstance(a, Node) or wa is not None or not _scale_shape(wb):
                return None
            if wb.live or bool((evaluate(wb) == 0).any()):
                return None  # x / 0 is inf or nan, which no folded scale reproduces
            return [(reciprocal(wb), a)]
        if wb is not None and isinstance(a, Node) and wa is None and _scale_shape(wb):
            return [(wb, a)]
        if wa is not None and isinstance(b, Node) and wb is None and _scale_shape(wa):
            if fn in _IN_PLACE:
                return None  # ``c *= x`` updates the constant
            return [(wa, b)]
    return None


def _operands(pairs: list[tuple[Weight, Any]], ctx: Resolver) -> list[tuple[Weight, Any]] | None:
    """``pairs`` if every operand is a node or a number (``x - True`` is not a sum we read)."""
    ok = all(isinstance(op, Node) or ctx.number(op) is not None for _, op in pairs)
    return pairs if ok else None


def _combination_operands(
    node: Node, ctx: Resolver, *, root: bool
) -> tuple[list[tuple[Weight, Any]], Node | None] | None:
    """``node``'s operands as a linear op, and the anchor an in-place root must keep updating.

    An in-place op on a value nobody else sees (:meth:`~fxfuse.effects.Effects.private`) is a
    sum like any other; on a value others see, only the root of a combination may be one, and
    only ``a += …``/``a -= …`` (whose ``a`` stays, updated in place, see :class:`Combination`)."""
    operands = _linear_operands(node, ctx)
    if operands is None:
        return None
    target = _in_place_target(node)
    if target is None or ctx.effects.private(target, node):
        return operands, None
    if not root or _linear_fn(node) not in _ADD | _SUB:
        return None
    first, *rest = operands
    if first[1] is not target or not is_one(first[0]):
        return None
    return rest, target


def _absorbs(user: Node, node: Node, ctx: Resolver) -> bool:
    found = _combination_operands(user, ctx, root=False)
    return found is not None and any(op is node for _, op in found[0])


def as_combination(node: Node, ctx: Resolver) -> Combination | None:
    """Flatten the linear combination rooted at ``node``; ``None`` if ``node`` is not the root.

    A node inside a bigger combination (its only user absorbs it) is not a root: the
    combination is matched once, at its top."""
    found = _combination_operands(node, ctx, root=True)
    if found is None:
        return None
    users = value_users(node)
    if len(users) == 1 and _absorbs(users[0], node, ctx):
        return None
    operands, anchor = found
    combo = Combination(node, anchor=anchor)
    _flatten(node, _ONE, combo, ctx, operands)
    return combo


def _flatten(
    node: Node,
    coefficient: Weight,
    combo: Combination,
    ctx: Resolver,
    operands: list[tuple[Weight, Any]] | None = None,
) -> None:
    if operands is None and len(value_users(node)) == 1:
        found = _combination_operands(node, ctx, root=False)
        operands = None if found is None else found[0]
    if operands is None:
        combo.terms.append((coefficient, node))
        return
    combo.interior.append(node)
    for n in node.all_input_nodes:
        w = ctx.weight(n)
        if w is not None:
            combo.constant_dtypes.add((w.dtype, w.dim()))
    for factor, operand in operands:
        c = mul(coefficient, factor)
        w = ctx.weight(operand)
        if w is not None:
            combo.constants.append(mul(c, w))
        elif isinstance(operand, Node):
            _flatten(operand, c, combo, ctx)
        else:
            raise TypeError(f"unexpected operand {operand!r} in {node.format_node()}")


# --------------------------------------------------------------------------------------------
# Chains: two layers in a row, read as one
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """``outer(pad(inner(x)))`` read as one layer ``layer`` on ``x``; ``macs``: what the two
    cost as they are, per output position."""

    layer: Layer
    outer: Layer
    inner: Layer
    macs: int


def _only_path(source: Node, target: Node) -> bool:
    """Whether ``source``'s value reaches nobody but ``target`` (through single-use pads)."""
    node = source
    for _ in range(16):
        if node is target:
            return True
        users = [u for u in value_users(node) if not _writes_into(u, node)]
        if len(users) > 1 and node.target in _PAD_FUNCTIONS_AND_STRIPS:
            return _reaches_only(node, target)
        if len(users) != 1:
            return False
        node = users[0]
    return False


_STRIP_OPS = frozenset(
    {torch.ops.aten.slice.Tensor, torch.ops.aten.slice_scatter.default, torch.ops.aten.copy.default}
)
_PAD_FUNCTIONS_AND_STRIPS = _STRIP_OPS | {
    F.pad,
    torch.ops.aten.pad.default,
    torch.ops.aten.constant_pad_nd.default,
}


def _reaches_only(pad: Node, target: Node) -> bool:
    """Whether a padded value reaches nobody but ``target`` through the slices, copies and
    scatters export writes a border with (a functional graph: each of them only makes values
    that flow on, towards ``target``)."""
    seen: set[Node] = set()
    frontier = [pad]
    while frontier:
        node = frontier.pop()
        if node is target or node in seen:
            continue
        seen.add(node)
        users = value_users(node)
        if len(seen) > 256 or not users:
            return False
        if node is not pad and node.target not in _STRIP_OPS:
            return False
        frontier.extend(users)
    return True


def _writes_into(user: Node, node: Node) -> bool:
    """Whether ``user`` only writes into ``node`` and is read by nobody: ``node[i] = v``
    (symbolic tracing), ``copy_(aten.slice(node, …), v)`` (torch.export's training IR), or
    ``copy(aten.slice(node, …), v)`` (functionalized: the slice gives only its shape)."""
    if user.target is operator.setitem:
        return user.args[0] is node and not user.users
    if user.target is not torch.ops.aten.slice.Tensor or user.args[0] is not node:
        return False
    if len(user.users) != 1:
        return False
    (copy,) = user.users
    if copy.target is torch.ops.aten.copy_.default:
        return copy.args[0] is user and not copy.users
    # the functional form: copy(strip, v) takes only the strip's shape (its values are v's)
    return copy.target is torch.ops.aten.copy.default and copy.args[0] is user


def as_chain(node: Node, ctx: Resolver) -> Chain | Refusal | None:
    """``node`` as a layer reading another layer's output (through pads), composed into one
    layer where that is exact: the inner layer pointwise (a 1×1 conv or a linear layer), and
    what the outer layer's padding holds its image of zero.

        W[o, i, …] = Σ_m W₂[o, m, …] · W₁[m, i];   b = b₂ + Σ_m (Σ_taps W₂[o, m, …]) · b₁[m]

    ``None`` when ``node`` is not a layer on a layer."""
    outer = as_layer(node, ctx)
    if not isinstance(outer, Layer):
        return None
    inner = as_layer(outer.input, ctx)
    if not isinstance(inner, Layer):
        return None
    if not _only_path(inner.node, outer.node):
        return Refusal(node, f"the {inner.describe()} output also feeds another op")
    if outer.transposed or inner.transposed:
        return Refusal(node, "transposed convs are not composed")
    if (outer.geometry is None) != (inner.geometry is None):
        return Refusal(node, "a linear layer and a conv are not composed")
    if not inner.pointwise:
        return Refusal(
            node, f"the inner {inner.describe()} is not pointwise (1x1, stride 1, no padding)"
        )
    if inner.dtype != outer.dtype or inner.device != outer.device:
        return Refusal(node, "the two layers differ in dtype or device")
    geo = outer.geometry
    if geo is not None and geo.reads_padding:
        if geo.padding_mode == "value":
            assert geo.pad_value is not None
            zero = inner.bias
            if zero is None or not same_values(geo.pad_value, zero, inner.out_channels):
                return Refusal(
                    node,
                    f"the {outer.describe()} pads with values other than what the "
                    f"{inner.describe()} gives for a zero input",
                )
            geo = replace(geo, padding_mode="zeros", pad_value=None)
        elif geo.padding_mode == "zeros" and not _is_zero(inner.bias):
            return Refusal(
                node,
                f"the {outer.describe()} pads with zeros, but the {inner.describe()} gives its "
                "bias, not zero, for a zero input",
            )
    groups = _common_groups(outer.groups, inner.groups)
    if groups is None:
        return Refusal(node, f"groups differ ({inner.groups} then {outer.groups})")
    w2, w1 = outer.weight, inner.weight
    if outer.groups != groups:
        w2 = apply(kernels.expand_groups, w2, inner.out_channels, outer.groups, groups)
    if inner.groups != groups:
        w1 = apply(kernels.expand_groups, w1, inner.in_channels, inner.groups, groups)
    weight = apply(kernels.compose_kernels, w2, w1, groups=groups)
    bias = apply(kernels.compose_bias, w2, outer.bias, inner.bias, groups=groups)
    if geo is not None:
        geo = replace(geo, groups=groups)
    layer = Layer(
        outer.node,
        inner.input,
        weight,
        bias,
        geo,
        outer.kind,
        outer.dtype,
        outer.device,
        inner.sources + outer.sources,
        outer.requires_grad or inner.requires_grad,
        outer.name,
        inner.barrier,
    )
    stride = math.prod(geo.stride) if geo is not None else 1
    return Chain(layer, outer, inner, outer.macs + inner.macs * stride)


def _common_groups(a: int, b: int) -> int | None:
    """The grouping both layers can be written at (a grouped kernel is a block of a coarser
    one): the greatest common divisor."""
    return math.gcd(a, b)


def _is_zero(weight: Weight | None) -> bool:
    if weight is None:
        return True
    return isinstance(weight, Const) and not bool(weight.tensor.any())


def same_values(a: Weight, b: Weight, channels: int, rtol: float = 1e-5) -> bool:
    """Whether two constants hold the same value per channel (to the precision of the dtype
    the model computed them in)."""
    va = kernels.channel_vector(evaluate(a), channels)
    vb = kernels.channel_vector(evaluate(b), channels)
    scale = max(float(vb.abs().max()), 1e-30)
    return bool((va - vb).abs().max() <= rtol * scale)


def one_pad_value(values: Sequence[Weight | None], channels: int) -> bool:
    """Whether value paddings hold one value per channel, exactly, so that layers reading
    them may share one padding. Constants are compared by value (two objects holding
    ``0.5`` are one value), bit for bit in float64: ``-0.0`` is not ``0.0`` (a product with
    it keeps its sign) and NaN is never equal, so a merge is never wrong, at worst missed. A
    value that may change between calls (``live``) is only itself."""
    first = values[0] if values else None
    if all(v is first for v in values):
        return True
    if first is None or any(v is None or v.live for v in values):
        return False
    vectors = [kernels.channel_vector(evaluate(v), channels) for v in values]  # type: ignore[arg-type]
    reference = vectors[0]
    if bool(reference.isnan().any()):
        return False
    return all(
        torch.equal(v, reference) and torch.equal(v.signbit(), reference.signbit())
        for v in vectors[1:]
    )


def channels_of(node: Node, ctx: Resolver) -> int | None:
    """How many channels ``node``'s value has (dim 1), where the program fixes it: the layer
    or batch norm that made it, through ops that keep channels (activations, pads, pools), or
    a layer that reads it (a conv rejects any other channel count)."""
    for user in node.users:
        if user.op in ("call_module", "call_function") and user.args and user.args[0] is node:
            reader = as_layer(user, ctx) if _reads_directly(user, ctx) else None
            if isinstance(reader, Layer) and reader.geometry is not None and not reader.label:
                return reader.in_channels
    found = _read_through_pads(node, ctx)
    if found is not None:
        return found
    for _ in range(64):
        layer = as_layer(node, ctx)
        if isinstance(layer, Layer):
            return layer.out_channels
        affine = as_affine(node, ctx)
        if isinstance(affine, Affine) and affine.channels > 0:
            return affine.channels
        combo = as_combination(node, ctx)
        if combo is not None and combo.terms:
            node = combo.terms[0][1]
            continue
        source = _channel_preserving_input(node, ctx)
        if source is None:
            shape = ctx.shape(node)
            return int(shape[1]) if shape is not None and len(shape) > 1 else None
        node = source
    return None


_PADS_AND_CROPS = frozenset(
    {
        "getitem",
        "pad",
        "constant_pad_nd",
        "slice",
    }
)


def _read_through_pads(node: Node, ctx: Resolver) -> int | None:
    """The input channels of a conv that reads ``node`` through pads and crops its view
    peels back to ``node`` (so they are spatial: the channels are ``node``'s)."""
    frontier, seen = list(node.users), 0
    while frontier and seen < 16:
        user = frontier.pop()
        seen += 1
        if user.op not in ("call_module", "call_function"):
            continue
        if _reads_directly(user, ctx):
            reader = as_layer(user, ctx)
            if isinstance(reader, Layer) and reader.input is node and not reader.label:
                return reader.in_channels
        elif user.op == "call_function" and target_name(user) in _PADS_AND_CROPS:
            frontier.extend(user.users)
    return None


def _reads_directly(node: Node, ctx: Resolver) -> bool:
    """A conv module or function, or a conv fxfuse built (views that do not themselves ask
    for channels)."""
    if node.op == "call_module":
        return isinstance(ctx.module(str(node.target)), _ConvNd)
    if node.target is fused_layer:
        return isinstance(node.args[1], FusedLayer) and node.args[1].kind == "conv"
    return node.target in CONV_FUNCTIONS or node.target is aten.convolution.default


_SAME_CHANNEL_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)


def _channel_preserving_input(node: Node, ctx: Resolver) -> Node | None:
    """The input of an op that keeps channel count and order, else ``None``."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    if node.op == "call_module":
        module = ctx.module(str(node.target))
        return node.args[0] if isinstance(module, _SAME_CHANNEL_MODULES) else None
    if node.op in ("call_function", "call_method"):
        from fxfuse.dialects import target_name

        name = target_name(node)
        if name in _SAME_CHANNEL_NAMES:
            return node.args[0]
    return None


_SAME_CHANNEL_NAMES = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "silu",
        "silu_",
        "gelu",
        "hardswish",
        "hardswish_",
        "hardsigmoid",
        "sigmoid",
        "tanh",
        "leaky_relu",
        "leaky_relu_",
        "elu",
        "mish",
        "dropout",
        "pad",
        "constant_pad_nd",
        "avg_pool2d",
        "max_pool2d",
        "clone",
        "contiguous",
    }
)


def run_on(layer: Layer, x: Tensor) -> Tensor:
    """What ``layer`` computes on ``x``, from its weights' current values (tests, checks)."""
    bias = None if layer.bias is None else evaluate(layer.bias).to(layer.dtype)
    return run_layer(x, evaluate(layer.weight).to(layer.dtype), bias, layer.kind, layer.geometry)
