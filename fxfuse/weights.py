"""Weights as expressions of the graph's constants, evaluated once or computed on every call.

Every tensor a rule computes — a folded kernel, a merged bias, a batch norm's scale — is a
:class:`Weight`: an expression whose leaves are the constants the graph reads (a parameter, a
buffer, a weight ``torch.compile`` lifted to a graph input) and whose inner nodes are pure
functions of :mod:`fxfuse.kernels` (float64 arithmetic) or ops of the model re-run on its own
constants. Nothing is computed while the rules run, except what a condition needs; then:

- :func:`evaluate` computes a weight once (float64, exact); at emission,
  :func:`evaluate_as` computes each fused layer's weights and casts them to the layer's dtype,
  one layer at a time and, for a large layer, one block of output channels at a time (each
  kernel function says how its rows follow from its arguments' rows,
  :func:`fxfuse.kernels.by_rows`), so no float64 copy of the model, nor of one large layer, is
  ever held (an intermediate fold that a later merge absorbed is never computed on its own);
- :func:`emit_weight` writes the same expression into the graph, so the fused model computes
  its weights from the *live* constants on every call: the ``torch.compile`` backend does this,
  where weights are graph inputs that may change between calls in ways no version counter sees
  (fused optimizers, batch-norm statistics updated by a forward pass, ``p.data.mul_()``), and
  gradients flow through it to the original parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph, Node

from fxfuse import kernels

__all__ = [
    "Apply",
    "Const",
    "Leaf",
    "Weight",
    "apply",
    "const",
    "emit_weight",
    "evaluate",
    "evaluate_as",
    "is_one",
    "leaf",
    "mul",
    "reciprocal",
]


class Weight:
    """A tensor-valued expression; ``shape``, ``dtype`` and ``device`` are known without
    computing it."""

    __slots__ = ("device", "dtype", "nodes", "shape")

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    nodes: tuple[Node, ...]
    """The graph nodes its leaves are held by (what it reads from the graph), each once."""

    @property
    def live(self) -> bool:
        """Whether it depends on a constant that may change between calls."""
        return False

    def value(self) -> Tensor:
        """The weight's value (no autograd), computed now."""
        return evaluate(self)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


class Leaf(Weight):
    """A constant the graph reads: ``tensor``, held by ``node`` (an attribute read, a weight
    dynamo lifted to a graph input) or by the module attribute ``path`` (a layer's own
    parameter); ``live`` when it may change between calls and must be read on every call."""

    __slots__ = ("_live", "node", "path", "tensor")

    def __init__(
        self, tensor: Tensor, node: Node | None = None, path: str | None = None, live: bool = False
    ):
        self.tensor, self.node, self.path, self._live = tensor, node, path, live
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nodes = () if node is None else (node,)

    @property
    def live(self) -> bool:
        return self._live

    def __repr__(self) -> str:
        where = self.node.name if self.node is not None else self.path
        return f"Leaf({where}, {tuple(self.shape)})"


class Const(Weight):
    """A value fxfuse made (a Python number, a kernel of ones): never changes."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nodes = ()

    def __repr__(self) -> str:
        return f"Const({tuple(self.shape)})"


class Apply(Weight):
    """``fn(*args, **kwargs)`` where arguments may be weights; ``fn`` is pure."""

    __slots__ = ("_live", "args", "fn", "kwargs")

    def __init__(
        self,
        fn: Callable[..., Tensor],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        meta: Tensor,
    ):
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs)
        self.shape, self.dtype = meta.shape, meta.dtype
        children = _weights_in((self.args, self.kwargs))
        self.device = children[0].device if children else torch.device("cpu")
        self._live = any(w.live for w in children)
        # (gathered once here: the driver asks every rewrite which nodes its weights read)
        self.nodes = tuple(dict.fromkeys(n for w in children for n in w.nodes))

    @property
    def live(self) -> bool:
        return self._live

    def __repr__(self) -> str:
        return f"Apply({getattr(self.fn, '__name__', self.fn)}, {tuple(self.shape)})"


def leaf(
    tensor: Tensor, *, node: Node | None = None, path: str | None = None, live: bool = False
) -> Leaf:
    return Leaf(tensor, node, path, live)


def is_one(weight: Weight | None) -> bool:
    """Whether ``weight`` is the number 1 (a constant fxfuse knows, not a tensor that may
    change)."""
    if not isinstance(weight, Const):
        return False
    if weight.tensor is kernels.ONE:  # (most ones: without a tensor comparison)
        return True
    return weight.tensor.dim() == 0 and bool(weight.tensor == 1)


def mul(a: Weight, b: Weight) -> Weight:
    """``a · b``: constants multiplied now, 1 dropped, anything else an expression."""
    if is_one(a):
        return b
    if is_one(b):
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.tensor.to(torch.float64) * b.tensor.to(torch.float64))
    return apply(kernels.product, a, b)


def reciprocal(a: Weight) -> Weight:
    """``1 / a``."""
    if isinstance(a, Const):
        return Const(1.0 / a.tensor.to(torch.float64))
    return apply(kernels.reciprocal, a)


@functools.lru_cache(maxsize=1024)
def _scalar(value: float) -> Const:
    if value == 1.0:
        return Const(kernels.ONE)  # (kernels skip multiplying by this very tensor)
    return Const(torch.tensor(value, dtype=torch.float64))


def const(value: Tensor | float) -> Const:
    """A constant weight: a Python number (0-d float64) or a tensor fxfuse computed."""
    if isinstance(value, Tensor):
        return Const(value.detach())
    return _scalar(float(value))


def apply(
    fn: Callable[..., Tensor], *args: Any, result: Tensor | None = None, **kwargs: Any
) -> Apply:
    """The weight ``fn(*args, **kwargs)``. Its shape and dtype come from ``result`` (the op
    already run on the real values), from the shape a kernel function declares
    (:func:`fxfuse.kernels.shaped`; float64), or from running ``fn`` on meta tensors."""
    shape_of = getattr(fn, "shape_of", None)
    if result is None and shape_of is not None:
        shape = torch.Size(int(s) for s in shape_of(*args, **kwargs))
        result = torch.empty(shape, dtype=torch.float64, device="meta")
    if result is None:
        meta_args, meta_kwargs = _map_weights((args, kwargs), _meta)
        with torch.no_grad():
            result = fn(*meta_args, **meta_kwargs)
    if not isinstance(result, Tensor):
        raise TypeError(f"{getattr(fn, '__name__', fn)} gave {type(result).__name__}, not a tensor")
    return Apply(fn, args, kwargs, result)


# --------------------------------------------------------------------------------------------
# Computing a weight
# --------------------------------------------------------------------------------------------


def evaluate(weight: Weight, memo: dict[int, Tensor] | None = None) -> Tensor:
    """The value of ``weight``, computed from the constants' current values, without autograd.

    ``memo`` (keyed by ``id``) shares subexpressions across the weights of one layer."""
    memo = {} if memo is None else memo
    with torch.no_grad():
        return _evaluate(weight, memo)


def _evaluate(weight: Weight, memo: dict[int, Tensor]) -> Tensor:
    found = memo.get(id(weight))
    if found is not None:
        return found
    if isinstance(weight, Leaf):
        value = weight.tensor.detach()
    elif isinstance(weight, Const):
        value = weight.tensor
    elif isinstance(weight, Apply):
        args, kwargs = _map_weights((weight.args, weight.kwargs), lambda w: _evaluate(w, memo))
        value = weight.fn(*args, **kwargs)
    else:  # pragma: no cover - a new kind of weight
        raise TypeError(f"cannot evaluate {weight!r}")
    memo[id(weight)] = value
    return value


BLOCK_BYTES = 4 * 2**20
"""The float64 bytes of one block of a large layer's weight (:func:`evaluate_as`): a layer
whose float64 weight is larger is computed this many bytes of output channels at a time."""


def evaluate_as(
    weights: Sequence[Weight | None],
    dtype: torch.dtype,
    device: torch.device,
    *,
    block_bytes: int | None = None,
) -> list[Tensor | None]:
    """The values of ``weights`` (a layer's kernel and bias: their dim 0 is the layer's output
    channels), computed exactly (float64) and cast to ``dtype`` on ``device``.

    Subexpressions are shared between the weights. Weights larger than ``block_bytes``
    (float64; default :data:`BLOCK_BYTES`) are computed a block of rows at a time, each block
    cast into the result at once, so the float64 scratch is one block's, not the layer's: the
    rows come from the rows of the arguments wherever a kernel function says how
    (:func:`fxfuse.kernels.by_rows`), and from the whole argument, computed once, elsewhere.
    The same float64 operations on each row: the values are those :func:`evaluate` gives."""
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    present = [w for w in weights if w is not None]
    channels = {int(w.shape[0]) if w.dim() else 0 for w in present}
    row = max((w.numel() // max(int(w.shape[0]), 1) for w in present if w.dim()), default=0)
    if len(channels) != 1 or min(channels) < 2 or min(channels) * row * 8 <= block_bytes:
        memo: dict[int, Tensor] = {}
        values = [None if w is None else evaluate(w, memo) for w in weights]
        del memo  # (one layer's float64 scratch at a time)
        return [None if v is None else v.to(device=device, dtype=dtype) for v in values]
    (total,) = channels
    step = max(1, block_bytes // (8 * row))
    results = [
        None if w is None else torch.empty(w.shape, dtype=dtype, device=device) for w in weights
    ]
    whole: dict[int, Tensor] = {}
    with torch.no_grad():
        for start in range(0, total, step):
            stop = min(start + step, total)
            block: dict[tuple[int, int, int], Tensor] = {}
            for w, result in zip(weights, results, strict=True):
                if w is None or result is None:
                    continue
                value = _rows(w, start, stop, block, whole)
                if value.shape != result[start:stop].shape:  # pragma: no cover - a wrong rule
                    raise RuntimeError(f"rows {start}:{stop} of {w!r} came out {value.shape}")
                result[start:stop].copy_(value)
            del block
    return results


def _rows(
    weight: Weight,
    start: int,
    stop: int,
    block: dict[tuple[int, int, int], Tensor],
    whole: dict[int, Tensor],
) -> Tensor:
    """Rows ``start:stop`` of ``weight`` (``block`` shares them within one block of rows,
    ``whole`` the weights computed whole within the layer)."""
    key = (id(weight), start, stop)
    found = block.get(key)
    if found is not None:
        return found
    value: Tensor | None = None
    if isinstance(weight, Leaf):
        value = weight.tensor.detach()[start:stop]
    elif isinstance(weight, Const):
        value = weight.tensor[start:stop]
    elif isinstance(weight, Apply):
        rule = getattr(weight.fn, "rows_of", None)
        if rule is not None:
            value = rule(
                start,
                stop,
                lambda w, i, j: _rows(w, i, j, block, whole) if isinstance(w, Weight) else w[i:j],
                lambda w: _evaluate(w, whole) if isinstance(w, Weight) else w,
                *weight.args,
                **weight.kwargs,
            )
    if value is None:  # (no rule, or not for these rows: the whole value, once, sliced)
        value = _evaluate(weight, whole)[start:stop]
    block[key] = value
    return value


def emit_weight(
    weight: Weight,
    graph: Graph,
    constant: Callable[[Tensor], Node],
    memo: dict[int, Node],
) -> Node:
    """Nodes of ``graph`` (inserted at its current insertion point) computing ``weight`` on
    every call: leaves are the nodes that hold them, constants become attributes (through
    ``constant``), applications become calls. Shared subexpressions are emitted once per
    ``memo``."""
    found = memo.get(id(weight))
    if found is not None:
        return found
    if isinstance(weight, Leaf):
        if weight.node is not None:
            node = weight.node
        else:
            assert weight.path is not None, weight
            node = graph.get_attr(weight.path)
    elif isinstance(weight, Const):
        node = constant(weight.tensor)
    elif isinstance(weight, Apply):
        args, kwargs = _map_weights(
            (weight.args, weight.kwargs), lambda w: emit_weight(w, graph, constant, memo)
        )
        node = graph.call_function(weight.fn, tuple(args), kwargs)
    else:  # pragma: no cover
        raise TypeError(f"cannot emit {weight!r}")
    memo[id(weight)] = node
    return node


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _map_weights(value: Any, fn: Callable[[Weight], Any]) -> Any:
    """``value`` with ``fn(w)`` for each weight ``w`` in it (nested tuples, lists, dicts)."""
    if isinstance(value, Weight):
        return fn(value)
    if isinstance(value, tuple):
        return tuple([_map_weights(v, fn) if isinstance(v, _NESTED) else v for v in value])
    if isinstance(value, list):
        return [_map_weights(v, fn) if isinstance(v, _NESTED) else v for v in value]
    if isinstance(value, dict):
        return {k: _map_weights(v, fn) if isinstance(v, _NESTED) else v for k, v in value.items()}
    return value


_NESTED = (Weight, tuple, list, dict)  # (the values _map_weights looks into)


def _weights_in(value: Any) -> list[Weight]:
    """The weights in ``value`` (nested tuples, lists and dicts), in order."""
    found: list[Weight] = []
    stack = [value]
    while stack:  # (every new expression asks: without a call per argument)
        v = stack.pop()
        if isinstance(v, Weight):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
    return found


def _meta(weight: Weight) -> Tensor:
    return torch.empty(weight.shape, dtype=weight.dtype, device="meta")
