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

__all__ = ["Decline", "FusionReport", "GraphStats", "Rewrite", "graph_stats", "op_kind"]


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
        if self.counts:
            lines.append("rules fired:")
            for rule, count in sorted(self.counts.items()):
                lines.append(f"  {rule:<22} {count:>5}")
        else:
            lines.append("rules fired: none")
        if self.declines:
            lines.append(f"declined ({len(self.declines)}):")
            for d in self.declines:
                lines.append(f"  {d.rule} at {d.node}: {d.reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
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
