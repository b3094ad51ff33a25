"""What live weights cost: the compile backend's fused graph computes its weights on every call.

``python -m benchmarks live`` times, per model, at batch 1, interleaved in one process (median
of ``--rounds``), under ``torch.no_grad()``:

- ``fused``: ``fxfuse.optimize(model)``, weights computed once (the reference);
- ``live``: ``torch.compile(model, backend="fxfuse")`` (inner ``eager``), weights computed from
  the parameters on every call — right after any update, including the ones no version
  counter sees (fused optimizers, batch-norm statistics, ``p.data``);
- ``frozen``: the same with ``options={"weights": "frozen"}``, weights folded once per set of
  weights (identity and version checked on every call).

- ``check``: the check live weights make on every call without gradients
  (:class:`fxfuse.backend.Fingerprint` of the model's parameters and buffers), alone;

and reports each as a ratio to ``fused``, both the medians and the minimums (on a loaded,
shared machine the minimum is the steadier of the two): the per-call price of being right by
default.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import fxfuse
from fxfuse.backend import Fingerprint
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
            model,
            backend="fxfuse",
            options={"inner": "eager", "report": "none", "weights": "frozen"},
        )
        weights = [*model.parameters(), *model.buffers()]
        fingerprint = Fingerprint(weights)
        variants = {
            "fused": fused,
            "live": live,
            "frozen": frozen,
            "check": lambda x, w=weights, f=fingerprint: f(w),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.no_grad():
            for fn in variants.values():  # compile and warm up
                fn(x)
                fn(x)
            for _ in range(rounds):
                for name, fn in variants.items():
                    times[name].append(_time(lambda fn=fn, x=x: fn(x)))
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        least = {name: min(t) * 1e3 for name, t in times.items()}
        results[spec] = {"ms": median, "min_ms": least}
        for name in ("live", "frozen", "check"):
            results[spec][f"{name}_vs_fused"] = median[name] / median["fused"]
            results[spec][f"{name}_vs_fused_min"] = least[name] / least["fused"]
        print(
            f"{spec}: fused {median['fused']:.1f} ms (min {least['fused']:.1f}); "
            + ", ".join(
                f"{name} {median[name]:.1f} ms ({results[spec][f'{name}_vs_fused']:.2f}×; "
                f"min {least[name]:.1f} ms, {results[spec][f'{name}_vs_fused_min']:.2f}×)"
                for name in ("live", "frozen", "check")
            )
        )
    return results
