"""identity-to-kernel: a branch that is the input itself, or a batch norm of it, as a conv kernel.

``x`` is the conv whose kernel is zero except ``W[c, c mod (C/g), centre] = 1``, for any groups
``g`` dividing ``C`` (grouped and depthwise convs included); ``BN(x)`` is the same with
``scale = γ/σ`` on the diagonal and bias ``β − μ·γ/σ``; a constant scale on either multiplies
the diagonal. :mod:`merge_branches` uses these terms to absorb such branches into the merged
conv, and counts each one as an ``identity-to-kernel`` rewrite.

    # x -> conv_id(x),  BN(x) -> conv_bn(x)   (1×1 here; placed at the centre by the merge)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import Node

from fxfuse.kernels import batch_norm_affine
from fxfuse.rules import RewriteContext

__all__ = ["Diagonal", "as_diagonal", "diagonal_terms", "identity"]

RULE_NAME = "identity-to-kernel"


@dataclass(frozen=True)
class Diagonal:
    """The per-channel map ``x ↦ scale · x + shift`` (``None``: 1 and 0, the identity)."""

    label: str  # "identity" or "batch norm"
    scale: Tensor | None = None
    shift: Tensor | None = None
    sources: tuple[str, ...] = ()

    @property
    def channels(self) -> int | None:
        """Channel count the map fixes (``None``: any, the identity)."""
        return None if self.scale is None else self.scale.numel()


def identity() -> Diagonal:
    return Diagonal("identity")


def as_diagonal(node: Node, ctx: RewriteContext) -> tuple[Node, Diagonal] | None:
    """``node = BN(x)`` with running statistics as ``(x, diagonal)``; else ``None``."""
    bn = ctx.batch_norm(node)
    if bn is None or bn.uses_batch_stats or bn.running_mean is None or bn.running_var is None:
        return None
    scale, shift = batch_norm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return bn.input, Diagonal("batch norm", scale, shift, bn.sources)


def diagonal_terms(diagonal: Diagonal, coefficient: Tensor) -> tuple[Tensor, Tensor]:
    """``coefficient · diagonal`` as the per-channel ``(scale, shift)`` its kernel holds:
    ``W[c, c mod (C/g), centre] = scale[c]`` and bias ``shift`` (see
    :func:`fxfuse.kernels.add_diagonal`). ``coefficient`` is a float64 vector."""
    scale = coefficient if diagonal.scale is None else coefficient * diagonal.scale
    shift = (
        torch.zeros_like(coefficient) if diagonal.shift is None else coefficient * diagonal.shift
    )
    return scale, shift
