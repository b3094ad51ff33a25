"""R-Drop as a graph transform: two dropout samples of a model from one forward pass.

R-Drop (Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021) feeds
every sample through two dropout sub-models of the same network and adds a symmetric KL term
between their predictions to the task loss::

    L = ½ (NLL(p₁) + NLL(p₂)) + α · ½ (KL(p₁ ‖ p₂) + KL(p₂ ‖ p₁))

Two forward passes are not needed: written twice along dim 0, the batch goes through the
model once, and each dropout draws its masks independently for every element of the doubled
batch, so for the two copies. Split after the model, the halves are the two sub-models'
outputs. :func:`rdrop` does this to the model's graph::

    twin = fxfuse.rdrop(model)        # shares model's parameters: model's optimizer trains it
    out1, out2 = twin(x)              # one pass over torch.cat([x, x]), split in two
    loss = fxfuse.rdrop_loss(out1, out2, y, alpha=1.0)

It is exact only where dim 0 is the batch everywhere in the model. Before the first call with
inputs of a new shape, :func:`fxfuse.batch_audit.audit_batch` follows the batch through every
aten op of the model (on fake tensors, at batch sizes 2 and 3) and refuses, naming the op and
the line, a model that mixes samples other than by batch norm, draws random numbers shared by
several samples, computes with the batch size, or writes batch data into its state.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fxfuse.batch_audit import LIBRARY_DIRS, BatchAudit, BatchError, audit_batch, describe_node
from fxfuse.capture import Tracer, symbolic_capture
from fxfuse.errors import CaptureError

__all__ = [
    "BatchError",
    "RDrop",
    "copy_back",
    "duplicate_batch",
    "rdrop",
    "rdrop_loss",
    "split_batch",
]

log = logging.getLogger("fxfuse")

#: Plans kept per twin: one per input signature (shapes past dim 0, dtypes) and mode.
PLAN_CACHE_SIZE = 128


# --------------------------------------------------------------------------------------------
# The three functions the rewritten graph calls
# --------------------------------------------------------------------------------------------


def duplicate_batch(value: Any) -> Any:
    """``value`` with every tensor leaf that has a dim written twice along dim 0."""
    return tree_map(
        lambda x: torch.cat((x, x)) if isinstance(x, Tensor) and x.dim() > 0 else x, value
    )


def split_batch(value: Any, batched: tuple[bool, ...]) -> tuple[Any, Any]:
    """``(first, second)``: ``value`` with each leaf flagged in ``batched`` (pytree order) cut
    in two halves along dim 0; the other leaves are the same objects in both."""
    leaves, spec = tree_flatten(value)
    if len(leaves) != len(batched):
        raise RuntimeError(
            f"fxfuse.rdrop: the output has {len(leaves)} leaves where the check saw "
            f"{len(batched)}; its structure depends on the inputs' values"
        )
    first, second = [], []
    for leaf, is_batched in zip(leaves, batched, strict=True):
        if is_batched:
            n = leaf.size(0) // 2
            first.append(leaf.narrow(0, 0, n))
            second.append(leaf.narrow(0, n, n))
        else:
            first.append(leaf)
            second.append(leaf)
    return tree_unflatten(first, spec), tree_unflatten(second, spec)


def copy_back(original: Any, doubled: Any, leaves: tuple[int, ...]) -> None:
    """Write the first half of each doubled leaf in ``leaves`` (pytree order) into the
    caller's input: the model changes these inputs in place, and so does its twin."""
    originals, _ = tree_flatten(original)
    copies, _ = tree_flatten(doubled)
    with torch.no_grad():
        for i in leaves:
            originals[i].copy_(copies[i].narrow(0, 0, originals[i].size(0)))


# --------------------------------------------------------------------------------------------
# The twin
# --------------------------------------------------------------------------------------------


@dataclass
class _Capture:
    """The model's graph in one mode: targets under ``model.``, fx's tensor constants apart."""

    graph: Graph
    constants: dict[str, Tensor]
    body: GraphModule  # the graph as captured, for the check
    rewritten: dict[Any, GraphModule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.signature = inspect.signature(self.body.forward)
        self.arity = len(self.signature.parameters)


@dataclass
class _Plan:
    module: GraphModule
    audit: BatchAudit


class RDrop(nn.Module):
    """Two dropout samples of ``model`` from one forward pass: ``out1, out2 = twin(x)``.

    Made by :func:`rdrop`. ``twin(*args, **kwargs)`` takes what ``model`` takes and returns
    ``(out1, out2)``, each with the structure of ``model``'s output: the model's graph run
    once on its batch written twice along dim 0, every output tensor that holds the batch cut
    in two halves along dim 0 (outputs without the batch, and non-tensor outputs, are the
    same objects in both).

    ``model`` is the twin's only submodule: the twin shares its parameters and buffers, so
    the optimizer of ``model.parameters()`` trains it, ``twin.train()``/``twin.eval()`` set
    ``model``'s mode, and ``twin.to(...)`` moves ``model``. The twin follows ``model``'s
    modes: it captures the model again after they change (a functional
    ``F.dropout(x, p, self.training)`` is fixed at capture time).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        leaf_modules: Iterable[type[nn.Module]] = (),
        concrete_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self._leaf_modules = tuple(leaf_modules)
        self._concrete_args = concrete_args
        self._captures: dict[tuple[bool, ...], _Capture] = {}
        self._plans: OrderedDict[Any, _Plan] = OrderedDict()
        self._capture()

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return self._plan(args, kwargs, stacklevel=5).module(*args, **kwargs)

    def check(self, *args: Any, **kwargs: Any) -> BatchAudit:
        """Check inputs like these without running the model; :class:`BatchError` with the
        reason where doubling their batch would compute something other than the model."""
        return self._plan(args, kwargs, stacklevel=3).audit

    @property
    def graph_module(self) -> GraphModule:
        """The rewritten graph of the last call (``print(twin.graph_module.code)``)."""
        if not self._plans:
            raise RuntimeError("the twin has not been called yet: its graph depends on the inputs")
        return next(reversed(self._plans.values())).module

    # -- capture and plans -------------------------------------------------------------------

    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.model.modules())

    def _capture(self, modes: tuple[bool, ...] | None = None) -> _Capture:
        modes = self._modes() if modes is None else modes
        found = self._captures.get(modes)
        if found is None:
            graph, constants = _capture(self.model, self._leaf_modules, self._concrete_args)
            body = _graph_module(self.model, constants, graph, type(self.model).__name__)
            found = self._captures[modes] = _Capture(graph, constants, body)
            log.info(
                "fxfuse.rdrop: captured %s (%d nodes; %s)",
                type(self.model).__name__,
                len(graph.nodes),
                "training mode" if self.model.training else "eval mode",
            )
        return found

    def _plan(self, args: tuple[Any, ...], kwargs: dict[str, Any], stacklevel: int) -> _Plan:
        modes = self._modes()
        capture = self._capture(modes)
        if not kwargs and len(args) == capture.arity and all(isinstance(a, Tensor) for a in args):
            inputs: list[Any] = list(args)  # the common call, keyed without pytree or binding
            key: Any = (modes, tuple((a.shape[1:], a.dim(), a.dtype, a.device) for a in args))
        else:
            bound = capture.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            inputs = list(bound.arguments.values())
            key = (modes, _signature(inputs))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        name = type(self.model).__name__
        _check_batch_sizes(inputs, name)
        with _disable_current_modes():  # a counter or profiler the caller runs sees no check
            audit = audit_batch(capture.body, inputs, model_name=name, describe=describe_node)
        log.info(
            "fxfuse.rdrop: %s keeps its samples apart along dim 0 (%d aten ops followed); "
            "output leaves holding the batch: %s",
            name,
            audit.ops,
            audit.outputs,
        )
        if audit.batch_norms_after_random:
            warnings.warn(
                "fxfuse.rdrop: training-mode batch norm after a dropout ("
                + "; ".join(audit.batch_norms_after_random)
                + "): on the doubled batch its statistics cover both dropout samples, as in "
                "one batch of twice the size; two forward passes would give each its own",
                stacklevel=stacklevel,
            )
        holds = tuple(_holds_batch(x) for x in inputs)
        shape = (key[0], holds, audit.outputs, audit.mutated)  # what the rewrite depends on
        module = capture.rewritten.get(shape)
        if module is None:
            graph = _rewrite(capture.graph, holds, audit)
            module = _graph_module(self.model, capture.constants, graph, f"RDrop{name}")
            capture.rewritten[shape] = module
        plan = self._plans[key] = _Plan(module, audit)
        while len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan


def rdrop(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> RDrop:
    """Two dropout samples of ``model`` from one forward pass: ``out1, out2 = twin(x)``.

    The model is captured with ``torch.fx`` and rewritten so that it runs once on its batch
    written twice along dim 0 (``torch.cat([x, x])``), then cuts each output in two halves:
    every dropout draws independent masks for the two copies (it draws per element, or per
    sample and channel), and every other op computes what the model computes. Use it with
    :func:`rdrop_loss`::

        twin = fxfuse.rdrop(model)
        optimizer = torch.optim.AdamW(model.parameters())   # model's parameters train twin
        out1, out2 = twin(x)
        loss = fxfuse.rdrop_loss(out1, out2, y, alpha=1.0)

    ``model`` is not changed. The twin *shares* its parameters and buffers (it is the twin's
    submodule): a step of ``model``'s optimizer trains both; ``twin.train()``/``twin.eval()``
    set ``model``'s mode.

    **Batch norm** in training mode sees the doubled batch: its mean and biased variance are
    those of the batch (each sample counted twice), so with dropout off ``out1`` and ``out2``
    equal ``model(x)``. The running variance is updated with the unbiased variance, which
    multiplies the biased one by ``n/(n-1)`` with ``n`` the values per channel — ``2n`` on the
    doubled batch, so its update is ``var·2n/(2n-1)`` where the model's is ``var·n/(n-1)``.
    A batch norm *after* a dropout takes statistics over both dropout samples together, as one
    batch of twice the size would (a warning says which); two separate passes would normalise
    each sample with its own.

    **Refusals.** The transform is exact only where dim 0 of every input is the batch and
    nothing mixes samples. Before the first call with inputs of a new shape the model is
    checked (see :mod:`fxfuse.batch_audit`): a softmax, sort, cumsum or reduction over dim 0,
    ``x.view(-1)``, a matrix product over the batch, ``torch.cat`` with a constant along dim
    0, indexing samples, inputs whose batch is not dim 0 (a sequence-first transformer),
    random draws shared by several samples, ``x / x.shape[0]``, writes of batch data into a
    buffer, tensor inputs of different sizes along dim 0 — each raises
    :class:`~fxfuse.batch_audit.BatchError` naming the op and the line of the model.
    ``SyncBatchNorm`` in one process is a batch norm; under ``torch.distributed`` its
    collectives are not followed, and the check refuses them. The check runs the model's code
    twice on fake tensors, without hooks; a model that cannot run on fake tensors (it reads
    tensor values: ``.item()``, ``nonzero``) is refused.

    Args:
        model: any ``nn.Module`` ``torch.fx`` can trace, usually in training mode.
        example_inputs: if given, the model is checked on them now rather than at the first
            call.
        leaf_modules: submodule classes to keep whole instead of tracing through them (their
            forward hooks then run, on the doubled batch).
        concrete_args: passed to ``torch.fx`` tracing, to fix Python-valued arguments.

    Raises:
        CaptureError: ``torch.fx`` cannot trace the model, or its trace would not be the
            model: a traced-through submodule has hooks (tracing runs them once, with
            placeholders), or a random op draws from no input (tracing records its one draw).
        BatchError: doubling the batch would compute something else (raised by the call, or
            here with ``example_inputs``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxfuse.rdrop takes an nn.Module, got {type(model).__name__}")
    twin = RDrop(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if example_inputs is not None:
        twin.check(*example_inputs)
    return twin


def _capture(
    model: nn.Module,
    leaf_modules: tuple[type[nn.Module], ...],
    concrete_args: dict[str, Any] | None,
) -> tuple[Graph, dict[str, Tensor]]:
    """``model``'s graph with every target under ``model.``; the tensor constants ``torch.fx``
    sets as attributes of the model (docs/design.md trap 18) are taken back and kept apart.

    Traced as :func:`fxfuse.capture.symbolic_capture` traces (buffers as graph inputs, else
    read while tracing), with each node's line of code recorded for messages."""
    _refuse_traced_hooks(model, leaf_modules)
    graph = None
    for proxy_buffers in (True, False):
        before = set(vars(model))
        tracer = Tracer(leaf_modules, proxy_buffers=proxy_buffers)
        tracer.record_stack_traces = True
        draws = _TraceTimeDraws()
        try:
            with draws:
                graph = tracer.trace(model, concrete_args)
        except Exception:
            continue
        finally:
            constants = {name: vars(model).pop(name) for name in set(vars(model)) - before}
        break
    if graph is None:
        try:  # fxfuse.capture says what failed, where, and what to try
            symbolic_capture(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
        except CaptureError as error:
            message = str(error).split("\nWhat to try:")[0]
            raise CaptureError(
                f"{message}\nWhat to try: fxfuse.rdrop(model, leaf_modules=[ThatModule]) keeps "
                "a submodule whole; concrete_args={'flag': value} fixes a Python flag"
            ) from error.__cause__
        raise CaptureError(f"torch.fx cannot capture {type(model).__name__}")
    if draws.seen:
        op, where = draws.seen[0]
        raise CaptureError(
            f"fxfuse.rdrop cannot capture {type(model).__name__}: {op} at {where} draws random "
            "numbers from no input, so torch.fx runs it once, while capturing, and the twin "
            "would reuse that one draw; draw from an input instead (torch.rand_like(x), "
            "x.new_empty(...).bernoulli_(p))"
        )
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in constants:
            node.target = f"model.{node.target}"
    return graph, {name: t for name, t in constants.items() if isinstance(t, Tensor)}


class _TraceTimeDraws(TorchDispatchMode):
    """Random ops that run *while* tracing: their inputs are no proxies (``torch.rand(1, 4)``),
    so ``torch.fx`` records their one result as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            frame = _user_frame(traceback.extract_stack())
            self.seen.append((f"{func.namespace}.{func.overloadpacket.__name__}", frame))
        return func(*args, **(kwargs or {}))


def _user_frame(stack: traceback.StackSummary) -> str:
    for frame in reversed(stack):
        if not frame.filename.startswith(LIBRARY_DIRS):
            code = (frame.line or "").strip()
            return f"`{code}` ({os.path.basename(frame.filename)}:{frame.lineno})"
    return "an unknown line"


def _refuse_traced_hooks(model: nn.Module, leaf_modules: tuple[type[nn.Module], ...]) -> None:
    """Tracing runs a traced-through module's hooks once, with placeholders
    (docs/design.md, trap 17): the twin would never run them. Modules kept whole run theirs, on
    the doubled batch."""
    tracer = Tracer(leaf_modules)
    kept: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(k + ".") for k in kept):
            continue
        if module is not model and tracer.is_leaf_module(module, name):
            kept.append(name)
            continue
        hooks = [
            kind
            for kind, table in (
                ("forward hooks", module._forward_hooks),
                ("forward pre-hooks", module._forward_pre_hooks),
                ("backward hooks", module._backward_hooks),
                ("backward pre-hooks", module._backward_pre_hooks),
            )
            if table
        ]
        if hooks:
            what = name or "the model itself"
            hint = (
                f"pass leaf_modules=[{type(module).__name__}] to keep it whole (its hooks then "
                "run, on the doubled batch), or remove the hooks"
                if module is not model
                else "remove them while training with the twin"
            )
            raise CaptureError(
                f"fxfuse.rdrop cannot capture {type(model).__name__}: {what} "
                f"({type(module).__name__}) has {' and '.join(hooks)}, which tracing runs "
                f"once, with placeholders, and the twin never again; {hint}"
            )


def _graph_module(
    model: nn.Module, constants: dict[str, Tensor], graph: Graph, class_name: str
) -> GraphModule:
    """A ``GraphModule`` whose ``model`` is the caller's model itself, not copies of the
    parts it uses: parameters, buffers and modes stay the model's, through ``.to()`` too."""
    module = GraphModule(nn.Module(), Graph(), class_name=class_name)
    module.model = model
    for name, value in constants.items():
        module.register_buffer(name, value)
    module.graph = copy.deepcopy(graph) if graph.owning_module is not None else graph
    return module


def _signature(inputs: Sequence[Any]) -> Any:
    """What a plan depends on: structure, shapes past dim 0, dtypes, devices, other values."""
    leaves, spec = tree_flatten(list(inputs))
    keys: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            keys.append((leaf.shape[1:], leaf.dim(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
                keys.append(("value", leaf))
            except TypeError:
                keys.append(("object", id(leaf)))
    return str(spec), tuple(keys)


def _check_batch_sizes(inputs: Sequence[Any], name: str) -> None:
    leaves, _ = tree_flatten(list(inputs))
    sizes = [(i, x.size(0)) for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.dim()]
    if not sizes:
        raise BatchError(
            f"fxfuse.rdrop cannot double the batch of {name}: no tensor input has a dim to "
            "double; it doubles every tensor input along dim 0"
        )
    if len({n for _, n in sizes}) > 1:
        listed = ", ".join(f"input leaf {i}: {n}" for i, n in sizes)
        raise BatchError(
            f"fxfuse.rdrop cannot double the batch of {name}: its tensor inputs differ in "
            f"size along dim 0 ({listed}); it doubles every tensor input along dim 0, so each "
            "must hold the batch there"
        )


def _rewrite(body: Graph, holds_batch: Sequence[bool], audit: BatchAudit) -> Graph:
    """``body`` on its inputs doubled along dim 0, its output cut in two halves.

    ``placeholder x`` → ``x_twice = duplicate_batch(x)``, every use of ``x`` reading
    ``x_twice``; ``output(out)`` → ``output(split_batch(out, batched))``; where the model
    writes an input in place, ``copy_back`` writes the first half into the caller's tensor.
    """
    graph = Graph()
    env: dict[Node, Node] = {}
    output = graph.graph_copy(body, env)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    twice: dict[Node, Node] = {}
    if placeholders:
        with graph.inserting_after(placeholders[-1]):
            for node, batched in reversed(list(zip(placeholders, holds_batch, strict=False))):
                if batched:
                    twice[node] = graph.create_node(
                        "call_function", duplicate_batch, (node,), name=f"{node.name}_twice"
                    )
    for node, doubled in twice.items():
        node.replace_all_uses_with(doubled, delete_user_cb=_not(doubled))
    output = map_arg(output, lambda n: twice.get(n, n))
    if audit.mutated:
        copies = tuple(twice.get(p, p) for p in placeholders)
        graph.call_function(copy_back, (tuple(placeholders), copies, audit.mutated))
    halves = graph.call_function(split_batch, (output, audit.outputs))
    graph.output(halves)
    graph.lint()
    return graph


def _not(node: Node) -> Callable[[Node], bool]:
    return lambda user: user is not node


def _holds_batch(value: Any) -> bool:
    leaves, _ = tree_flatten(value)
    return any(isinstance(x, Tensor) and x.dim() > 0 for x in leaves)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def rdrop_loss(
    out1: Tensor,
    out2: Tensor,
    target: Tensor,
    alpha: float,
    reduction: str = "mean",
    *,
    ignore_index: int = -100,
) -> Tensor:
    """R-Drop's loss for classification logits: cross-entropy on both samples and their
    symmetric KL divergence, per sample ``i``::

        Lᵢ = ½ (NLL(p₁ᵢ) + NLL(p₂ᵢ)) + α · ½ (KL(p₁ᵢ ‖ p₂ᵢ) + KL(p₂ᵢ ‖ p₁ᵢ))

    with ``pₖᵢ = softmax(outₖᵢ)`` over the classes, ``NLL(p) = −log p[targetᵢ]`` and
    ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)``. This is the loss of the paper's code; its
    Eq. 3 adds the two NLL terms rather than averaging them (that loss is
    ``2 · rdrop_loss(..., alpha / 2)``).

    Args:
        out1, out2: logits of the two dropout samples, ``(N, C)`` or ``(N, C, d₁, …)`` (the
            class dim is dim 1, as for ``F.cross_entropy``), e.g. ``twin(x)``.
        target: class indices, ``(N)`` or ``(N, d₁, …)``.
        alpha: the weight of the KL term (≥ 0).
        reduction: ``"mean"`` over the counted elements, ``"sum"``, or ``"none"`` for the
            per-element losses (shaped like ``target``; ignored ones are 0).
        ignore_index: target value whose elements count in neither term (padding).
    """
    if out1.shape != out2.shape:
        raise ValueError(
            f"rdrop_loss: out1 and out2 differ in shape ({tuple(out1.shape)} vs "
            f"{tuple(out2.shape)}); pass the two halves twin(x) returns"
        )
    if out1.dim() < 2 or target.shape != out1.shape[:1] + out1.shape[2:]:
        raise ValueError(
            f"rdrop_loss: logits {tuple(out1.shape)} and target {tuple(target.shape)} do not "
            "match: logits are (N, C, ...) with classes at dim 1 and target (N, ...)"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"rdrop_loss: reduction must be 'mean', 'sum' or 'none', not {reduction!r}"
        )
    if alpha < 0:
        raise ValueError(f"rdrop_loss: alpha weighs the KL term and must be >= 0, not {alpha}")
    log_p1 = F.log_softmax(out1, dim=1)
    log_p2 = F.log_softmax(out2, dim=1)
    nll1 = F.nll_loss(log_p1, target, ignore_index=ignore_index, reduction="none")
    nll2 = F.nll_loss(log_p2, target, ignore_index=ignore_index, reduction="none")
    # ½ (KL(p₁‖p₂) + KL(p₂‖p₁)) = ½ Σ_c (p₁ − p₂)(log p₁ − log p₂)
    kl = 0.5 * ((log_p1.exp() - log_p2.exp()) * (log_p1 - log_p2)).sum(dim=1)
    counted = target != ignore_index
    loss = 0.5 * (nll1 + nll2) + alpha * torch.where(counted, kl, torch.zeros_like(kl))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum().clamp(min=1)
