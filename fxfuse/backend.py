"""``torch.compile(model, backend="fxfuse")``: fuse every graph dynamo captures, then compile it.

Dynamo hands a backend torch-level ops (``torch.conv2d``, ``F.batch_norm``, ``operator.add``)
with the parameters and buffers lifted to graph inputs that it does **not** guard on (DESIGN
trap 3): a second instance of the same class reuses the compiled code with its own weights,
and an in-place update changes the weights under it. So the weights fxfuse folds are never
baked blindly: each call looks at the identity and version (``_version``) of the weight
inputs, and a call whose weights are not the ones a fused graph was built from gets its own
fusion (kept in a small cache, so alternating instances do not refuse every call). Updates
that bypass PyTorch's version counter — ``p.data.mul_(…)``, or in-place changes to inference
tensors — are not seen: update weights in place under ``torch.no_grad()`` (``p.mul_(…)``,
``p.copy_(…)``, ``load_state_dict``), or call ``torch._dynamo.reset()`` after such an update.

Options (``torch.compile(..., options={...})``):

- ``inner``: what compiles the fused graph: ``"eager"`` (default: run it as is) or
  ``"inductor"``, or any backend name ``torch._dynamo`` knows.
- ``verify``: compare the fused graph with the captured one on the call's own inputs before
  first use (default ``False``); a mismatch raises :class:`~fxfuse.VerificationError`.
- ``report``: ``"log"`` (default: one INFO line per fused graph on the ``fxfuse`` logger),
  ``"none"``, or a callable given each :class:`~fxfuse.FusionReport`. Every report is also
  kept in :data:`REPORTS` (the most recent 64).
- ``cache_size``: weight sets remembered per graph (default 8).

With gradients enabled for the weights (training), folding would cut the original weights
out of autograd: the captured graph runs unfused, and fxfuse says so once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph, GraphModule, Node

from fxfuse.api import fuse_graph
from fxfuse.compare import compare_outputs
from fxfuse.errors import FxFuseError, VerificationError
from fxfuse.report import FusionReport

__all__ = ["REPORTS", "BackendOptions", "fxfuse_backend"]

log = logging.getLogger("fxfuse")

#: The reports of the most recent fusions done by the backend, newest last.
REPORTS: deque[FusionReport] = deque(maxlen=64)

_warned: set[str] = set()
_lock = threading.Lock()


@dataclass(frozen=True)
class BackendOptions:
    """The backend's options, validated (see the module docstring)."""

    inner: str | Callable[..., Any] = "eager"
    verify: bool = False
    report: str | Callable[[FusionReport], None] = "log"
    cache_size: int = 8

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        unknown = set(options) - {"inner", "verify", "report", "cache_size"}
        if unknown:
            raise FxFuseError(
                f"unknown fxfuse backend option(s) {sorted(unknown)}; the options are inner, "
                "verify, report and cache_size"
            )
        parsed = cls(**options)
        if parsed.report not in ("log", "none") and not callable(parsed.report):
            raise FxFuseError(f"option report={parsed.report!r}: use 'log', 'none' or a callable")
        return parsed


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _is_weight(node: Node, value: Any) -> bool:
    """A graph input dynamo lifted from a module's state: parameters and buffers, and (under
    ``dynamic=True``) float attributes like a batch norm's ``eps``, lifted as 0-d tensors."""
    if not isinstance(value, Tensor):
        return False
    if isinstance(value, torch.nn.Parameter):
        return True
    if getattr(value, "_dynamo_static_input_type", None) is not None:
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return value.dim() == 0 and type(source).__name__ == "AttrSource"


def _inner_compiler(inner: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)


def _state(weight: Tensor) -> tuple[int, int, int | None]:
    """Where a weight's values live and how often they were changed in place.

    ``_version`` counts in-place updates made through the tensor (``p.mul_(…)``,
    ``load_state_dict``); the storage address catches ``p.data = other``. An update through
    ``p.data.mul_(…)`` changes neither (it bypasses autograd's counter), nor does any update of
    an inference tensor (which has no counter).
    """
    version = None if torch.is_inference(weight) else weight._version
    return weight.data_ptr(), weight.storage_offset(), version


class _Fused:
    """A graph fused for one set of weights, compiled by the inner backend."""

    def __init__(self, weights: Sequence[Tensor], run: Callable[..., Any]):
        self.refs = [weakref.ref(w) for w in weights]
        self.states = [_state(w) for w in weights]
        self.run = run

    def matches(self, weights: Sequence[Tensor]) -> bool:
        return all(
            ref() is w and _state(w) == state
            for ref, state, w in zip(self.refs, self.states, weights, strict=True)
        )


class FusingCallable:
    """What the backend returns to dynamo: fuses on first use of each set of weights."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], options: BackendOptions):
        self.gm = gm
        self.options = options
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weight_indices = [
            i
            for i, (node, value) in enumerate(zip(self.placeholders, example_inputs, strict=False))
            if _is_weight(node, value)
        ]
        self.cache: OrderedDict[int, _Fused] = OrderedDict()
        self.inner = _inner_compiler(options.inner)
        self._unfused: Callable[..., Any] | None = None
        self._next_key = 0

    def __call__(self, *args: Any) -> Any:
        weights = [args[i] for i in self.weight_indices]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return self._run_unfused(args)
        for key, fused in self.cache.items():
            if fused.matches(weights):
                self.cache.move_to_end(key)
                return fused.run(*args)
        fused = self._fuse(args, weights)
        self.cache[self._next_key] = fused
        self._next_key += 1
        while len(self.cache) > self.options.cache_size:
            self.cache.popitem(last=False)
        return fused.run(*args)

    def _run_unfused(self, args: Sequence[Any]) -> Any:
        _warn_once(
            "grad",
            "fxfuse: gradients are enabled for the model's weights, so folding them would cut "
            "them out of autograd; running the captured graph unfused (call the model under "
            "torch.no_grad() or torch.inference_mode() to fuse)",
        )
        if self._unfused is None:
            self._unfused = self.inner(self.gm, list(args))
        return self._unfused(*args)

    def _fuse(self, args: Sequence[Any], weights: Sequence[Tensor]) -> _Fused:
        graph = Graph()
        mapping: dict[Node, Node] = {}
        output = graph.graph_copy(self.gm.graph, mapping)
        graph.output(output)
        bound = {mapping[self.placeholders[i]]: args[i] for i in self.weight_indices}
        fused = fuse_graph(
            graph,
            self.gm,
            bound=bound,
            capture="torch.compile (dynamo)",
            class_name="FusedDynamoGraph",
            parameters=sum(w.numel() for w in weights),
        )
        report = fused.fxfuse_report
        REPORTS.append(report)
        if self.options.report == "log":
            log.info(
                "fxfuse backend: convs %d -> %d, batch norms %d -> %d (%s)",
                report.before.convs,
                report.after.convs,
                report.before.batch_norms,
                report.after.batch_norms,
                dict(report.counts),
            )
        elif callable(self.options.report):
            self.options.report(report)
        if self.options.verify:
            self._verify(fused, args)
        return _Fused(weights, self.inner(fused, list(args)))

    def _verify(self, fused: GraphModule, args: Sequence[Any]) -> None:
        with torch.no_grad():
            expected, actual = self.gm(*args), fused(*args)
        failure = compare_outputs(expected, actual).failure
        if failure is not None:
            raise VerificationError(
                f"fxfuse backend: the fused graph differs from the captured one at "
                f"{failure.output or 'its output'}: {failure.detail}. This is a bug in a rule; "
                "compile with options={'verify': False} to get going and please report it.",
                kind=failure.kind,
                output=failure.output,
                error=failure.error,
                tolerance=failure.tolerance,
                inputs=[a for a in args if isinstance(a, Tensor)],
            )


def fxfuse_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    **unused: Any,
) -> Callable[..., Any]:
    """The ``torch.compile`` backend (registered as ``"fxfuse"``; see the module docstring)."""
    parsed = BackendOptions.parse(options)
    if unused:
        _warn_once("mode", f"fxfuse backend: ignoring {sorted(unused)} (pass options={{...}})")
    return FusingCallable(gm, example_inputs, parsed)
