"""Declarative rewrite rules and the bounded fixpoint driver that runs them.

A rule is three small methods (after onnxscript's rewriter and MLIR's DRR):

- :meth:`Rule.matches` says the *structure*: which ops, connected how, with ``users == 1``
  where a node must disappear. It yields :class:`Match` objects and decides nothing else.
- :meth:`Rule.check` says the *conditions* and returns a reason when they fail. Every reason
  ends up in the report, so a user learns why a block did not fuse.
- :meth:`Rule.rewrite` builds the replacement of ``match.root`` and checks nothing.

:class:`RuleSet` groups rules into stages; :meth:`RuleSet.run` runs each stage with a worklist
(every node once, then only what a rewrite touched) and repeats the stages until a full round
changes nothing. The number of rewrites and rounds is bounded: a rule set that does not settle
raises :class:`ConvergenceError` naming the rule that kept firing.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
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

from fxfuse.effects import Effects, reads_metadata_only, value_users
from fxfuse.errors import ConvergenceError
from fxfuse.ops import (
    BatchNormView,
    Combination,
    ConvGeometry,
    ConvView,
    FusedLayer,
    as_batch_norm,
    as_combination,
    as_conv,
    fused_layer,
)
from fxfuse.report import Decline, Rewrite
from fxfuse.validate import RewriteValidator

__all__ = ["Attempt", "FusionOptions", "Match", "RewriteContext", "Rule", "RuleSet", "Stage"]

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
    """

    max_flops_ratio: float = 1.5
    max_rounds: int = 16
    validate_rewrites: bool = False


@dataclass
class Match:
    """What a rule's pattern found. ``root`` is the node the rewrite replaces.

    ``excluded`` lists nodes the pattern saw but left out, with the reason (a branch whose
    output has another consumer, say); they are reported as declines. ``absorbed`` lists the
    nodes that disappear with the root and have its shape (see :func:`fxfuse.ops.value_users`).
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
        every stage, and stages run in turn until all worklists are empty.
        """
        budget = 4 * len(ctx.graph.nodes) + 64
        ctx._begin(len(self.stages), ctx.graph.nodes)
        for _ in range(ctx.options.max_rounds):
            for index, stage in enumerate(self.stages):
                _run_stage(stage, index, ctx, budget)
            if ctx._settled():
                return
        raise ConvergenceError(
            f"rules still firing after {ctx.options.max_rounds} rounds "
            f"(counts so far: {dict(ctx.counts)}); a rule set that does not settle is a bug"
        )


def _run_stage(stage: Stage, index: int, ctx: RewriteContext, budget: int) -> None:
    while (node := ctx._next(index)) is not None:
        for rule in stage.rules:
            if node.op not in rule.ops:
                continue
            if _try_rule(rule, node, ctx):
                if len(ctx.rewrites) > budget:
                    raise ConvergenceError(
                        f"more than {budget} rewrites on a graph of {len(ctx.graph.nodes)} "
                        f"nodes; rule {rule.name!r} keeps firing (last at {node.name})"
                    )
                break


SHAPE_CYCLE = "the rewritten value would depend on the shape of a node it removes"


@dataclass
class Attempt:
    """A rewrite in progress and what undoing it needs: where its nodes start, and the counts
    and constants from before it."""

    root: Node
    before: Node  # the node before ``root`` when the rewrite began
    counts: Counter[str]
    attributes: frozenset[str]

    def created(self) -> list[Node]:
        """The nodes the rewrite inserted (they all sit just before ``root``), in order."""
        nodes, node = [], self.before.next
        while node is not self.root:
            nodes.append(node)
            node = node.next
        return nodes


def _try_rule(rule: Rule[Any], node: Node, ctx: RewriteContext) -> bool:
    ctx._forget(rule, node)
    for match in rule.matches(node, ctx):
        for subject, why in match.excluded:
            ctx._decline(rule, subject, why, sticky=True)
        reason = rule.check(match, ctx)
        if reason is not None:
            ctx._decline(rule, match.root, reason)
            log.debug("%s declined at %s: %s", rule.name, match.root.name, reason)
            continue
        detail = rule.describe(match)
        root = match.root
        root_name = root.name
        attempt = ctx._attempt(root)
        try:
            with ctx.graph.inserting_before(root):
                new = rule.rewrite(match, ctx)
        except Exception as error:
            if ctx.validator is None:
                raise
            ctx._roll_back(attempt)  # with checking on, a faulty rule must not take the model
            ctx.validator.fail(rule, match, f"its rewrite raised {type(error).__name__}: {error}")
            continue
        created = attempt.created()
        readers = ctx._metadata_readers(match, new)
        moved = ctx._dependents_before(new, [r for r, _, _ in readers if r < new])
        cycle = set(moved)
        if not cycle.isdisjoint(created) or not cycle.isdisjoint(new.all_input_nodes):
            ctx._roll_back(attempt)  # the replacement needs the shape of a node it removes
            ctx._decline(rule, root, SHAPE_CYCLE)
            continue
        conflict = ctx._effect_conflict(match, created, new)
        if conflict is not None:
            ctx._roll_back(attempt)
            ctx._decline(rule, root, conflict)
            continue
        if ctx.validator is not None and not ctx.validator.check(rule, match, new, attempt):
            continue  # it differs from what it replaces on random inputs: rolled back, declined
        ctx.replace(root, new, readers, moved)
        ctx.counts[rule.name] += 1
        ctx.rewrites.append(Rewrite(rule.name, root_name, detail))
        log.debug("%s at %s: %s", rule.name, root_name, detail)
        return True
    return False


_ERASABLE_MODULES = (
    _ConvNd,
    nn.Linear,
    nn.Identity,
    _DropoutNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
    _CircularPadNd,
)


class RewriteContext:
    """What rules see: the graph, views of its ops, and the few ways to build new nodes.

    It resolves constants (attributes of the module, or graph inputs bound to tensors when the
    graph comes from ``torch.compile``), so views and rules never read modules themselves.
    """

    def __init__(
        self,
        graph: Graph,
        root: nn.Module,
        options: FusionOptions | None = None,
        bound: dict[Node, Tensor] | None = None,
    ):
        self.graph = graph
        self.root = root
        self.options = options or FusionOptions()
        self.bound = bound or {}
        # attributes fxfuse adds (new constants), by target; emission owns them
        self.attributes: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()
        self.rewrites: list[Rewrite] = []
        self._declines: dict[tuple[str, Node], tuple[str, bool]] = {}
        self._declining_rules: set[str] = set()
        self._modules: dict[str, nn.Module] = dict(root.named_modules())
        self.effects = Effects(graph, self.module, self._held)
        self._queues: list[deque[Node]] = []
        self._queued: list[set[Node]] = []
        self.validator: RewriteValidator | None = (
            RewriteValidator(self) if self.options.validate_rewrites else None
        )

    # -- constants --------------------------------------------------------------------------

    def tensor(self, arg: Any) -> Tensor | None:
        """The tensor ``arg`` always holds (an attribute or a bound input), else ``None``:
        never one the graph may change in place, through any alias (see :mod:`fxfuse.effects`).
        """
        if not isinstance(arg, Node):
            return None
        value = self._held(arg)
        if value is not None and self.effects.written(arg):
            return None  # the graph (or code it calls) may change it: not a constant
        return value

    def _held(self, node: Node) -> Tensor | None:
        """The tensor an attribute or a bound input holds, constant or not."""
        if node.op == "get_attr":
            value = self.attribute(str(node.target))
            return value if isinstance(value, Tensor) else None
        return self.bound.get(node)

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

    # -- views -----------------------------------------------------------------------------

    def conv(self, node: Node) -> ConvView | None:
        return as_conv(node, self)

    def batch_norm(self, node: Node) -> BatchNormView | None:
        return as_batch_norm(node, self)

    def combination(self, node: Node) -> Combination | None:
        return as_combination(node, self)

    def shape(self, node: Node) -> torch.Size | None:
        """The node's shape where the graph carries it (``meta["val"]``/``tensor_meta``)."""
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, Tensor):
            return val.shape
        meta = node.meta.get("tensor_meta")
        return getattr(meta, "shape", None)

    # -- building (call these from Rule.rewrite: nodes go before the match's root) ----------

    def fused(
        self,
        input: Node,
        *,
        kind: str,
        weight: Tensor,
        bias: Tensor | None,
        geometry: ConvGeometry | None,
        like: ConvView,
        sources: Sequence[str],
        name: str,
        requires_grad: bool | None = None,
    ) -> Node:
        """A new layer computing ``weight ⋆ input + bias`` exactly (float64), in ``like``'s dtype
        and device."""
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

    def count(self, name: str, n: int = 1) -> None:
        """Count a sub-event for the report (e.g. an identity turned into a kernel)."""
        self.counts[name] += n

    # -- graph surgery (the driver's) --------------------------------------------------------

    def replace(
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
        self.effects.replaced(old, new)
        for reader, node, target in readers:
            reader.replace_input_with(node, target)
        for node in reversed(moved):
            new.append(node)
        self._erase_dead(old)
        self._push(new)
        for user in new.users:
            self._push_upwards(user)

    def _attempt(self, root: Node) -> Attempt:
        return Attempt(root, root.prev, Counter(self.counts), frozenset(self.attributes))

    def _roll_back(self, attempt: Attempt) -> None:
        """Erase what a rewrite inserted and forget its constants and counts."""
        for node in reversed(attempt.created()):
            self.graph.erase_node(node)
        for target in set(self.attributes) - attempt.attributes:
            del self.attributes[target]
        self.counts.clear()
        self.counts.update(attempt.counts)

    @staticmethod
    def _metadata_readers(match: Match, new: Node) -> list[tuple[Node, Node, Node]]:
        """``(reader, node, target)`` for every user that only reads the metadata of a node
        the rewrite removes: ``target`` is the new node of the same shape it should read."""
        targets = {node: new for node in match.absorbed}
        targets.update(match.redirects)
        return [
            (user, node, target)
            for node, target in targets.items()
            for user in node.users
            if reads_metadata_only(user, node)
        ]

    @staticmethod
    def _dependents_before(anchor: Node, early: Sequence[Node]) -> list[Node]:
        """``early`` and every node before ``anchor`` that depends on them, in graph order:
        what must move behind ``anchor`` once ``early`` reads it."""
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
            if all(user in dying for user in value_users(node)):
                dying.add(node)
                stack.extend(node.all_input_nodes)
        return dying

    def _effect_conflict(self, match: Match, created: Sequence[Node], new: Node) -> str | None:
        """Why replacing ``match.root`` by ``created`` would change an effect, or ``None``.

        - The replacement runs where the root was: it reads its inputs there, where the ops it
          replaces read them earlier. A write to one of those inputs (through any alias) in
          between would change what it reads.
        - A root that updates a value in place others can see must stay an update of that value
          (some new node writes it), unless the rule vouches that, as matched, it writes
          nothing (``Match.writes_nothing``: dropout in eval mode)."""
        root = match.root
        self.effects.added(created)
        made = set(created)
        reads = {i for n in created for i in n.all_input_nodes if i not in made}
        if new not in made:
            reads.add(new)  # the rewrite hands an existing value to the root's users
        start = min(self.dying(root, [*created, new]))
        writer = self.effects.first_write_between(start, root, reads, ignore=made)
        if writer is not None:
            return (
                f"{writer.name} changes a value in place between the ops this would merge; "
                "moving them past it would change what they read"
            )
        if match.writes_nothing:
            return None
        kept = {t for n in made for t in self.effects.writes(n)}
        for target in self.effects.writes(root):
            if target not in kept and not self.effects.private(target, root):
                return (
                    f"{root.name} updates {target.name} in place, which other code can see; "
                    "the rewrite would lose that update"
                )
        return None

    def _erasable(self, node: Node) -> bool:
        return not node.users and self._removable(node)

    def _removable(self, node: Node) -> bool:
        """Whether the driver erases ``node`` once nothing uses it."""
        if node.op in ("placeholder", "output"):
            return False
        if node.op == "get_attr":
            return True
        if node.op == "call_module":
            module = self.module(str(node.target))
            return isinstance(module, _ERASABLE_MODULES) or (
                isinstance(module, _BatchNorm) and not module.training
            )
        return self.effects.pure(node)

    def _erase_dead(self, node: Node) -> None:
        """Erase ``node`` (a replaced root: a rule vouched for replacing it, even if torch
        calls it impure, like an eval-mode ``aten.dropout``) and what only it used."""
        stack = [node]
        while stack:
            n = stack.pop()
            if getattr(n, "_erased", False) or n.users:
                continue
            if not (n is node and n.op not in ("placeholder", "output")) and not self._removable(n):
                continue
            inputs = n.all_input_nodes
            self.graph.erase_node(n)
            for rule_name in self._declining_rules:  # a few names, not every decline
                self._declines.pop((rule_name, n), None)
            for i in inputs:
                if i.users:
                    for user in i.users:  # its user count changed: patterns may match now
                        self._push_upwards(user)
                else:
                    stack.append(i)

    # -- worklist ----------------------------------------------------------------------------

    def _begin(self, stages: int, nodes: Iterable[Node]) -> None:
        order = list(nodes)
        self._queues = [deque(order) for _ in range(stages)]
        self._queued = [set(order) for _ in range(stages)]

    def _settled(self) -> bool:
        return not any(self._queues)

    def _next(self, stage: int) -> Node | None:
        queue, queued = self._queues[stage], self._queued[stage]
        while queue:
            node = queue.popleft()
            queued.discard(node)
            if not getattr(node, "_erased", False):
                return node
        return None

    def _push(self, node: Node) -> None:
        if getattr(node, "_erased", False):
            return
        for queue, queued in zip(self._queues, self._queued, strict=True):
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

    # -- declines ----------------------------------------------------------------------------

    def _decline(self, rule: Rule[Any], subject: Node, reason: str, sticky: bool = False) -> None:
        self._declines[(rule.name, subject)] = (reason, sticky)
        self._declining_rules.add(rule.name)

    def _forget(self, rule: Rule[Any], node: Node) -> None:
        entry = self._declines.get((rule.name, node))
        if entry is not None and not entry[1]:
            del self._declines[(rule.name, node)]

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
