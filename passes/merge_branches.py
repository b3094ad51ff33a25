"""pad-and-add branch merge: branches that read the same input and are summed become one conv.

    # Σ cᵢ · convᵢ(x) + Σ cⱼ · diagⱼ(x) + Σ constants -> conv'(x)

Each branch is a conv (after folding), or a per-channel map of ``x`` (the identity, a batch
norm, a constant scale: see :mod:`identity`). ``cᵢ`` are constant scales (scalars or
per-channel tensors, from ``*``, ``/``, ``-`` and ``torch.add(alpha=)``). Per spatial dim,
branch ``i`` with kernel ``k``, dilation ``d`` and left padding ``p`` reads input positions
``o·s − p + j·d``. With ``P = max pᵢ``, its tap ``j`` is tap ``P − pᵢ + j·d`` of a conv with
left padding ``P`` (see :func:`fxfuse.kernels.align_windows`), so::

    W' = Σ cᵢ · place(expand_groups(Wᵢ), offsetᵢ, stepᵢ)      b' = Σ cᵢ · bᵢ + constants

The merge is exact when every branch has the same stride and output size for every input
size, branches that read padding share one padding mode, and channel counts agree. Convs with
different groups merge at the coarsest common grouping, which costs multiply-adds: a merge
that would cost more than ``FusionOptions.max_flops_ratio`` times the branches is declined.
A branch whose output has another consumer cannot disappear, so it stays (and is reported).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor
from torch.fx import Node

from fxfuse.kernels import (
    MergedWindow,
    Window,
    add_diagonal,
    add_placed,
    align_windows,
    exact,
    expand_groups,
)
from fxfuse.ops import (
    Combination,
    ConvGeometry,
    ConvView,
    channel_vector,
    constant_value,
    value_users,
)
from fxfuse.rules import Match, RewriteContext, Rule

from .fold_bn import (
    LINEAR_RANK_UNKNOWN,
    other_users,
    promotion_reason,
    uses_batch_stats_reason,
)
from .identity import RULE_NAME as IDENTITY_RULE
from .identity import Diagonal, as_diagonal, diagonal_terms, identity

__all__ = ["BranchGroup", "MergeBranches", "Term"]

_IDENTITY_WINDOW = Window(1, 1, 0, 0)


@dataclass
class Term:
    """One branch of a sum: ``coefficient · node``, where ``node`` reads ``input`` through a
    conv or a per-channel map."""

    coefficient: Tensor
    node: Node
    input: Node
    conv: ConvView | None = None
    diagonal: Diagonal | None = None

    def window(self, dim: int) -> Window:
        if self.conv is None or self.conv.geometry is None:
            return _IDENTITY_WINDOW
        return self.conv.geometry.windows(self.conv.kernel_size)[dim]

    def describe(self) -> str:
        c = self.coefficient
        scale = (
            "" if c.dim() == 0 and float(c) == 1 else (f"{float(c):g}·" if c.dim() == 0 else "s·")
        )
        assert self.conv is not None or self.diagonal is not None
        return scale + (self.conv.describe() if self.conv else self.diagonal.label)


@dataclass
class BranchGroup(Match):
    """Terms of one sum that read the same ``input``, and what stays around them."""

    combination: Combination
    input: Node
    terms: list[Term]
    constants: list[tuple[Tensor, Node | float]]  # folded into the merged bias
    rest: list[tuple[Tensor, Node | float]] = field(default_factory=list)  # kept as they are
    blocked: str | None = None  # why these branches, which read one input, cannot merge

    @property
    def convs(self) -> list[ConvView]:
        return [t.conv for t in self.terms if t.conv is not None]

    @cached_property
    def plan(self) -> Plan:
        return Plan.of(self)


@dataclass(frozen=True)
class Plan:
    """Where each branch lands in the merged conv, and what the merged conv costs."""

    windows: tuple[MergedWindow, ...]
    groups: int
    flops_ratio: float

    @classmethod
    def of(cls, group: BranchGroup) -> Plan:
        first = group.convs[0]
        windows = tuple(
            align_windows([t.window(dim) for t in group.terms]) for dim in range(first.ndim)
        )
        merged_groups = math.gcd(*(c.groups for c in group.convs))
        taps = math.prod(w.kernel for w in windows)
        merged = first.in_channels // merged_groups * taps
        branches = sum(
            t.conv.in_channels // t.conv.groups * math.prod(t.conv.kernel_size) if t.conv else 1
            for t in group.terms
        )
        return cls(windows, merged_groups, merged / branches)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(w.kernel for w in self.windows)

    def geometry(self, like: ConvView, mode: str) -> ConvGeometry | None:
        if like.geometry is None:
            return None
        return ConvGeometry(
            like.geometry.stride,
            tuple((w.left, w.right) for w in self.windows),
            tuple(w.dilation for w in self.windows),
            self.groups,
            mode,
        )


def _is_one(t: Tensor) -> bool:
    return t.dim() == 0 and float(t) == 1.0


def _padding_mode(group: BranchGroup) -> set[str]:
    return {
        c.geometry.padding_mode
        for c in group.convs
        if c.geometry is not None and c.geometry.reads_padding
    }


class MergeBranches(Rule[BranchGroup]):
    """``Σ cᵢ·convᵢ(x) + Σ cⱼ·diagⱼ(x) -> conv'(x)`` (pad-and-add, identity-to-kernel)."""

    name = "merge-branches"
    formula = "conv_a(x) + conv_b(x) + x -> conv'(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[BranchGroup]:
        combo = ctx.combination(node)
        if combo is None:
            return
        terms: list[Term] = []
        stays: list[tuple[Node, Node, str]] = []  # (branch, the input it reads, why it stays)
        for coefficient, term_node in combo.terms:
            term, why = _classify(coefficient, term_node, ctx)
            terms.append(term)
            if why is not None:
                stays.append((term_node, *why))
        by_input: dict[Node, list[Term]] = {}
        for term in terms:
            by_input.setdefault(term.input, []).append(term)
        for x, members in by_input.items():
            convs = [t.conv for t in members if t.conv is not None]
            if not convs:
                continue
            folded, kept = [], []
            for c, operand in combo.constants:
                value = constant_value(operand, ctx)
                assert value is not None
                fits = channel_vector(c * value, convs[0].out_channels, convs[0].ndim)
                (folded if fits is not None else kept).append((c, operand))
            excluded = [(branch, why) for branch, reads, why in stays if reads is x]
            trivial = len(members) == 1 and _is_one(members[0].coefficient) and not folded
            if trivial and excluded:  # nothing to merge because its siblings must stay
                yield BranchGroup(
                    node,
                    combination=combo,
                    input=x,
                    terms=members,
                    constants=[],
                    blocked=excluded[0][1],
                )
            if trivial:
                continue
            rest: list[tuple[Tensor, Node | float]] = [
                (t.coefficient, t.node) for t in terms if t.input is not x
            ]
            yield BranchGroup(
                node,
                combination=combo,
                input=x,
                terms=members,
                constants=folded,
                rest=rest + kept,
                excluded=excluded,
                # the interior of the sum has its shape only if nothing else is added in
                absorbed=[] if rest + kept else list(combo.interior),
            )
        yield from _blocked_groups(node, combo, terms)

    def check(self, group: BranchGroup, ctx: RewriteContext) -> str | None:
        if group.blocked is not None:
            return group.blocked
        convs = group.convs
        first = convs[0]
        for reason in (
            _check_layers(first, convs),
            _check_diagonals(group, first, ctx),
            _check_coefficients(group, first),
            _check_windows(group, first),
            _check_shapes(group, ctx),
        ):
            if reason is not None:
                return reason
        ratio = group.plan.flops_ratio
        if ratio > ctx.options.max_flops_ratio:
            return (
                f"the merged {self._merged(group)} would cost {ratio:.2f}× the branches' "
                f"multiply-adds (limit {ctx.options.max_flops_ratio:g}×, "
                "FusionOptions.max_flops_ratio)"
            )
        return None

    def rewrite(self, group: BranchGroup, ctx: RewriteContext) -> Node:
        first = group.convs[0]
        plan = group.plan
        channels, ndim = first.out_channels, first.ndim
        weight = exact(first.weight).new_zeros(
            (channels, first.in_channels // plan.groups, *plan.kernel_size)
        )
        bias = weight.new_zeros(channels)
        for i, term in enumerate(group.terms):
            vector = channel_vector(term.coefficient, channels, ndim)
            assert vector is not None
            coefficient = vector.to(weight.device)
            offsets = [w.offsets[i] for w in plan.windows]
            if term.conv is not None:
                conv = term.conv
                kernel = conv.weight
                if conv.groups != plan.groups:
                    kernel = expand_groups(
                        exact(kernel), conv.in_channels, conv.groups, plan.groups
                    )
                steps = [w.steps[i] for w in plan.windows]
                add_placed(weight, kernel, offsets, steps, coefficient)
                if conv.bias is not None:
                    bias += coefficient * exact(conv.bias)
            else:
                assert term.diagonal is not None
                scale, shift = diagonal_terms(term.diagonal, coefficient)
                add_diagonal(weight, scale, plan.groups, offsets)
                bias += shift.to(weight.device)
                ctx.count(IDENTITY_RULE)
        for c, operand in group.constants:
            value = constant_value(operand, ctx)
            assert value is not None
            vector = channel_vector(c * value, channels, ndim)
            assert vector is not None
            bias += vector.to(bias.device)
        modes = _padding_mode(group)
        sources = [
            s
            for t in group.terms
            for s in (t.conv.sources if t.conv else t.diagonal.sources if t.diagonal else ())
        ]
        merged = ctx.fused(
            group.input,
            kind=first.kind,
            weight=weight,
            bias=bias,
            geometry=plan.geometry(first, modes.pop() if modes else "zeros"),
            like=first,
            sources=sources,
            name=_merged_name([c.name for c in group.convs]),
            requires_grad=any(c.requires_grad for c in group.convs),
        )
        # the absorbed branches have the merged conv's shape (the checks ruled out broadcasting)
        group.redirects.update({t.node: merged for t in group.terms if t.node is not t.input})
        total = merged
        for c, operand in group.rest:
            total = _add_scaled(ctx, total, c, operand, first)
        anchor = group.combination.anchor
        if anchor is not None:  # ``a += …`` whose ``a`` others see: still updated in place
            total = ctx.call(operator.iadd, anchor, total)
        return total

    def describe(self, group: BranchGroup) -> str:
        parts = [t.describe() for t in group.terms]
        if group.constants:
            parts.append("constant")
        return " + ".join(parts) + " -> " + self._merged(group)

    @staticmethod
    def _merged(group: BranchGroup) -> str:
        first = group.convs[0]
        if first.geometry is None:
            return "linear"
        plan = group.plan
        text = "x".join(map(str, plan.kernel_size)) + " conv"
        dilation = {w.dilation for w in plan.windows}
        if dilation != {1}:
            text += " d" + "x".join(str(w.dilation) for w in plan.windows)
        return text + (f" g{plan.groups}" if plan.groups != 1 else "")


def _classify(
    coefficient: Tensor, node: Node, ctx: RewriteContext
) -> tuple[Term, tuple[Node, str] | None]:
    """The term ``coefficient · node``; and, for a branch that must stay (its output has
    another consumer, its batch norm uses batch statistics), the input it reads and why."""
    conv = ctx.conv(node)
    if conv is not None and not conv.transposed:
        if len(value_users(node)) == 1:
            return Term(coefficient, node, conv.input, conv=conv), None
        why = (
            f"the {conv.describe()} output also feeds {other_users(node, _sum_user(node))}, "
            "so it cannot disappear into the merged conv"
        )
        return Term(coefficient, node, node, diagonal=identity()), (conv.input, why)
    bn = ctx.batch_norm(node)
    if bn is not None:
        found = as_diagonal(node, ctx)
        if found is None:
            return Term(coefficient, node, node, diagonal=identity()), (
                bn.input,
                uses_batch_stats_reason(bn),
            )
        if len(value_users(node)) == 1:
            return Term(coefficient, node, found[0], diagonal=found[1]), None
        why = (
            f"the batch norm output also feeds {other_users(node, _sum_user(node))}, "
            "so it cannot disappear into the merged conv"
        )
        return Term(coefficient, node, node, diagonal=identity()), (bn.input, why)
    return Term(coefficient, node, node, diagonal=identity()), None


def _blocked_groups(root: Node, combo: Combination, terms: list[Term]) -> Iterator[BranchGroup]:
    """Branches that read one input, some through a pad or crop that did not fold into their
    padding: they cannot merge, and the report should say which op stopped them."""
    by_source: dict[Node, list[Term]] = {}
    for term in terms:
        barrier = term.conv.barrier if term.conv is not None else None
        by_source.setdefault(barrier[0] if barrier else term.input, []).append(term)
    for source, members in by_source.items():
        stopped = [t for t in members if t.conv is not None and t.conv.barrier is not None]
        if len(members) < 2 or not stopped:
            continue
        assert stopped[0].conv is not None and stopped[0].conv.barrier is not None
        why = stopped[0].conv.barrier[1]
        yield BranchGroup(
            root,
            combination=combo,
            input=source,
            terms=members,
            constants=[],
            blocked=f"{stopped[0].describe()} reads {source.name} but {why}",
        )


def _sum_user(node: Node) -> Node:
    """Some user of ``node`` (the one inside the sum is as good as any for naming others)."""
    return value_users(node)[0]


def _check_layers(first: ConvView, convs: Sequence[ConvView]) -> str | None:
    if not first.dtype.is_floating_point:
        return f"weights are {first.dtype}, not floating point"
    for conv in convs[1:]:
        if conv.kind != first.kind:
            return f"mixes a {first.describe()} and a {conv.describe()} branch"
        if conv.dtype != first.dtype or conv.device != first.device:
            return (
                f"branches differ in dtype/device ({first.dtype} on {first.device}, "
                f"{conv.dtype} on {conv.device})"
            )
        if (conv.in_channels, conv.out_channels) != (first.in_channels, first.out_channels):
            return (
                f"branches map different channels: {first.describe()} "
                f"{first.in_channels}→{first.out_channels}, {conv.describe()} "
                f"{conv.in_channels}→{conv.out_channels}"
            )
        if (
            conv.geometry is not None
            and first.geometry is not None
            and (conv.geometry.stride != first.geometry.stride)
        ):
            return (
                f"strides differ ({first.describe()}: {first.geometry.stride}, "
                f"{conv.describe()}: {conv.geometry.stride})"
            )
    return None


def _check_diagonals(group: BranchGroup, first: ConvView, ctx: RewriteContext) -> str | None:
    for term in group.terms:
        if term.diagonal is None:
            continue
        label = term.diagonal.label
        shape = ctx.shape(term.node)
        if (
            first.kind == "linear"
            and term.diagonal.scale is not None
            and (shape is None or len(shape) != 2)
        ):
            return LINEAR_RANK_UNKNOWN  # a batch norm's channels are dim 1, features are last
        if first.in_channels != first.out_channels:
            return (
                f"the {label} branch needs in = out channels, but the {first.describe()} "
                f"maps {first.in_channels} → {first.out_channels}"
            )
        if term.diagonal.channels not in (None, first.out_channels):
            return (
                f"the {label} has {term.diagonal.channels} channels, the convs {first.out_channels}"
            )
        if first.geometry is not None and any(s != 1 for s in first.geometry.stride):
            return (
                f"the {label} branch keeps every position, but the convs have stride "
                f"{first.geometry.stride}"
            )
    return None


def _check_coefficients(group: BranchGroup, first: ConvView) -> str | None:
    for term in group.terms:
        if channel_vector(term.coefficient, first.out_channels, first.ndim) is None:
            return (
                f"the scale of shape {tuple(term.coefficient.shape)} on {term.describe()} "
                f"is not per output channel"
            )
    return None


def _check_windows(group: BranchGroup, first: ConvView) -> str | None:
    for dim in range(first.ndim):
        windows = [t.window(dim) for t in group.terms]
        if len({w.size_offset for w in windows}) > 1:
            described = ", ".join(
                f"{t.describe()} (padding {w.left},{w.right})"
                for t, w in zip(group.terms, windows, strict=True)
            )
            return (
                f"misaligned windows along spatial dim {dim}: the branches give different "
                f"output sizes ({described})"
            )
    modes = _padding_mode(group)
    if len(modes) > 1:
        return f"branches read padding with different padding modes ({', '.join(sorted(modes))})"
    return None


def _check_shapes(group: BranchGroup, ctx: RewriteContext) -> str | None:
    """Where the graph carries shapes: batched input, and no branch relying on broadcasting."""
    if group.combination.promotes(group.convs[0].dtype):
        return promotion_reason(group.combination, group.convs[0].dtype)
    first = group.convs[0]
    source = ctx.shape(group.input)
    if first.geometry is not None and source is not None and len(source) != first.ndim + 2:
        return (
            f"the input has shape {tuple(source)}: an unbatched input, whose channels are "
            "dim 0, which the merge does not handle"
        )
    root = ctx.shape(group.root)
    if root is None:
        return None
    for term in group.terms:
        shape = ctx.shape(term.node)
        if shape is not None and shape != root:
            return (
                f"{term.describe()} has shape {tuple(shape)} and broadcasts against {tuple(root)}"
            )
    return None


def _merged_name(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    split = [n.split(".") for n in names]
    prefix = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    if prefix == split[0]:  # the same layer twice
        return names[0]
    return ".".join([*prefix, "reparam_conv"])


def _add_scaled(
    ctx: RewriteContext, acc: Node, coefficient: Tensor, operand: Node | float, like: ConvView
) -> Node:
    """``acc + coefficient · operand`` as new nodes (a term the merge leaves in place)."""
    if coefficient.dim() == 0:
        c = float(coefficient)
        if not isinstance(operand, Node):
            return ctx.call(operator.add, acc, c * float(operand))
        if c == 1.0:
            return ctx.call(operator.add, acc, operand)
        if c == -1.0:
            return ctx.call(operator.sub, acc, operand)
        return ctx.call(operator.add, acc, ctx.call(operator.mul, operand, c))
    scale = ctx.constant(coefficient.to(dtype=like.dtype, device=like.device), "scale")
    if not isinstance(operand, Node):
        return ctx.call(operator.add, acc, ctx.call(operator.mul, scale, float(operand)))
    return ctx.call(operator.add, acc, ctx.call(operator.mul, operand, scale))
