"""``fxfuse.optimize``: capture → rules to a fixpoint → emit."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from fxfuse.asserts import drop_proven_rank_asserts, drop_unused_metadata_reads
from fxfuse.capture import structural_copy
from fxfuse.dialects import has_hooks
from fxfuse.emit import emit
from fxfuse.errors import CaptureError, TrainingModeError, VerificationError
from fxfuse.parts import fuse_model
from fxfuse.report import FusionReport, Part, graph_stats
from fxfuse.rules import FusionOptions, RewriteContext, Rule, RuleSet
from fxfuse.verify import fresh_copies

__all__ = ["fuse_graph", "optimize"]

log = logging.getLogger("fxfuse")


def _rule_set(rules: RuleSet | Iterable[Rule[Any]] | Iterable[str] | str | None) -> RuleSet:
    """The rule set ``rules=`` names: the default one, a :class:`RuleSet`, a list of rules (one
    stage), or names of default rules (those, in their stages)."""
    from fxfuse.passes import default_rules

    if rules is None:
        return default_rules()
    if isinstance(rules, RuleSet):
        return rules
    items = (rules,) if isinstance(rules, str) else tuple(rules) if _iterable(rules) else None
    given = [r for r in items or () if isinstance(r, Rule)]
    if items is not None and len(given) == len(items):
        return RuleSet.of(given)
    default = default_rules()
    known = [r.name for r in default]
    if items is None or not all(isinstance(r, str) for r in items):
        raise TypeError(
            "rules= takes a RuleSet, a list of Rule objects, or names of default rules "
            f"({', '.join(known)}), got {rules!r}"
        )
    unknown = [name for name in items if name not in known]
    if unknown:
        raise ValueError(
            f"no default rule named {', '.join(map(repr, unknown))}; the default rules are "
            f"{', '.join(known)}"
        )
    return default.without(*(name for name in known if name not in items))


def _iterable(value: object) -> bool:
    try:
        iter(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _checked_model(model: nn.Module) -> None:
    """Refuse, in one line, modules fxfuse cannot read: TorchScript, ``torch.compile``'d, lazy
    ones not yet initialized, and models in training mode."""
    name = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(
            f"fxfuse cannot capture a TorchScript module ({name}): its Python code is gone",
            hint="pass the nn.Module you scripted, fxfuse.optimize(model), and script the result",
            cli_hint="return the nn.Module itself, not torch.jit.script(model)",
        )
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (not imported: not compiled)
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        raise CaptureError(
            f"fxfuse cannot capture a torch.compile'd module ({name})",
            hint="fuse first and compile the result, torch.compile(fxfuse.optimize(model)), "
            'or compile with fxfuse as the backend, torch.compile(model, backend="fxfuse")',
            cli_hint="return the nn.Module itself, not torch.compile(model)",
        )
    for where, module in model.named_modules():
        if any(
            nn.parameter.is_lazy(t)
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        ):
            raise ValueError(
                f"{_named(module, where)} is a lazy module not yet initialized: run one "
                "forward pass first, model(x), to give it its shapes"
            )
    if model.training:
        raise TrainingModeError(_training_reason(model))


def _check_accepts(model: nn.Module, example_inputs: Sequence[Any]) -> None:
    """Run ``model`` (a copy without its hooks, owning its tensors: a forward may write a
    buffer, or a weight under ``no_grad``) on the example: inputs it rejects are refused here,
    in one line, not met deep inside capture."""
    copy = structural_copy(model, hooks=False, own_buffers=True, own_parameters=True)
    try:
        with torch.no_grad():
            copy(*fresh_copies(example_inputs))
    except Exception as error:
        lines = str(error).strip().splitlines()
        shapes = ", ".join(
            "x".join(map(str, x.shape)) if isinstance(x, Tensor) else type(x).__name__
            for x in example_inputs
        )
        raise ValueError(
            f"{type(model).__name__} rejects example_inputs ({shapes}): {type(error).__name__}"
            f"{': ' + lines[0] if lines else ''}; pass inputs the model accepts"
        ) from error


def _named(module: nn.Module, where: str) -> str:
    return f"{type(module).__name__} ({repr(where) if where else 'the model'})"


def _training_reason(model: nn.Module) -> str:
    """Why a model in training mode is refused, naming what in it behaves differently."""
    found: dict[str, str] = {}
    for where, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase) and (
            isinstance(module, nn.modules.batchnorm._BatchNorm) or module.track_running_stats
        ):
            found.setdefault("norm", f"{_named(module, where)} uses batch statistics")
        elif isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU)):
            found.setdefault("random", f"{_named(module, where)} is random")
    name = type(model).__name__
    if found:
        return (
            f"{name} is in training mode, where {' and '.join(found.values())}, so no fused "
            "model computes the same thing. Call model.eval() first (fxfuse never changes the "
            "mode of your model)."
        )
    return (
        f"{name} is in training mode (nn.Module's default); fxfuse fuses what it computes in "
        "eval mode. Call model.eval() first (fxfuse never changes the mode of your model)."
    )


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while fusing.

    Fusing allocates tens of thousands of small objects (graph nodes, proxies, weight
    expressions) that live until it ends; each allocation burst triggers collections that
    walk every object of the process (a timm model and torch hold ~500,000): 25–30 % of
    ``optimize``'s time on mobileone_s0. Nothing it makes is garbage before it returns, and
    the collector runs as usual afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _left_alone(graph: Graph, ctx: RewriteContext, skip: Mapping[str, Any]) -> list[str]:
    """Notes on modules fxfuse does not touch: quantized ones, hooked ones (but not the parts
    in ``skip``, which are reported as parts)."""
    notes = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target in skip:
            continue
        module = ctx.module(str(node.target))
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            notes.append(f"{node.target} ({type(module).__name__}) is quantized: left alone")
        elif has_hooks(module):
            notes.append(
                f"{node.target} ({type(module).__name__}) runs forward hooks, which "
                "may change what it computes: left alone"
            )
    return notes


def _submodule(root: nn.Module, target: str) -> nn.Module | None:
    try:
        return root.get_submodule(target)
    except AttributeError:
        return None


def _checked_options(
    options: FusionOptions | Mapping[str, Any] | None,
    example_inputs: Sequence[Any] | None,
    verify: bool | Mapping[str, Any],
) -> FusionOptions:
    if isinstance(options, Mapping):
        fields = {f.name for f in dataclasses.fields(FusionOptions)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(
                f"options has no {', '.join(map(repr, unknown))}: FusionOptions' fields are "
                f"{', '.join(sorted(fields))}"
            )
        options = FusionOptions(**options)
    elif options is not None and not isinstance(options, FusionOptions):
        raise TypeError(
            f"options= takes a FusionOptions or a dict of its fields, got {type(options).__name__}"
        )
    options = options or FusionOptions()
    if verify:
        options = dataclasses.replace(options, validate_rewrites=True)
    if options.validate_rewrites and example_inputs is None:
        what = "verify" if verify else "FusionOptions(validate_rewrites=True)"
        raise ValueError(
            f"{what} needs example_inputs: the checks run the model on inputs like them "
            "(e.g. fxfuse.optimize(model, (torch.randn(1, 3, 224, 224),), verify=True))"
        )
    return options


def _verify_result(
    model: nn.Module,
    fused: nn.Module,
    example_inputs: Sequence[Any],
    knobs: bool | Mapping[str, Any],
) -> Any:
    from fxfuse.verify import verify

    try:
        return verify(model, fused, example_inputs, **(knobs if isinstance(knobs, Mapping) else {}))
    except VerificationError as error:
        report = fused.fxfuse_report
        fired = ", ".join(f"{rule} ×{n}" for rule, n in sorted(report.counts.items()))
        error.args = (
            f"{error.args[0]}\n  fxfuse.optimize's result is wrong: a bug in a rule (rules "
            f"fired: {fired or 'none'}). Run again with rules=... leaving one out to find it, "
            "and please report it.",
        )
        error.fusion_report = report  # type: ignore[attr-defined]
        raise


@overload
def optimize(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    rules: RuleSet | Iterable[Rule[Any]] | Iterable[str] | str | None = None,
    options: FusionOptions | Mapping[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    verify: bool | Mapping[str, Any] = False,
    equalize: bool = False,
) -> nn.Module: ...


@overload
def optimize(
    model: torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | None = None,
    *,
    rules: RuleSet | Iterable[Rule[Any]] | Iterable[str] | str | None = None,
    options: FusionOptions | Mapping[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    verify: bool | Mapping[str, Any] = False,
    equalize: bool = False,
) -> torch.export.ExportedProgram: ...


def optimize(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | None = None,
    *,
    rules: RuleSet | Iterable[Rule[Any]] | Iterable[str] | str | None = None,
    options: FusionOptions | Mapping[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    verify: bool | Mapping[str, Any] = False,
    equalize: bool = False,
) -> nn.Module | torch.export.ExportedProgram:
    """Fuse ``model`` into an equivalent, cheaper model.

    The model is traced with ``torch.fx`` symbolic tracing; batch norms are folded into the
    convs before them, branches reading the same input and summed are merged into one conv
    (identity and batch-norm branches included), and ops that do nothing at inference are
    dropped. Every rewrite is exact in real arithmetic; weights are computed in float64 and
    cast back to each layer's dtype.

    Where the whole ``forward`` cannot be traced, fxfuse fuses it part by part: a submodule
    whose code cannot be traced (a Python ``if`` on a shape, a loop over a list, NMS) is
    kept whole and the code around it is traced; it is then fused on its own, and so on
    down. A module whose own code cannot be traced stays Python — a copy of it, with its
    class, plain attributes and hooks — around its fused submodules. ``fxfuse_report.parts``
    lists each part fused and each part kept as Python, and why. With ``example_inputs``,
    ``torch.export`` is tried first for the whole model, with batch and spatial dims dynamic;
    its graph is used where it keeps them so (or where the parts would run more convs and
    batch norms; then the report's ``specialized`` says what it fixed).

    Python arguments with a default (``augment=False``, ``mode="fast"``) are fixed to it
    (or to the value in ``example_inputs``); a call with another value raises
    ``AssertionError: augment has been specialized to have value False…``. A
    ``forward(x, *args, **kwargs)`` is traced with the arguments given, and a call with more
    raises ``TypeError``. Hooks on the model are kept on the result; a submodule with hooks
    is kept as a module of its own, so they fire on every call.

    Args:
        model: an ``nn.Module`` in eval mode, or a ``torch.export.ExportedProgram``. It is
            never modified: the result owns fresh copies of everything it uses (what cannot
            be copied, a lock, is shared and noted in the report).
        example_inputs: optional inputs; when given, the graph's shapes are recorded first
            and the rules check their layout assumptions against them. They are never
            changed: every run gets its own copies.
        rules: the rule set to run (default :func:`fxfuse.passes.default_rules`); a plain
            list of :class:`~fxfuse.Rule` objects runs as one stage; names of default rules
            (``["fold-bn"]``) run those alone, in their stages.
        options: :class:`~fxfuse.FusionOptions` for the rules, or a dict of its fields.
        leaf_modules: module classes to keep whole instead of tracing through them (each is
            still fused on its own).
        concrete_args: passed to ``torch.fx`` tracing of ``model``, to fix Python-valued
            arguments.
        verify: check the result before returning it (needs ``example_inputs``): every
            rewrite is validated locally as it is applied (a failing one is rolled back and
            reported, see ``FusionOptions.validate_rewrites``), and the fused model is
            compared with ``model`` by :func:`fxfuse.verify` on inputs drawn around
            ``example_inputs``; its report is ``fxfuse_report.verification``. A mapping
            turns it on and passes its items to :func:`fxfuse.verify` (``{"examples": 50,
            "tolerance": 1e-4}``).
        equalize: after fusing, equalize the per-channel weight ranges of consecutive layers
            (cross-layer equalization through ReLU-like activations, exact; see
            ``passes/equalize.py``), for INT8 quantization with per-tensor weights. The same as
            ``FusionOptions(equalize=True)``; :func:`fxfuse.quant_report` shows the effect.

    Returns:
        An ``nn.Module`` in eval mode, with the :class:`~fxfuse.FusionReport` as its
        ``fxfuse_report`` attribute: a ``torch.fx.GraphModule`` where the whole model was
        captured as one graph, else a copy of ``model`` (same class) whose parts are fused.
        For an ``ExportedProgram``, a fused ``ExportedProgram`` (re-exported on its own
        example inputs, dynamic dims kept) with the same attribute.

    Raises:
        TrainingModeError: ``model.training`` is true.
        CaptureError: no part of the model can be captured (a TorchScript or
            ``torch.compile``'d module, say); one line naming the construct and where, and
            ``.hint``, what to try.
        VerificationError: with ``verify=True``, the fused model differs from ``model``.
        ValueError: ``example_inputs`` the model rejects; ``verify`` or
            ``validate_rewrites`` without them; a lazy module not yet initialized; an
            unknown rule name or option.
        TypeError: ``rules`` or ``options`` of the wrong type.
    """
    if equalize:
        checked = _checked_options(options, example_inputs, False)
        options = dataclasses.replace(checked, equalize=True)
    if isinstance(model, torch.export.ExportedProgram):
        return _optimize_program(model, example_inputs, rules=rules, options=options, verify=verify)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "fxfuse.optimize takes an nn.Module or a torch.export.ExportedProgram, "
            f"got {type(model).__name__}"
        )
    _checked_model(model)
    options = _checked_options(options, example_inputs, verify)
    rules = _rule_set(rules)
    if example_inputs is not None:
        example_inputs = fresh_copies(example_inputs)  # (nothing runs on the caller's own)
        _check_accepts(model, example_inputs)
    with _collection_paused():
        fused = fuse_model(
            model,
            example_inputs,
            rules=rules,
            options=options,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
        )
    if verify:
        assert example_inputs is not None
        report = fused.fxfuse_report
        start = time.perf_counter()
        report.verification = _verify_result(model, fused, example_inputs, verify)
        report.timings["verify"] = time.perf_counter() - start
    return fused


def fuse_graph(
    graph: Graph,
    root: nn.Module,
    *,
    bound: dict[Node, Tensor] | None = None,
    rules: RuleSet | Iterable[Rule[Any]] | Iterable[str] | str | None = None,
    options: FusionOptions | None = None,
    capture: str,
    class_name: str,
    parameters: int,
    live: bool = False,
    given: Mapping[str, nn.Module] | None = None,
    memo: dict[int, Any] | None = None,
) -> GraphModule:
    """Run the rules on ``graph`` (in place) and emit the fused ``GraphModule``.

    ``root`` resolves the graph's targets; ``bound`` gives the tensors of placeholders that
    hold weights (graphs from ``torch.compile``); with ``live`` weights those may change
    between calls, and the result computes its fused weights from them on every call.
    ``given`` are modules already built for some ``call_module`` targets (leaves fused on
    their own): the result holds them as they are. ``memo`` is the deep-copy memo to copy the
    rest with (one per result keeps weight tying). The result carries its report.
    """
    # fxfuse resolves targets itself (``root`` and the constants it adds); a module that owns
    # the graph (an ExportedProgram's) would warn about every new attribute read
    graph.owning_module = None
    before = graph_stats(graph, root.get_submodule, parameters)
    start = time.perf_counter()
    # rank checks that cannot fail, and metadata reads nobody uses, go before the rules see
    # them (timm: 4 of a batch norm's ~9 nodes); emission drops those proven only later
    drop_proven_rank_asserts(
        graph, lambda target: _submodule(root, target), modules_fix_ranks=False
    )
    drop_unused_metadata_reads(graph)
    ctx = RewriteContext(graph, root, options, bound, live=live)
    given = dict(given or {})
    report = FusionReport(capture=capture, before=before, notes=_left_alone(graph, ctx, skip=given))
    _rule_set(rules).run(ctx)
    if ctx.options.equalize:
        from fxfuse.passes import equalize_rules

        equalize_rules().run(ctx)
    report.timings["rules"] = time.perf_counter() - start

    start = time.perf_counter()
    declines = ctx.declines()
    fused = emit(
        graph,
        ctx.attribute,
        {**ctx.attributes, **given},
        class_name=class_name,
        notes=report.notes,
        effects=ctx.effects,
        live=live,
        memo=memo,
    )
    report.timings["emit"] = time.perf_counter() - start

    report.after = graph_stats(
        fused.graph, fused.get_submodule, sum(p.numel() for p in fused.parameters())
    )
    report.parts = [Part("", type(root).__name__, "graph", report.before, report.after, capture)]
    report.rewrites = ctx.rewrites
    report.declines = declines
    report.counts = ctx.counts
    if ctx.validator is not None:
        report.validation = ctx.validator.stats
        report.declines += [d for d in ctx.validator.failures if d not in declines]
    fused.fxfuse_report = report
    log.info(
        "fxfuse: %s convs %d -> %d, batch norms %d -> %d, %d declined",
        class_name,
        report.before.convs,
        report.after.convs,
        report.before.batch_norms,
        report.after.batch_norms,
        len(declines),
    )
    return fused


def _optimize_program(
    program: torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | None,
    *,
    rules: RuleSet | Iterable[Rule[Any]] | Iterable[str] | str | None,
    options: FusionOptions | Mapping[str, Any] | None,
    verify: bool | Mapping[str, Any],
) -> torch.export.ExportedProgram:
    """Fuse an ``ExportedProgram``: its module (aten IR) through the same rules, re-exported."""
    args, kwargs = _program_inputs(program, example_inputs)
    options = _checked_options(options, args, verify)
    rules = _rule_set(rules)
    start = time.perf_counter()
    module = program.module()
    captured = time.perf_counter() - start
    fused = fuse_graph(
        module.graph,
        module,
        rules=rules,
        options=options,
        capture="torch.export",
        class_name="FusedExportedProgram",
        parameters=sum(p.numel() for p in program.parameters()),
    )
    report = fused.fxfuse_report
    start = time.perf_counter()
    result = torch.export.export(fused, args, kwargs, dynamic_shapes=_dynamic_shapes(program))
    report.timings = {"capture": captured, **report.timings, "export": time.perf_counter() - start}
    if verify:
        start = time.perf_counter()
        report.verification = _verify_result(program.module(), result.module(), args, verify)
        report.timings["verify"] = time.perf_counter() - start
    result.fxfuse_report = report  # type: ignore[attr-defined]
    return result


def _program_inputs(
    program: torch.export.ExportedProgram, example_inputs: Sequence[Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is not None:
        return tuple(example_inputs), {}
    stored = getattr(program, "example_inputs", None)
    if stored is None:
        raise ValueError(
            "this ExportedProgram carries no example inputs to re-export the fused program "
            "with; pass them: fxfuse.optimize(program, (x,))"
        )
    args, kwargs = stored
    return tuple(args), dict(kwargs)


def _dynamic_shapes(program: torch.export.ExportedProgram) -> Any:
    """The program's dynamic dims, as ``Dim.AUTO`` per user input (``None`` if static)."""
    specs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes: list[Any] = []
    dynamic = False
    for name in specs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, Tensor):
            dims = {
                i: torch.export.Dim.AUTO
                for i, size in enumerate(val.shape)
                if not isinstance(size, int)
            }
            dynamic = dynamic or bool(dims)
            shapes.append(dims or None)
        else:
            shapes.append(None)
    return tuple(shapes) if dynamic else None
