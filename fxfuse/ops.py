"""The normalization layer: one read-only view per op the rules care about, in any dialect.

A conv may be an ``nn.Conv2d`` module, ``F.conv2d``/``torch.conv2d`` with attribute weights, or a
conv fxfuse built itself (:class:`FusedLayer`); a batch norm may be an ``nn.BatchNorm2d`` (or a
subclass that keeps its ``forward``) or ``F.batch_norm`` (timm's ``BatchNormAct2d`` traces into
that). Rules only ever see :class:`ConvView`, :class:`BatchNormView` and :class:`Combination`, so a
rule written for one dialect works for all of them.

Views read the graph; they never change it. Everything that reads a tensor goes through a
:class:`Constants` resolver, so the same views work on graphs whose weights are attributes
(``symbolic_trace``) or bound graph inputs (``torch.compile``).

Layout assumption: activations are batched, channels first (``N, C, *spatial``), the layout every
``nn.BatchNorm`` module enforces. Where a graph carries shapes (``node.meta["val"]``), the rules
check it instead of assuming it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node
from torch.nn.modules import module as _module_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)

from fxfuse.effects import Effects, register_pure, value_users
from fxfuse.kernels import Window

__all__ = [
    "BATCH_NORM_FUNCTIONS",
    "CONV_FUNCTIONS",
    "CONV_TRANSPOSE_FUNCTIONS",
    "LINEAR_FUNCTIONS",
    "PADDING_MODES",
    "BatchNormView",
    "Combination",
    "Constants",
    "ConvGeometry",
    "ConvView",
    "FusedLayer",
    "Padding",
    "as_batch_norm",
    "as_combination",
    "as_conv",
    "bind_arguments",
    "channel_vector",
    "constant_value",
    "fused_layer",
    "inherits_forward",
    "module_path_of",
    "pad_calls",
    "peel_padding",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class Constants(Protocol):
    """Resolves graph values to tensors: attributes, bound inputs; ``None`` for activations."""

    def tensor(self, arg: Any) -> Tensor | None: ...

    def module(self, target: str) -> nn.Module: ...

    def shape(self, node: Node) -> torch.Size | None: ...

    @property
    def effects(self) -> Effects: ...


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Static attributes of a convolution, normalised.

    ``padding`` is ``(left, right)`` per spatial dim; a negative amount is a crop. For a
    transposed conv it is the conv-transpose padding (symmetric) and is never peeled or merged.
    """

    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.stride)

    def windows(self, kernel_size: Sequence[int]) -> tuple[Window, ...]:
        return tuple(
            Window(k, d, left, right)
            for k, d, (left, right) in zip(kernel_size, self.dilation, self.padding, strict=True)
        )

    @property
    def reads_padding(self) -> bool:
        """Whether some output reads a padded position (which then depends on the mode)."""
        return any(left > 0 or right > 0 for left, right in self.padding)


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """An int or a sequence of ints as ``n`` ints; ``TypeError`` for anything computed at run
    time (a node among them)."""
    if _is_int(value):
        return (int(value),) * n
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise TypeError(f"not static ints: {value!r}")
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def _padding_pairs(
    padding: str | int | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Per-dim (left, right) padding of a conv's ``padding`` argument.

    ``"same"`` pads ``d·(k−1)`` in total with the extra position on the right (DESIGN trap 6).
    """
    n = len(kernel_size)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        pairs = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        return tuple(pairs)
    return tuple((p, p) for p in _tuple(padding, n))


@dataclass(frozen=True)
class Padding:
    """Padding accumulated between a value and the op that reads it: (left, right) per spatial dim.

    Negative amounts are crops, applied first; then the positive amounts pad with ``mode``.
    """

    pairs: tuple[tuple[int, int], ...]
    mode: str = "zeros"

    @property
    def positive(self) -> bool:
        return any(a > 0 for pair in self.pairs for a in pair)

    def around(self, inner: Padding) -> Padding | str:
        """This padding applied to the result of ``inner``, as one padding; or why it is not one.

        Per side, with inner amount ``a`` and outer ``e``: a crop of a padded value removes the
        padding first (``a + e``, exact for every mode); padding a cropped value fills with zeros
        where real values were, which no single padding expresses; two zero paddings add up.
        Circular padding reads the opposite end, which a crop moves: a dim that is both cropped
        and padded circularly is never folded (the merge would move the crop).
        """
        pairs = []
        modes = set()
        for (a_left, a_right), (e_left, e_right) in zip(inner.pairs, self.pairs, strict=True):
            amounts = (a_left, a_right, e_left, e_right)
            circular = (inner.mode == "circular" and max(a_left, a_right) > 0) or (
                self.mode == "circular" and max(e_left, e_right) > 0
            )
            if circular and min(amounts) < 0:
                return "circular padding of a cropped dim wraps to the crop, not the input"
            pair = []
            for a, e in ((a_left, e_left), (a_right, e_right)):
                if a == 0 or e == 0:
                    total = a + e
                    mode = inner.mode if a else self.mode
                elif a > 0 and e < 0:
                    total, mode = a + e, inner.mode
                elif (a > 0 and e > 0 and inner.mode == self.mode == "zeros") or (a < 0 and e < 0):
                    total, mode = a + e, "zeros"
                elif a < 0:
                    return "it pads a cropped value, which no single padding of the input does"
                else:
                    return f"{self.mode} padding of {inner.mode}-padded values"
                if total > 0:
                    modes.add(mode)
                pair.append(total)
            pairs.append((pair[0], pair[1]))
        if len(modes) > 1:
            return f"it mixes padding modes ({', '.join(sorted(modes))})"
        return Padding(tuple(pairs), modes.pop() if modes else "zeros")


_PAD_MODES = {
    "constant": "zeros",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pairs_from_pad_arg(pad: Sequence[int], ndim: int) -> tuple[tuple[int, int], ...] | None:
    """F.pad's ``(left_last, right_last, left_prev, right_prev, …)`` as pairs in dim order."""
    if not isinstance(pad, (tuple, list)):
        return None  # computed at run time
    pad = tuple(pad)
    if len(pad) % 2 or len(pad) // 2 > ndim or not all(_is_int(p) for p in pad):
        return None
    pairs = [(0, 0)] * ndim
    for i in range(len(pad) // 2):
        pairs[ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return tuple(pairs)


def _slice_crop(index: Any, ndim: int) -> tuple[tuple[int, int], ...] | None:
    """``x[:, :, a:-b, …]`` or ``x[..., a:-b]`` as negative padding; ``None`` for anything else."""
    if not isinstance(index, tuple):
        index = (index,)
    if index and index[0] is Ellipsis:
        spatial = index[1:]
    else:
        if len(index) < 2 or any(i != slice(None) for i in index[:2]):
            return None
        spatial = index[2:]
        spatial = spatial + (slice(None),) * (ndim - len(spatial))
    if len(spatial) > ndim or any(not isinstance(s, slice) for s in spatial):
        return None
    pairs = [(0, 0)] * (ndim - len(spatial))
    for s in spatial:
        if s.step not in (None, 1):
            return None
        start = 0 if s.start is None else s.start
        stop = 0 if s.stop is None else s.stop
        if not isinstance(start, int) or not isinstance(stop, int) or start < 0 or stop > 0:
            return None
        pairs.append((-start, stop))
    return tuple(pairs)


_INT64_MAX = 2**63 - 1


def _slice_as_padding(node: Node, ndim: int) -> tuple[Node, Padding] | None:
    """``aten.slice(x, dim, start, end)`` on a spatial dim as a crop (negative padding)."""
    args = bind_arguments(aten.slice.Tensor, node)
    if args is None or not isinstance(args["input"], Node) or args["step"] not in (None, 1):
        return None
    dim, start, end = args["dim"], args["start"], args["end"]
    if not isinstance(dim, int):
        return None
    spatial = dim - 2 if dim >= 0 else dim + ndim
    start = 0 if start is None else start
    end = 0 if end is None or end == _INT64_MAX else end
    if start == 0 and end == 0:  # x[:, ...] on any dim (export writes these out): a no-op
        return args["input"], Padding(((0, 0),) * ndim)
    if not 0 <= spatial < ndim or not isinstance(start, int) or not isinstance(end, int):
        return None
    if start < 0 or end > 0:
        return None
    pairs = [(0, 0)] * ndim
    pairs[spatial] = (-start, end)
    return args["input"], Padding(tuple(pairs))


def _as_padding_op(node: Node, ndim: int, consts: Constants) -> tuple[Node, Padding] | None:
    """A pad or crop of a value: ``F.pad``, an ``nn.*Pad*d`` module, or a slicing crop."""
    if node.op == "call_function" and node.target in (aten.slice.Tensor, operator.getitem):
        source = node.args[0]
        shape = consts.shape(source) if isinstance(source, Node) else None
        if shape is not None and len(shape) != ndim + 2:
            return None  # an unbatched value: its dims are not (N, C, spatial...)
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        return _slice_as_padding(node, ndim)
    if node.op == "call_function" and node.target in (
        F.pad,
        aten.pad.default,
        aten.constant_pad_nd.default,
    ):
        args = bind_arguments(node.target, node)
        if args is None or not isinstance(args["input"], Node):
            return None
        mode = _PAD_MODES.get(args.get("mode", "constant"))
        if mode is None or (mode == "zeros" and args.get("value") not in (None, 0, 0.0)):
            return None
        pairs = _pairs_from_pad_arg(args["pad"], ndim)
        if pairs is None or (mode != "zeros" and min(min(pair) for pair in pairs) < 0):
            return None  # a negative pad of another mode: leave its semantics to torch
        return args["input"], Padding(pairs, mode)
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if not isinstance(source, Node):
            return None
        pairs = _slice_crop(index, ndim)
        return None if pairs is None else (source, Padding(pairs))
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = consts.module(str(node.target))
        mode = next((m for cls, m in _PAD_MODULES.items() if isinstance(module, cls)), None)
        if mode is None or not inherits_forward(module):
            return None
        if mode == "zeros" and getattr(module, "value", 0) != 0:
            return None
        pairs = _pairs_from_pad_arg(module.padding, ndim)
        return None if pairs is None else (node.args[0], Padding(pairs, mode))
    return None


_PAD_MODULES: dict[type, str] = {
    _ConstantPadNd: "zeros",
    _ReflectionPadNd: "reflect",
    _ReplicationPadNd: "replicate",
    _CircularPadNd: "circular",
}


def inherits_forward(module: nn.Module, *methods: str) -> bool:
    """True when ``module`` runs ``forward`` (and ``methods``) as defined in ``torch.nn``.

    A subclass that redefines them (weight standardization, fake quantization, dynamic
    "same" padding) computes something else and is not the op its base class is.
    """
    for name in ("forward", *methods):
        fn = getattr(type(module), name, None)
        if not getattr(fn, "__module__", "").startswith("torch.nn."):
            return False
    return not has_hooks(module)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks: its own (``weight_norm`` is one)
    or global ones. A hook can change what the module computes, so such a module is never
    replaced by a fused one."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
    )


def peel_padding(
    node: Node, outer: Padding, consts: Constants
) -> tuple[Node, Padding, tuple[Node, str] | None]:
    """Walk from a conv's input through pads and crops, folding them into the conv's padding.

    Returns the value actually read, the total padding, and, when the walk stopped at a pad or
    crop that does not compose exactly (:meth:`Padding.around`), the value under it and why.
    """
    ndim = len(outer.pairs)
    while True:
        inner = _as_padding_op(node, ndim, consts)
        if inner is None:
            return node, outer, None
        combined = outer.around(inner[1])
        if isinstance(combined, str):
            return (
                node,
                outer,
                (inner[0], f"{node.name} does not fold into its padding: {combined}"),
            )
        node, outer = inner[0], combined


# --------------------------------------------------------------------------------------------
# Layers fxfuse builds itself
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FusedLayer:
    """A conv or linear layer fxfuse has built, held exactly (float64) until emission.

    It sits in the graph as ``fused_layer(x, layer)`` while rules run, so a later rule reads
    the exact weights rather than a rounded copy; emission turns it into a fresh module with
    parameters cast to ``dtype``.
    """

    kind: str  # "conv" | "conv_transpose" | "linear"
    weight: Tensor
    bias: Tensor | None
    geometry: ConvGeometry | None
    dtype: torch.dtype
    device: torch.device
    sources: tuple[str, ...]  # module paths of every op folded into it
    name: str  # where emission would like to put the module (a dotted path)
    requires_grad: bool = False

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.weight.shape)
        return f"FusedLayer({self.kind} {shape} -> {self.name})"


@register_pure
def fused_layer(x: Tensor, layer: FusedLayer) -> Tensor:
    """Reference semantics of a :class:`FusedLayer` (used only before emission)."""
    weight = layer.weight.to(device=layer.device, dtype=layer.dtype)
    bias = None if layer.bias is None else layer.bias.to(device=layer.device, dtype=layer.dtype)
    if layer.kind == "linear":
        return F.linear(x, weight, bias)
    geo = layer.geometry
    assert geo is not None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[geo.ndim]
    if layer.kind == "conv_transpose":
        convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[geo.ndim]
        padding = tuple(left for left, _ in geo.padding)
        return convt(
            x, weight, bias, geo.stride, padding, geo.output_padding, geo.groups, geo.dilation
        )
    x = pad_input(x, geo.padding, geo.padding_mode)
    return conv(x, weight, bias, geo.stride, 0, geo.dilation, geo.groups)


def pad_calls(
    pairs: Sequence[tuple[int, int]], mode: str
) -> list[tuple[list[int], dict[str, str]]]:
    """The ``F.pad(x, amounts, **kwargs)`` calls that apply per-dim (left, right) padding:
    the crops (negative amounts) first, then the padding with ``mode`` (see :class:`Padding`).
    """
    amounts = [a for pair in reversed(pairs) for a in pair]
    crop, grow = [min(a, 0) for a in amounts], [max(a, 0) for a in amounts]
    calls: list[tuple[list[int], dict[str, str]]] = []
    if any(crop):
        calls.append((crop, {}))
    if any(grow):
        calls.append((grow, {"mode": "constant" if mode == "zeros" else mode}))
    return calls


def pad_input(x: Tensor, pairs: Sequence[tuple[int, int]], mode: str) -> Tensor:
    """Apply per-dim (left, right) padding; negative amounts crop."""
    for amounts, kwargs in pad_calls(pairs, mode):
        x = F.pad(x, amounts, **kwargs)
    return x


# --------------------------------------------------------------------------------------------
# Argument binding for functional forms
# --------------------------------------------------------------------------------------------

_CONVT_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TORCH_BATCH_NORM_ARGS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)
aten = torch.ops.aten
_SIGNATURES: dict[Callable[..., Any], tuple[str, ...]] = {
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv3d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv_transpose1d: _CONVT_ARGS,
    F.conv_transpose2d: _CONVT_ARGS,
    F.conv_transpose3d: _CONVT_ARGS,
    F.linear: ("input", "weight", "bias"),
    F.pad: ("input", "pad", "mode", "value"),
    # the same ops in aten IR (torch.export): one normalization layer for every dialect
    aten.conv1d.default: _CONV_ARGS,
    aten.conv2d.default: _CONV_ARGS,
    aten.conv3d.default: _CONV_ARGS,
    aten.conv1d.padding: _CONV_ARGS,
    aten.conv2d.padding: _CONV_ARGS,
    aten.conv3d.padding: _CONV_ARGS,
    aten.conv_transpose1d.default: _CONVT_ARGS,
    aten.conv_transpose2d.input: _CONVT_ARGS,
    aten.conv_transpose3d.input: _CONVT_ARGS,
    aten.convolution.default: (
        "input",
        "weight",
        "bias",
        "stride",
        "padding",
        "dilation",
        "transposed",
        "output_padding",
        "groups",
    ),
    aten.linear.default: ("input", "weight", "bias"),
    aten.pad.default: ("input", "pad", "mode", "value"),
    aten.constant_pad_nd.default: ("input", "pad", "value"),
    aten.slice.Tensor: ("input", "dim", "start", "end", "step"),
    aten.batch_norm.default: _TORCH_BATCH_NORM_ARGS,
    aten._native_batch_norm_legit_no_training.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "momentum",
        "eps",
    ),
    aten.native_batch_norm.default: _TORCH_BATCH_NORM_ARGS[:-1],  # no cudnn_enabled
    aten.dropout.default: ("input", "p", "train"),
    F.batch_norm: (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    ),
    torch.batch_norm: _TORCH_BATCH_NORM_ARGS,
}
_DEFAULTS: dict[str, Any] = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "output_padding": 0,
    "weight": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
    "mode": "constant",
    "value": None,
    "dim": 0,
    "start": None,
    "end": None,
    "step": 1,
    "cudnn_enabled": True,
}


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def bind_arguments(fn: Callable[..., Any], node: Node) -> dict[str, Any] | None:
    """The node's arguments by parameter name, defaults filled in; ``None`` if they do not bind."""
    names = _SIGNATURES.get(fn)
    if names is None:
        signature = _signature(fn)
        if signature is None:
            return None
        try:
            bound = signature.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return dict(bound.arguments)
    if len(node.args) > len(names) or not set(node.kwargs) <= set(names):
        return None
    args = dict(zip(names, node.args, strict=False))
    if set(args) & set(node.kwargs):
        return None
    args.update(node.kwargs)
    for name in names:
        args.setdefault(name, _DEFAULTS.get(name))
    return args


# --------------------------------------------------------------------------------------------
# Conv / linear
# --------------------------------------------------------------------------------------------


@dataclass
class ConvView:
    """A conv, transposed conv or linear layer: ``node = W ⋆ input + b`` with ``geometry``.

    ``input`` is the value actually read, after any pads/crops folded into ``geometry.padding``.
    ``weight``/``bias`` are the layer's tensors as stored (any dtype; float64 for a
    :class:`FusedLayer`); ``dtype`` is the dtype of the layer's output.
    """

    node: Node
    input: Node
    weight: Tensor
    bias: Tensor | None
    geometry: ConvGeometry | None  # None for a linear layer
    kind: str
    dtype: torch.dtype
    sources: tuple[str, ...]
    requires_grad: bool
    name: str  # a module path for the layer (a hint for naming what replaces it)
    # where peeling pads/crops stopped short: the value under the op that did not fold, and why
    barrier: tuple[Node, str] | None = None

    @property
    def device(self) -> torch.device:
        return self.weight.device

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
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def describe(self) -> str:
        """``3x3 conv``, ``1x1 conv s2 g4``, ``linear``: what a person would call it."""
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


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_FUNCTIONS: dict[Any, int] = {
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
}
CONV_TRANSPOSE_FUNCTIONS: dict[Any, int] = {
    F.conv_transpose1d: 1,
    F.conv_transpose2d: 2,
    F.conv_transpose3d: 3,
    aten.conv_transpose1d.default: 1,
    aten.conv_transpose2d.input: 2,
    aten.conv_transpose3d.input: 3,
}
LINEAR_FUNCTIONS = {F.linear, aten.linear.default}


def module_path_of(node: Node) -> str:
    """The module a node belongs to, as a dotted path ('' for the root)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(next(reversed(stack.values()))[0])
    return ""


def as_conv(node: Node, consts: Constants) -> ConvView | None:
    """View ``node`` as a conv/linear layer with constant weights, or ``None``."""
    if node.op == "call_module":
        return _conv_from_module(node, consts)
    if node.op != "call_function":
        return None
    if node.target is fused_layer:
        x, layer = node.args
        assert isinstance(x, Node) and isinstance(layer, FusedLayer)
        geo, barrier = layer.geometry, None
        if layer.kind == "conv" and geo is not None:  # its input may be a pad that did not fold
            own = Padding(geo.padding, geo.padding_mode)
            x, padding, barrier = peel_padding(x, own, consts)
            geo = dataclasses.replace(geo, padding=padding.pairs, padding_mode=padding.mode)
        return ConvView(
            node,
            x,
            layer.weight,
            layer.bias,
            geo,
            layer.kind,
            layer.dtype,
            layer.sources,
            layer.requires_grad,
            layer.name,
            barrier,
        )
    fn = node.target
    if fn is aten.convolution.default:
        return _conv_from_aten_convolution(node, consts)
    if fn in CONV_FUNCTIONS or fn in CONV_TRANSPOSE_FUNCTIONS or fn in LINEAR_FUNCTIONS:
        return _conv_from_function(node, fn, consts)
    return None


def _conv_from_aten_convolution(node: Node, consts: Constants) -> ConvView | None:
    """``aten.convolution`` is a conv or a transposed conv, by its ``transposed`` flag."""
    args = bind_arguments(aten.convolution.default, node)
    if args is None or not isinstance(args["transposed"], bool):
        return None
    n = len(args["stride"])
    fn = (
        {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
        if args["transposed"]
        else {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    ).get(n)
    if fn is None:
        return None
    return _conv_from_function(node, fn, consts, args)


def _float_weights(weight: Any, bias: Any) -> bool:
    return (
        isinstance(weight, Tensor)
        and weight.is_floating_point()
        and not isinstance(weight, nn.parameter.UninitializedParameter)
        and weight.device.type != "meta"
        and (bias is None or isinstance(bias, Tensor))
    )


def _conv_from_module(node: Node, consts: Constants) -> ConvView | None:
    module = consts.module(str(node.target))
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
        return None  # e.g. ConvTranspose2d(x, output_size=...)
    if not isinstance(module, (nn.Linear, _ConvNd)):
        return None
    methods = ("_conv_forward",) if isinstance(module, _CONV_MODULES) else ()
    if not inherits_forward(module, *methods) or not _float_weights(module.weight, module.bias):
        return None
    x = node.args[0]
    sources = (str(node.target),)
    grad = module.weight.requires_grad
    if isinstance(module, nn.Linear):
        return ConvView(
            node,
            x,
            module.weight,
            module.bias,
            None,
            "linear",
            module.weight.dtype,
            sources,
            grad,
            sources[0],
        )
    if isinstance(module, _CONVT_MODULES):
        geo = _transposed_geometry(
            module.stride,
            module.padding,
            module.output_padding,
            module.dilation,
            module.groups,
            len(module.kernel_size),
        )
        if geo is None or module.padding_mode != "zeros":
            return None
        return ConvView(
            node,
            x,
            module.weight,
            module.bias,
            geo,
            "conv_transpose",
            module.weight.dtype,
            sources,
            grad,
            sources[0],
        )
    if isinstance(module, _CONV_MODULES) and not isinstance(module, _ConvTransposeNd):
        assert isinstance(module, _ConvNd)
        own = Padding(
            _padding_pairs(module.padding, module.kernel_size, module.dilation),
            module.padding_mode,
        )
        source, padding, barrier = peel_padding(x, own, consts)
        geo = ConvGeometry(
            tuple(module.stride), padding.pairs, tuple(module.dilation), module.groups, padding.mode
        )
        return ConvView(
            node,
            source,
            module.weight,
            module.bias,
            geo,
            "conv",
            module.weight.dtype,
            sources,
            grad,
            sources[0],
            barrier,
        )
    return None


def _transposed_geometry(
    stride: Any, padding: Any, output_padding: Any, dilation: Any, groups: Any, n: int
) -> ConvGeometry | None:
    if isinstance(padding, str) or not isinstance(groups, int):
        return None
    try:
        return ConvGeometry(
            _tuple(stride, n),
            tuple((p, p) for p in _tuple(padding, n)),
            _tuple(dilation, n),
            groups,
            "zeros",
            True,
            _tuple(output_padding, n),
        )
    except TypeError:
        return None


def _conv_from_function(
    node: Node, fn: Any, consts: Constants, args: dict[str, Any] | None = None
) -> ConvView | None:
    """A functional conv/linear; ``args`` already bound (by name) when ``fn`` only says how
    to read them."""
    args = args if args is not None else bind_arguments(fn, node)
    if args is None or not isinstance(args["input"], Node):
        return None
    weight = consts.tensor(args["weight"])
    bias = None if args["bias"] is None else consts.tensor(args["bias"])
    if not _float_weights(weight, bias) or (args["bias"] is not None and bias is None):
        return None
    assert weight is not None
    nodes = [a for a in (args["weight"], args["bias"]) if isinstance(a, Node)]
    sources = tuple(dict.fromkeys(module_path_of(n) for n in [node, *nodes]))
    grad = weight.requires_grad
    path = module_path_of(node)
    base = str(getattr(fn, "__name__", "conv")).split(".")[0]
    name = f"{path}.{base}" if path else base
    if fn in LINEAR_FUNCTIONS:
        return ConvView(
            node, args["input"], weight, bias, None, "linear", weight.dtype, sources, grad, name
        )
    if fn in CONV_TRANSPOSE_FUNCTIONS:
        geo = _transposed_geometry(
            args["stride"],
            args["padding"],
            args["output_padding"],
            args["dilation"],
            args["groups"],
            CONV_TRANSPOSE_FUNCTIONS[fn],
        )
        if geo is None:
            return None
        return ConvView(
            node,
            args["input"],
            weight,
            bias,
            geo,
            "conv_transpose",
            weight.dtype,
            sources,
            grad,
            name,
        )
    n = CONV_FUNCTIONS[fn]
    if not _is_int(args["groups"]):
        return None
    try:  # stride, padding and dilation must be static (a traced int is a node)
        dilation = _tuple(args["dilation"], n)
        own = Padding(_padding_pairs(args["padding"], weight.shape[2:], dilation))
        stride = _tuple(args["stride"], n)
    except TypeError:
        return None
    source, padding, barrier = peel_padding(args["input"], own, consts)
    geo = ConvGeometry(stride, padding.pairs, dilation, args["groups"], padding.mode)
    return ConvView(
        node, source, weight, bias, geo, "conv", weight.dtype, sources, grad, name, barrier
    )


# --------------------------------------------------------------------------------------------
# Batch norm
# --------------------------------------------------------------------------------------------


@dataclass
class BatchNormView:
    """``node = BN(input)``. ``uses_batch_stats``: training mode or no running statistics."""

    node: Node
    input: Node
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    uses_batch_stats: bool
    # the spatial dims its input may have (BatchNorm2d: {2}; BatchNorm1d: {0, 1}); None: any
    ndims: frozenset[int] | None
    sources: tuple[str, ...]

    @property
    def num_features(self) -> int:
        for t in (self.running_mean, self.weight, self.bias):
            if t is not None:
                return t.numel()
        return -1


_BN_NDIMS = {
    nn.BatchNorm1d: frozenset({0, 1}),
    nn.BatchNorm2d: frozenset({2}),
    nn.BatchNorm3d: frozenset({3}),
}


_TUPLE_BATCH_NORMS = {
    aten._native_batch_norm_legit_no_training.default,
    aten.native_batch_norm.default,
}
BATCH_NORM_FUNCTIONS = {
    F.batch_norm,
    torch.batch_norm,
    aten.batch_norm.default,
    *_TUPLE_BATCH_NORMS,
}


def as_batch_norm(node: Node, consts: Constants) -> BatchNormView | None:
    """View ``node`` as a batch norm, or ``None``. Training-mode BNs are views too (so a rule
    can say why it declines them)."""
    if node.op == "call_module":
        module = consts.module(str(node.target))
        if not isinstance(module, _BatchNorm) or len(node.args) != 1 or node.kwargs:
            return None
        if not (inherits_forward(module) or isinstance(module, nn.SyncBatchNorm)):
            return None
        ndims = next((n for cls, n in _BN_NDIMS.items() if isinstance(module, cls)), None)
        batch_stats = module.training or module.running_mean is None
        return BatchNormView(
            node,
            node.args[0],
            module.running_mean,
            module.running_var,
            module.weight,
            module.bias,
            float(module.eps),
            batch_stats,
            ndims,
            (str(node.target),),
        )
    fn, value = node.target, node
    if (
        node.op == "call_function"
        and fn is operator.getitem
        and node.args[1] == 0
        and isinstance(node.args[0], Node)
        and node.args[0].target in _TUPLE_BATCH_NORMS
    ):
        node = node.args[0]  # aten's batch norms return (output, mean, invstd): view output
        fn = node.target
    elif fn in _TUPLE_BATCH_NORMS:
        return None  # the tuple itself is not the normalized value; its [0] is
    if node.op == "call_function" and fn in BATCH_NORM_FUNCTIONS:
        args = bind_arguments(fn, node)
        if args is None or not isinstance(args["input"], Node):
            return None
        tensors = {}
        for name in ("running_mean", "running_var", "weight", "bias"):
            arg = args[name]
            tensors[name] = None if arg is None else consts.tensor(arg)
            if arg is not None and tensors[name] is None:
                return None  # a statistic computed at run time
        training = args.get("training", False)  # _native_batch_norm_legit_no_training: False
        batch_stats = bool(training) or tensors["running_mean"] is None
        nodes = [a for a in args.values() if isinstance(a, Node) and a is not args["input"]]
        sources = tuple(dict.fromkeys(module_path_of(n) for n in [node, *nodes]))
        eps = static_number(args["eps"], consts)
        if eps is None or not isinstance(training, bool):
            return None
        args["eps"] = eps
        return BatchNormView(
            value,
            args["input"],
            tensors["running_mean"],
            tensors["running_var"],
            tensors["weight"],
            tensors["bias"],
            float(args["eps"]),
            batch_stats,
            None,
            sources,
        )
    return None


# --------------------------------------------------------------------------------------------
# Linear combinations: sums, differences and constant scales
# --------------------------------------------------------------------------------------------

_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add.Scalar}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub.Scalar}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIV = {operator.truediv, operator.itruediv, torch.div, aten.div.Tensor, aten.div.Scalar}
_NEG = {operator.neg, torch.neg, aten.neg.default}
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


@dataclass
class Combination:
    """``root = anchor + Σ coefficient_i · term_i + Σ coefficient_j · constant_j``, flattened
    through single-use nodes.

    Coefficients are float64 tensors that broadcast against the terms (0-d for a scalar);
    a constant is a python number or a node holding a constant tensor. ``interior`` are the
    add/sub/mul nodes that disappear with the root.

    ``anchor``: when the root is an in-place ``a += …`` (or ``a -= …``) whose ``a`` others can
    see (a view of another tensor, a graph input, a value read again later), ``a`` must still
    be updated in place: it is not a term, and a rewrite of the root must end in ``a += …``.
    An in-place op on a value nobody else sees is just a sum.
    """

    root: Node
    terms: list[tuple[Tensor, Node]] = field(default_factory=list)
    constants: list[tuple[Tensor, Node | float]] = field(default_factory=list)
    interior: list[Node] = field(default_factory=list)
    anchor: Node | None = None
    # (dtype, rank) of the constant tensors it scales or adds by: a float64 scale on a float32
    # value makes the result float64, unless the scale is 0-d (PyTorch's type promotion)
    constant_dtypes: set[tuple[torch.dtype, int]] = field(default_factory=set)

    def promotes(self, dtype: torch.dtype) -> bool:
        """Whether a constant makes the sum's dtype differ from ``dtype``."""
        return bool(self.promoting(dtype))

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


def _scalar(value: Any) -> Tensor | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _float64(float(value))


@functools.lru_cache(maxsize=1024)
def _float64(value: float) -> Tensor:
    """A 0-d float64 tensor, shared: coefficient arithmetic never works in place."""
    return torch.tensor(value, dtype=torch.float64)


def static_number(arg: Any, consts: Constants) -> float | None:
    """A python number, or ``t.item()`` of a constant tensor (dynamo lifts a module's float
    attributes, like a batch norm's ``eps``, to graph inputs under ``dynamic=True``)."""
    if _scalar(arg) is not None:
        return float(arg)
    if isinstance(arg, Node) and arg.op == "call_method" and arg.target == "item":
        t = consts.tensor(arg.args[0])
        if t is not None and t.numel() == 1:
            return float(t)
    return None


def constant_value(arg: Any, consts: Constants) -> Tensor | None:
    """A python number or a constant floating tensor as float64, else ``None``."""
    scalar = _scalar(arg)
    if scalar is not None:
        return scalar
    if isinstance(arg, Node):
        t = consts.tensor(arg)
        if t is not None and t.is_floating_point() and t.device.type != "meta":
            return t.detach().to(torch.float64)
    return None


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


def _linear_operands(node: Node, consts: Constants) -> list[tuple[Tensor, Any]] | None:
    """``node`` as ``Σ factor · operand`` if it is an add/sub/neg or a scale by a constant."""
    fn = _linear_fn(node)
    if fn is None:
        return None
    one = _float64(1.0)
    kwargs = node.kwargs
    if fn in _ADD or fn in _SUB:
        if len(node.args) != 2 or set(kwargs) - {"alpha"}:
            return None
        alpha = _scalar(kwargs.get("alpha", 1))
        if alpha is None:
            return None
        if fn in _SUB:
            alpha = -alpha
        a, b = node.args
        return _operands([(one, a), (alpha, b)])
    if fn in _NEG:
        return _operands([(-one, node.args[0])]) if len(node.args) == 1 and not kwargs else None
    if fn in _MUL or fn in _DIV:
        if len(node.args) != 2 or kwargs.get("rounding_mode") is not None:
            return None
        if set(kwargs) - {"rounding_mode"}:
            return None
        a, b = node.args
        cb = constant_value(b, consts)
        if fn in _DIV:
            if cb is None or not isinstance(a, Node) or bool((cb == 0).any()):
                return None
            return [(1.0 / cb, a)] if _per_channel_shape(cb) else None
        ca = constant_value(a, consts)
        if cb is not None and isinstance(a, Node) and ca is None and _per_channel_shape(cb):
            return [(cb, a)]
        if ca is not None and isinstance(b, Node) and cb is None and _per_channel_shape(ca):
            if fn in _IN_PLACE:
                return None  # ``c *= x`` updates the constant
            return [(ca, b)]
    return None


def _operands(pairs: list[tuple[Tensor, Any]]) -> list[tuple[Tensor, Any]] | None:
    """``pairs`` if every operand is a node or a number (``x - True`` is not a sum we read)."""
    ok = all(isinstance(op, Node) or _scalar(op) is not None for _, op in pairs)
    return pairs if ok else None


def _combination_operands(
    node: Node, consts: Constants, *, root: bool
) -> tuple[list[tuple[Tensor, Any]], Node | None] | None:
    """``node``'s operands as a linear op, and the anchor an in-place root must keep updating.

    An in-place op on a value nobody else sees (:meth:`~fxfuse.effects.Effects.private`) is a
    sum like any other; on a value others see, only the root of a combination may be one, and
    only ``a += …``/``a -= …`` (whose ``a`` stays, updated in place, see :class:`Combination`).
    """
    operands = _linear_operands(node, consts)
    if operands is None:
        return None
    target = _in_place_target(node)
    if target is None or consts.effects.private(target, node):
        return operands, None
    if not root or _linear_fn(node) not in _ADD | _SUB:
        return None
    first, *rest = operands
    if first[1] is not target or not _is_one(first[0]):
        return None
    return rest, target


def _is_one(t: Tensor) -> bool:
    return t.dim() == 0 and float(t) == 1.0


def channel_vector(t: Tensor, channels: int, ndim: int) -> Tensor | None:
    """``t`` as a per-output-channel vector of a ``ndim``-d layer's output ``[N, C, *spatial]``,
    or ``None`` when it broadcasts some other way (or would change the output's rank)."""
    if t.dim() > ndim + 2:
        return None
    if t.numel() == 1:
        return t.reshape(1).expand(channels)
    if t.dim() < ndim + 1 or t.numel() != channels or t.shape[t.dim() - ndim - 1] != channels:
        return None
    return t.reshape(channels)


def _per_channel_shape(t: Tensor) -> bool:
    """A scalar, or ``(…1, C, 1, …, 1)``: something that can scale output channels."""
    dims = [s for s in t.shape]
    while dims and dims[0] == 1:
        dims.pop(0)
    return all(s == 1 for s in dims[1:])


def _absorbs(user: Node, node: Node, consts: Constants) -> bool:
    found = _combination_operands(user, consts, root=False)
    return found is not None and any(op is node for _, op in found[0])


def as_combination(node: Node, consts: Constants) -> Combination | None:
    """Flatten the linear combination rooted at ``node``; ``None`` if ``node`` is not the root.

    A node inside a bigger combination (its only user absorbs it) is not a root: the
    combination is matched once, at its top.
    """
    found = _combination_operands(node, consts, root=True)
    if found is None:
        return None
    users = value_users(node)
    if len(users) == 1 and _absorbs(users[0], node, consts):
        return None
    operands, anchor = found
    combo = Combination(node, anchor=anchor)
    _flatten(node, _float64(1.0), combo, consts, operands)
    return combo


def _flatten(
    node: Node,
    coefficient: Tensor,
    combo: Combination,
    consts: Constants,
    operands: list[tuple[Tensor, Any]] | None = None,
) -> None:
    if operands is None and len(value_users(node)) == 1:
        found = _combination_operands(node, consts, root=False)
        operands = None if found is None else found[0]
    if operands is None:
        combo.terms.append((coefficient, node))
        return
    combo.interior.append(node)
    for n in node.all_input_nodes:
        t = consts.tensor(n)
        if t is not None:
            combo.constant_dtypes.add((t.dtype, t.dim()))
    for factor, operand in operands:
        c = coefficient * factor
        if constant_value(operand, consts) is not None:
            combo.constants.append((c, operand))
        elif isinstance(operand, Node):
            _flatten(operand, c, combo, consts)
        else:
            raise TypeError(f"unexpected operand {operand!r} in {node.format_node()}")
