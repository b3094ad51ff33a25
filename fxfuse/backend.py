"""``torch.compile(model, backend="fxfuse")``: fuse every graph dynamo captures, then compile it.

Dynamo hands a backend torch-level ops (``torch.conv2d``, ``F.batch_norm``, ``operator.add``)
with the parameters and buffers lifted to graph inputs that it does **not** guard on
(docs/design.md, trap 3): a second instance of the same class reuses the compiled code with its
own weights, and weights change under it — an optimizer step (``fused=True`` ones included),
batch-norm statistics re-estimated by a forward pass in training mode, ``p.data.mul_(…)`` —
without any version counter seeing it. So the fused graph never bakes a weight: it computes its
fused weights from the weight inputs (:mod:`fxfuse.weights`, "live" weights), exactly, in
float64, and differentiably — the same graph serves every instance and every update, and with
gradients enabled it trains the original parameters (the merged kernel is computed from the
branches on every step: the multi-branch model's gradients at one conv's activation cost).
Without gradients the fused weights are kept while a :class:`Fingerprint` of the weight inputs,
taken on every call, is unchanged; that check is the per-call cost (``python -m benchmarks
live``; ``benchmarks/RESULTS.md``).

Options (``torch.compile(..., options={...})``):

- ``inner``: what compiles the fused graph: ``"eager"`` (default: run it as is) or
  ``"inductor"``, or any backend name ``torch._dynamo`` knows.
- ``weights``: ``"live"`` (default, above) or ``"frozen"``: fold each set of weights once and
  reuse the result while the weights' identity and version (``_version``) stay the same —
  faster per call, but blind to updates that bypass the version counter (the ones listed
  above): after one, call ``torch._dynamo.reset()``. Gradients enabled for the weights run the
  captured graph unfused, with a warning.
- ``verify``: compare the fused graph with the captured one on the call's own inputs before
  first use (default ``False``); a mismatch raises :class:`~fxfuse.VerificationError`.
- ``report``: ``"log"`` (default: one INFO line per fused graph on the ``fxfuse`` logger),
  ``"none"``, or a callable given each :class:`~fxfuse.FusionReport`. Every report is also
  kept in :data:`REPORTS` (the most recent 64).
- ``cache_size``: with frozen weights, weight sets remembered per graph (default 8).
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
from fxfuse.effects import Effects
from fxfuse.errors import FxFuseError, VerificationError, warn
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
    weights: str = "live"
    verify: bool = False
    report: str | Callable[[FusionReport], None] = "log"
    cache_size: int = 8

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        unknown = set(options) - {"inner", "weights", "verify", "report", "cache_size"}
        if unknown:
            raise FxFuseError(
                f"unknown fxfuse backend option(s) {sorted(unknown)}; the options are inner, "
                "weights, verify, report and cache_size"
            )
        parsed = cls(**options)
        if parsed.report not in ("log", "none") and not callable(parsed.report):
            raise FxFuseError(f"option report={parsed.report!r}: use 'log', 'none' or a callable")
        if parsed.weights not in ("live", "frozen"):
            raise FxFuseError(f"option weights={parsed.weights!r}: use 'live' or 'frozen'")
        if not isinstance(parsed.inner, str) and not callable(parsed.inner):
            raise FxFuseError(
                f"option inner={parsed.inner!r}: use a backend name ('eager', 'inductor', …) "
                "or a compiler callable"
            )
        if not isinstance(parsed.verify, bool):
            raise FxFuseError(f"option verify={parsed.verify!r}: use True or False")
        size = parsed.cache_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FxFuseError(
                f"option cache_size={size!r}: use an int ≥ 0 (weight sets remembered per graph)"
            )
        return parsed


def _warn_once(key: str, message: str) -> None:
    """A warning the user sees without configuring logging, once per cause."""
    if key not in _warned:
        _warned.add(key)
        log.info(message)
        warn(message, stacklevel=4)


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


class _LiveWeights:
    """A fused graph split in two: ``weights`` computes the fused weights from the weight
    inputs (float64 arithmetic, differentiable), ``rest`` runs the model on the activations and
    those fused weights.

    With gradients enabled for a weight, every call runs both (autograd reaches the
    parameters). Otherwise the fused weights are kept and reused while a fingerprint of the
    weight inputs stays the same (:class:`Fingerprint`); any update, whether a version counter
    saw it or not, changes it, and the next call recomputes them."""

    def __init__(
        self, fused: GraphModule, weight_indices: Sequence[int], inner: Any, args: Sequence[Any]
    ):
        self.weight_indices = list(weight_indices)
        held = {i: args[i] for i in weight_indices}
        weight_part, rest, arity = _split_weights(fused, held)
        self.weights = weight_part
        self.arity = arity
        self._cached: tuple[Any, ...] | None = None
        self._fingerprint = Fingerprint([args[i] for i in self.weight_indices])
        self._print: list[Tensor] | None = None
        with torch.no_grad():
            boundary = tuple(self.weights(*[args[i] for i in self.weight_indices]))
        self.rest = inner(rest, [*args, *boundary])

    def __call__(self, *args: Any) -> Any:
        weights = [args[i] for i in self.weight_indices]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            self._cached = None  # (they are about to change)
            return self.rest(*args, *self.weights(*weights))
        current = self._fingerprint(weights)
        if self._cached is None or not Fingerprint.same(self._print, current):
            with torch.no_grad():
                self._cached = tuple(self.weights(*weights))
            self._print = current
        return self.rest(*args, *self._cached)


class Fingerprint:
    """What a set of weights holds, summed up cheaply enough to check on every call.

    Each large tensor is read as a matrix of rows of :data:`ROW` elements and summed up by its
    row sums and its column sums (each element is in one of each, so a change to one element
    moves its row's sum, and moving values around within a row or a column moves the other);
    small tensors (batch-norm statistics, biases, row tails) are kept as they are, in one
    ``torch.cat``. :meth:`same` compares two summaries *exactly*: any change to an element of a
    small tensor is seen, and any change to a large one that moves a row sum by more than the
    float32 rounding of a 256-term sum (about 1e-6 of the row's size) or that permutes values —
    short of changes that keep every row and column sum, which no optimizer step, statistics
    update or load makes. It needs no version counter: ``p.data`` updates, fused optimizers and
    batch-norm statistics updated by a forward pass are all seen. Costs two memory-bound
    reductions per large tensor and one copy of the small ones (planned once for the tensors'
    shapes, which the compiled graph fixes); a sum that differs only because a reduction was
    ordered differently (another thread count) costs one recomputation of the weights, never
    a stale one.
    """

    ROW = 256

    def __init__(self, tensors: Sequence[Tensor]):
        Key = tuple[torch.device, torch.dtype]
        # large tensors: (index, group, offset, rows): row sums, then column sums, at offset;
        # small ones: per group, (index, whether it needs a cast or a reshape), after those
        self._large: list[tuple[int, Key, int, int]] = []
        self._small: dict[Key, list[tuple[int, bool]]] = {}
        self._sizes: dict[Key, int] = {}
        count: dict[Key, int] = {}
        for i, t in enumerate(tensors):
            key = (t.device, _summary_dtype(t.dtype))
            rows = t.numel() // self.ROW if t.numel() >= 4 * self.ROW else 0
            self._small.setdefault(key, [])
            if rows:
                self._large.append((i, key, self._sizes.get(key, 0), rows))
                self._sizes[key] = self._sizes.get(key, 0) + rows + self.ROW
            else:
                self._small[key].append((i, t.dtype != key[1] or t.dim() != 1))
            count[key] = count.get(key, 0) + t.numel() - rows * self.ROW
        self._small_at = {key: self._sizes.get(key, 0) for key in self._small}
        for key, n in count.items():
            self._sizes[key] = self._small_at[key] + n

    def __call__(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The summary of ``tensors`` (the same shapes, dtypes and devices as planned)."""
        summary = {
            key: torch.empty(size, device=key[0], dtype=key[1]) for key, size in self._sizes.items()
        }
        with torch.no_grad():
            small = {
                key: [_flat(tensors[i], key[1]) if reshape else tensors[i] for i, reshape in items]
                for key, items in self._small.items()
            }
            for i, key, offset, rows in self._large:
                flat = _flat(tensors[i], key[1])
                body = rows * self.ROW
                matrix = flat[:body].view(rows, self.ROW)
                out = summary[key]
                torch.sum(matrix, 1, out=out[offset : offset + rows])
                torch.sum(matrix, 0, out=out[offset + rows : offset + rows + self.ROW])
                if body < flat.numel():
                    small[key].append(flat[body:])
            for key, values in small.items():
                if values:
                    torch.cat(values, out=summary[key][self._small_at[key] :])
        return list(summary.values())

    @staticmethod
    def same(a: Sequence[Tensor] | None, b: Sequence[Tensor]) -> bool:
        return a is not None and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    flat = t.detach().reshape(-1)
    return flat if flat.dtype == dtype else flat.to(dtype)


def _summary_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 and integers (exact up to 2**53) are summed up in float64, the rest in float32."""
    return torch.float64 if dtype == torch.float64 or not dtype.is_floating_point else torch.float32


def _split_weights(
    fused: GraphModule, weights: dict[int, Tensor]
) -> tuple[GraphModule, GraphModule, int]:
    """``fused`` as two graphs: the nodes that depend on weight inputs only (and constants),
    returning the values the rest reads; and the rest, reading them as extra inputs."""
    graph = fused.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    held = {placeholders[i]: t for i, t in weights.items()}
    weight_nodes = set(held)
    # only what computes the same on every call from the same weights: no random op, no
    # write, nothing reading memory the graph writes (a buffer updated in forward)
    effects = Effects(graph, fused.get_submodule, held.get)
    pure: set[Node] = {n for n in weight_nodes if not effects.written(n)}
    for node in graph.nodes:
        if (
            node.op in ("call_function", "call_method", "get_attr")
            and all(i in pure for i in node.all_input_nodes)
            and (node.op == "get_attr" or node.all_input_nodes)
            and effects.pure(node)
        ):
            pure.add(node)
    boundary = [
        n
        for n in graph.nodes
        if n in pure
        and n.op != "get_attr"
        and n not in weight_nodes
        and any(u not in pure for u in n.users)
    ]
    # the weights' graph
    wg = Graph()
    env: dict[Node, Node] = {}
    for node in placeholders:
        if node in weight_nodes:
            env[node] = wg.placeholder(node.name)
    for node in graph.nodes:
        if node in pure and node not in weight_nodes:
            env[node] = wg.node_copy(node, env.__getitem__)
    wg.output(tuple(env[n] for n in boundary))
    # the rest
    rg = Graph()
    renv: dict[Node, Node] = {}
    for node in placeholders:  # (weights too: an op no rule fused reads them as they are)
        renv[node] = rg.placeholder(node.name)
    for node in boundary:
        renv[node] = rg.placeholder(f"{node.name}_fused")
    for node in graph.nodes:
        if node.op == "placeholder" or node in renv:
            continue
        if node in pure and not any(u not in pure for u in node.users):
            continue  # used only inside the weights' graph
        if node in pure and node.op != "get_attr":
            continue
        renv[node] = rg.node_copy(node, renv.__getitem__)
    return GraphModule(fused, wg), GraphModule(fused, rg), len(boundary)


_AUTOCAST = frozenset(
    {torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast}
)
_UNFUSED = {
    "grad": "fxfuse: gradients are enabled for the model's weights, so folding them would cut "
    "them out of autograd; running the captured graph unfused (call the model under "
    "torch.no_grad() or torch.inference_mode() to fuse)",
    "autocast": "fxfuse: a captured graph has an autocast region (torch.autocast inside "
    "forward), whose ops compute in another precision; a fold across its edge would change "
    "that, so the graph runs unfused",
}


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
        self._live: Callable[..., Any] | None = None
        self._next_key = 0
        # an autocast region changes what the ops in it compute: a fold across its edge would
        # move an op into another precision; such a graph runs as captured
        self.autocast = any(
            n.op == "call_function" and n.target in _AUTOCAST for n in gm.graph.nodes
        )

    def __call__(self, *args: Any) -> Any:
        if self.autocast:
            return self._run_unfused(args, "autocast")
        weights = [args[i] for i in self.weight_indices]
        if self.options.weights == "live":
            if self._live is None:
                self._live = self._fuse(args, weights, live=True).run
            return self._live(*args)
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return self._run_unfused(args, "grad")
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

    def _run_unfused(self, args: Sequence[Any], why: str) -> Any:
        _warn_once(why, _UNFUSED[why])
        if self._unfused is None:
            self._unfused = self.inner(self.gm, list(args))
        return self._unfused(*args)

    def _fuse(self, args: Sequence[Any], weights: Sequence[Tensor], live: bool = False) -> _Fused:
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
            live=live,
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
        if live:
            return _Fused(weights, _LiveWeights(fused, self.weight_indices, self.inner, args))
        return _Fused(weights, self.inner(fused, list(args)))

    def _verify(self, fused: GraphModule, args: Sequence[Any]) -> None:
        weights = set(self.weight_indices)

        def fresh() -> list[Any]:  # (a graph may update its inputs in place: each run its own)
            return [
                a.clone() if isinstance(a, Tensor) and i not in weights else a
                for i, a in enumerate(args)
            ]

        with torch.no_grad():
            expected, actual = self.gm(*fresh()), fused(*fresh())
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
