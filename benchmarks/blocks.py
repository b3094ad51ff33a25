"""Emission time with a large layer's weights computed in blocks of output channels, against
whole layers (``python -m benchmarks.blocks [--rounds N] SPEC …``).

``fxfuse.weights.evaluate_as`` computes a fused layer whose float64 weight is larger than
``fxfuse.weights.BLOCK_BYTES`` a block of output channels at a time (peak memory: one block's
float64 scratch, not the layer's). Here ``optimize`` runs on the same model in rounds with a
rotating order, once with the default block size and once with blocks larger than any layer
(every layer whole, as before blocking), in one process: the ratio of the medians of the emit
phase (where the weights are computed) and of the whole ``optimize`` is what to read on a
shared machine. Peak memory is ``python -m benchmarks.memory SPEC``'s.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fxfuse
from fxfuse import weights
from fxfuse.console import table
from fxfuse.models import load_model
from fxfuse.testing import randomize_batch_norms

_WHOLE = 2**62


def measure(spec: str, rounds: int) -> dict[str, float]:
    """Median emit and ``optimize`` seconds of ``spec``, blocked and whole."""
    torch.manual_seed(0)
    model = randomize_batch_norms(load_model(spec).model, 0)
    default = weights.BLOCK_BYTES
    variants = {"blocked": default, "whole": _WHOLE}
    emit: dict[str, list[float]] = {name: [] for name in variants}
    total: dict[str, list[float]] = {name: [] for name in variants}
    fxfuse.optimize(model)  # (warm-up)
    try:
        for round_ in range(rounds):
            order = list(variants.items())
            for name, size in order if round_ % 2 == 0 else reversed(order):
                weights.BLOCK_BYTES = size
                timings = fxfuse.optimize(model).fxfuse_report.timings
                emit[name].append(timings["emit"])
                total[name].append(sum(timings.values()))
    finally:
        weights.BLOCK_BYTES = default
    result = {f"emit_{k}_s": statistics.median(v) for k, v in emit.items()}
    result.update({f"optimize_{k}_s": statistics.median(v) for k, v in total.items()})
    return result


def render(results: dict[str, dict[str, float]]) -> str:
    rows = [["model", "emit blocked / whole ms", "ratio", "optimize blocked / whole ms", "ratio"]]
    for spec, r in results.items():
        rows.append(
            [
                spec,
                f"{r['emit_blocked_s'] * 1e3:.1f} / {r['emit_whole_s'] * 1e3:.1f}",
                f"{r['emit_blocked_s'] / r['emit_whole_s']:.2f}",
                f"{r['optimize_blocked_s'] * 1e3:.0f} / {r['optimize_whole_s'] * 1e3:.0f}",
                f"{r['optimize_blocked_s'] / r['optimize_whole_s']:.2f}",
            ]
        )
    return table(
        rows, title="fxfuse.optimize: weights in blocks of output channels vs whole layers"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.blocks", description=__doc__)
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    print(render({spec: measure(spec, args.rounds) for spec in args.specs}))


if __name__ == "__main__":
    main()
