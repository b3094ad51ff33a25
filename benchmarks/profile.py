"""Where ``fxfuse.optimize`` spends its time: each phase under ``cProfile``, top functions.

``python -m benchmarks profile --blocks 1000`` runs the phases of :func:`fxfuse.optimize`
(capture, rules, emit) one by one on the synthetic network of :mod:`.scaling` and prints each
phase's hottest functions by own time. cProfile slows Python code about twofold; compare the
shares, not the seconds, with the scaling table.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

import torch
from fxfuse.passes import default_rules

from benchmarks.scaling import synthetic_net
from fxfuse.capture import symbolic_capture
from fxfuse.emit import emit
from fxfuse.rules import RewriteContext
from fxfuse.testing import randomize_batch_norms


def _profiled(fn: Any, top: int) -> tuple[Any, float, str]:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    result = fn()
    profiler.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start_at = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return result, seconds, "\n".join(lines[start_at:]).rstrip()


def run(blocks: int, top: int = 15) -> dict[str, Any]:
    torch.manual_seed(0)
    model = randomize_batch_norms(synthetic_net(blocks).eval(), 0).double()
    symbolic_capture(synthetic_net(2).eval())  # imports and first-call costs out of the way
    # the phases of fxfuse.optimize (fxfuse/api.py), one profile each
    graph, capture_s, capture = _profiled(lambda: symbolic_capture(model), top)
    ctx = RewriteContext(graph, model)
    _, rules_s, rules = _profiled(lambda: default_rules().run(ctx), top)
    _, emit_s, emitted = _profiled(
        lambda: emit(graph, ctx.attribute, ctx.attributes, class_name="Fused"), top
    )
    result = {"blocks": blocks, "seconds": {"capture": capture_s, "rules": rules_s, "emit": emit_s}}
    for name, seconds, text in (
        ("capture", capture_s, capture),
        ("rules", rules_s, rules),
        ("emit", emit_s, emitted),
    ):
        print(f"== {name}: {seconds:.2f} s under cProfile ({blocks} blocks) ==\n{text}\n")
        result[name] = text
    return result
