"""What every benchmark shares: the results file, the machine's description, cold compiles."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fxfuse.bench import environment

OUT = Path(__file__).resolve().parent / "out"


def machine(device: str = "cpu") -> dict[str, Any]:
    """:func:`fxfuse.bench.environment` plus the CPU model, the load and the command line."""
    env = environment(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env["memory_gib"] = _memory_gib()
    env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["command"] = " ".join(["python -m benchmarks", *sys.argv[1:]])
    env["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env


def _memory_gib() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages / 2**30, 1)


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {}


def save_section(path: Path, section: str, data: Any) -> None:
    """Write ``data`` as ``section`` of the results file, keeping the other sections."""
    results = load_results(path)
    results[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def cold_compiles() -> str:
    """Make every ``torch.compile`` in this process compile from scratch.

    Inductor caches compiled graphs and kernels on disk; a second benchmark run would time
    cache hits. A fresh cache directory and the FX graph cache off keep compile times honest.
    """
    directory = tempfile.mkdtemp(prefix="fxfuse-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = False
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    torch._dynamo.reset()
    return directory
