"""compose-layers: a layer reading a pointwise layer's output is one layer.

    # layer₂(pad(layer₁(x))) -> layer'(x)      (layer₁ a 1×1 conv or a linear layer)
    W[o, i, …] = Σ_m W₂[o, m, …] · W₁[m, i];   b = b₂ + Σ_m (Σ_taps W₂[o, m, …]) · b₁[m]

DBB's transform III (``1×1 → k×k``), exact when what layer₂'s padding holds is layer₁'s image
of zero: zeros with no bias before it, or the value DBB's ``BNAndPadLayer`` writes (see
:func:`fxfuse.maps.as_chain`). Composing is done only where the composed layer costs no more
multiply-adds than the two (a 1×1 that shrinks the channels before a k×k is cheaper as two);
inside a sum of branches, :mod:`.merge_branches` composes chains as part of the merge, where
the cost that counts is the merged layer's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.fx import Node

from fxfuse.maps import Chain, Refusal, as_chain
from fxfuse.rules import Match, RewriteContext, Rule

__all__ = ["ComposeLayers"]


@dataclass
class Composition(Match):
    chain: Chain | None
    refused: str | None = None


class ComposeLayers(Rule[Composition]):
    """``layer₂(layer₁(x)) -> layer'(x)`` for a pointwise ``layer₁``, where it is cheaper."""

    name = "compose-layers"
    formula = "conv_kxk(conv_1x1(x)) -> conv'(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[Composition]:
        found = as_chain(node, ctx)
        if isinstance(found, Chain):
            yield Composition(node, chain=found, absorbed=[])
        elif isinstance(found, Refusal) and "pointwise" not in found.reason:
            # (a k×k on a k×k is simply two layers: no decline for every such pair)
            yield Composition(node, chain=None, refused=found.reason)

    def check(self, match: Composition, ctx: RewriteContext) -> str | None:
        if match.chain is None:
            return match.refused
        chain = match.chain
        if chain.layer.macs > chain.macs:
            return (
                f"the composed {chain.layer.describe()} would cost {chain.layer.macs:,} "
                f"multiply-adds per position, the {chain.inner.describe()} and "
                f"{chain.outer.describe()} {chain.macs:,}"
            )
        return None

    def rewrite(self, match: Composition, ctx: RewriteContext) -> Node:
        chain = match.chain
        assert chain is not None
        layer = chain.layer
        return ctx.fused(
            layer.input,
            kind=layer.kind,
            weight=layer.weight,
            bias=layer.bias,
            geometry=layer.geometry,
            like=chain.outer,
            sources=layer.sources,
            name=layer.name,
            requires_grad=layer.requires_grad,
        )

    def describe(self, match: Composition) -> str:
        chain = match.chain
        assert chain is not None
        return f"{chain.outer.describe()} ∘ {chain.inner.describe()} -> {chain.layer.describe()}"
