"""fold-constants: an op whose inputs are all constants is a constant.

    # f(c₁, c₂, …) -> c       (weights, buffers, numbers; deterministic ops only)

Models compute things from their weights at run time — torchvision's ``FrozenBatchNorm2d``
builds ``scale = γ·rsqrt(var + eps)`` and ``bias = β − μ·scale`` on every call, weight
standardization rescales a kernel. The views already read such values as weight expressions
(:meth:`~fxfuse.rules.RewriteContext.weight`), so the other rules fold them wherever they meet
a layer; this rule computes what is left once, so the fused model does not recompute it on
every call. The op runs exactly as the model would run it (same dtypes), after
:func:`fxfuse.effects.run_pure` has checked that it draws no random numbers and writes nothing.

With live weights (the ``torch.compile`` backend) nothing is computed once: weights may change
between calls, so the rule does not match.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.fx import Node

from fxfuse.rules import Match, RewriteContext, Rule
from fxfuse.weights import Apply, evaluate

__all__ = ["FoldConstants"]


@dataclass
class ConstantOp(Match):
    value: Apply | None
    refused: str | None = None  # why an op of constants is not a constant


class FoldConstants(Rule[ConstantOp]):
    """``f(c₁, c₂, …) -> c`` for pure, deterministic ops on constant tensors."""

    name = "fold-constants"
    formula = "f(c1, c2, ...) -> c"
    ops = frozenset({"call_function", "call_method"})

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[ConstantOp]:
        if not node.users:
            return
        value = ctx.weight(node)
        if isinstance(value, Apply) and not ctx.live:  # (a Leaf is an attribute already)
            yield ConstantOp(node, value=value)
        elif value is None and all(u.op != "output" for u in node.users):
            why = ctx.why_not_constant(node)
            if why is not None and _feeds_no_other_constant_op(node, ctx):
                yield ConstantOp(node, value=None, refused=why)

    def check(self, match: ConstantOp, ctx: RewriteContext) -> str | None:
        return match.refused

    def rewrite(self, match: ConstantOp, ctx: RewriteContext) -> Node:
        assert match.value is not None
        return ctx.constant(evaluate(match.value), "folded")

    def describe(self, match: ConstantOp) -> str:
        target = match.root.target
        return f"{getattr(target, '__name__', target)}(constants) -> constant"


def _feeds_no_other_constant_op(node: Node, ctx: RewriteContext) -> bool:
    """Whether ``node`` is the last op of its chain of ops on constants (one explanation per
    chain, at its end, not one per op)."""
    return not any(ctx.why_not_constant(user) for user in node.users)
