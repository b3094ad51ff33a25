"""Peak memory of ``fxfuse.optimize`` against the model's own parameter size.

Each model is measured in a fresh child process (``python -m benchmarks.memory SPEC``), so
one measurement's garbage cannot hide in another's. Two numbers:

- **RSS peak**: the process's resident-set high-water mark (``VmHWM`` in
  ``/proc/self/status``, reset through ``/proc/self/clear_refs`` just before ``optimize``)
  minus the resident set just before. It counts everything: tensors, Python objects, the
  allocator's slack. Linux only.
- **Python heap peak** (``tracemalloc``): the Python objects alone (graph nodes, the
  report), not tensor storage, which torch allocates outside Python's allocator.

The result (the fused model) is alive at the peak, so a run cannot use less than one copy
of the fused parameters; the model's own parameters are already resident before and are
not counted.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import torch

import fxfuse
from fxfuse.console import progress, table
from fxfuse.models import load_model
from fxfuse.testing import randomize_batch_norms

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(spec: str) -> torch.nn.Module:
    if spec.startswith("synthetic:"):
        from benchmarks.scaling import synthetic_net

        return synthetic_net(int(spec.split(":", 1)[1])).eval()
    return load_model(spec).model


def measure_here(spec: str) -> dict[str, Any]:
    """Measure in this process (the child's job).

    A small model is fused first, so one-time costs (imports, lazy initialisation) are not
    counted; then ``optimize`` runs once for the RSS peak and once more under
    ``tracemalloc`` for the Python heap (tracing costs memory of its own, which would
    inflate the RSS peak).
    """
    fxfuse.optimize(randomize_batch_norms(load_model("builtin:repvgg_net").model))
    torch.manual_seed(0)
    model = randomize_batch_norms(_build(spec), 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    gc.collect()
    rss_before = _status_kib("VmRSS")
    can_reset = _reset_peak()
    fused = fxfuse.optimize(model)
    hwm = _status_kib("VmHWM")
    rss_peak = (hwm - rss_before) * 1024 if can_reset and hwm and rss_before else None
    fused_bytes = sum(t.numel() * t.element_size() for t in fused.state_dict().values())
    nodes = fused.fxfuse_report.before.nodes
    del fused
    gc.collect()
    tracemalloc.start()
    fxfuse.optimize(model)
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "spec": spec,
        "parameter_bytes": params,
        "buffer_bytes": buffers,
        "fused_state_bytes": fused_bytes,
        "rss_peak_bytes": rss_peak,
        "python_heap_peak_bytes": heap_peak,
        "nodes": nodes,
    }


def measure(spec: str) -> dict[str, Any]:
    """Measure ``spec`` in a child process."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", spec],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        return {"spec": spec, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(specs: list[str]) -> list[dict[str, Any]]:
    results = [measure(spec) for spec in progress(specs, "memory")]
    print(render(results))
    return results


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render(results: list[dict[str, Any]]) -> str:
    rows = [["model", "params MiB", "RSS peak MiB", "× params", "Python heap MiB", "nodes"]]
    for r in results:
        if "error" in r:
            rows.append([r["spec"], f"failed: {r['error']}"])
            continue
        ratio = (
            f"{r['rss_peak_bytes'] / r['parameter_bytes']:.2f}"
            if r["rss_peak_bytes"] is not None and r["parameter_bytes"]
            else "-"
        )
        rows.append(
            [
                r["spec"],
                _mib(r["parameter_bytes"]),
                _mib(r["rss_peak_bytes"]),
                ratio,
                _mib(r["python_heap_peak_bytes"]),
                f"{r['nodes']:,}",
            ]
        )
    return table(
        rows,
        title="peak memory of fxfuse.optimize (RSS high-water mark above the "
        "resident set before it; Python heap by tracemalloc)",
    )


if __name__ == "__main__":
    print(json.dumps(measure_here(sys.argv[1])))
