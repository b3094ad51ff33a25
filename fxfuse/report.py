"""What a fusion run did, in a form a person can read and a program can check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.fx import Graph, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from fxfuse.dialects import (
    BATCH_NORM_FUNCTIONS,
    CONV_FUNCTIONS,
    CONV_TRANSPOSE_FUNCTIONS,
    LINEAR_FUNCTIONS,
    aten,
)

__all__ = [
    "Decline",
    "FusionReport",
    "GraphStats",
    "Part",
    "Rewrite",
    "graph_stats",
    "op_kind",
]


@dataclass(frozen=True)
class Rewrite:
    """One rule firing: ``rule`` rewrote the op at ``node``; ``detail`` says into what."""

    rule: str
    node: str
    detail: str


@dataclass(frozen=True)
class Decline:
    """A place where ``rule``'s pattern matched but its conditions did not hold, and why."""

    rule: str
    node: str
    reason: str


@dataclass(frozen=True)
class GraphStats:
    """Ops in a graph, counted statically (each call site once)."""

    convs: int
    batch_norms: int
    linears: int
    parameters: int
    nodes: int

    def __add__(self, other: GraphStats) -> GraphStats:
        return GraphStats(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)
        )


NO_OPS = GraphStats(0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Part:
    """One piece of the model as :func:`fxfuse.optimize` handled it.

    ``path`` is where it sits in the model (``""``: the model itself) and ``module`` its
    class. ``kind`` is ``"graph"`` (captured, fused; ``capture`` says how) or ``"python"``
    (kept as the module's own code, its submodules handled as parts of their own; ``reason``
    says why — the construct ``torch.fx`` met, ``forward hooks``, or ``no forward of its
    own`` for a ``ModuleList`` — and ``where`` is ``file:line `code```). ``before``/``after``
    count the ops of the part itself: a graph's call sites, or the ``torch.nn`` layers a
    Python part calls directly (each once); ``parameters`` are those it holds itself.
    """

    path: str
    module: str
    kind: str
    before: GraphStats = NO_OPS
    after: GraphStats = NO_OPS
    capture: str = ""
    reason: str = ""
    where: str = ""

    @property
    def name(self) -> str:
        return self.path or "the model"


_CONV_TARGETS = frozenset({*CONV_FUNCTIONS, *CONV_TRANSPOSE_FUNCTIONS, aten.convolution.default})
_BN_TARGETS = frozenset({*BATCH_NORM_FUNCTIONS, aten._native_batch_norm_legit.default})


def op_kind(node: Node, module: Callable[[str], nn.Module]) -> str | None:
    """``"conv"``, ``"bn"`` or ``"linear"`` for the ops :class:`GraphStats` counts, else None.

    ``module`` resolves ``call_module`` targets (``gm.get_submodule``, say)."""
    if node.op == "call_module":
        mod = module(str(node.target))
        if isinstance(mod, _ConvNd):
            return "conv"
        if isinstance(mod, _BatchNorm):
            return "bn"
        if isinstance(mod, nn.Linear):
            return "linear"
        return None
    if node.op != "call_function":
        return None
    if getattr(node.target, "__name__", "") == "fused_layer":  # (a layer the rules built)
        return "linear" if getattr(node.args[1], "kind", "") == "linear" else "conv"
    if node.target in _CONV_TARGETS:
        return "conv"
    if node.target in _BN_TARGETS:
        return "bn"
    if node.target in LINEAR_FUNCTIONS:
        return "linear"
    return None


def graph_stats(graph: Graph, module: Callable[[str], nn.Module], parameters: int) -> GraphStats:
    """Count convs, batch norms, linear layers and nodes in ``graph``.

    ``module`` resolves ``call_module`` targets; ``parameters`` is reported as given.
    """
    kinds = Counter(op_kind(n, module) for n in graph.nodes)
    return GraphStats(kinds["conv"], kinds["bn"], kinds["linear"], parameters, len(graph.nodes))


@dataclass
class FusionReport:
    """What :func:`fxfuse.optimize` did.

    ``rewrites`` lists every rule firing; ``declines`` every place a rule's pattern matched but
    a condition failed, with the reason; ``notes`` what was left alone and why (quantized
    modules, training-mode layers); ``before``/``after`` count ops; ``timings`` are seconds per
    phase; ``str(report)`` is a table for people, :meth:`to_dict` is for programs.

    With per-rewrite validation on, ``validation`` counts rewrites ``validated``, ``rolled
    back`` and ``not checkable``; with ``optimize(..., verify=True)``, ``verification`` is the
    :class:`~fxfuse.verify.VerificationReport`.

    ``parts`` lists each :class:`Part`: one graph when the whole model was captured, else each
    part fused and each part kept as Python, and why; ``before``/``after`` are then the sums
    over the parts, and rewrites and declines in a part name their node ``path:node``.
    ``specialized`` lists what a ``torch.export`` capture requires of the input dims fxfuse
    asked it to keep dynamic (``x.shape[2] == 224``, ``x.shape[2] == x.shape[3]``): other
    inputs raise.
    """

    capture: str
    before: GraphStats
    after: GraphStats | None = None
    rewrites: list[Rewrite] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    validation: Counter[str] | None = None
    verification: Any = None
    parts: list[Part] = field(default_factory=list)
    specialized: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = dict(self.counts)
        data["validation"] = None if self.validation is None else dict(self.validation)
        data["verification"] = None if self.verification is None else str(self.verification)
        return data

    def __str__(self) -> str:
        lines = [f"fxfuse report (captured with {self.capture})"]
        after = self.after or self.before
        rows = [("", "before", "after")]
        for name in ("convs", "batch_norms", "linears", "parameters", "nodes"):
            rows.append(
                (
                    name.replace("_", " "),
                    f"{getattr(self.before, name):,}",
                    f"{getattr(after, name):,}",
                )
            )
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            lines.append(f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}")
        if self.specialized:
            lines.append(
                "specialized to the example's shape (other sizes raise): "
                + ", ".join(self.specialized)
            )
        lines += self._parts_lines()
        if self.counts:
            lines.append("rules fired:")
            for rule, count in sorted(self.counts.items()):
                lines.append(f"  {rule:<22} {count:>5}")
        else:
            lines.append("rules fired: none")
        lines += self._decline_lines()
        lines += [f"note: {note}" for note in _at_most(self.notes, _LIMIT)]
        if self.validation is not None:
            checks = ", ".join(
                f"{self.validation[k]} {k}" for k in ("validated", "rolled back", "not checkable")
            )
            lines.append(f"rewrites checked on random inputs: {checks}")
        if self.verification is not None:
            lines.append(str(self.verification))
        if self.timings:
            timing = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items())
            lines.append(f"time: {timing}")
        return "\n".join(lines)

    def _parts_lines(self) -> list[str]:
        """The parts, grouped by class and reason (a 200-block model reads in a few lines)."""
        if len(self.parts) <= 1:
            return []
        graphs = [p for p in self.parts if p.kind == "graph"]
        python = [p for p in self.parts if p.kind == "python"]
        lines = [
            f"captured part by part: {_count(graphs, 'graph')} fused, "
            f"{_count(python, 'part')} kept as Python code around them"
        ]
        groups: dict[tuple[str, str, str], list[Part]] = {}
        for part in python:
            groups.setdefault((part.module, part.reason, part.where), []).append(part)
        if groups:
            lines.append("  kept as Python:")
        for (module, reason, where), members in _at_most_groups(groups):
            paths = _paths(members)
            lines.append(
                f"    {module}{_times(members)} ({paths}): {reason}"
                + (f" at {where}" if where else "")
            )
        fused: dict[str, list[Part]] = {}
        for part in graphs:
            fused.setdefault(part.module, []).append(part)
        ranked = sorted(
            fused.items(),
            key=lambda item: -sum(p.before.convs + p.before.batch_norms for p in item[1]),
        )
        if ranked:
            lines.append("  fused graphs (most convs and batch norms first):")
        for module, members in ranked[:_LIMIT]:
            before = sum((p.before for p in members), NO_OPS)
            after = sum((p.after for p in members), NO_OPS)
            lines.append(
                f"    {module}{_times(members)} ({_paths(members)}): convs {before.convs} → "
                f"{after.convs}, batch norms {before.batch_norms} → {after.batch_norms}"
            )
        if len(ranked) > _LIMIT:
            lines.append(f"    … and {len(ranked) - _LIMIT} more classes")
        return lines

    def _decline_lines(self) -> list[str]:
        if not self.declines:
            return []
        lines = [f"declined ({len(self.declines)}):"]
        if len(self.declines) <= _LIMIT:
            return lines + [f"  {d.rule} at {d.node}: {d.reason}" for d in self.declines]
        groups: dict[tuple[str, str], list[Decline]] = {}
        for d in self.declines:
            groups.setdefault((d.rule, d.reason), []).append(d)
        for (rule, reason), members in _at_most_groups(groups):
            nodes = ", ".join(d.node for d in members[:3]) + (", …" if len(members) > 3 else "")
            lines.append(f"  {rule}{_times(members)} at {nodes}: {reason}")
        return lines


_LIMIT = 12  # lines per section of str(report)


def _count(items: list[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _times(members: list[Any]) -> str:
    return f" ×{len(members)}" if len(members) > 1 else ""


def _paths(parts: list[Part]) -> str:
    return ", ".join(p.name for p in parts[:2]) + (", …" if len(parts) > 2 else "")


def _at_most(items: list[str], limit: int) -> list[str]:
    if len(items) <= limit:
        return items
    return [*items[:limit], f"… and {len(items) - limit} more"]


def _at_most_groups(groups: dict[Any, list[Any]]) -> list[tuple[Any, list[Any]]]:
    """The largest groups first, at most :data:`_LIMIT` of them."""
    ranked = sorted(groups.items(), key=lambda item: -len(item[1]))
    return ranked[:_LIMIT]
