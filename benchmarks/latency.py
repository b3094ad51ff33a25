"""Latency side by side, for a list of models: :func:`fxfuse.bench.compare` on each.

Every model is built with random weights and random batch-norm statistics
(:mod:`fxfuse.models`), measured on one input, and Inductor's state is reset between models.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from fxfuse.bench import Comparison, compare
from fxfuse.console import format_seconds, table
from fxfuse.models import load_model
from fxfuse.testing import randomize_batch_norms

log = logging.getLogger("benchmarks")

# Quick: one of each kind — fxfuse's own blocks, both timm families it competes with timm's
# converter on, and a plain conv-bn network. Full: larger members of each family too.
QUICK_MODELS = [
    "builtin:training_time_net",
    "timm:repvgg_a0",
    "timm:mobileone_s0",
    "torchvision:resnet18",
]
FULL_MODELS = [
    *QUICK_MODELS,
    "timm:repvgg_b0",
    "timm:mobileone_s1",
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
]


def run(
    specs: list[str],
    *,
    input_size: int | None,
    rounds: int,
    variants: list[str] | None,
    device: str,
    convert_repeats: int = 5,
) -> list[dict[str, Any]]:
    """Compare every model in ``specs``; print each table as it is done; return the results."""
    results = []
    for spec in specs:
        torch.manual_seed(0)
        loaded = load_model(spec)
        model = randomize_batch_norms(loaded.model, 0).to(device)
        shape = loaded.input_shape
        if input_size is not None:
            shape = (*shape[:-2], input_size, input_size)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        comparison = compare(
            model,
            (x,),
            spec=spec,
            variants=variants,
            rounds=rounds,
            convert_repeats=convert_repeats,
        )
        print(comparison.table())
        print(summary(comparison), end="\n\n", flush=True)
        results.append(comparison.to_dict())
        del model, comparison
        torch._dynamo.reset()
        gc.collect()
    return results


def summary(comparison: Comparison) -> str:
    """The lines that speak to the issue's targets for one model."""
    lines = []
    fx = comparison.get("fxfuse")
    if fx is None or fx.status != "ok":
        return "fxfuse: " + (fx.reason if fx is not None else "not measured")
    phases = ", ".join(f"{k} {format_seconds(v)}" for k, v in fx.phases.items())
    lines.append(f"fxfuse.optimize {format_seconds(fx.convert_s)} ({phases})")
    timm = comparison.get("timm")
    if timm is not None and timm.status == "ok":
        ratio = comparison.latency_ratio("fxfuse", "timm")
        assert ratio is not None and timm.convert_s and fx.convert_s is not None
        lines.append(
            f"vs timm: latency ratio {ratio:.2f} (target ≤ 1.00), optimize time "
            f"{fx.convert_s / timm.convert_s:.2f}× timm's (target ≤ 1), convs "
            f"{fx.convs} vs {timm.convs}, batch norms {fx.batch_norms} vs {timm.batch_norms}"
        )
    inductor = comparison.get("inductor")
    if inductor is not None and inductor.status == "ok" and inductor.convert_s and fx.convert_s:
        lines.append(
            f"vs Inductor: compile {format_seconds(inductor.convert_s)}, fxfuse "
            f"{inductor.convert_s / fx.convert_s:.0f}× faster (target ≥ 20×); latency ratio "
            f"{comparison.latency_ratio('fxfuse', 'inductor'):.2f}"
        )
    return "\n".join(lines)


def overview(results: list[dict[str, Any]]) -> str:
    """One row per model: every variant's latency relative to eager."""
    variants: list[str] = []
    for result in results:
        for m in result["measurements"]:
            if m["variant"] not in variants:
                variants.append(m["variant"])
    rows = [["latency / eager", *variants]]
    for result in results:
        by_name = {m["variant"]: m for m in result["measurements"]}
        eager = by_name["eager"]["latency_ms"]
        row = [result["spec"]]
        for name in variants:
            m = by_name.get(name)
            ok = m is not None and m["status"] == "ok" and eager
            row.append(f"{m['latency_ms'] / eager:.2f}" if ok else "-")  # type: ignore[index]
        rows.append(row)
    return table(rows)
