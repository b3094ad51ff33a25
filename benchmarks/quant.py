"""INT8 after fusion: output SQNR against the float model, with and without equalization.

For each model (timm's ``repvgg_a0`` and ``mobileone_s0`` by default) and seed, batch norms
get trained-like statistics (:func:`fxfuse.testing.trained_like_batch_norms`: γ log-uniform
over [0.02, 5], means N(0, 0.2²), variances U(0.5, 1.5)); then the model is fused
(``fxfuse.optimize``) with and without ``equalize=True`` and each fused model is quantized
four ways:

- ``weights/tensor``, ``weights/channel``: weights alone rounded to symmetric INT8, per tensor
  or per output channel (:func:`fxfuse.quant.fake_quantize_weights`), activations float;
- ``pt2e/tensor``, ``pt2e/channel``: torchao's PT2E flow (:func:`fxfuse.quant.pt2e_quantize`:
  ``torch.export``, X86 inductor quantizer — activations uint8 per tensor, histogram
  calibration — weights int8 symmetric per tensor or per channel, ``convert_pt2e``),
  calibrated on ``calibration`` random batches. Skipped without torchao.

SQNR = ``10·log10(‖y‖² / ‖y − ŷ‖²)`` of the logits over an evaluation batch drawn apart from
the calibration batches; inputs are N(0, 1) images (no data set here). Everything in one
process, on CPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import fxfuse
from fxfuse.console import table
from fxfuse.quant import fake_quantize_weights, output_sqnr
from fxfuse.testing import trained_like_batch_norms

MODELS = ("repvgg_a0", "mobileone_s0")
METHODS = ("weights/tensor", "weights/channel", "pt2e/tensor", "pt2e/channel")


def _has_torchao() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def measure(
    name: str, seed: int, *, size: int, batch: int, calibration: int
) -> dict[str, dict[str, float]]:
    """``{"off"|"on": {method: SQNR dB}}`` for one model and seed."""
    import timm

    from fxfuse.quant import pt2e_quantize

    torch.manual_seed(seed)
    model = trained_like_batch_norms(timm.create_model(name, pretrained=False).eval(), seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    shape = (batch, 3, size, size)
    x = torch.randn(shape, generator=generator)
    batches = [(torch.randn(shape, generator=generator),) for _ in range(calibration)]
    results: dict[str, dict[str, float]] = {}
    for label, equalize in (("off", False), ("on", True)):
        fused = fxfuse.optimize(model, (x[:1],), equalize=equalize)
        row = {
            "weights/tensor": output_sqnr(model, fake_quantize_weights(fused), (x,)),
            "weights/channel": output_sqnr(
                model, fake_quantize_weights(fused, per_channel=True), (x,)
            ),
        }
        if _has_torchao():
            for per_channel in (False, True):
                quantized = pt2e_quantize(fused, (x,), batches, per_channel=per_channel)
                key = "pt2e/channel" if per_channel else "pt2e/tensor"
                row[key] = output_sqnr(model, quantized, (x,))
        results[label] = row
    return results


def run(
    models: list[str] | tuple[str, ...] = MODELS,
    *,
    seeds: int = 3,
    size: int = 128,
    batch: int = 8,
    calibration: int = 4,
) -> list[dict[str, Any]]:
    """Measure every model over ``seeds`` seeds; print the table; return the rows."""
    rows: list[dict[str, Any]] = []
    for name in models:
        start = time.perf_counter()
        per_seed = [
            measure(name, seed, size=size, batch=batch, calibration=calibration)
            for seed in range(seeds)
        ]
        for label in ("off", "on"):
            row: dict[str, Any] = {"model": name, "equalize": label}
            for method in METHODS:
                values = [r[label][method] for r in per_seed if method in r[label]]
                if values:
                    row[method] = statistics.mean(values)
                    row[f"{method} per seed"] = values
            rows.append(row)
        print(f"{name}: {time.perf_counter() - start:.1f} s")
    print(render(rows))
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The SQNR table (dB, mean over seeds)."""
    methods = [m for m in METHODS if any(m in r for r in rows)]
    body = [
        [r["model"], r["equalize"], *(f"{r[m]:.1f}" if m in r else "-" for m in methods)]
        for r in rows
    ]
    return table([["model", "equalize", *methods], *body], align="ll" + "r" * len(methods))
