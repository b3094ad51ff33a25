"""``fxfuse.optimize``: capture → rules to a fixpoint → emit."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from fxfuse.capture import symbolic_capture
from fxfuse.emit import emit
from fxfuse.errors import TrainingModeError, VerificationError
from fxfuse.report import FusionReport, graph_stats
from fxfuse.rules import FusionOptions, RewriteContext, Rule, RuleSet
from fxfuse.verify import buffers_restored

__all__ = ["optimize"]

log = logging.getLogger("fxfuse")


def _rule_set(rules: RuleSet | Iterable[Rule[Any]] | None) -> RuleSet:
    if rules is None:
        from fxfuse.passes import default_rules

        return default_rules()
    return rules if isinstance(rules, RuleSet) else RuleSet.of(rules)


def _left_alone(graph: Graph, ctx: RewriteContext) -> list[str]:
    """Notes on modules fxfuse does not touch: quantized ones."""
    notes = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = ctx.module(str(node.target))
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            notes.append(f"{node.target} ({type(module).__name__}) is quantized: left alone")
    return notes


def _checked_options(
    options: FusionOptions | None,
    example_inputs: Sequence[Any] | None,
    verify: bool | Mapping[str, Any],
) -> FusionOptions:
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
    fused: GraphModule,
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


def optimize(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    rules: RuleSet | Iterable[Rule[Any]] | None = None,
    options: FusionOptions | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    verify: bool | Mapping[str, Any] = False,
) -> GraphModule:
    """Fuse ``model`` into an equivalent, cheaper ``torch.fx.GraphModule``.

    The model is traced with ``torch.fx`` symbolic tracing; batch norms are folded into the
    convs before them, branches reading the same input and summed are merged into one conv
    (identity and batch-norm branches included), and ops that do nothing at inference are
    dropped. Every rewrite is exact in real arithmetic; weights are computed in float64 and
    cast back to each layer's dtype.

    Args:
        model: an ``nn.Module`` in eval mode. It is never modified: the result owns fresh
            copies of everything it uses.
        example_inputs: optional inputs; when given, the graph's shapes are recorded first
            and the rules check their layout assumptions against them.
        rules: the rule set to run (default :func:`fxfuse.passes.default_rules`); a plain
            list of :class:`~fxfuse.Rule` objects runs as one stage.
        options: :class:`~fxfuse.FusionOptions` for the rules.
        leaf_modules: module classes to keep whole instead of tracing through them.
        concrete_args: passed to ``torch.fx`` tracing, to fix Python-valued arguments.
        verify: check the result before returning it (needs ``example_inputs``): every
            rewrite is validated locally as it is applied (a failing one is rolled back and
            reported, see ``FusionOptions.validate_rewrites``), and the fused model is
            compared with ``model`` by :func:`fxfuse.verify` on inputs drawn around
            ``example_inputs``; its report is ``fxfuse_report.verification``. A mapping
            turns it on and passes its items to :func:`fxfuse.verify` (``{"examples": 50,
            "tolerance": 1e-4}``).

    Returns:
        A ``GraphModule`` in eval mode, with the :class:`~fxfuse.FusionReport` as its
        ``fxfuse_report`` attribute.

    Raises:
        TrainingModeError: ``model.training`` is true.
        CaptureError: the model cannot be traced; the message names the construct.
        VerificationError: with ``verify=True``, the fused model differs from ``model``.
        ValueError: ``verify`` or ``validate_rewrites`` without ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxfuse.optimize takes an nn.Module, got {type(model).__name__}")
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where batch norm uses batch "
            "statistics and dropout is random, so no fused model computes the same thing. "
            "Call model.eval() first (fxfuse never changes the mode of your model)."
        )
    options = _checked_options(options, example_inputs, verify)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    graph = symbolic_capture(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if example_inputs is not None:
        # (it runs the caller's modules: a batch norm in training mode would update its stats)
        with torch.no_grad(), buffers_restored(model):
            ShapeProp(GraphModule(model, graph)).propagate(*example_inputs)
        # that GraphModule only recorded shapes: emission adds submodules it never had, and
        # torch.fx checks new call_module targets against a graph's owning module
        graph.owning_module = None
    timings["capture"] = time.perf_counter() - start

    ctx = RewriteContext(graph, model, options)
    report = FusionReport(
        capture="torch.fx.symbolic_trace",
        before=graph_stats(graph, ctx.module, sum(p.numel() for p in model.parameters())),
        notes=_left_alone(graph, ctx),
    )
    start = time.perf_counter()
    _rule_set(rules).run(ctx)
    timings["rules"] = time.perf_counter() - start

    start = time.perf_counter()
    declines = ctx.declines()
    fused = emit(graph, ctx.attribute, ctx.attributes, class_name=f"Fused{type(model).__name__}")
    timings["emit"] = time.perf_counter() - start

    report.after = graph_stats(
        fused.graph, fused.get_submodule, sum(p.numel() for p in fused.parameters())
    )
    report.rewrites = ctx.rewrites
    report.declines = declines
    report.counts = ctx.counts
    if ctx.validator is not None:
        report.validation = ctx.validator.stats
        report.declines += [d for d in ctx.validator.failures if d not in declines]
    fused.fxfuse_report = report
    if verify:
        assert example_inputs is not None
        start = time.perf_counter()
        report.verification = _verify_result(model, fused, example_inputs, verify)
        timings["verify"] = time.perf_counter() - start
    report.timings = timings
    log.info(
        "fxfuse: %s convs %d -> %d, batch norms %d -> %d, %d declined",
        type(model).__name__,
        report.before.convs,
        report.after.convs,
        report.before.batch_norms,
        report.after.batch_norms,
        len(declines),
    )
    return fused
