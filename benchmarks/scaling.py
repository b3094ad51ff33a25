"""How fxfuse's pass time grows with the graph: synthetic networks of N training-time blocks.

The network cycles through the papers' blocks (:mod:`fxfuse.zoo`: RepVGG, ACNet, depthwise
and pointwise MobileOne, CSLA, a dilated branch, RepViT's post-sum batch norm) at a small
width, so the graph is large and the weights are small: the time measured is the graph work,
not the float64 arithmetic. Each block fuses to one conv.

The network is float64 and the fused model's output is compared with the original's up to 300
blocks. Beyond that the comparison says nothing: a chain of random blocks amplifies any
rounding exponentially with depth (at 1,000 blocks two float64 evaluations of the *same*
function in a different summation order differ by ~1e-4), so larger networks are checked by
structure instead: every block must end as exactly one conv (the ``convs`` column).

The growth exponent is the least-squares slope of log(time) against log(nodes) over the
sizes of at least 100 blocks (below that, fixed costs dominate); 1.0 is linear.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxfuse
from fxfuse import zoo
from fxfuse.console import format_seconds, progress, table
from fxfuse.testing import randomize_batch_norms, relative_error

WIDTH = 8
_BLOCKS: list[Callable[[int], nn.Module]] = [
    lambda c: zoo.RepVGGBlock(c, c),
    lambda c: zoo.ACBlock(c, c, 3),
    lambda c: zoo.MobileOneBlock(c, c, 3, groups=c),
    lambda c: zoo.MobileOneBlock(c, c, 1),
    lambda c: zoo.CSLABlock(c),
    lambda c: zoo.DilatedReparam(c),
    lambda c: zoo.RepViTMixer(c),
]


def synthetic_net(blocks: int, width: int = WIDTH) -> nn.Sequential:
    """``blocks`` re-parameterizable blocks in a chain, cycling through the papers' kinds.

    Every block keeps the spatial size, so any number of them runs on an 8×8 input.
    """
    return nn.Sequential(*(_BLOCKS[i % len(_BLOCKS)](width) for i in range(blocks)))


def fit_exponent(nodes: list[int], seconds: list[float]) -> float | None:
    points = [(math.log(n), math.log(s)) for n, s in zip(nodes, seconds, strict=True) if s > 0]
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else None


def measure(blocks: int, repeats: int, check: bool) -> dict[str, Any]:
    """Optimize a ``blocks``-block network ``repeats`` times; median total and per phase."""
    torch.manual_seed(0)
    model = randomize_batch_norms(synthetic_net(blocks).eval(), 0).double()
    runs = []
    fused = None
    for _ in range(repeats):
        fused = None
        gc.collect()
        start = time.perf_counter()
        fused = fxfuse.optimize(model)
        total = time.perf_counter() - start
        runs.append({"total": total, **fused.fxfuse_report.timings})
    assert fused is not None
    report = fused.fxfuse_report
    result: dict[str, Any] = {
        "blocks": blocks,
        "nodes": report.before.nodes,
        "nodes_after": report.after.nodes if report.after else None,
        "convs": [report.before.convs, report.after.convs if report.after else None],
        "batch_norms": [
            report.before.batch_norms,
            report.after.batch_norms if report.after else None,
        ],
        "repeats": repeats,
        "seconds": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
    }
    result["us_per_node"] = result["seconds"]["total"] / result["nodes"] * 1e6
    if check:
        x = torch.randn(1, WIDTH, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            result["error"] = relative_error(model(x), fused(x))
    return result


def run(sizes: list[int], repeats: int, check_up_to: int = 300) -> dict[str, Any]:
    """Measure every size; fit the exponents; print the table."""
    points = []
    for blocks in progress(sizes, "scaling"):
        reps = repeats if blocks <= 1000 else 1
        points.append(measure(blocks, reps, check=blocks <= check_up_to))
        print(_row_text(points[-1]), flush=True)
    fit = [p for p in points if p["blocks"] >= 100] or points
    exponents = {
        phase: fit_exponent([p["nodes"] for p in fit], [p["seconds"][phase] for p in fit])
        for phase in points[0]["seconds"]
    }
    result = {"width": WIDTH, "points": points, "exponents": exponents}
    print(render(result))
    return result


def _row_text(point: dict[str, Any]) -> str:
    s = point["seconds"]
    return (
        f"  {point['blocks']:>6} blocks, {point['nodes']:>6} nodes: "
        f"{format_seconds(s['total'])} ({point['us_per_node']:.0f} µs/node)"
    )


def render(result: dict[str, Any]) -> str:
    """The scaling table and the fitted exponents."""
    phases = list(result["points"][0]["seconds"])
    rows = [["blocks", "nodes", *phases, "µs/node", "convs", "error"]]
    for p in result["points"]:
        rows.append(
            [
                f"{p['blocks']:,}",
                f"{p['nodes']:,}",
                *(format_seconds(p["seconds"][k]) for k in phases),
                f"{p['us_per_node']:.0f}",
                f"{p['convs'][0]:,} → {p['convs'][1]:,}",
                f"{p['error']:.1e}" if "error" in p else "-",
            ]
        )
    exps = ", ".join(f"{k} {v:.2f}" for k, v in result["exponents"].items() if v is not None)
    return table(rows, title="fxfuse.optimize pass time vs graph size") + (
        f"\ngrowth exponent (time ∝ nodes^k, sizes ≥ 100 blocks): {exps}"
    )
