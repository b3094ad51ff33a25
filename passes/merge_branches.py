"""merge-branches: maps that read the same input and are summed become one layer.

    # Σ cᵢ · layerᵢ(x) + Σ cⱼ · diagⱼ(x) + Σ constants -> layer'(x)

Each branch is a layer (after folding), a chain of two layers that composes into one
(:func:`fxfuse.maps.as_chain`: DBB's 1×1 → k×k and 1×1 → avg-pool branches), or a
per-channel
map of ``x`` — the identity, a batch norm, a constant scale — whose kernel is zero except
``W[c, c mod (C/g), centre] = a[c]`` for any ``g`` dividing ``C``. ``cᵢ`` are constant scales
(scalars or per-channel tensors, from ``*``, ``/``, ``-`` and ``torch.add(alpha=)``). Per
spatial dim, branch ``i`` with kernel ``k``, dilation ``d`` and left padding ``p`` reads input
positions ``o·s − p + j·d``. With ``P = max pᵢ``, its tap ``j`` is tap ``P − pᵢ + j·d`` of a
layer with left padding ``P`` (see :func:`fxfuse.kernels.align_windows`), so::

    W' = Σ cᵢ · place(expand_groups(Wᵢ), offsetᵢ, stepᵢ) + Σ diag(cⱼ·aⱼ)
    b' = Σ cᵢ·bᵢ + Σ cⱼ·tⱼ + k

The merge is exact when every branch has the same stride and output size for every input
size, branches that read padding share what it holds, and channel counts agree. Layers with
different groups merge at the coarsest common grouping, which costs multiply-adds: a merge that
would cost more than ``FusionOptions.max_flops_ratio`` times the branches is declined. A branch
whose output has another consumer cannot disappear, so it stays (and is reported).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from torch.fx import Node

from fxfuse import kernels
from fxfuse.effects import value_users
from fxfuse.geometry import Geometry
from fxfuse.kernels import MergedWindow, Window, align_windows
from fxfuse.maps import Chain, Combination, Layer, as_chain, one_pad_value, per_channel
from fxfuse.rules import Match, RewriteContext, Rule
from fxfuse.weights import Const, Weight, apply, const, is_one, mul

__all__ = ["BranchGroup", "MergeBranches", "Term"]

_POINT = Window(1, 1, 0, 0)


@dataclass(frozen=True)
class Diagonal:
    """The per-channel map ``x ↦ a · x + t`` (``None``: 1 and 0, the identity)."""

    label: str  # "identity" or "batch norm"
    scale: Weight | None = None
    shift: Weight | None = None
    sources: tuple[str, ...] = ()

    @property
    def channels(self) -> int | None:
        """Channel count the map fixes (``None``: any, the identity)."""
        return None if self.scale is None else self.scale.numel()


_IDENTITY = Diagonal("identity")


@dataclass
class Term:
    """One branch of a sum: ``coefficient · node``, where ``node`` reads ``input`` through a
    layer (or a chain of two) or a per-channel map."""

    coefficient: Weight
    node: Node
    input: Node
    layer: Layer | None = None
    chain: Chain | None = None
    diagonal: Diagonal | None = None

    def window(self, dim: int) -> Window:
        if self.layer is None or self.layer.geometry is None:
            return _POINT
        return self.layer.geometry.windows(self.layer.kernel_size)[dim]

    @property
    def macs(self) -> int:
        if self.chain is not None:
            return self.chain.macs
        if self.layer is not None:
            return self.layer.macs
        return 1

    def describe(self) -> str:
        c = self.coefficient
        scale = ""
        if not is_one(c):
            scale = f"{float(c.tensor):g}·" if isinstance(c, Const) and c.dim() == 0 else "s·"
        if self.chain is not None:
            return scale + f"{self.chain.outer.describe()} ∘ {self.chain.inner.describe()}"
        if self.layer is not None:
            return scale + self.layer.describe()
        assert self.diagonal is not None
        return scale + self.diagonal.label


@dataclass
class BranchGroup(Match):
    """Terms of one sum that read the same ``input``, and what stays around them."""

    combination: Combination
    input: Node
    terms: list[Term]
    constants: list[Weight]  # folded into the merged bias
    rest: list[tuple[Weight, Node | None]] = field(default_factory=list)  # kept as they are
    blocked: str | None = None  # why these branches, which read one input, cannot merge

    @property
    def layers(self) -> list[Layer]:
        return [t.layer for t in self.terms if t.layer is not None]

    @cached_property
    def plan(self) -> Plan:
        return Plan.of(self)


@dataclass(frozen=True)
class Plan:
    """Where each branch lands in the merged layer, and what the merged layer costs."""

    windows: tuple[MergedWindow, ...]
    groups: int
    flops_ratio: float

    @classmethod
    def of(cls, group: BranchGroup) -> Plan:
        first = group.layers[0]
        windows = tuple(
            align_windows([t.window(dim) for t in group.terms]) for dim in range(first.ndim)
        )
        merged_groups = math.gcd(*(layer.groups for layer in group.layers))
        taps = math.prod(w.kernel for w in windows)
        merged = first.out_channels * (first.in_channels // merged_groups) * taps
        branches = sum(t.macs for t in group.terms)
        return cls(windows, merged_groups, merged / branches)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(w.kernel for w in self.windows)

    def geometry(self, like: Layer, mode: str, value: Weight | None) -> Geometry | None:
        if like.geometry is None:
            return None
        return Geometry(
            like.geometry.stride,
            tuple((w.left, w.right) for w in self.windows),
            tuple(w.dilation for w in self.windows),
            self.groups,
            mode,
            pad_value=value,
        )


def _padding(group: BranchGroup) -> dict[str, list[Weight | None]]:
    """What the branches that read padding pad with: mode -> values (for ``"value"``)."""
    modes: dict[str, list[Weight | None]] = {}
    for layer in group.layers:
        geo = layer.geometry
        if geo is not None and geo.reads_padding:
            modes.setdefault(geo.padding_mode, []).append(geo.pad_value)
    return modes


class MergeBranches(Rule[BranchGroup]):
    """``Σ cᵢ·layerᵢ(x) + Σ cⱼ·diagⱼ(x) -> layer'(x)`` (pad-and-add; identity and batch-norm
    branches as diagonal kernels)."""

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
            layers = [t.layer for t in members if t.layer is not None]
            if not layers:
                continue
            from_end = layers[0].ndim + 1
            folded = [
                c for c in combo.constants if per_channel(c, layers[0].out_channels, from_end)
            ]
            kept = [c for c in combo.constants if c not in folded]
            excluded = [(branch, why) for branch, reads, why in stays if reads is x]
            trivial = len(members) == 1 and is_one(members[0].coefficient) and not folded
            trivial = trivial and members[0].chain is None
            if trivial and x is combo.anchor:
                excluded.append(
                    (
                        x,
                        f"{x.name} is updated in place (its += of the layer), so it cannot become "
                        "a kernel of the merged layer",
                    )
                )
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
            rest: list[tuple[Weight, Node | None]] = [
                (t.coefficient, t.node) for t in terms if t.input is not x
            ]
            rest += [(c, None) for c in kept]
            yield BranchGroup(
                node,
                combination=combo,
                input=x,
                terms=members,
                constants=folded,
                rest=rest,
                excluded=excluded,
                # the interior of the sum has its shape only if nothing else is added in
                absorbed=[] if rest else list(combo.interior),
            )
        yield from _blocked_groups(node, combo, terms)

    def check(self, group: BranchGroup, ctx: RewriteContext) -> str | None:
        if group.blocked is not None:
            return group.blocked
        layers = group.layers
        first = layers[0]
        for reason in (
            _check_layers(first, layers),
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
        first = group.layers[0]
        plan = group.plan
        channels = first.out_channels
        extent = plan.kernel_size
        parts: list[Weight] = []
        biases: list[Weight | None] = []
        scales: list[Weight] = []
        layer_terms = [(i, t) for i, t in enumerate(group.terms) if t.layer is not None]
        if layer_terms:
            parts.append(
                apply(
                    kernels.placed_sum,
                    tuple(t.layer.weight for _, t in layer_terms),  # type: ignore[union-attr]
                    tuple(t.coefficient for _, t in layer_terms),
                    in_channels=first.in_channels,
                    groups=tuple(t.layer.groups for _, t in layer_terms),  # type: ignore[union-attr]
                    new_groups=plan.groups,
                    extent=extent,
                    offsets=tuple(
                        tuple(w.offsets[i] for w in plan.windows) for i, _ in layer_terms
                    ),
                    steps=tuple(tuple(w.steps[i] for w in plan.windows) for i, _ in layer_terms),
                )
            )
            for _, t in layer_terms:
                assert t.layer is not None
                biases.append(t.layer.bias)
                scales.append(t.coefficient)
        for i, term in enumerate(group.terms):
            if term.diagonal is None:
                continue
            d = term.diagonal
            scale = term.coefficient
            if d.scale is not None:  # (a (1, C, 1) coefficient times a (C,) scale: per channel)
                scale = mul(apply(kernels.channel_vector, scale, channels), d.scale)
            centre = tuple(w.offsets[i] for w in plan.windows)
            parts.append(
                apply(kernels.diagonal_kernel, scale, channels, plan.groups, extent, centre)
            )
            if d.shift is not None:
                biases.append(d.shift)
                scales.append(term.coefficient)
        for constant in group.constants:
            biases.append(constant)
            scales.append(const(1.0))
        weight = parts[0] if len(parts) == 1 else apply(kernels.add, *parts)
        bias = apply(kernels.merged_bias, tuple(biases), tuple(scales), channels)
        mode, value = _merged_padding(group)
        merged = ctx.fused(
            group.input,
            kind=first.kind,
            weight=weight,
            bias=bias,
            geometry=plan.geometry(first, mode, value),
            like=first,
            sources=[s for t in group.terms for s in _sources(t)],
            name=_merged_name([layer.name for layer in group.layers]),
            requires_grad=any(layer.requires_grad for layer in group.layers),
        )
        # the absorbed branches have the merged layer's shape (the checks ruled out broadcasting)
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
        first = group.layers[0]
        if first.geometry is None:
            return "linear"
        plan = group.plan
        text = "x".join(map(str, plan.kernel_size)) + " conv"
        dilation = {w.dilation for w in plan.windows}
        if dilation != {1}:
            text += " d" + "x".join(str(w.dilation) for w in plan.windows)
        return text + (f" g{plan.groups}" if plan.groups != 1 else "")


def _sources(term: Term) -> tuple[str, ...]:
    if term.layer is not None:
        return term.layer.sources
    return term.diagonal.sources if term.diagonal is not None else ()


def _merged_padding(group: BranchGroup) -> tuple[str, Weight | None]:
    modes = _padding(group)
    if not modes:
        return "zeros", None
    mode, values = next(iter(modes.items()))
    return mode, values[0]


def _classify(
    coefficient: Weight, node: Node, ctx: RewriteContext
) -> tuple[Term, tuple[Node, str] | None]:
    """The term ``coefficient · node``; and, for a branch that must stay (its output has
    another consumer, its batch norm uses batch statistics), the input it reads and why."""
    single = len(value_users(node)) == 1
    chain = as_chain(node, ctx)
    if isinstance(chain, Chain) and single:
        return Term(coefficient, node, chain.layer.input, layer=chain.layer, chain=chain), None
    layer = ctx.layer(node)
    if layer is not None and not layer.transposed:
        if single:
            return Term(coefficient, node, layer.input, layer=layer), None
        why = (
            f"the {layer.describe()} output also feeds {_others(node)}, "
            "so it cannot disappear into the merged conv"
        )
        return Term(coefficient, node, node, diagonal=_IDENTITY), (layer.input, why)
    bn = ctx.affine(node)
    if bn is not None:
        if bn.fixed is not None:
            return Term(coefficient, node, node, diagonal=_IDENTITY), (bn.input, bn.fixed)
        if single:
            diagonal = Diagonal("batch norm", bn.scale, bn.shift, bn.sources)
            return Term(coefficient, node, bn.input, diagonal=diagonal), None
        why = (
            f"the batch norm output also feeds {_others(node)}, "
            "so it cannot disappear into the merged conv"
        )
        return Term(coefficient, node, node, diagonal=_IDENTITY), (bn.input, why)
    refused = ctx.refusal(node)  # an op fxfuse knows but cannot read as a map: say why
    source = next((a for a in node.args if isinstance(a, Node)), None)
    if refused is not None and source is not None:
        return Term(coefficient, node, node, diagonal=_IDENTITY), (source, refused)
    return Term(coefficient, node, node, diagonal=_IDENTITY), None


def _others(node: Node) -> str:
    """The users of a branch other than the sum it is in (the first one's user, as good as
    any: the sum's name changes as it is rewritten, and the reason should not)."""
    others = [u.name for u in value_users(node)][1:]
    return ", ".join(others[:3]) + (" …" if len(others) > 3 else "")


def _blocked_groups(root: Node, combo: Combination, terms: list[Term]) -> Iterator[BranchGroup]:
    """Branches that read one input, some through a pad or crop that did not fold into their
    padding: they cannot merge, and the report should say which op stopped them."""
    by_source: dict[Node, list[Term]] = {}
    for term in terms:
        barrier = term.layer.barrier if term.layer is not None else None
        by_source.setdefault(barrier[0] if barrier else term.input, []).append(term)
    for source, members in by_source.items():
        stopped = [t for t in members if t.layer is not None and t.layer.barrier is not None]
        if len(members) < 2 or not stopped:
            continue
        barrier = stopped[0].layer.barrier  # type: ignore[union-attr]
        assert barrier is not None
        yield BranchGroup(
            root,
            combination=combo,
            input=source,
            terms=members,
            constants=[],
            blocked=f"{stopped[0].describe()} reads {source.name} but {barrier[1]}",
        )


def _check_layers(first: Layer, layers: Sequence[Layer]) -> str | None:
    if not first.dtype.is_floating_point:
        return f"weights are {first.dtype}, not floating point"
    for layer in layers[1:]:
        if layer.kind != first.kind:
            return f"mixes a {first.describe()} and a {layer.describe()} branch"
        if layer.dtype != first.dtype or layer.device != first.device:
            return (
                f"branches differ in dtype/device ({first.dtype} on {first.device}, "
                f"{layer.dtype} on {layer.device})"
            )
        if (layer.in_channels, layer.out_channels) != (first.in_channels, first.out_channels):
            return (
                f"branches map different channels: {first.describe()} "
                f"{first.in_channels}→{first.out_channels}, {layer.describe()} "
                f"{layer.in_channels}→{layer.out_channels}"
            )
        if (
            layer.geometry is not None
            and first.geometry is not None
            and layer.geometry.stride != first.geometry.stride
        ):
            return (
                f"strides differ ({first.describe()}: {first.geometry.stride}, "
                f"{layer.describe()}: {layer.geometry.stride})"
            )
    return None


def _check_diagonals(group: BranchGroup, first: Layer, ctx: RewriteContext) -> str | None:
    for term in group.terms:
        if term.diagonal is None:
            continue
        label = term.diagonal.label
        if first.kind == "linear" and term.diagonal.scale is not None and ctx.rank(term.node) != 2:
            # a batch norm's channels are dim 1, a linear layer's features the last dim
            return (
                "a batch norm beside a Linear normalizes dim 1, the features only where the "
                "program fixes the output as 2-d"
            )
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


def _check_coefficients(group: BranchGroup, first: Layer) -> str | None:
    from_end = first.ndim + 1
    for term in group.terms:
        if not per_channel(term.coefficient, first.out_channels, from_end):
            return (
                f"the scale of shape {tuple(term.coefficient.shape)} on {term.describe()} "
                f"is not per output channel"
            )
    return None


def _check_windows(group: BranchGroup, first: Layer) -> str | None:
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
    modes = _padding(group)
    if len(modes) > 1:
        return f"branches read padding with different padding modes ({', '.join(sorted(modes))})"
    if not one_pad_value(modes.get("value", []), first.in_channels):
        return "branches pad with different values"
    return None


def _check_shapes(group: BranchGroup, ctx: RewriteContext) -> str | None:
    """Where the graph carries shapes: batched input, and no branch relying on broadcasting."""
    first = group.layers[0]
    promoted = group.combination.promotion(first.dtype)
    if promoted is not None:
        return promoted
    if (
        first.kind == "linear"
        and group.combination.max_rank > 1
        and ctx.rank(group.combination.root) is None
    ):
        return (
            "a scale or constant of more than one dim beside a Linear would change the rank of "
            "an input of unknown rank"
        )
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
    ctx: RewriteContext, acc: Node, coefficient: Weight, operand: Node | None, like: Layer
) -> Node:
    """``acc + coefficient · operand`` as new nodes (a term the merge leaves in place); a
    ``None`` operand adds the constant ``coefficient`` itself."""
    if isinstance(coefficient, Const) and coefficient.dim() == 0:
        c = float(coefficient.tensor)
        if operand is None:
            return ctx.call(operator.add, acc, c)
        if c == 1.0:
            return ctx.call(operator.add, acc, operand)
        if c == -1.0:
            return ctx.call(operator.sub, acc, operand)
        return ctx.call(operator.add, acc, ctx.call(operator.mul, operand, c))
    scale = ctx.weight_node(coefficient, like)
    if operand is None:
        return ctx.call(operator.add, acc, scale)
    return ctx.call(operator.add, acc, ctx.call(operator.mul, operand, scale))
