"""fxfuse's rules, one family per module, and the default rule set.

- :mod:`.cleanup`: ``identity(x) -> x``, ``dropout(x, training=False) -> x``
- :mod:`.constants`: ``f(c₁, c₂, …) -> c`` (weights computed at run time, e.g. frozen BN)
- :mod:`.fold_bn`: ``bn(layer(x)) -> layer'(x)``; ``bn(Σ cᵢ·layerᵢ(xᵢ)) -> Σ layerᵢ'(xᵢ)``
- :mod:`.fold_affine`: ``layer(a·x + t) -> layer'(x)`` (a batch norm or a scale before a layer)
- :mod:`.merge_branches`: ``conv_a(x) + conv_b(x) + x -> conv'(x)`` (pad-and-add)
- :mod:`.compose`: ``conv_kxk(conv_1x1(x)) -> conv'(x)``
- :mod:`.concat`: ``cat([conv_a(x), conv_b(x)], 1) -> conv'(x)``
- :mod:`.equalize`: ``l₂(φ(l₁(x))) -> l₂'(φ(l₁'(x)))`` (cross-layer equalization for INT8;
  opt-in, after fusion: :func:`equalize_rules`)
- :mod:`.avg_pool`: average pooling read as a layer (a depthwise kernel of ``1/kᵈ``), so the
  rules above fold and merge it

Import as ``fxfuse.passes``. How to add a rule: docs/design.md.
"""

from __future__ import annotations

from fxfuse.rules import RuleSet, Stage

from . import avg_pool  # noqa: F401  (registers average pooling as a layer)
from .cleanup import DropEvalDropout, DropIdentity
from .compose import ComposeLayers
from .concat import MergeConcat
from .constants import FoldConstants
from .equalize import EqualizeLayers
from .fold_affine import FoldAffineIntoLayer
from .fold_bn import FoldBn, FoldBnIntoBranches
from .merge_branches import MergeBranches

__all__ = [
    "ComposeLayers",
    "DropEvalDropout",
    "DropIdentity",
    "EqualizeLayers",
    "FoldAffineIntoLayer",
    "FoldBn",
    "FoldBnIntoBranches",
    "FoldConstants",
    "MergeBranches",
    "MergeConcat",
    "default_rules",
    "equalize_rules",
]


def default_rules() -> RuleSet:
    """The rules :func:`fxfuse.optimize` runs unless told otherwise.

    ``cleanup`` first, so dropout and identities do not hide a layer from its batch norm or
    its sibling branches; then ``fuse``, where folding, composing and merging enable each
    other (a merge makes a conv that a post-sum batch norm folds into). A batch norm folds
    into the layer before it rather than the one after (``fold-bn`` is tried first)."""
    return RuleSet(
        [
            Stage("cleanup", (DropIdentity(), DropEvalDropout(), FoldConstants())),
            Stage(
                "fuse",
                (
                    FoldBn(),
                    MergeBranches(),
                    FoldBnIntoBranches(),
                    FoldAffineIntoLayer(),
                    ComposeLayers(),
                    MergeConcat(),
                ),
            ),
        ]
    )


def equalize_rules() -> RuleSet:
    """The rules run after fusion when ``FusionOptions(equalize=True)``: cross-layer
    equalization of the fused layers (a stage of its own, so it sees every layer fused)."""
    return RuleSet([Stage("equalize", (EqualizeLayers(),))])
