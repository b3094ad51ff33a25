"""Per-rewrite validation: each rewrite is checked on random inputs as it is applied.

With ``FusionOptions(validate_rewrites=True)`` (and whenever ``optimize(..., verify=True)``),
the driver hands every rewrite to :class:`RewriteValidator` instead of applying it blindly:

1. the rule builds its replacement (new nodes land just before ``match.root``);
2. the *old* subgraph — ``match.root`` and every node that would die with it — and the
   replacement are evaluated on the same random values for their *frontier* (the live values
   they read), drawn with the shapes and dtypes ``ShapeProp`` recorded from the example
   inputs (``node.meta["tensor_meta"]``);
3. their outputs are compared with :func:`fxfuse.compare.compare_outputs` (normalised error,
   dtype-aware tolerance);
4. on a mismatch, or when the rule's rewrite raises, the new nodes (and any constants they
   registered) are erased, the graph is left exactly as it was, and a decline naming the rule
   and the error goes into the report. One faulty rule cannot poison the model.

A rewrite whose frontier has no recorded shape, or is not floating point (indices, masks),
cannot be checked this way; it is applied and counted as "not checkable". The local check
uses the example's shapes only; sizes that only some inputs have (odd sizes with stride 2)
are the end-to-end verifier's job (:func:`fxfuse.verify`).

Off (the default), the driver never constructs a validator: it costs one attribute test per
rewrite.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.fx import Node
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules.batchnorm import _BatchNorm

from fxfuse.compare import compare_outputs
from fxfuse.report import Decline

if TYPE_CHECKING:
    from fxfuse.rules import RewriteContext, Transaction

__all__ = ["RewriteValidator"]

log = logging.getLogger("fxfuse")

TRIALS = 2


class _Uncheckable(Exception):
    """The old subgraph cannot be evaluated on drawn values; the reason says why."""


class _BatchStatistics(Exception):
    """The old subgraph has a batch norm in training mode: it is no fixed function, so no
    rewrite of it is exact (and running it would change the caller's statistics)."""


class RewriteValidator:
    """Checks each rewrite against the subgraph it replaces; the driver rolls back those that
    fail (their :class:`~fxfuse.rules.Transaction`) and records them here."""

    def __init__(self, ctx: RewriteContext, seed: int = 0):
        self.ctx = ctx
        self.seed = seed
        self.stats: Counter[str] = Counter()
        # every rolled-back rewrite: reported even where another rule later fuses that node
        self.failures: list[Decline] = []
        self._device = _default_device(ctx)

    def check(self, transaction: Transaction, new: Node, dying: set[Node]) -> str | None:
        """Why the replacement ``new`` (built in ``transaction``) does not compute what the
        ``dying`` subgraph rooted at ``transaction.root`` does, or ``None``."""
        root = transaction.root
        created = transaction.created()
        old_order, old_frontier = _closure(root, dying)
        new_order, new_frontier = _closure(new, set(created))
        try:
            frontier = list(dict.fromkeys(old_frontier + new_frontier))
            for trial in range(TRIALS):
                env = self._draw(frontier, root.name, trial)
                try:
                    expected = _evaluate(old_order, dict(env), self.ctx)[root]
                except _BatchStatistics as bn:
                    return (
                        f"it replaces {bn}, a batch norm in training mode (batch statistics: "
                        "no fixed function to rewrite); rolled back"
                    )
                except _Uncheckable:
                    raise
                except Exception as error:  # e.g. the values need a relation drawing lacks
                    raise _Uncheckable(f"the original raised {type(error).__name__}") from error
                try:
                    values = _evaluate(new_order, dict(env), self.ctx)
                except Exception as error:
                    return f"the replacement raised {type(error).__name__}: {error}"
                comparison = compare_outputs(expected, values[new])
                if comparison.failure is not None:
                    shapes = ", ".join(f"{n.name} {tuple(env[n].shape)}" for n in frontier)
                    return (
                        f"the replacement differs from {root.name} on random inputs "
                        f"({shapes or 'no inputs'}): {comparison.failure.detail}; rolled back"
                    )
        except _Uncheckable as why:
            self.stats["not checkable"] += 1
            log.debug("rewrite at %s not checked: %s", root.name, why)
            return None
        for node in created:  # later rewrites may read these nodes' shapes
            if isinstance(values.get(node), Tensor):
                node.meta["tensor_meta"] = _extract_tensor_metadata(values[node])
        self.stats["validated"] += 1
        return None

    def record_failure(self, rule: str, node: str, reason: str) -> None:
        """A rewrite that failed (and was rolled back), for the report."""
        self.stats["rolled back"] += 1
        self.failures.append(Decline(rule, node, f"failed validation: {reason}"))

    def _draw(self, frontier: Iterable[Node], where: str, trial: int) -> dict[Node, Any]:
        seed = zlib.crc32(f"{self.seed}:{where}:{trial}".encode())
        generator = torch.Generator().manual_seed(seed)
        env: dict[Node, Any] = {}
        for node in frontier:
            if node in self.ctx.bound:  # a weight lifted to an input: the rewrite baked it in
                env[node] = self.ctx.bound[node]
                continue
            meta = node.meta.get("tensor_meta")
            shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
            if shape is None or dtype is None:
                raise _Uncheckable(f"{node.name} has no recorded shape")
            if not dtype.is_floating_point:
                raise _Uncheckable(f"{node.name} is {dtype}, not floating point")
            values = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
            env[node] = values.to(device=_device_of(node, self._device), dtype=dtype)
        return env


def _closure(output: Node, inside: set[Node]) -> tuple[list[Node], list[Node]]:
    """The nodes to evaluate for ``output`` (those ``inside``, and attributes they read) in
    dependency order, and the frontier they read."""
    order: list[Node] = []
    frontier: list[Node] = []
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(output, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        if node not in inside and node.op != "get_attr":
            frontier.append(node)
            continue
        stack.append((node, True))
        stack.extend((i, False) for i in reversed(node.all_input_nodes) if i not in seen)
    return order, frontier


def _evaluate(order: list[Node], env: dict[Node, Any], ctx: RewriteContext) -> dict[Node, Any]:
    """Run ``order`` on ``env`` (the frontier's values) like ``torch.fx.Interpreter`` would."""
    with torch.no_grad():
        for node in order:
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            if node.op == "get_attr":
                env[node] = ctx.attribute(str(node.target))
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_method":
                self_, *rest = args
                env[node] = getattr(self_, str(node.target))(*rest, **kwargs)
            elif node.op == "call_module":
                module = ctx.module(str(node.target))  # the caller's: it must not change
                if isinstance(module, _BatchNorm) and module.training:
                    raise _BatchStatistics(node.name)
                env[node] = module(*args, **kwargs)
            else:
                raise _Uncheckable(f"cannot evaluate a {node.op} node ({node.name})")
    return env


def _default_device(ctx: RewriteContext) -> torch.device:
    """Where activations live when the graph does not say: the model's first tensor's device
    (``ShapeProp`` records shapes and dtypes, not devices)."""
    for tensor in (*ctx.root.parameters(), *ctx.root.buffers()):
        return tensor.device
    return torch.device("cpu")


def _device_of(node: Node, default: torch.device) -> torch.device:
    value = node.meta.get("val", node.meta.get("example_value"))
    return value.device if isinstance(value, Tensor) else default
