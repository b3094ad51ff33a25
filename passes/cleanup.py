"""Cleanup: ops that compute nothing at inference.

    # identity(x) -> x
    # dropout(x, training=False) -> x      (also p = 0 in training mode)

Dead nodes left by the other rules are erased as each rewrite lands; unused submodules and
attributes are dropped when the fused module is emitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn
from torch.fx import Node
from torch.nn.modules.dropout import _DropoutNd

from fxfuse.ops import aten, bind_arguments, inherits_forward
from fxfuse.rules import Match, RewriteContext, Rule

__all__ = ["DropDropout", "DropIdentity"]


@dataclass
class PassThrough(Match):
    input: Node
    training: bool = False
    p: float = 0.0


class DropIdentity(Rule[PassThrough]):
    """``identity(x) -> x`` for ``nn.Identity`` modules."""

    name = "drop-identity"
    formula = "identity(x) -> x"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[PassThrough]:
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], Node):
            return
        module = ctx.module(str(node.target))
        if isinstance(module, nn.Identity) and inherits_forward(module):
            yield PassThrough(node, input=node.args[0])

    def rewrite(self, match: PassThrough, ctx: RewriteContext) -> Node:
        return match.input


_DROPOUT_FUNCTIONS = {
    aten.dropout.default,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}


def _dropout(node: Node, x: Node, training: bool, p: float) -> PassThrough:
    # dropout that is off returns its input untouched, even with inplace=True
    off = not training or p == 0
    return PassThrough(node, input=x, training=training, p=p, writes_nothing=off)


class DropDropout(Rule[PassThrough]):
    """``dropout(x) -> x`` where dropout is off: eval mode, or ``p = 0``."""

    name = "drop-eval-dropout"
    formula = "dropout(x, training=False) -> x"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[PassThrough]:
        if node.op == "call_module" and len(node.args) == 1 and isinstance(node.args[0], Node):
            module = ctx.module(str(node.target))
            if isinstance(module, _DropoutNd) and inherits_forward(module):
                yield _dropout(node, node.args[0], module.training, float(module.p))
        elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            args = bind_arguments(node.target, node)
            if args is None or not isinstance(args["input"], Node):
                return
            training = args.get("training", args.get("train", True))
            p = args.get("p", 0.5)
            if isinstance(training, bool) and isinstance(p, (int, float)):
                yield _dropout(node, args["input"], training, float(p))

    def check(self, match: PassThrough, ctx: RewriteContext) -> str | None:
        if match.training and match.p > 0:
            return (
                "dropout in training mode zeroes random elements; call .eval() to make "
                "it the identity"
            )
        return None

    def rewrite(self, match: PassThrough, ctx: RewriteContext) -> Node:
        return match.input
