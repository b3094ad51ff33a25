"""Layout evidence: the rank a value has for *every* input the model accepts.

Some rewrites are exact only at one rank: a ``BatchNorm1d`` normalizes dim 1, which is a
``Linear`` layer's feature axis only when its output is 2-d; a ``[1, C]`` scale beside a linear
layer adds a dim to a 1-d input. Example inputs show one rank; they prove nothing about the next
input. :class:`Ranks` proves a rank from the program itself: ops that fix it (``flatten(x, 1)``,
``x.view(n, -1)``, a ``BatchNorm2d`` that rejects anything but 4-d, a global pool), carried
forward through ops that keep it. ``None`` means not proven.

One assumption is made, and documented in the README: the activations a conv reads are
batched, ``(N, C, *spatial)`` (the layout every ``nn.BatchNorm`` enforces), so a ``d``-d conv's
output has rank ``d + 2`` where nothing else says otherwise. A linear layer gets no such
assumption: its input may have any rank.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, Node

from fxfuse.dialects import aten, bind
from fxfuse.effects import reads_metadata_only

__all__ = ["Ranks"]

# ops whose result has the rank of their first tensor argument
_SAME_RANK_METHODS = frozenset(
    {
        "relu",
        "relu_",
        "sigmoid",
        "tanh",
        "contiguous",
        "clone",
        "float",
        "half",
        "double",
        "to",
        "transpose",
        "permute",
        "abs",
        "exp",
        "neg",
        "sqrt",
        "rsqrt",
        "pow",
        "softmax",
        "log_softmax",
        "add",
        "sub",
        "mul",
        "div",
        "add_",
        "sub_",
        "mul_",
        "div_",
        "clamp",
        "clamp_",
        "hardswish",
        "detach",
        "type_as",
        "masked_fill",
        "roll",
    }
)
_SAME_RANK_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu6,
        F.gelu,
        F.silu,
        F.hardswish,
        F.hardsigmoid,
        F.sigmoid,
        F.tanh,
        F.leaky_relu,
        F.elu,
        F.mish,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.softmax,
        F.log_softmax,
        F.batch_norm,
        F.layer_norm,
        F.group_norm,
        F.linear,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool2d,
        F.interpolate,
        F.pad,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.transpose,
        torch.permute,
        torch.clone,
        torch.batch_norm,
        torch.roll,
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        operator.neg,
        torch.nn.functional.normalize,
        torch.channel_shuffle,
    }
)
_BROADCASTING = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.maximum,
        torch.minimum,
        torch.where,
    }
)
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "std", "var", "norm", "prod"})
_SAME_RANK_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.PReLU,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Softmax,
    nn.Upsample,
)
_BN_RANK = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
# a conv's output rank where its input's is not proven: batched (the documented layout)
_CONV_RANKS = {
    F.conv1d: 3,
    F.conv2d: 4,
    F.conv3d: 5,
    torch.conv1d: 3,
    torch.conv2d: 4,
    torch.conv3d: 5,
    F.conv_transpose1d: 3,
    F.conv_transpose2d: 4,
    F.conv_transpose3d: 5,
}


class Ranks:
    """Proven ranks of a graph's values.

    They are read off the program as captured, before any rewrite: what the original proves
    (a ``BatchNorm2d`` rejects anything but 4-d) holds for every input the original accepts,
    which is all a rewrite must match, even after the batch norm is folded away. A node that
    replaces another (:meth:`replaced`) has its rank; other new nodes are looked at when asked.
    """

    def __init__(
        self,
        graph: Graph,
        module: Callable[[str], nn.Module],
        tensor: Callable[[Node], Tensor | None],
    ):
        self._module = module
        self._tensor = tensor
        self._memo: dict[Node, int | None] = {}
        for node in graph.nodes:  # (in order: inputs first, so no deep recursion)
            self(node)

    def replaced(self, old: Node, new: Node) -> None:
        """``new`` computes ``old``'s value: it has the rank the program proved for ``old``."""
        if self._memo.get(old) is not None:
            self._memo[new] = self._memo[old]

    def __call__(self, node: Any) -> int | None:
        if not isinstance(node, Node):
            return 0 if isinstance(node, (int, float)) and not isinstance(node, bool) else None
        if node in self._memo:
            return self._memo[node]
        self._memo[node] = None  # (cycles cannot happen in a graph; this guards recursion)
        found = self._rank(node)
        self._memo[node] = found
        return found

    def _rank(self, node: Node) -> int | None:
        if node.op == "get_attr":
            t = self._tensor(node)
            return None if t is None else t.dim()
        if node.op == "placeholder":
            t = self._tensor(node)  # a weight lifted to an input holds its tensor
            return None if t is None else t.dim()
        if node.op == "call_module":
            return self._module_rank(node)
        if node.op == "call_method":
            return self._method_rank(node)
        if node.op == "call_function":
            return self._function_rank(node)
        return None

    def _first(self, node: Node) -> int | None:
        return self(node.args[0]) if node.args else None

    def _module_rank(self, node: Node) -> int | None:
        module = self._module(str(node.target))
        for cls, r in _BN_RANK.items():
            if isinstance(module, cls):
                return r  # it rejects any other rank
        if isinstance(module, nn.BatchNorm1d):
            r = self._first(node)
            return r if r in (2, 3) else None
        if isinstance(module, nn.Flatten):
            return _flatten_rank(self._first(node), module.start_dim, module.end_dim)
        if isinstance(module, nn.modules.conv._ConvNd):
            r = self._first(node)
            return len(module.kernel_size) + 2 if r is None else r
        if isinstance(module, _SAME_RANK_MODULES):
            return self._first(node)
        return None

    def _method_rank(self, node: Node) -> int | None:
        name = str(node.target)
        if name in ("view", "reshape"):
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            return len(shape) if shape else None
        if name == "flatten":
            args = bind(torch.flatten, node)
            return (
                None
                if args is None
                else _flatten_rank(self(args["input"]), args["start_dim"], args["end_dim"])
            )
        if name in _REDUCTIONS:
            return self._reduction_rank(node, torch.mean)
        if name == "unsqueeze":
            r = self._first(node)
            return None if r is None else r + 1
        if name in ("squeeze",) and len(node.args) == 2:
            r = self._first(node)
            return None if r is None else r - 1
        if name in ("reshape_as", "view_as", "expand_as"):
            return self(node.args[1]) if len(node.args) > 1 else None
        if name in _SAME_RANK_METHODS:
            return (
                self._broadcast(node) if name in ("add", "sub", "mul", "div") else self._first(node)
            )
        return None

    def _function_rank(self, node: Node) -> int | None:
        fn = node.target
        if fn in (torch.flatten, aten.flatten.using_ints):
            args = bind(torch.flatten, node)
            return (
                None
                if args is None
                else _flatten_rank(self(args["input"]), args["start_dim"], args["end_dim"])
            )
        if fn in (
            torch.reshape,
            aten.view.default,
            aten.reshape.default,
            aten._unsafe_view.default,
        ):
            shape = node.args[1] if len(node.args) > 1 else None
            return len(shape) if isinstance(shape, (tuple, list)) else None
        if fn in (torch.mean, torch.sum, torch.amax, aten.mean.dim, aten.sum.dim_IntList):
            return self._reduction_rank(node, torch.mean)
        if fn in (torch.cat, aten.cat.default):
            tensors = node.args[0] if node.args else ()
            ranks = {self(t) for t in tensors} if isinstance(tensors, (list, tuple)) else {None}
            return ranks.pop() if len(ranks) == 1 else None
        if fn in _BROADCASTING:
            return self._broadcast(node)
        if fn in _CONV_RANKS:
            r = self._first(node)
            return _CONV_RANKS[fn] if r is None else r
        if fn in _SAME_RANK_FUNCTIONS:
            return self._first(node)
        if fn is operator.getitem:
            return self._index_rank(node)
        from fxfuse.maps import fused_layer  # (layout is below maps; fused layers keep rank)

        if fn is fused_layer:
            layer = node.args[1]
            geo = getattr(layer, "geometry", None)
            r = self._first(node)
            return geo.ndim + 2 if r is None and geo is not None else r
        if isinstance(fn, torch._ops.OpOverload) and fn.overloadpacket.__name__ in {
            "convolution",
            "relu",
            "relu_",
            "hardswish",
            "hardswish_",
            "sigmoid",
            "silu",
            "clone",
            "_native_batch_norm_legit_no_training",
            "avg_pool2d",
            "linear",
        }:
            return self._first(node)
        return None

    def _broadcast(self, node: Node) -> int | None:
        ranks = [self(a) for a in node.args[:2]]
        if any(r is None for r in ranks):
            return None
        return max(r for r in ranks if r is not None)

    def _reduction_rank(self, node: Node, fn: Any) -> int | None:
        args = bind(fn, node)
        r = self._first(node)
        if args is None or r is None:
            return None
        dims = args.get("dim")
        if args.get("keepdim"):
            return r
        if dims is None:
            return 0
        return r - (len(dims) if isinstance(dims, (tuple, list)) else 1)

    def _index_rank(self, node: Node) -> int | None:
        source, index = node.args
        if (
            isinstance(source, Node)
            and source.op == "call_function"
            and reads_metadata_only(source, source.args[0] if source.args else source)
        ):
            return None
        r = self(source)
        if r is None:
            return None
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (Node, list)) for i in items):
            return None
        removed = sum(isinstance(i, int) for i in items)
        added = sum(i is None for i in items)
        return r - removed + added


def _flatten_rank(r: int | None, start: int, end: int) -> int | None:
    if end == -1 and start >= 0:
        return start + 1  # whatever the input rank (above start)
    if r is None:
        return None
    start, end = start % r if r else 0, end % r if r else 0
    return r - (end - start)
