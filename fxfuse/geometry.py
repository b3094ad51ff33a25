"""Geometry of convolutions and the pads and crops between a value and the layer reading it.

A conv's padding is normalised to ``(left, right)`` per spatial dim, negative for a crop, with a
mode: ``zeros``, ``reflect``, ``replicate``, ``circular``, or ``value`` — padding with a given
per-channel value (DBB's ``BNAndPadLayer`` writes a batch norm's image of zero into the border of
a zero-padded tensor, which is exactly what lets the batch norm fold into the conv after it).
:func:`peel_padding` walks from a layer's input through ``F.pad``, ``nn.*Pad*d`` modules,
slicing crops (``x[:, :, 1:-1]``, ``aten.slice``) and such border writes, folding each into the
layer's padding where that is exact, and says why where it is not.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)

from fxfuse.dialects import Resolver, aten, bind, inherits_forward
from fxfuse.effects import register_pure
from fxfuse.kernels import Window
from fxfuse.weights import Weight, evaluate

__all__ = [
    "Geometry",
    "Padding",
    "as_ints",
    "conv_padding",
    "pad_calls",
    "pad_input",
    "peel_padding",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_ints(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """An int or a sequence of ints as ``n`` ints; ``TypeError`` for anything computed at run
    time (a node among them)."""
    if _is_int(value):
        return (int(value),) * n
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise TypeError(f"not static ints: {value!r}")
    ints = tuple(int(v) for v in value)
    return ints * n if len(ints) == 1 else ints


def conv_padding(
    padding: str | int | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Per-dim (left, right) padding of a conv's ``padding`` argument.

    ``"same"`` pads ``d·(k−1)`` in total with the extra position on the right
    (docs/design.md, trap 6)."""
    n = len(kernel_size)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        pairs = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        return tuple(pairs)
    return tuple((p, p) for p in as_ints(padding, n))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Padding:
    """Padding between a value and the op that reads it: (left, right) per spatial dim.

    Negative amounts are crops, applied first; then the positive amounts pad with ``mode``;
    ``mode == "value"`` pads with ``value`` (a constant: a number or one value per channel)."""

    pairs: tuple[tuple[int, int], ...]
    mode: str = "zeros"
    value: Weight | None = None

    @property
    def positive(self) -> bool:
        return any(a > 0 for pair in self.pairs for a in pair)

    def around(self, inner: Padding) -> Padding | str:
        """This padding applied to the result of ``inner``, as one padding; or why it is not one.

        Per side, with inner amount ``a`` and outer ``e``: a crop of a padded value removes the
        padding first (``a + e``, exact for every mode); padding a cropped value fills with zeros
        where real values were, which no single padding expresses; two zero paddings add up.
        Circular padding reads the opposite end, which a crop moves: a dim that is both cropped
        and padded circularly is never folded (the merge would move the crop)."""
        pairs = []
        modes: set[str] = set()
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
        mode = modes.pop() if modes else "zeros"
        value = (inner.value if inner.mode == "value" else self.value) if mode == "value" else None
        return Padding(tuple(pairs), mode, value)


@dataclass(frozen=True)
class Geometry:
    """Static attributes of a convolution, normalised.

    ``padding`` is ``(left, right)`` per spatial dim; a negative amount is a crop; what padded
    positions hold is ``padding_mode`` (and ``pad_value`` for ``"value"``). For a transposed
    conv it is the conv-transpose padding (symmetric) and is never peeled or merged."""

    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    pad_value: Weight | None = None

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


# --------------------------------------------------------------------------------------------
# Applying padding (emission and the reference semantics of fused layers)
# --------------------------------------------------------------------------------------------


def pad_calls(
    pairs: Sequence[tuple[int, int]], mode: str
) -> list[tuple[list[int], dict[str, str]]]:
    """The ``F.pad(x, amounts, **kwargs)`` calls that apply per-dim (left, right) padding:
    the crops (negative amounts) first, then the padding with ``mode`` (zeros, reflect,
    replicate, circular; a value padding is :func:`pad_with_value`'s)."""
    amounts = [a for pair in reversed(pairs) for a in pair]
    crop, grow = [min(a, 0) for a in amounts], [max(a, 0) for a in amounts]
    calls: list[tuple[list[int], dict[str, str]]] = []
    if any(crop):
        calls.append((crop, {}))
    if any(grow):
        calls.append((grow, {"mode": "constant" if mode in ("zeros", "value") else mode}))
    return calls


@register_pure
def pad_with_value(x: Tensor, amounts: list[int], value: Tensor) -> Tensor:
    """``F.pad(x, amounts)`` with the padded positions holding ``value`` (per channel, dim 1
    of a batched input, or one number): ``v`` broadcast per channel, selected where a
    zero-padded mask of ones is 0. A selection, so ``x`` is kept bit for bit whatever ``v``
    is (``pad(x − v) + v`` rounds ``x`` to ``v``'s precision, and an infinite or NaN ``v``
    made every element NaN). ``amounts`` are not negative (:func:`pad_calls`)."""
    v = value.to(x.dtype)
    if v.numel() > 1:
        v = v.reshape(1, -1, *([1] * (x.dim() - 2)))
    padded = len(amounts) // 2
    inside = x.new_ones([1] * (x.dim() - padded) + list(x.shape[x.dim() - padded :]))
    return torch.where(F.pad(inside, amounts) != 0, F.pad(x, amounts), v)


def pad_input(
    x: Tensor, pairs: Sequence[tuple[int, int]], mode: str, value: Tensor | None = None
) -> Tensor:
    """Apply per-dim (left, right) padding; negative amounts crop."""
    for amounts, kwargs in pad_calls(pairs, mode):
        if mode == "value" and value is not None and kwargs:
            x = pad_with_value(x, amounts, value)
        else:
            x = F.pad(x, amounts, **kwargs)
    return x


# --------------------------------------------------------------------------------------------
# Recognizing pads and crops
# --------------------------------------------------------------------------------------------

_PAD_MODES = {
    "constant": "zeros",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}
_PAD_MODULES: dict[type, str] = {
    _ConstantPadNd: "zeros",
    _ReflectionPadNd: "reflect",
    _ReplicationPadNd: "replicate",
    _CircularPadNd: "circular",
}
_INT64_MAX = 2**63 - 1


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


def _slice_as_padding(node: Node, ndim: int) -> tuple[Node, Padding] | None:
    """``aten.slice(x, dim, start, end)`` on a spatial dim as a crop (negative padding)."""
    args = bind(aten.slice.Tensor, node)
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


_PAD_FUNCTIONS = frozenset({F.pad, aten.pad.default, aten.constant_pad_nd.default})


def _constant_pad(node: Node, ndim: int, ctx: Resolver) -> tuple[Node, Padding] | None:
    """``F.pad(x, …)`` in any mode; a constant value other than 0 is a value padding."""
    args = bind(node.target, node)  # type: ignore[arg-type]
    if args is None or not isinstance(args["input"], Node):
        return None
    mode = _PAD_MODES.get(args.get("mode") or "constant")
    pairs = _pairs_from_pad_arg(args["pad"], ndim)
    if mode is None or pairs is None:
        return None
    if mode != "zeros" and min(min(pair) for pair in pairs) < 0:
        return None  # a negative pad of another mode: leave its semantics to torch
    value = args.get("value")
    if mode == "zeros" and value not in (None, 0, 0.0):
        weight = ctx.weight(value)
        if weight is None or weight.numel() != 1:
            return None
        return args["input"], Padding(pairs, "value", weight)
    return args["input"], Padding(pairs, mode)


def _as_padding_op(
    node: Node, ndim: int, ctx: Resolver, reader: Node | None
) -> tuple[Node, Padding] | None:
    """A pad or crop of a value: ``F.pad``, an ``nn.*Pad*d`` module, a slicing crop, or a zero
    pad whose border is then written with one per-channel value before ``reader`` reads it."""
    if node.op == "call_function" and node.target in (aten.slice.Tensor, operator.getitem):
        source = node.args[0]
        shape = ctx.shape(source) if isinstance(source, Node) else None
        if shape is not None and len(shape) != ndim + 2:
            return None  # an unbatched value: its dims are not (N, C, spatial...)
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        return _slice_as_padding(node, ndim)
    if node.op == "call_function" and node.target is aten.slice_scatter.default:
        return _scattered_border(node, ndim, ctx)
    if node.op == "call_function" and node.target in _PAD_FUNCTIONS:
        found = _constant_pad(node, ndim, ctx)
        if found is not None and found[1].mode == "zeros":
            return _border_written(node, found, reader, ctx)
        return found
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if not isinstance(source, Node):
            return None
        pairs = _slice_crop(index, ndim)
        return None if pairs is None else (source, Padding(pairs))
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = ctx.module(str(node.target))
        mode = next((m for cls, m in _PAD_MODULES.items() if isinstance(module, cls)), None)
        if mode is None or not inherits_forward(module):
            return None
        if mode == "zeros" and getattr(module, "value", 0) != 0:
            return None
        pairs = _pairs_from_pad_arg(module.padding, ndim)
        return None if pairs is None else (node.args[0], Padding(pairs, mode))
    return None


def _border_written(
    pad: Node, found: tuple[Node, Padding], reader: Node | None, ctx: Resolver
) -> tuple[Node, Padding] | None:
    """A zero pad whose whole border is then overwritten, in place, with one constant per
    channel (``out[:, :, 0:p, :] = v`` for each side, DBB's ``BNAndPadLayer``) before
    ``reader`` — its only other reader — reads it: a padding with value ``v``.

    A pad nobody writes is a zero pad (returned as found); a pad written some other way, or
    read by someone else, is not a padding fxfuse can fold (``None``)."""
    source, padding = found
    writes = [u for u in pad.users if u is not reader]
    if not writes:
        return found
    if reader is None:
        return None
    value: Weight | None = None
    value_node: Any = None
    strips: set[tuple[int, int]] = set()
    for write in writes:
        if write.op != "call_function":
            return None
        if write.target is operator.setitem:  # symbolic tracing: out[:, :, 0:p, :] = v
            if write.args[0] is not pad or not write < reader or write.users:
                return None
            strip = _border_strip(write.args[1], padding.pairs)
            written: Any = write.args[2]
        elif write.target is aten.slice.Tensor:  # torch.export: copy_(out[:, :, 0:p], v)
            (copy,) = write.users if len(write.users) == 1 else (None,)
            if copy is None or copy.target is not aten.copy_.default or copy.args[0] is not write:
                return None
            if not copy < reader or copy.users:
                return None
            strip = _aten_strip(write, padding.pairs)
            written = _broadcast_source(copy.args[1])
        else:
            return None
        weight = ctx.weight(written)
        if strip is None or weight is None or not _per_channel(weight, len(padding.pairs)):
            return None
        if value is None:
            value, value_node = weight, _view_root(written)
        elif not _same_constant(value, value_node, weight, _view_root(written)):
            return None  # one value on every side
        strips.add(strip)
    wanted = {(d, side) for d, pair in enumerate(padding.pairs) for side in (0, 1) if pair[side]}
    if strips != wanted or value is None:
        return None
    return source, Padding(padding.pairs, "value", value)


def _scattered_border(node: Node, ndim: int, ctx: Resolver) -> tuple[Node, Padding] | None:
    """The functional form of a border write (``torch.export`` after ``run_decompositions``):
    ``slice_scatter(… slice_scatter(pad(x), v₁, dim, start, end) …, vₖ, …)``, each strip one
    side of one padded dim, all holding one per-channel constant: a padding with that value.
    With dynamic dims, export writes each strip as nested scatters over full slices of the
    other dims (see :func:`_strip_write`). Functional values are never written, so no other
    reader matters."""
    writes: list[tuple[tuple[Any, ...], Any]] = []
    for _ in range(64):
        if node.op != "call_function" or node.target is not aten.slice_scatter.default:
            break
        found = _strip_write(node)
        if found is None:
            return None
        node, region, written = found
        writes.append((region, written))
    pad = node
    if pad.op != "call_function" or pad.target not in _PAD_FUNCTIONS:
        return None
    found_pad = _constant_pad(pad, ndim, ctx)
    if found_pad is None or found_pad[1].mode != "zeros":
        return None
    source, padding = found_pad
    strips: set[tuple[int, int]] = set()
    root: Any = None
    value: Weight | None = None
    for region, written in writes:
        narrowed = [r for r in region if not (r[1] in (0, None) and r[2] in (None, _INT64_MAX))]
        if len(narrowed) != 1:
            return None
        dim, start, end, step = narrowed[0]
        strip = _strip_of(dim, start, end, step, padding.pairs)
        weight = ctx.weight(written)
        if strip is None or weight is None or not _per_channel(weight, ndim):
            return None
        if value is None:
            root, value = _view_root(written), weight
        elif not _same_constant(value, root, weight, _view_root(written)):
            return None  # one value on every side
        strips.add(strip)
    wanted = {(d, side) for d, pair in enumerate(padding.pairs) for side in (0, 1) if pair[side]}
    if strips != wanted or value is None:
        return None
    return source, Padding(padding.pairs, "value", value)


def _slice_args(node: Node, op: Any) -> tuple[Any, ...] | None:
    args = bind(op, node)
    if args is None:
        return None
    return args["dim"], args["start"], args["end"], args["step"]


def _strip_write(node: Node) -> tuple[Node, tuple[tuple[Any, ...], ...], Any] | None:
    """``slice_scatter(base, src, dim, start, end)`` as ``(base, region, value)``: ``value``
    (broadcast) written into ``base[region]``, the rest of ``base`` kept. A ``src`` that is
    itself a ``slice_scatter`` into the same region of ``base`` (a slice of a slice) narrows
    the region; ``copy(strip, v)`` is ``v`` broadcast to the strip."""
    args = bind(aten.slice_scatter.default, node)
    if args is None or not isinstance(args["input"], Node):
        return None
    base = args["input"]
    region = [(args["dim"], args["start"], args["end"], args["step"])]
    src = args["src"]
    while isinstance(src, Node) and src.target is aten.slice_scatter.default:
        inner = bind(aten.slice_scatter.default, src)
        if inner is None or _slice_chain(inner["input"]) != (base, tuple(region)):
            return None
        region.append((inner["dim"], inner["start"], inner["end"], inner["step"]))
        src = inner["src"]
    if isinstance(src, Node) and src.target is aten.copy.default:
        src = src.args[1]
    return base, tuple(region), _broadcast_source(src)


def _slice_chain(node: Any) -> tuple[Any, tuple[tuple[Any, ...], ...]]:
    """``aten.slice(aten.slice(base, …), …)`` as ``(base, the slices' arguments in order)``."""
    region: list[tuple[Any, ...]] = []
    while isinstance(node, Node) and node.target is aten.slice.Tensor:
        found = _slice_args(node, aten.slice.Tensor)
        if found is None:
            break
        region.append(found)
        node = node.args[0]
    return node, tuple(reversed(region))


_EXPANDS = frozenset({aten.expand.default, aten.expand_copy.default})
_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


def _broadcast_source(value: Any) -> Any:
    """The value an ``expand`` broadcasts (a write broadcasts its value anyway; the expanded
    shape may hold the batch size)."""
    while isinstance(value, Node) and value.op == "call_function" and value.target in _EXPANDS:
        value = value.args[0]
    return value


def _view_root(value: Any) -> Any:
    """The value under a chain of views: writes of two views of one per-channel constant,
    each shaped per channel, write the same values."""
    while isinstance(value, Node) and value.op == "call_function" and value.target in _VIEWS:
        value = value.args[0]
    return value


def _same_constant(a: Weight, a_root: Any, b: Weight, b_root: Any) -> bool:
    """Whether two per-channel constants written into a border are one: views of one value,
    or (folded one view at a time, by ``fold-constants``) equal values that never change."""
    if a_root is b_root:
        return True
    if a.live or b.live or a.numel() != b.numel():
        return False
    return bool(torch.equal(evaluate(a).reshape(-1), evaluate(b).reshape(-1)))


def _per_channel(weight: Weight, ndim: int) -> bool:
    """Whether ``weight``, broadcast against a batched ``(N, C, *spatial)`` value of ``ndim``
    spatial dims, holds one value per channel (or one for all): every dim but C is 1."""
    shape = tuple(weight.shape)
    if len(shape) > ndim + 2:
        return False
    full = (1,) * (ndim + 2 - len(shape)) + shape
    return all(size == 1 for i, size in enumerate(full) if i != 1)


def _aten_strip(node: Node, pairs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """``(dim, side)`` where ``aten.slice(x, dim, start, end)`` selects exactly one padded
    strip (see :func:`_border_strip`)."""
    found = _slice_args(node, aten.slice.Tensor)
    if found is None:
        return None
    dim, start, end, step = found
    return _strip_of(dim, start, end, step, pairs)


def _strip_of(
    dim: Any, start: Any, end: Any, step: Any, pairs: Sequence[tuple[int, int]]
) -> tuple[int, int] | None:
    ndim = len(pairs)
    if not isinstance(dim, int) or step not in (None, 1):
        return None
    d = (dim if dim >= 0 else dim + ndim + 2) - 2
    if not 0 <= d < ndim:
        return None
    start = 0 if start is None else start
    end = None if end == _INT64_MAX else end
    left, right = pairs[d]
    if start == 0 and end == left and left > 0:
        return d, 0
    if start == -right and end is None and right > 0:
        return d, 1
    return None


def _border_strip(index: Any, pairs: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """``(dim, side)`` when ``index`` selects exactly the left (0) or right (1) padded strip of
    one spatial dim, all of every other dim: ``[:, :, 0:p, :]`` or ``[:, :, :, -p:]``."""
    if not isinstance(index, tuple) or len(index) != len(pairs) + 2:
        return None
    if any(i != slice(None) for i in index[:2]):
        return None
    found = None
    for d, (s, (left, right)) in enumerate(zip(index[2:], pairs, strict=True)):
        if s == slice(None):
            continue
        if not isinstance(s, slice) or s.step not in (None, 1) or found is not None:
            return None
        if s.start in (None, 0) and s.stop == left and left > 0:
            found = (d, 0)
        elif s.start == -right and s.stop is None and right > 0:
            found = (d, 1)
        else:
            return None
    return found


def peel_padding(
    node: Node, outer: Padding, ctx: Resolver, reader: Node | None = None
) -> tuple[Node, Padding, tuple[Node, str] | None]:
    """Walk from a layer's input ``node`` (read by ``reader``) through pads and crops, folding
    them into the layer's padding ``outer``.

    Returns the value actually read, the total padding, and, when the walk stopped at a pad or
    crop that does not compose exactly (:meth:`Padding.around`), the value under it and why."""
    ndim = len(outer.pairs)
    while True:
        inner = _as_padding_op(node, ndim, ctx, reader)
        if inner is None:
            return node, outer, None
        combined = outer.around(inner[1])
        if isinstance(combined, str):
            return (
                node,
                outer,
                (inner[0], f"{node.name} does not fold into its padding: {combined}"),
            )
        reader, node, outer = node, inner[0], combined
