"""Part by part: fuse every piece of a model that can be captured, keep the rest as its code.

``fxfuse.optimize`` first traces the whole ``forward``. Where that fails inside a submodule,
:func:`~fxfuse.capture.trace_part` keeps that instance whole (a leaf) and the parent is
traced around it; each leaf is then fused on its own, the same way, recursively — and so are
the classes given as ``leaf_modules`` and the submodules with hooks. A module whose own
``forward`` cannot be traced (a shape test, a loop over a list, NMS) is kept as Python: a copy
of it — its class, its plain attributes (``m.f``, ``m.stride``), its hooks — whose submodules
are the fused parts. So the result is a copy of the model that runs its untraceable glue as
the model's own code around fused children, and never the caller's modules edited.

One deep-copy memo serves the whole result, so a tensor two parts share stays shared.

::

    model (Python: `for img in images:`)
    ├── backbone    → graph, fused
    ├── rpn         (Python: NMS)
    │   └── head    (Python: `for feature in x:`)
    │       └── conv → graph, fused
    └── roi_heads   (Python) …
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from fxfuse.capture import (
    EXPORT,
    SYMBOLIC,
    Exported,
    ExportError,
    Failure,
    Traced,
    _owned,
    capture_error,
    default_leaf,
    export_capture,
    hooked,
    is_container,
    structural_copy,
    trace_part,
)
from fxfuse.effects import Effects
from fxfuse.emit import _copy, copy_hooks, copy_shell, keep_attributes, share_hook_functions
from fxfuse.report import NO_OPS, Decline, FusionReport, GraphStats, Part, Rewrite
from fxfuse.rules import FusionOptions, Rule, RuleSet
from fxfuse.verify import buffers_restored, fresh_copies

__all__ = ["fuse_model"]

log = logging.getLogger("fxfuse")


@dataclass
class _Settings:
    rules: RuleSet | Iterable[Rule[Any]] | None
    options: FusionOptions
    leaf_modules: tuple[type[nn.Module], ...]


@dataclass
class _Assembly:
    """The parts of one result as they are built, and what their fusions reported."""

    settings: _Settings
    memo: dict[int, Any]
    parts: list[Part] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    validation: Counter[str] | None = None
    timings: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    built: dict[int, nn.Module] = field(default_factory=dict)
    alive: list[Any] = field(default_factory=list)  # what ``memo`` names by id
    # arguments a part is called with on the example inputs, by path: its graph's shapes
    examples: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    # -- a module, whichever way it goes ---------------------------------------------------

    def build(
        self, module: nn.Module, path: str, *, call: _Call | None = None, in_python: bool
    ) -> nn.Module:
        """``module``'s part: a fused graph if its ``forward`` traces, else its own code
        around its children's parts. ``in_python``: the code around it is Python (which may
        read its attributes), not a graph (which only calls it)."""
        if id(module) in self.built:
            return self.built[id(module)]
        if is_container(module):
            return self.python(module, path, "no forward of its own (a container)", "")
        if hooked(module):
            return self.python(module, path, "forward hooks (kept so they keep firing)", "")
        start = time.perf_counter()
        traced = trace_part(
            module,
            leaf_modules=self.settings.leaf_modules,
            given=None if call is None else call.args,
            given_kwargs=None if call is None else call.kwargs,
        )
        self.timings["capture"] += time.perf_counter() - start
        if isinstance(traced, Failure):
            return self.python(module, path, traced.construct, traced.where)
        part = self.graph(traced, module, path)
        if in_python:
            keep_attributes(part, module, self.memo, self.notes)
        return part

    # -- a fused graph ----------------------------------------------------------------------

    def graph(self, traced: Traced, module: nn.Module, path: str) -> GraphModule:
        """Fuse ``traced`` (``module``'s graph), its leaves first, each as a part of its own."""
        from fxfuse.api import fuse_graph

        self._propagate(traced, module, path)
        given: dict[str, nn.Module] = {}
        for leaf in traced.leaves:
            original = module.get_submodule(leaf)
            if not default_leaf(original):  # (a torch.nn layer with hooks is copied as is)
                call = _Call.of(traced.graph, leaf)
                # (a leaf keeps its class and attributes too: what it holds is still its own)
                given[leaf] = self.build(original, _join(path, leaf), call=call, in_python=True)
        fused = fuse_graph(
            traced.graph,
            traced.root,
            rules=self.settings.rules,
            options=self.settings.options,
            capture=traced.how,
            class_name=f"Fused{type(module).__name__}",
            parameters=sum(p.numel() for p in module.parameters()),
            given=given,
            memo=self.memo,
        )
        self.alive += [traced.root, module]
        self.memo[id(module)] = self.built[id(module)] = fused
        self._merge(_report(fused), path, type(module).__name__)
        return fused

    def _propagate(self, traced: Traced, module: nn.Module, path: str) -> None:
        """Record the shapes of ``traced``'s values on the part's example (the rules check
        their layout assumptions against them), and the arguments of each leaf call."""
        example = self.examples.get(path)
        if example is None:
            return
        root = structural_copy(traced.root, hooks=False)  # (not the user's hooks)
        _own_written(root, traced.graph)  # (a forward may write a weight under no_grad)
        recorder = _Recorder(GraphModule(root, traced.graph), set(traced.leaves))
        try:  # (it runs the caller's modules: a BN in training mode would update its stats)
            with torch.no_grad(), buffers_restored(module):
                recorder.propagate(*fresh_copies(example))
        except Exception as error:  # shapes are evidence, not a requirement
            log.info("fxfuse: no shapes for %s: %s", path or "the model", error)
            return
        for leaf, args in recorder.calls.items():
            self.examples.setdefault(_join(path, leaf), args)

    def _record_calls(self, module: nn.Module, path: str) -> None:
        """Run ``module``'s code on its example (a structural copy of it, hooks on the copy's
        submodules) and keep the arguments each submodule is first called with."""
        example = self.examples.get(path)
        if example is None:
            return
        copy = structural_copy(module, hooks=False)  # (not the user's hooks)
        calls: dict[str, tuple[Any, ...]] = {}

        def record(name: str) -> Callable[..., None]:
            def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if not kwargs:
                    calls.setdefault(name, fresh_copies(args))

            return hook

        for name, sub in copy.named_modules():
            if name and not default_leaf(sub):  # (a torch.nn layer is no part of its own)
                sub.register_forward_pre_hook(record(name), with_kwargs=True)
        try:
            with torch.no_grad(), buffers_restored(module):
                copy(*fresh_copies(example))
        except Exception as error:  # shapes are evidence, not a requirement
            log.info("fxfuse: no shapes inside %s: %s", path or "the model", error)
        for name, args in calls.items():
            self.examples.setdefault(_join(path, name), args)

    def _merge(self, report: FusionReport, path: str, module: str) -> None:
        def where(node: str) -> str:
            return f"{path}:{node}" if path else node

        self.rewrites += [replace(r, node=where(r.node)) for r in report.rewrites]
        self.declines += [replace(d, node=where(d.node)) for d in report.declines]
        self.notes += [f"{path}: {n}" if path else n for n in report.notes]
        self.counts.update(report.counts)
        if report.validation is not None:
            self.validation = (self.validation or Counter()) + report.validation
        for phase in ("rules", "emit"):
            self.timings[phase] += report.timings.get(phase, 0.0)
        after = report.after or report.before
        self.parts.append(Part(path, module, "graph", report.before, after, report.capture))

    # -- Python kept around fused parts ----------------------------------------------------

    def python(self, module: nn.Module, path: str, reason: str, where: str) -> nn.Module:
        """A copy of ``module`` running its own code, whose children are parts."""
        shell = object.__new__(type(module))
        self.alive.append(module)
        self.memo[id(module)] = self.built[id(module)] = shell  # references resolve to it
        self._record_calls(module, path)
        children: dict[str, nn.Module | None] = {}
        ops = NO_OPS
        alone: list[str] = []  # convs and batch norms its Python code calls one by one
        norms = 0
        for name, child in module._modules.items():
            if child is None:
                children[name] = None
            elif is_container(child):
                children[name] = self.build(child, _join(path, name), in_python=True)
            elif default_leaf(child):  # a torch.nn layer its code calls: copied as it is
                children[name] = _copy(child, self.memo, _join(path, name), self.notes)
                stats = _layer_stats(child)
                ops = ops + stats
                alone += [name] if stats.convs + stats.batch_norms else []
                norms += stats.batch_norms
            elif _used_as_sequence(type(module), name, child):
                why = "its parent's code uses it as a sequence, not by calling it"
                children[name] = self.python(child, _join(path, name), why, "")
            else:
                children[name] = self.build(child, _join(path, name), in_python=True)
        if norms:  # (a conv alone has nothing to fuse with)
            self.notes.append(
                f"{path or 'the model'}: {', '.join(alone)} not fused: Python code calls"
                " them one by one (only layers a traced forward calls together fuse)"
            )
        copy_shell(module, children, self.memo, self.notes, target=path, shell=shell)
        own = sum(p.numel() for p in module.parameters(recurse=False))
        ops = replace(ops, parameters=ops.parameters + own)
        self.parts.append(Part(path, type(module).__name__, "python", ops, ops, "", reason, where))
        return shell

    # -- the whole result --------------------------------------------------------------------

    def report(self, capture: str, model: nn.Module, result: nn.Module) -> FusionReport:
        """Totals over the parts: what runs, counting inside every part."""
        graphs = [p for p in self.parts if p.kind == "graph"]
        before = sum((p.before for p in self.parts), NO_OPS)
        after = sum((p.after for p in self.parts), NO_OPS)
        nodes = sum(p.before.nodes for p in graphs), sum(p.after.nodes for p in graphs)
        before = replace(before, parameters=_parameters(model), nodes=nodes[0])
        after = replace(after, parameters=_parameters(result), nodes=nodes[1])
        return FusionReport(
            capture=capture,
            before=before,
            after=after,
            rewrites=self.rewrites,
            declines=self.declines,
            notes=self.notes,
            timings=dict(self.timings),
            counts=self.counts,
            validation=self.validation,
            parts=sorted(self.parts, key=lambda p: p.path.split(".") if p.path else []),
        )


def _own_written(root: nn.Module, graph: Graph) -> None:
    """Give ``root`` (a structural copy) its own copy of each parameter and buffer ``graph``
    may write, so that running it leaves the caller's tensors as they are."""

    def held(node: Node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        owner, _, name = str(node.target).rpartition(".")
        try:
            value = getattr(root.get_submodule(owner), name)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None

    effects = Effects(graph, root.get_submodule, held)
    made: dict[int, Any] = {}  # (a tensor under two names stays one)
    for node in graph.nodes:
        t = held(node)
        if t is None or not effects.written(node):
            continue
        owner, _, name = str(node.target).rpartition(".")
        module = root.get_submodule(owner)
        if name in module._parameters:
            module._parameters[name] = _owned(t, made, parameter=True)  # type: ignore[assignment]
        elif name in module._buffers:
            module._buffers[name] = _owned(t, made)


class _Recorder(ShapeProp):
    """``ShapeProp`` that keeps the arguments of each leaf's first call."""

    def __init__(self, module: GraphModule, leaves: set[str]):
        super().__init__(module)
        self.leaves = leaves
        self.calls: dict[str, tuple[Any, ...]] = {}

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if target in self.leaves and target not in self.calls and not kwargs:
            self.calls[target] = fresh_copies(args)
        return super().call_module(target, args, kwargs)


@dataclass(frozen=True)
class _Call:
    """How a graph calls a leaf: a literal where every call site passes the same plain value,
    ``TRACED`` where it passes a traced value."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, graph: Graph, target: str) -> _Call | None:
        sites = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
        if not sites:
            return None
        count = min(len(n.args) for n in sites)
        args = tuple(_agreed([n.args[i] for n in sites]) for i in range(count))
        names = set.intersection(*(set(n.kwargs) for n in sites))
        kwargs = {k: _agreed([n.kwargs[k] for n in sites]) for k in sorted(names)}
        return cls(args, kwargs)


TRACED = object()  # an argument a graph computes: a placeholder when the leaf is traced


def _agreed(values: Sequence[Any]) -> Any:
    first = values[0]
    plain = isinstance(first, (bool, int, float, str, type(None))) and not isinstance(first, Node)
    if plain and all(type(v) is type(first) and v == first for v in values):
        return first
    return TRACED


def _used_as_sequence(parent: type, name: str, child: nn.Module) -> bool:
    """Whether ``parent``'s code may iterate or index its child ``name`` (a ``Sequential``):
    then each element must stay a module of its own, not one fused graph. Read from the
    source of ``parent``'s classes: any use of ``self.name`` other than a call counts, and so
    does source that cannot be read."""
    if not isinstance(child, nn.Sequential) and not hasattr(type(child), "__iter__"):
        return False
    if parent.__module__.startswith("torch.nn"):  # Sequential calls its elements; a
        return False  # ModuleList's are reached by the code around it
    return _uses(parent).get(name, True)


@functools.cache
def _uses(parent: type) -> dict[str, bool]:
    """For each ``self.name`` in ``parent``'s own code (not ``torch.nn``'s): whether some use
    is neither a call nor an assignment to it. ``self`` is whatever each method names its
    first parameter (``def forward(s, x)`` reads ``s.body``)."""
    uses: dict[str, bool] = {}
    for klass in parent.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return {}
        for method in _methods(tree):
            for name, plain in _attribute_uses(method):
                uses[name] = uses.get(name, False) or plain
    return uses


def _methods(tree: ast.Module) -> Iterable[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The functions defined directly in the class of ``tree`` (static methods aside: they
    have no instance to read)."""
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            static = any(
                isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list
            )
            if not static and (node.args.posonlyargs or node.args.args):
                yield node


def _attribute_uses(method: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterable[tuple[str, bool]]:
    """``(name, plain)`` for each ``self.name`` in ``method`` (nested code included), where
    ``self`` is its first parameter; ``plain``: neither called nor assigned to."""
    instance = (method.args.posonlyargs or method.args.args)[0].arg
    called = {id(node.func) for node in ast.walk(method) if isinstance(node, ast.Call)}
    for node in ast.walk(method):
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name):
            continue
        if node.value.id == instance:
            yield node.attr, id(node) not in called and not isinstance(node.ctx, ast.Store)


def _report(module: nn.Module) -> FusionReport:
    return cast(FusionReport, module.fxfuse_report)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_stats(layer: nn.Module) -> GraphStats:
    """The convs, batch norms and linear layers in a ``torch.nn`` layer kept whole."""
    layers = list(layer.modules())
    return GraphStats(
        sum(isinstance(m, _ConvNd) for m in layers),
        sum(isinstance(m, _BatchNorm) for m in layers),
        sum(isinstance(m, nn.Linear) for m in layers),
        _parameters(layer),
        0,
    )


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


def fuse_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | None,
    *,
    rules: RuleSet | Iterable[Rule[Any]] | None,
    options: FusionOptions,
    leaf_modules: Iterable[type[nn.Module]],
    concrete_args: dict[str, Any] | None,
) -> nn.Module:
    """``model`` fused: one graph where its whole ``forward`` traces; else one
    ``torch.export`` graph where example inputs are given and export keeps every batch and
    spatial dim dynamic; else part by part (and where export had to fix a dim, whichever of
    the two runs fewer convs and batch norms on the example). The result carries its
    report as ``fxfuse_report``.

    A model with hooks is not exported: export would run them once, at capture time, on
    fake tensors (a feature-capture hook would record those), and never again.
    """
    settings = _Settings(rules, options, tuple(leaf_modules))
    start = time.perf_counter()
    traced = trace_part(
        model, leaf_modules=settings.leaf_modules, concrete_args=concrete_args, given=example_inputs
    )
    captured = time.perf_counter() - start
    failed = isinstance(traced, Failure) or any(
        isinstance(why, Failure) for why in traced.leaves.values()
    )
    if not failed:
        assert isinstance(traced, Traced)
        return _symbolic(model, traced, example_inputs, settings, captured)
    first = traced if isinstance(traced, Failure) else _first_failure(traced)
    exported: Exported | None = None
    export_error: ExportError | None = None
    hooks = any(hooked(m) for m in model.modules())  # export would run them once, on fakes
    if example_inputs is not None and not hooks:
        start = time.perf_counter()
        try:
            exported = export_capture(model, example_inputs)
        except ExportError as error:
            export_error = error
        captured += time.perf_counter() - start
        if exported is not None and not exported.specialized:
            return _exported(model, exported, first, settings, captured)
    partial = _part_by_part(model, traced, example_inputs, settings, captured)
    if exported is not None:
        whole = _exported(model, exported, first, settings, captured)
        return _fewer_ops(model, partial, whole, example_inputs)
    if partial is None:
        assert isinstance(traced, Failure)
        also = export_error.failure if export_error is not None else None
        raise capture_error(type(model).__name__, traced, exported=also) from traced.error
    return partial


def _first_failure(traced: Traced) -> Failure:
    return next(why for why in traced.leaves.values() if isinstance(why, Failure))


def _symbolic(
    model: nn.Module,
    traced: Traced,
    example_inputs: Sequence[Any] | None,
    settings: _Settings,
    captured: float,
) -> nn.Module:
    """The whole model as one graph (its leaves fused on their own)."""
    assembly = _Assembly(settings, _memo(model))
    if example_inputs is not None:
        assembly.examples[""] = tuple(example_inputs)
    fused = assembly.graph(traced, model, "")
    return _finish(assembly, SYMBOLIC, model, fused, captured)


def _exported(
    model: nn.Module,
    exported: Exported,
    failure: Failure,
    settings: _Settings,
    captured: float,
) -> nn.Module:
    traced = Traced(exported.module.graph, exported.module, how=EXPORT)
    assembly = _Assembly(settings, _memo(model))
    fused = assembly.graph(traced, model, "")
    capture = f"{EXPORT} (symbolic tracing failed: {failure.construct})"
    result = _finish(assembly, capture, model, fused, captured)
    _report(result).specialized = list(exported.specialized)
    return result


def _part_by_part(
    model: nn.Module,
    traced: Traced | Failure,
    example_inputs: Sequence[Any] | None,
    settings: _Settings,
    captured: float,
) -> nn.Module | None:
    """The model as parts; ``None`` when no part of it could be captured at all."""
    assembly = _Assembly(settings, _memo(model))
    if example_inputs is not None:
        assembly.examples[""] = tuple(example_inputs)
    assembly.timings["capture"] += captured
    if isinstance(traced, Failure):
        result = assembly.python(model, "", traced.construct, traced.where)
    else:
        result = assembly.graph(traced, model, "")
    if not any(p.kind == "graph" for p in assembly.parts):
        return None
    report = assembly.report(f"{SYMBOLIC}, part by part", model, result)
    if isinstance(result, GraphModule):
        copy_hooks(model, result, assembly.memo)
    result.eval()  # (the copies keep their own modes; the model itself is in eval mode)
    _attach(result, report)
    return result


def _finish(
    assembly: _Assembly, capture: str, model: nn.Module, fused: GraphModule, captured: float
) -> GraphModule:
    report = _report(fused)
    if len(assembly.parts) > 1:
        report = assembly.report(capture, model, fused)
    else:
        report.parts = [replace(p, path="") for p in assembly.parts]
    report.capture = capture
    report.timings = {"capture": captured + assembly.timings.get("capture", 0.0), **report.timings}
    copy_hooks(model, fused, assembly.memo)  # (none on an exported one: see fuse_model)
    fused.fxfuse_report = report
    return fused


def _attach(result: nn.Module, report: FusionReport) -> None:
    if "fxfuse_report" in result._modules:  # the model's own submodule keeps its name
        log.warning("fxfuse: the model has a submodule named fxfuse_report; no report attached")
        return
    result.fxfuse_report = report


def _memo(model: nn.Module) -> dict[int, Any]:
    memo: dict[int, Any] = {}
    share_hook_functions(model, memo)
    return memo


def _fewer_ops(
    model: nn.Module,
    partial: nn.Module | None,
    whole: nn.Module,
    example_inputs: Sequence[Any] | None,
) -> nn.Module:
    """``torch.export`` fixed some dims of the example: keep its result only where the part
    by part one (which accepts every size) runs more convs and batch norms on the example."""
    from fxfuse.testing import count_ops

    report = _report(whole)
    if partial is None or example_inputs is None:
        return whole
    with buffers_restored(model):
        ops = [count_ops(m, *fresh_copies(example_inputs)) for m in (partial, whole)]
    costs = [o["conv"] + o["batch_norm"] for o in ops]
    fixed = ", ".join(report.specialized)
    if costs[0] <= costs[1]:
        _report(partial).notes.append(
            f"torch.export would fix {fixed}: fused part by part instead, which keeps every size"
        )
        return partial
    report.notes.append(
        f"fused part by part, {costs[0]} convs and batch norms would run, not {costs[1]}: "
        f"the torch.export capture is kept, and it fixes {fixed}"
    )
    return whole
