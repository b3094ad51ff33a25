"""fxfuse's rules, one family per module, and the default rule set.

- :mod:`.cleanup`: ``identity(x) -> x``, ``dropout(x, training=False) -> x``
- :mod:`.constants`: ``f(c₁, c₂, …) -> c`` (weights computed at run time, e.g. frozen BN)
- :mod:`.fold_bn`: ``bn(conv(x)) -> conv'(x)``; ``bn(Σ cᵢ·convᵢ(xᵢ)) -> Σ convᵢ'(xᵢ)``
- :mod:`.merge_branches`: ``conv_a(x) + conv_b(x) + x -> conv'(x)`` (pad-and-add)
- :mod:`.identity`: the identity and ``BN(x)`` branches as kernels, used by the merge

Import as ``fxfuse.passes``.
"""

from __future__ import annotations

from fxfuse.rules import RuleSet, Stage

from .cleanup import DropDropout, DropIdentity
from .constants import FoldConstants
from .fold_bn import DistributeBatchNorm, FoldBatchNorm
from .merge_branches import MergeBranches

__all__ = [
    "DistributeBatchNorm",
    "DropDropout",
    "DropIdentity",
    "FoldBatchNorm",
    "FoldConstants",
    "MergeBranches",
    "default_rules",
]


def default_rules() -> RuleSet:
    """The rules :func:`fxfuse.optimize` runs unless told otherwise.

    ``cleanup`` first, so dropout and identities do not hide a conv from its batch norm or
    its sibling branches; then ``fuse``, where folding and merging enable each other
    (a merge makes a conv that a post-sum batch norm folds into).
    """
    return RuleSet(
        [
            Stage("cleanup", (DropIdentity(), DropDropout(), FoldConstants())),
            Stage("fuse", (FoldBatchNorm(), MergeBranches(), DistributeBatchNorm())),
        ]
    )
