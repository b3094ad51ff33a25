"""Rank assertions that cannot fail: dropped from the fused graph.

Models check ranks as they go: timm's ``BatchNormAct2d`` runs ``torch._assert(x.ndim == 4, …)``
on its input, and symbolic tracing keeps each check as three nodes (``getattr``, ``eq``,
``_assert``). Once the batch norm is folded, the checks read the fused conv's output: two per
block in timm's RepVGG, three Python calls each, on every call of the fused model.

A check is dropped only where it is *provably* true: an earlier check (or an op that accepts
one rank only, like ``BatchNorm2d``) fixed the rank of a value, and ops that keep the rank carry
it forward (``conv → act → conv``). Where the rank is not proven — the first check, reading a
conv of the graph's input, which may be unbatched — the check stays, and the fused model
raises where the original raises. A value passed to code that may change it in place loses
what was proven about it (an in-place ``unsqueeze_`` changes a rank).

::

    y = conv(x); _assert(y.ndim == 4)   # kept: x may be 3-d
    z = relu(y); w = conv(z)
    _assert(w.ndim == 4)                # dropped: w has z's rank, z has y's, y's is 4
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, Node

from fxfuse.dialects import inherits_forward
from fxfuse.effects import _METADATA_ATTRIBUTES
from fxfuse.layout import (
    _BROADCASTING,
    _SAME_RANK_FUNCTIONS,
    _SAME_RANK_METHODS,
    _SAME_RANK_MODULES,
)

__all__ = ["drop_proven_rank_asserts", "drop_unused_metadata_reads"]

# modules that reject every rank but one (torch's own forward checks it)
_ONE_RANK_MODULES = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_RANK_METHODS = frozenset({"dim", "ndimension"})
# functions and methods that read their tensor arguments and change none of them in place
_READING_FUNCTIONS = frozenset(
    {getattr, operator.getitem, operator.eq, operator.ne, torch._assert, torch.cat, torch.stack}
)
_READING_METHODS = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "view",
        "reshape",
        "flatten",
        "unsqueeze",
        "squeeze",
        "expand",
        "expand_as",
        "view_as",
        "reshape_as",
        "chunk",
        "split",
        "mean",
        "sum",
        "amax",
    }
)


def drop_proven_rank_asserts(
    graph: Graph, module: Callable[[str], Any], *, modules_fix_ranks: bool = True
) -> int:
    """Erase each ``torch._assert(x.ndim == k)`` of ``graph`` whose ``x`` is proven to have
    rank ``k`` wherever the check runs; returns how many. The nodes that computed the
    condition are left for dead-code removal.

    ``module`` resolves ``call_module`` targets (those fxfuse built included). A value read by
    an op not known to leave its inputs' ranks alone (user code, an in-place method such as
    ``unsqueeze_``) loses what was proven about it.

    Without ``modules_fix_ranks`` a ``BatchNorm2d`` proves nothing: before the rules run, it
    may be folded into a conv that accepts other ranks, and a check dropped because of it
    would then let an input the original rejects run."""
    ranks: dict[Node, int] = {}
    dropped = 0
    for node in list(graph.nodes):
        checked = _checked_rank(node)
        if checked is not None:
            value, rank = checked
            if ranks.get(value) == rank:
                graph.erase_node(node)
                dropped += 1
                _erase_unused(node.args[0])
            else:
                ranks[value] = rank  # (past this point the check has passed)
            continue
        found = _rank(node, ranks, module, modules_fix_ranks)
        if found is not None:
            ranks[node] = found
        if ranks and not _keeps_input_ranks(node, module):
            for value in node.all_input_nodes:  # (it may change a rank in place)
                ranks.pop(value, None)
    return dropped


def drop_unused_metadata_reads(graph: Graph) -> int:
    """Erase reads of a value's metadata nobody uses (``x.ndim`` formatted into an assert's
    message while tracing: the message holds a string, the read is left without users), and
    what only they read; returns how many nodes went."""
    erased = 0
    for node in list(graph.nodes):
        if not node.users and _metadata_read(node):
            erased += _erase_unused(node)
    return erased


def _metadata_read(node: Any) -> bool:
    """``getattr(x, "ndim")`` and the like, or a comparison of such reads with numbers: pure
    reads of metadata (what a rank check computes)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRIBUTES
    return node.target in (operator.eq, operator.ne) and all(
        _metadata_read(a) or isinstance(a, (int, bool)) for a in node.args
    )


def _erase_unused(node: Any) -> int:
    """Erase ``node`` if it is a metadata read nobody uses, then its inputs likewise."""
    erased = 0
    stack = [node]
    while stack:
        n = stack.pop()
        if not _metadata_read(n) or n.users:
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased += 1
        stack.extend(inputs)
    return erased


def _keeps_input_ranks(node: Node, module: Callable[[str], Any]) -> bool:
    """Whether ``node`` certainly leaves the rank of every tensor it reads as it was: torch's
    own modules and the functions and methods whose results fxfuse reasons about (none
    reshapes its input in place); not user code, nor methods such as ``unsqueeze_``."""
    if node.op == "call_module":
        m = module(str(node.target))
        return isinstance(m, nn.Module) and inherits_forward(m)
    if node.op == "call_function":
        return (
            node.target in _READING_FUNCTIONS
            or node.target in _SAME_RANK_FUNCTIONS
            or node.target in _BROADCASTING
            or _is_fused_layer(node)
        )
    if node.op == "call_method":
        return str(node.target) in _SAME_RANK_METHODS or str(node.target) in _READING_METHODS
    return node.op in ("placeholder", "get_attr")


def _checked_rank(node: Node) -> tuple[Node, int] | None:
    """``(x, k)`` for ``torch._assert(x.ndim == k, …)`` (or ``x.dim()``, either side)."""
    if node.op != "call_function" or node.target is not torch._assert or node.users:
        return None
    cond = node.args[0] if node.args else node.kwargs.get("condition")
    if not (
        isinstance(cond, Node)
        and cond.op == "call_function"
        and cond.target is operator.eq
        and len(cond.args) == 2
        and len(cond.users) == 1
    ):
        return None
    a, b = cond.args
    if isinstance(a, int):
        a, b = b, a
    if isinstance(b, bool) or not isinstance(b, int) or not isinstance(a, Node):
        return None
    value = _rank_read(a)
    return None if value is None else (value, b)


def _rank_read(node: Node) -> Node | None:
    """``x`` where ``node`` is ``x.ndim`` or ``x.dim()``."""
    if (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] == "ndim"
    ) or (node.op == "call_method" and node.target in _RANK_METHODS and len(node.args) == 1):
        source = node.args[0]
    else:
        return None
    return source if isinstance(source, Node) and not node.kwargs else None


def _rank(
    node: Node, ranks: dict[Node, int], module: Callable[[str], Any], modules_fix: bool = True
) -> int | None:
    """The rank ``node``'s value has whenever it is computed, from ``ranks`` already proven,
    or ``None``. Only ops that keep their first argument's rank (or fix one) count."""
    if node.op == "call_module":
        m = module(str(node.target))
        if not isinstance(m, nn.Module) or not inherits_forward(m):
            return None
        for cls, rank in _ONE_RANK_MODULES.items():
            if isinstance(m, cls):
                return rank if modules_fix else _first(node, ranks)
        return _first(node, ranks) if isinstance(m, _SAME_RANK_MODULES) else None
    if node.op == "call_method":
        name = str(node.target)
        if name in ("add", "sub", "mul", "div"):
            return _broadcast(node, ranks)
        if name not in _SAME_RANK_METHODS:
            return None
        others = [*node.args[1:], *node.kwargs.values()]
        if name != "type_as" and any(isinstance(a, Node) for a in others):
            return None  # (``x.pow(t)``, ``x.clamp(min=t)`` broadcast against a tensor)
        return _first(node, ranks)
    if node.op == "call_function":
        if node.target in _BROADCASTING and node.target is not torch.where:
            return _broadcast(node, ranks)
        if node.target in _SAME_RANK_FUNCTIONS or _is_fused_layer(node):
            return _first(node, ranks)
    return None


def _first(node: Node, ranks: dict[Node, int]) -> int | None:
    x = node.args[0] if node.args else None
    return ranks.get(x) if isinstance(x, Node) else None


def _broadcast(node: Node, ranks: dict[Node, int]) -> int | None:
    """The rank of an elementwise op's result: the largest of its operands' (a Python
    number has rank 0); unknown if any tensor operand's is."""
    if node.kwargs.keys() - {"alpha"} or len(node.args) != 2:
        return None
    found = []
    for arg in node.args:
        if isinstance(arg, Node):
            if arg not in ranks:
                return None
            found.append(ranks[arg])
        elif isinstance(arg, (int, float)):
            found.append(0)
        else:
            return None
    return max(found)


def _is_fused_layer(node: Node) -> bool:
    from fxfuse.maps import fused_layer  # (maps imports emit's neighbours)

    return node.target is fused_layer
