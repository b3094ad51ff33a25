"""What live weights cost: the compile backend's fused graph computes its weights on every call.

``python -m benchmarks live`` times, per model, at batch 1, interleaved in one process (median
of ``--rounds``), under ``torch.no_grad()``:

- ``fused``: ``fxfuse.optimize(model)``, weights computed once (the reference);
- ``live``: ``torch.compile(model, backend="fxfuse")`` (inner ``eager``), weights computed from
  the parameters on every call — right after any update, including the ones no version
  counter sees (fused optimizers, batch-norm statistics, ``p.data``);
- ``frozen``: the same with ``options={"weights": "frozen"}``, weights folded once per set of
  weights (identity and version checked on every call).

and reports each as a ratio to ``fused``: the per-call price of being right by default.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import fxfuse
from fxfuse.models import load_model
from fxfuse.testing import randomize_batch_norms

MODELS = ("timm:repvgg_a0", "timm:mobileone_s0")


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(specs: Sequence[str] = MODELS, rounds: int = 20, size: int = 224) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for spec in specs:
        model = randomize_batch_norms(load_model(spec).model.eval())
        x = torch.randn(1, 3, size, size)
        fused = fxfuse.optimize(model)
        torch._dynamo.reset()
        live = torch.compile(model, backend="fxfuse", options={"inner": "eager", "report": "none"})
        frozen = torch.compile(
            model, backend="fxfuse",
            options={"inner": "eager", "report": "none", "weights": "frozen"},
        )
        variants = {"fused": fused, "live": live, "frozen": frozen}
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.no_grad():
            for fn in variants.values():  # compile and warm up
                fn(x)
                fn(x)
            for _ in range(rounds):
                for name, fn in variants.items():
                    times[name].append(_time(lambda fn=fn: fn(x)))
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results[spec] = {
            "ms": median,
            "live_vs_fused": median["live"] / median["fused"],
            "frozen_vs_fused": median["frozen"] / median["fused"],
        }
        print(
            f"{spec}: fused {median['fused']:.1f} ms, live {median['live']:.1f} ms "
            f"({results[spec]['live_vs_fused']:.2f}×), frozen {median['frozen']:.1f} ms "
            f"({results[spec]['frozen_vs_fused']:.2f}×)"
        )
    return results
