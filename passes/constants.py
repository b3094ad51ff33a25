"""fold-constants: an op whose inputs are all constants is a constant.

    # f(c₁, c₂, …) -> c       (weights, buffers, numbers; deterministic ops only)

Models compute things from their weights at run time — torchvision's ``FrozenBatchNorm2d``
builds ``scale = γ·rsqrt(var + eps)`` and ``bias = β − μ·scale`` on every call, weight
standardization rescales a kernel — and the other rules can only fold what they can read as a
tensor. Evaluating those ops once turns ``conv(x) * scale + bias`` into something the merge
rule folds into the conv. The op runs exactly as the model would run it (same dtypes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.fx import Node
from torch.fx.node import map_arg

from fxfuse.effects import run_pure
from fxfuse.rules import Match, RewriteContext, Rule

__all__ = ["FoldConstants"]

# An op may make its result bigger than its inputs (expand, repeat): never materialize more
# than this many times the largest input.
GROWTH_LIMIT = 4


@dataclass
class ConstantOp(Match):
    value: Tensor


class FoldConstants(Rule[ConstantOp]):
    """``f(c₁, c₂, …) -> c`` for pure, deterministic ops on constant tensors."""

    name = "fold-constants"
    formula = "f(c1, c2, ...) -> c"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[ConstantOp]:
        if node.op not in ("call_function", "call_method") or not node.users:
            return
        if node.target is getattr or not node.all_input_nodes:
            return  # (metadata reads stay)
        effects = ctx.effects
        if effects.writes(node) or effects.opaque(node) or effects.written(node):
            return  # it writes, runs unknown code, or its result is changed in place later
        if any(user.op == "output" for user in node.users):
            return  # handed to the caller, who may change it: it must be fresh on every call
        values = {}
        for n in node.all_input_nodes:
            value = ctx.tensor(n)
            if value is None:
                return
            values[n] = value
        # Whether an op of constants gives one tensor of sensible size is part of what it
        # *is*, so the pattern evaluates it (there is no condition left to check).
        # (run_pure refuses random ops and writes, asking the operators themselves)
        try:
            result = run_pure(
                _callable(node),
                map_arg(node.args, values.__getitem__),
                map_arg(node.kwargs, values.__getitem__),
            )
        except Exception:
            return
        largest = max(t.numel() for t in values.values())
        if isinstance(result, Tensor) and result.numel() <= GROWTH_LIMIT * max(largest, 1):
            yield ConstantOp(node, value=result)

    def rewrite(self, match: ConstantOp, ctx: RewriteContext) -> Node:
        return ctx.constant(match.value, "folded")

    def describe(self, match: ConstantOp) -> str:
        target = match.root.target
        return f"{getattr(target, '__name__', target)}(constants) -> constant"


def _callable(node: Node) -> Callable[..., Any]:
    if node.op == "call_method":
        name = str(node.target)
        return lambda self_arg, *rest, **kwargs: getattr(self_arg, name)(*rest, **kwargs)
    assert callable(node.target)
    return node.target
