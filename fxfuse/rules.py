"""Declarative rewrite rules, what they see, and the bounded fixpoint driver that runs them.

A rule is three small methods (after onnxscript's rewriter and MLIR's DRR):

- :meth:`Rule.matches` says the *structure*: which ops, connected how, with ``users == 1``
  where a node must disappear. It yields :class:`Match` objects and decides nothing else.
- :meth:`Rule.check` says the *conditions* and returns a reason when they fail. Every reason
  ends up in the report, so a user learns why a block did not fuse.
- :meth:`Rule.rewrite` builds the replacement of ``match.root`` and checks nothing.

Rules see the graph through a :class:`RewriteContext`: views of its ops as linear maps
(:mod:`fxfuse.maps`), weights as expressions of its constants (:mod:`fxfuse.weights`), its
effects (:mod:`fxfuse.effects`) and proven ranks (:mod:`fxfuse.layout`), and a few ways to
build nodes. :class:`RuleSet` groups rules into stages; :meth:`RuleSet.run` runs each stage
with a worklist (every node once, then only what a rewrite touched) and repeats the stages
until a full round changes nothing. The driver applies each rewrite as a :class:`Transaction`
— checked for effects it would change, optionally validated on random inputs
(:mod:`fxfuse.validate`), rolled back when refused. The number of rewrites and rounds is
bounded: a rule set that does not settle raises :class:`ConvergenceError` naming the rule
that kept firing.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.fx import Graph, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)
from torch.nn.modules.pooling import _AvgPoolNd

from fxfuse import kernels
from fxfuse.dialects import inherits_forward
from fxfuse.effects import Effects, register_pure, run_pure, value_users
from fxfuse.errors import ConvergenceError, warn
from fxfuse.geometry import Geometry
from fxfuse.layout import Ranks
from fxfuse.maps import (
    Affine,
    Combination,
    FusedLayer,
    Layer,
    Refusal,
    as_affine,
    as_combination,
    as_layer,
    fused_layer,
)
from fxfuse.report import Decline, Rewrite
from fxfuse.validate import RewriteValidator
from fxfuse.weights import Weight, apply, const, evaluate, leaf

__all__ = [
    "FusionOptions",
    "Match",
    "RewriteContext",
    "Rule",
    "RuleSet",
    "Stage",
    "Transaction",
    "weight_of",
]

log = logging.getLogger("fxfuse")


@dataclass(frozen=True)
class FusionOptions:
    """Knobs the rules read.

    ``max_flops_ratio``: a merge may cost a little more arithmetic than the branches it
    replaces (a dilated 3×3 beside a 3×3 spreads into a 5×5: 25 taps instead of 18), since
    one conv saves a pass over memory per branch; it never may cost more than this factor,
    which stops a depthwise kernel from being densified (≈ 9C/(C+9)×).

    ``validate_rewrites``: check every rewrite as it is applied — the subgraph it replaces
    and its replacement are evaluated on the same random inputs (shapes recorded from
    ``optimize``'s ``example_inputs``, which it then needs) and compared; a rewrite that
    differs, or whose rule raises, is rolled back and reported as a decline. Costs about two
    forward passes of the rewritten region per rewrite; nothing when off. See
    :mod:`fxfuse.validate`. ``optimize(..., verify=True)`` turns it on.

    ``equalize``: after fusion, trade per-channel weight ranges between consecutive layers
    (cross-layer equalization, ``passes/equalize.py``), so that per-tensor INT8 weights lose
    less; exact. ``optimize(..., equalize=True)`` turns it on.

    ``keep_post_sum_bn``: keep a batch norm after a sum of branches as it is (QARepVGG: it
    keeps the activations' distribution trainable under quantization-aware training); the
    branches still merge into one conv.
    """

    max_flops_ratio: float = 1.5
    max_rounds: int = 16
    validate_rewrites: bool = False
    equalize: bool = False
    keep_post_sum_bn: bool = False

    def __post_init__(self) -> None:
        ratio, rounds, validate = self.max_flops_ratio, self.max_rounds, self.validate_rewrites
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"FusionOptions' max_flops_ratio must be a number, got {ratio!r}")
        if not ratio > 0:
            raise ValueError(
                "FusionOptions' max_flops_ratio must be > 0 (how much more arithmetic a merge "
                f"may cost than its branches), got {ratio!r}"
            )
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise TypeError(f"FusionOptions' max_rounds must be an int, got {rounds!r}")
        if rounds < 1:
            raise ValueError(f"FusionOptions' max_rounds must be ≥ 1, got {rounds!r}")
        if not isinstance(validate, bool):
            raise TypeError(f"FusionOptions' validate_rewrites must be a bool, got {validate!r}")


@dataclass
class Match:
    """What a rule's pattern found. ``root`` is the node the rewrite replaces.

    ``excluded`` lists nodes the pattern saw but left out, with the reason (a branch whose
    output has another consumer, say); they are reported as declines. ``absorbed`` lists the
    nodes that disappear with the root and have its shape (see :func:`fxfuse.effects.value_users`).
    """

    root: Node
    excluded: list[tuple[Node, str]] = field(default_factory=list, kw_only=True)
    # nodes that disappear with the root and have its shape and dtype: reads of their metadata
    # (``x.shape``, ``x.ndim`` in an assert) move to the replacement
    absorbed: list[Node] = field(default_factory=list, kw_only=True)
    # the same for nodes whose shape a node of the replacement other than its root has (set
    # by the rewrite, which made that node): removed node -> new node of its shape
    redirects: dict[Node, Node] = field(default_factory=dict, kw_only=True)
    # the rule vouches that the root, as matched, writes nothing even if its op could
    # (``dropout(x, training=False, inplace=True)``): the driver need not keep a write
    writes_nothing: bool = field(default=False, kw_only=True)


MatchT = TypeVar("MatchT", bound=Match)
_T = TypeVar("_T")


class Rule(ABC, Generic[MatchT]):
    """A declarative rewrite: pattern (:meth:`matches`), conditions (:meth:`check`),
    replacement (:meth:`rewrite`). Subclasses set ``name`` (kebab-case) and ``formula``
    (``before -> after``)."""

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    #: the node kinds a match can be anchored at (the driver skips the others)
    ops: ClassVar[frozenset[str]] = frozenset({"call_function", "call_method", "call_module"})

    @abstractmethod
    def matches(self, node: Node, ctx: RewriteContext) -> Iterable[MatchT]:
        """Structural matches anchored at ``node`` (usually zero or one)."""

    def check(self, match: MatchT, ctx: RewriteContext) -> str | None:
        """``None`` when the rewrite is exact here; otherwise the reason it is not."""
        return None

    @abstractmethod
    def rewrite(self, match: MatchT, ctx: RewriteContext) -> Node:
        """Build the replacement of ``match.root`` (inserted before it) and return it."""

    def describe(self, match: MatchT) -> str:
        """One line for the report: what this firing turned into what."""
        return self.formula

    def __repr__(self) -> str:
        return f"<rule {self.name}: {self.formula}>"


@dataclass(frozen=True)
class Stage:
    """Rules that run together to a fixpoint; earlier rules are tried first at each node."""

    name: str
    rules: tuple[Rule[Any], ...]


class RuleSet:
    """Stages of rules, run in order and repeated until a whole round changes nothing."""

    def __init__(self, stages: Iterable[Stage]):
        self.stages = tuple(stages)
        names = [r.name for s in self.stages for r in s.rules]
        if any(not n for n in names):
            raise ValueError("every rule needs a name")

    @classmethod
    def of(cls, rules: Iterable[Rule[Any]]) -> RuleSet:
        """A rule set with one stage."""
        return cls([Stage("rules", tuple(rules))])

    def with_rules(self, *rules: Rule[Any], stage: str | None = None) -> RuleSet:
        """A copy with ``rules`` appended to ``stage`` (by name; default: the last stage)."""
        target = stage or self.stages[-1].name
        if target not in {s.name for s in self.stages}:
            raise ValueError(f"no stage {target!r}; stages are {[s.name for s in self.stages]}")
        return RuleSet(
            Stage(s.name, s.rules + rules) if s.name == target else s for s in self.stages
        )

    def without(self, *names: str) -> RuleSet:
        """A copy without the rules named ``names``."""
        return RuleSet(
            Stage(s.name, tuple(r for r in s.rules if r.name not in names)) for s in self.stages
        )

    @property
    def rules(self) -> tuple[Rule[Any], ...]:
        return tuple(r for s in self.stages for r in s.rules)

    def __iter__(self) -> Iterator[Rule[Any]]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return (
            "RuleSet("
            + "; ".join(f"{s.name}: {', '.join(r.name for r in s.rules)}" for s in self.stages)
            + ")"
        )

    def run(self, ctx: RewriteContext) -> None:
        """Rewrite ``ctx.graph`` until no rule fires (bounded).

        Every stage has a worklist that starts with every node; a rewrite queues what it
        touched (the new node, its users and the sums above them, the users of what died) for
        every stage, and stages run in turn until all worklists are empty."""
        _Driver(ctx, self).run()


# --------------------------------------------------------------------------------------------
# Graph functions rules may leave in the graph until emission
# --------------------------------------------------------------------------------------------


@register_pure
def weight_of(weight: Weight) -> Tensor:
    """A weight expression's value as a graph value (emission turns it into an attribute, or
    into the nodes computing it on every call)."""
    return evaluate(weight)


# --------------------------------------------------------------------------------------------
# What rules see
# --------------------------------------------------------------------------------------------


class RewriteContext:
    """What rules see: the graph, views of its ops, and the few ways to build new nodes.

    It resolves constants (attributes of the module, or graph inputs bound to tensors when the
    graph comes from ``torch.compile``), so views and rules never read modules themselves.
    With ``live`` weights (the compile backend), bound inputs may change between calls: every
    weight read from them stays an expression emitted into the graph, never a value baked in.
    """

    def __init__(
        self,
        graph: Graph,
        root: nn.Module,
        options: FusionOptions | None = None,
        bound: dict[Node, Tensor] | None = None,
        *,
        live: bool = False,
    ):
        self.graph = graph
        self.root = root
        self.options = options or FusionOptions()
        self.bound = bound or {}
        self.live = live
        # attributes fxfuse adds (new constants), by target; emission owns them
        self.attributes: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()
        self.rewrites: list[Rewrite] = []
        self._declines: dict[tuple[str, Node], tuple[str, bool]] = {}
        self._declining_rules: set[str] = set()
        self._modules: dict[str, nn.Module] = dict(root.named_modules())
        self._weights: dict[Node, Weight | None] = {}
        self._candidates: dict[Node, bool] = {}
        self._module_weights: dict[str, Weight | None] = {}
        self._derived: dict[Hashable, Any] = {}
        self.effects = Effects(graph, self.module, self._held)
        self.rank = Ranks(graph, self.module, self._held)
        for node in graph.nodes:  # (in order: each node's inputs are decided before it)
            self._may_be_constant(node)
        self.validator: RewriteValidator | None = (
            RewriteValidator(self) if self.options.validate_rewrites else None
        )

    # -- constants ---------------------------------------------------------------------------

    def weight(self, arg: Any) -> Weight | None:
        """``arg`` as a constant weight: a Python number, an attribute or a bound input nothing
        writes (see :mod:`fxfuse.effects`), or a pure, deterministic op of such constants
        (``rsqrt(running_var + eps)`` in a frozen batch norm); ``None`` when it may vary."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return const(float(arg))
        if not isinstance(arg, Node):
            return None
        if arg not in self._weights:
            self._weights[arg] = self._constant(arg)
        return self._weights[arg]

    def _may_be_constant(self, node: Node) -> bool:
        """Whether ``node`` is an attribute, a bound input or made from such only (computed
        once, forward, so that asking about an activation never walks the graph)."""
        found = self._candidates.get(node)
        if found is None:
            if node.op == "call_function" and node.target is weight_of:
                found = True
            elif node.op in ("get_attr", "placeholder"):
                found = self._held(node) is not None
            elif node.op in ("call_function", "call_method"):
                inputs = node.all_input_nodes
                found = bool(inputs) and all(self._may_be_constant(i) for i in inputs)
            else:
                found = False
            self._candidates[node] = found
        return found

    def _constant(self, node: Node) -> Weight | None:
        if not self._may_be_constant(node):
            return None
        if node.op == "call_function" and node.target is weight_of:
            (weight,) = node.args
            return weight if isinstance(weight, Weight) else None
        held = self._held(node)
        if held is not None:
            if self.effects.written(node) or not held.is_floating_point():
                return None  # the graph (or code it calls) may change it: not a constant
            live = self.live and node.op == "placeholder"
            return leaf(held, node=node, live=live)
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            return None
        effects = self.effects
        if effects.writes(node) or effects.opaque(node) or effects.written(node):
            return None
        if any(user.op == "output" for user in node.users):
            return None  # handed to the caller, who may change it: fresh on every call
        weights = {n: self.weight(n) for n in node.all_input_nodes}
        if any(w is None for w in weights.values()):
            return None
        fn = _callable(node)
        args, kwargs = _substitute((node.args, node.kwargs), weights)
        try:  # evaluated once: refused if it is random or writes (asked of the aten ops)
            values = _substitute(
                (node.args, node.kwargs), {n: evaluate(w) for n, w in weights.items()}
            )  # type: ignore[union-attr]
            result = run_pure(fn, *values)
        except Exception:
            return None
        if not isinstance(result, Tensor) or not result.is_floating_point():
            return None
        largest = max(w.numel() for w in weights.values())  # type: ignore[union-attr]
        if result.numel() > GROWTH_LIMIT * max(largest, 1):
            return None  # (expand, repeat: never materialize a big tensor from a small one)
        return apply(fn, *args, result=result, **kwargs)

    def why_not_constant(self, node: Node) -> str | None:
        """Why ``node``, computed only from attributes and weights, is still not a constant:
        one of them is changed in place (through any alias), or an op on them draws random
        numbers or writes; ``None`` when it is a constant or not made of constants at all."""
        if not self._may_be_constant(node) or self.weight(node) is not None:
            return None
        seen: set[Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            held = self._held(n)
            if held is not None:
                if self.effects.written(n):
                    writer = next(
                        (w.name for w in self.effects.writers_of(n)), "code fxfuse cannot see"
                    )
                    return (
                        f"{n.target} is changed in place during the forward (by {writer}), "
                        "so it is no constant: nothing folds it"
                    )
                continue
            if self.effects.random(n):
                return f"{n.name} draws random numbers on every call: left as it is"
            if self.effects.writes(n):
                return f"{n.name} changes a value in place: left as it is"
            stack.extend(n.all_input_nodes)
        return None

    def _held(self, node: Node) -> Tensor | None:
        """The tensor an attribute or a bound input holds, constant or not."""
        if node.op == "get_attr":
            value = self.attribute(str(node.target))
            return value if isinstance(value, Tensor) else None
        return self.bound.get(node)

    def module_weight(self, path: str, name: str) -> Weight | None:
        """A module's own parameter or buffer (``conv.weight``) as a weight, ``None`` if the
        graph may change it."""
        key = f"{path}.{name}" if path else name
        if key not in self._module_weights:
            tensor = getattr(self.module(path), name)
            written = self.effects.written_tensor(tensor)
            self._module_weights[key] = None if written else leaf(tensor, path=key)
        return self._module_weights[key]

    def derived(self, key: Hashable, build: Callable[[], _T]) -> _T:
        """``build()``, computed once per ``key`` for this context: what views derive from
        constants alone (a batch norm's scale and shift from its weights), so that asking
        for a view again builds no new expressions. Keys hold the weights they name, so an
        ``id`` is never reused while the context lives."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]  # type: ignore[no-any-return]

    def number(self, arg: Any) -> float | None:
        """A Python number, or ``t.item()`` of a constant tensor (dynamo lifts a module's float
        attributes, like a batch norm's ``eps``, to graph inputs under ``dynamic=True``)."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        if isinstance(arg, Node) and arg.op == "call_method" and arg.target == "item":
            held = self._held(arg.args[0]) if isinstance(arg.args[0], Node) else None
            if held is not None and held.numel() == 1 and not self.effects.written(arg.args[0]):
                return float(held)
        return None

    def tensors(self) -> Iterator[Tensor]:
        """The model's parameters and buffers, then the bound inputs."""
        yield from self.root.parameters()
        yield from self.root.buffers()
        yield from self.bound.values()

    def module(self, target: str) -> nn.Module:
        """The submodule a ``call_module`` target names."""
        module = self._modules.get(target)
        if module is None:
            module = self.root.get_submodule(target)
            self._modules[target] = module
        return module

    def attribute(self, target: str) -> Any:
        """What a ``get_attr``/``call_module`` target names (``None`` if nothing)."""
        if target in self.attributes:
            return self.attributes[target]
        owner, _, name = target.rpartition(".")
        try:
            return getattr(self.module(owner) if owner else self.root, name, None)
        except AttributeError:
            return None

    # -- views -------------------------------------------------------------------------------

    def layer(self, node: Node) -> Layer | None:
        """``node`` as a layer (conv, transposed conv, linear, pooling…), or ``None``."""
        found = as_layer(node, self)
        return found if isinstance(found, Layer) else None

    def affine(self, node: Node) -> Affine | None:
        """``node`` as a batch norm (an affine map when it uses running statistics)."""
        found = as_affine(node, self)
        return found if isinstance(found, Affine) else None

    def refusal(self, node: Node) -> str | None:
        """Why ``node``, an op fxfuse knows, cannot be read as a map (``None`` if it can be,
        or is no such op)."""
        for view in (as_layer, as_affine):
            found = view(node, self)
            if isinstance(found, Refusal):
                return found.reason
        return None

    def combination(self, node: Node) -> Combination | None:
        return as_combination(node, self)

    def shape(self, node: Node) -> torch.Size | None:
        """The node's shape where the graph carries it (``meta["val"]``/``tensor_meta``): one
        example's evidence, never a proof for other inputs."""
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, Tensor):
            return val.shape
        meta = node.meta.get("tensor_meta")
        return getattr(meta, "shape", None)

    # -- building (call these from Rule.rewrite: nodes go before the match's root) ------------

    def fused(
        self,
        input: Node,
        *,
        kind: str,
        weight: Weight,
        bias: Weight | None,
        geometry: Geometry | None,
        like: Layer,
        sources: Sequence[str],
        name: str,
        requires_grad: bool | None = None,
    ) -> Node:
        """A new layer computing ``weight ⋆ input + bias`` exactly (float64), in ``like``'s
        dtype and device."""
        layer = FusedLayer(
            kind,
            weight,
            bias,
            geometry,
            like.dtype,
            like.device,
            tuple(dict.fromkeys(sources)),
            name,
            like.requires_grad if requires_grad is None else requires_grad,
        )
        return self.graph.call_function(fused_layer, (input, layer))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Node:
        """A new ``call_function`` node."""
        return self.graph.call_function(fn, args, kwargs)

    def constant(self, value: Tensor, hint: str = "constant") -> Node:
        """A new attribute holding ``value`` (a buffer of the result) and its ``get_attr``."""
        name = f"_fxfuse_{hint}_{len(self.attributes)}"
        self.attributes[name] = value.detach().clone()
        return self.graph.get_attr(name)

    def weight_node(self, weight: Weight, like: Layer) -> Node:
        """A graph value holding ``weight`` in ``like``'s dtype and device (a constant; with
        live weights, computed on every call)."""
        meta = torch.empty(weight.shape, dtype=like.dtype, device="meta")
        cast = apply(kernels.cast, weight, result=meta, dtype=like.dtype, device=like.device)
        return self.graph.call_function(weight_of, (cast,))

    def count(self, name: str, n: int = 1) -> None:
        """Count a sub-event for the report."""
        self.counts[name] += n

    def declines(self) -> list[Decline]:
        """Declines that still stand, in graph order; one per rule and reason."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        live = [(k, v) for k, v in self._declines.items() if k[1] in order]
        live.sort(key=lambda kv: (order[kv[0][1]], kv[0][0]))
        seen: set[tuple[str, str]] = set()
        result = []
        for (rule, node), (reason, _) in live:
            if (rule, reason) not in seen:
                seen.add((rule, reason))
                result.append(Decline(rule, node.name, reason))
        return result

    def decline(self, rule: Rule[Any], subject: Node, reason: str, sticky: bool = False) -> None:
        """Record that ``rule`` declined at ``subject`` because of ``reason`` (a sticky decline
        stays even when the rule later fires at that node for another match)."""
        self._declines[(rule.name, subject)] = (reason, sticky)
        self._declining_rules.add(rule.name)


GROWTH_LIMIT = 4


def _callable(node: Node) -> Callable[..., Any]:
    if node.op == "call_method":
        name = str(node.target)
        return lambda self_arg, *rest, **kwargs: getattr(self_arg, name)(*rest, **kwargs)
    assert callable(node.target)
    return node.target


def _substitute(value: Any, env: dict[Node, Any]) -> Any:
    if isinstance(value, Node):
        return env[value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, env) for v in value)
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Transactions: a rewrite, applied or undone as a whole
# --------------------------------------------------------------------------------------------


class Transaction:
    """A rewrite in progress and what undoing it needs: where its nodes start, and the counts
    and constants from before it. The driver and the validator both use it."""

    def __init__(self, ctx: RewriteContext, root: Node):
        self.ctx = ctx
        self.root = root
        self.before = root.prev  # the node before ``root`` when the rewrite began
        self._counts = Counter(ctx.counts)
        self._attributes = frozenset(ctx.attributes)

    def created(self) -> list[Node]:
        """The nodes the rewrite inserted (they all sit just before ``root``), in order."""
        nodes, node = [], self.before.next
        while node is not self.root:
            nodes.append(node)
            node = node.next
        return nodes

    def roll_back(self) -> None:
        """Erase what the rewrite inserted and forget its constants and counts."""
        for node in reversed(self.created()):
            self.ctx.graph.erase_node(node)
        for target in set(self.ctx.attributes) - self._attributes:
            del self.ctx.attributes[target]
        self.ctx.counts.clear()
        self.ctx.counts.update(self._counts)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

SHAPE_CYCLE = "the rewritten value would depend on the shape of a node it removes"

_ERASABLE_MODULES = (
    _ConvNd,
    nn.Linear,
    nn.Identity,
    _DropoutNd,
    _AvgPoolNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
    _CircularPadNd,
)

_ERASABLE_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


class _Driver:
    """Runs a rule set on a context: worklists, transactions, replacement and dead code."""

    def __init__(self, ctx: RewriteContext, rules: RuleSet):
        self.ctx = ctx
        self.rules = rules
        self.budget = 4 * len(ctx.graph.nodes) + 64
        order = list(ctx.graph.nodes)
        self.queues = [deque(order) for _ in rules.stages]
        self.queued = [set(order) for _ in rules.stages]

    def run(self) -> None:
        ctx = self.ctx
        for _ in range(ctx.options.max_rounds):
            for index, stage in enumerate(self.rules.stages):
                self._run_stage(stage, index)
            if not any(self.queues):
                return
        raise ConvergenceError(
            f"rules still firing after {ctx.options.max_rounds} rounds "
            f"(counts so far: {dict(ctx.counts)}); a rule set that does not settle is a bug"
        )

    def _run_stage(self, stage: Stage, index: int) -> None:
        while (node := self._next(index)) is not None:
            for rule in stage.rules:
                if node.op not in rule.ops:
                    continue
                if self._try(rule, node):
                    if len(self.ctx.rewrites) > self.budget:
                        raise ConvergenceError(
                            f"more than {self.budget} rewrites on a graph of "
                            f"{len(self.ctx.graph.nodes)} nodes; rule {rule.name!r} keeps "
                            f"firing (last at {node.name})"
                        )
                    break

    def _try(self, rule: Rule[Any], node: Node) -> bool:
        ctx = self.ctx
        self._forget(rule, node)
        for match in rule.matches(node, ctx):
            for subject, why in match.excluded:
                ctx.decline(rule, subject, why, sticky=True)
            reason = rule.check(match, ctx)
            if reason is not None:
                ctx.decline(rule, match.root, reason)
                log.debug("%s declined at %s: %s", rule.name, match.root.name, reason)
                continue
            if self._apply(rule, match):
                return True
        return False

    def _apply(self, rule: Rule[Any], match: Match) -> bool:
        ctx = self.ctx
        root = match.root
        root_name = root.name
        detail = rule.describe(match)
        transaction = Transaction(ctx, root)
        try:
            with ctx.graph.inserting_before(root):
                new = rule.rewrite(match, ctx)
        except Exception as error:
            if ctx.validator is None:
                raise
            transaction.roll_back()  # with checking on, a faulty rule must not take the model
            self._fail(rule, match, f"its rewrite raised {type(error).__name__}: {error}")
            return False
        created = transaction.created()
        readers = _metadata_readers(match, new)
        moved = _dependents_before(new, [r for r, _, _ in readers if r < new])
        cycle = set(moved)
        if not cycle.isdisjoint(created) or not cycle.isdisjoint(new.all_input_nodes):
            transaction.roll_back()  # the replacement needs the shape of a node it removes
            ctx.decline(rule, root, SHAPE_CYCLE)
            return False
        conflict = self._effect_conflict(match, created, new)
        if conflict is not None:
            transaction.roll_back()
            ctx.decline(rule, root, conflict)
            return False
        if ctx.validator is not None:
            failure = ctx.validator.check(transaction, new, self.dying(root, [*created, new]))
            if failure is not None:  # it differs from what it replaces on random inputs
                transaction.roll_back()
                self._fail(rule, match, failure)
                return False
        self._replace(root, new, readers, moved)
        ctx.counts[rule.name] += 1
        ctx.rewrites.append(Rewrite(rule.name, root_name, detail))
        log.debug("%s at %s: %s", rule.name, root_name, detail)
        return True

    def _fail(self, rule: Rule[Any], match: Match, reason: str) -> None:
        assert self.ctx.validator is not None
        warn(
            f"fxfuse: {rule.name} at {match.root.name} failed validation and was rolled back: "
            f"{reason}"
        )
        self.ctx.decline(rule, match.root, f"failed validation: {reason}")
        self.ctx.validator.record_failure(rule.name, match.root.name, reason)

    # -- effects -----------------------------------------------------------------------------

    def _effect_conflict(self, match: Match, created: Sequence[Node], new: Node) -> str | None:
        """Why replacing ``match.root`` by ``created`` would change an effect, or ``None``.

        - The replacement runs where the root was: it reads its inputs there, where the ops it
          replaces read them earlier. A write to one of those inputs (through any alias) in
          between would change what it reads.
        - A root that updates a value in place others can see must stay an update of that value
          (some new node writes it), unless the rule vouches that, as matched, it writes
          nothing (``Match.writes_nothing``: dropout in eval mode)."""
        effects = self.ctx.effects
        root = match.root
        effects.added(created)
        made = set(created)
        reads = {i for n in created for i in n.all_input_nodes if i not in made}
        if new not in made:
            reads.add(new)  # the rewrite hands an existing value to the root's users
        for n in created:  # weights a fused layer reads at run time (live ones)
            reads.update(_weight_nodes(n))
        start = min(self.dying(root, [*created, new]))
        writer = effects.first_write_between(start, root, reads, ignore=made)
        if writer is not None:
            return (
                f"{writer.name} changes a value in place between the ops this would merge; "
                "moving them past it would change what they read"
            )
        if match.writes_nothing:
            return None
        kept = {t for n in made for t in effects.writes(n)}
        for target in effects.writes(root):
            if target not in kept and not effects.private(target, root):
                return (
                    f"{root.name} updates {target.name} in place, which other code can see; "
                    "the rewrite would lose that update"
                )
        return None

    # -- replacing ---------------------------------------------------------------------------

    def dying(self, root: Node, keep: Sequence[Node]) -> set[Node]:
        """``root`` and the nodes that die once it is replaced: those all of whose value users
        die (reads of their shape move to the replacement), unless the replacement (``keep``)
        reads them or the driver would not erase them."""
        kept = set(keep)
        for node in keep:
            kept.update(node.all_input_nodes)
        dying = {root}
        stack = list(root.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in dying or node in kept or not self._removable(node):
                continue
            if not all(user in dying for user in value_users(node)):
                # (the border writes of a value padding whose reader is folded away)
                writes = self.ctx.effects.unread_writes(node, dying)
                if writes is None:
                    continue
                dying.update(writes)
            dying.add(node)
            stack.extend(node.all_input_nodes)
        return dying

    def _removable(self, node: Node) -> bool:
        """Whether the driver erases ``node`` once nothing uses it."""
        if node.op in ("placeholder", "output"):
            return False
        if node.op == "get_attr":
            return True
        if node.op == "call_module":
            module = self.ctx.module(str(node.target))
            return (
                isinstance(module, _ERASABLE_MODULES)
                or (isinstance(module, _BatchNorm) and not module.training)
                # (an activation a rule rebuilt: equalize-layers)
                or (isinstance(module, _ERASABLE_ACTIVATIONS) and inherits_forward(module))
            )
        return self.ctx.effects.pure(node)

    def _replace(
        self,
        old: Node,
        new: Node,
        readers: Sequence[tuple[Node, Node, Node]] = (),
        moved: Sequence[Node] = (),
    ) -> None:
        """Point every user of ``old`` at ``new``, and each metadata ``reader`` of an absorbed
        node too (after moving the ``moved`` nodes behind ``new``); drop what became dead;
        requeue what may match now."""
        for key in ("nn_module_stack", "stack_trace"):
            if key in old.meta and key not in new.meta:
                new.meta[key] = old.meta[key]
        old.replace_all_uses_with(new)
        self.ctx.effects.replaced(old, new)
        self.ctx.rank.replaced(old, new)
        for reader, node, target in readers:
            reader.replace_input_with(node, target)
        for node in reversed(moved):
            new.append(node)
        self._erase_dead(old)
        self._push(new)
        for user in new.users:
            self._push_upwards(user)

    def _erase_dead(self, node: Node) -> None:
        """Erase ``node`` (a replaced root: a rule vouched for replacing it, even if torch
        calls it impure, like an eval-mode ``aten.dropout``) and what only it used."""
        stack = [node]
        touched: dict[Node, None] = {}  # (ordered; each chain walked once, as left at the end)
        while stack:
            n = stack.pop()
            if getattr(n, "_erased", False):
                continue
            if n.users:
                writes = self.ctx.effects.unread_writes(n)
                if not writes:  # still read: its user count changed, patterns may match now
                    if n is not node:
                        touched.update(dict.fromkeys(n.users))
                    continue
                for write in reversed(writes):  # (a write before the view it writes through)
                    self.ctx.graph.erase_node(write)
                if n.users:  # (reads of its shape: they move to the replacement)
                    continue
            if not (n is node and n.op not in ("placeholder", "output")) and not self._removable(n):
                continue
            inputs = n.all_input_nodes
            self.ctx.graph.erase_node(n)
            for rule_name in self.ctx._declining_rules:  # a few names, not every decline
                self.ctx._declines.pop((rule_name, n), None)
            stack.extend(inputs)
        for user in touched:
            self._push_upwards(user)

    # -- worklist ----------------------------------------------------------------------------

    def _next(self, stage: int) -> Node | None:
        queue, queued = self.queues[stage], self.queued[stage]
        while queue:
            node = queue.popleft()
            queued.discard(node)
            if not getattr(node, "_erased", False):
                return node
        return None

    def _push(self, node: Node) -> None:
        if getattr(node, "_erased", False):
            return
        for queue, queued in zip(self.queues, self.queued, strict=True):
            if node not in queued:
                queue.append(node)
                queued.add(node)

    def _push_upwards(self, node: Node) -> None:
        """Queue ``node`` and the single-use chain above it (the roots of sums it is in)."""
        for _ in range(64):
            self._push(node)
            users = value_users(node)
            if len(users) != 1:
                return
            node = users[0]

    def _forget(self, rule: Rule[Any], node: Node) -> None:
        entry = self.ctx._declines.get((rule.name, node))
        if entry is not None and not entry[1]:
            del self.ctx._declines[(rule.name, node)]


def _weight_nodes(node: Node) -> list[Node]:
    """The graph nodes a fused layer's (or weight value's) live weights read on every call."""
    found: list[Node] = []
    for arg in node.args:
        if isinstance(arg, FusedLayer):
            found += arg.weight.nodes
            if arg.bias is not None:
                found += arg.bias.nodes
        elif isinstance(arg, Weight):
            found += arg.nodes
    return found


def _metadata_readers(match: Match, new: Node) -> list[tuple[Node, Node, Node]]:
    """``(reader, node, target)`` for every user that only reads the metadata of a node the
    rewrite removes: ``target`` is the new node of the same shape it should read."""
    from fxfuse.effects import reads_metadata_only

    targets = {node: new for node in match.absorbed}
    targets.update(match.redirects)
    return [
        (user, node, target)
        for node, target in targets.items()
        for user in node.users
        if reads_metadata_only(user, node)
    ]


def _dependents_before(anchor: Node, early: Sequence[Node]) -> list[Node]:
    """``early`` and every node before ``anchor`` that depends on them, in graph order: what
    must move behind ``anchor`` once ``early`` reads it."""
    if not early:
        return []
    moving: set[Node] = set(early)
    ordered = []
    node = min(early)
    while node is not anchor:
        if node in moving or any(i in moving for i in node.all_input_nodes):
            moving.add(node)
            ordered.append(node)
        node = node.next
    return ordered
