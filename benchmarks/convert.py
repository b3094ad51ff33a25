"""Conversion time and per-call overhead: ``fxfuse.optimize`` against timm's converter.

``python -m benchmarks convert`` builds each timm re-parameterizable family once (random
weights, random batch-norm statistics) and, in one process, times in rounds with a rotating
order:

- ``fxfuse.optimize(model)`` (as users call it: no example inputs), split into its phases
  (capture / rules / emit, from the report's timings);
- ``timm.utils.model.reparameterize_model(model)`` (it deep-copies the model itself:
  that copy is part of its cost, as fxfuse's own copies are part of ``optimize``'s);

then the two converted models' forward at batch 1, interleaved, at the model's input size
and at a small one (64×64, where per-call Python overhead is most of a call). Each number is
the median over the rounds; the ratios are what to read on a shared machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxfuse
from fxfuse.console import progress, table
from fxfuse.models import load_model
from fxfuse.testing import randomize_batch_norms

MODELS = [
    "timm:repvgg_a0",
    "timm:mobileone_s0",
    "timm:fastvit_t8",
    "timm:repvit_m0_9",
    "timm:repghostnet_050",
]


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _asserts(module: nn.Module) -> int:
    graph = getattr(module, "graph", None)
    if graph is None:
        return 0
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is torch._assert)


def measure(spec: str, rounds: int, call_rounds: int) -> dict[str, Any]:
    """Conversion rounds, then per-call rounds, for one model."""
    from timm.utils.model import reparameterize_model

    loaded = load_model(spec)
    torch.manual_seed(0)
    model = randomize_batch_norms(loaded.model.eval(), 0)
    fxfuse.optimize(model)  # first-call costs (imports, lazy initialisation) out of the way
    reparameterize_model(model)
    samples: dict[str, list[float]] = {"fxfuse": [], "timm": []}
    phases: list[dict[str, float]] = []
    fused: nn.Module | None = None
    converted: nn.Module | None = None
    for r in range(rounds):
        for name in ["fxfuse", "timm"] if r % 2 == 0 else ["timm", "fxfuse"]:
            fused = converted = None  # (the previous round's results: freed before timing)
            gc.collect()
            start = time.perf_counter()
            if name == "fxfuse":
                fused = fxfuse.optimize(model)
            else:
                converted = reparameterize_model(model)
            samples[name].append(time.perf_counter() - start)
            if fused is not None:
                phases.append(dict(fused.fxfuse_report.timings))
    fused = fxfuse.optimize(model)
    converted = reparameterize_model(model)
    result: dict[str, Any] = {
        "spec": spec,
        "rounds": rounds,
        "optimize_s": statistics.median(samples["fxfuse"]),
        "timm_s": statistics.median(samples["timm"]),
        "phases_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "asserts": {"fxfuse": _asserts(fused), "eager": _asserts(torch.fx.symbolic_trace(model))},
        "samples": samples,
    }
    result["ratio"] = result["optimize_s"] / result["timm_s"]
    sizes = {"model": loaded.input_shape, "small": (1, loaded.input_shape[1], 64, 64)}
    for label, shape in sizes.items():
        x = torch.randn(*shape)
        calls: dict[str, list[float]] = {"fxfuse": [], "timm": []}
        with torch.no_grad():
            fused(x), converted(x)  # warm-up
            for r in range(call_rounds):
                order = [("fxfuse", fused), ("timm", converted)]
                for name, m in order if r % 2 == 0 else order[::-1]:
                    calls[name].append(_seconds(lambda m=m, x=x: m(x)))
        fx_ms = statistics.median(calls["fxfuse"]) * 1e3
        timm_ms = statistics.median(calls["timm"]) * 1e3
        result[f"call_{label}"] = {
            "shape": list(shape),
            "fxfuse_ms": fx_ms,
            "timm_ms": timm_ms,
            "ratio": fx_ms / timm_ms,
        }
    return result


def run(specs: list[str], rounds: int = 5, call_rounds: int = 30) -> list[dict[str, Any]]:
    results = []
    for spec in progress(specs, "convert"):
        results.append(measure(spec, rounds, call_rounds))
    print(render(results))
    return results


def render(results: list[dict[str, Any]]) -> str:
    """The conversion table and the per-call table."""
    rows = [
        [
            "model",
            "optimize (capture / rules / emit)",
            "timm",
            "ratio",
            "call, model size: fxfuse / timm ms (ratio)",
            "call, 64×64",
            "_asserts eager → fused",
        ]
    ]
    for r in results:
        p = r["phases_s"]
        parts = " / ".join(f"{p[k] * 1e3:.0f}" for k in ("capture", "rules", "emit") if k in p)
        calls = []
        for label in ("model", "small"):
            c = r[f"call_{label}"]
            calls.append(f"{c['fxfuse_ms']:.2f} / {c['timm_ms']:.2f} ({c['ratio']:.2f})")
        rows.append(
            [
                r["spec"],
                f"{r['optimize_s'] * 1e3:.0f} ms ({parts})",
                f"{r['timm_s'] * 1e3:.0f} ms",
                f"{r['ratio']:.2f}",
                *calls,
                f"{r['asserts']['eager']} → {r['asserts']['fxfuse']}",
            ]
        )
    return table(rows, title="fxfuse.optimize vs timm's reparameterize_model")
