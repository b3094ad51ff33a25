"""The PNG: latency of every variant relative to eager, per model; pass time vs graph size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLOURS = {
    "eager": "#9e9e9e",
    "fxfuse": "#d62728",
    "timm": "#1f77b4",
    "fx.fuse": "#8c564b",
    "jit.freeze": "#ff7f0e",
    "inductor": "#2ca02c",
    "fxfuse+inductor": "#9467bd",
}


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Draw what ``results`` holds (latency and/or scaling) into ``path``; None without
    matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [k for k in ("latency", "scaling") if results.get(k)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "latency":
            _latency(ax, results["latency"]["models"])
        else:
            _scaling(ax, results["scaling"])
    env = (results.get("latency") or results.get("scaling") or {}).get("machine", {})
    fig.suptitle(
        f"fxfuse benchmarks — {env.get('cpu', env.get('device_name', ''))}, "
        f"{env.get('threads', '?')} threads, torch {env.get('torch', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency(ax: Any, models: list[dict[str, Any]]) -> None:
    variants = [v for v in _COLOURS if any(_ratio(m, v) is not None for m in models)]
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, model in enumerate(models):
            ratio = _ratio(model, variant)
            if ratio is not None:
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(ratio)
        ax.bar(xs, ys, width, label=variant, color=_COLOURS[variant])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([m["spec"] for m in models], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("latency / eager (lower is faster)")
    ax.set_title("inference latency relative to the training-time model")
    ax.legend(fontsize=7, ncol=2)


def _ratio(model: dict[str, Any], variant: str) -> float | None:
    by_name = {m["variant"]: m for m in model["measurements"]}
    m, eager = by_name.get(variant), by_name.get("eager")
    if m is None or eager is None or m["status"] != "ok" or not eager["latency_ms"]:
        return None
    return m["latency_ms"] / eager["latency_ms"]


def _scaling(ax: Any, scaling: dict[str, Any]) -> None:
    points = scaling["points"]
    nodes = [p["nodes"] for p in points]
    for phase, style in (("total", "o-"), ("capture", "s--"), ("rules", "^--"), ("emit", "v--")):
        if phase in points[0]["seconds"]:
            k = scaling["exponents"].get(phase)
            label = f"{phase} (k = {k:.2f})" if k is not None else phase
            ax.loglog(nodes, [p["seconds"][phase] for p in points], style, label=label)
    first = points[0]
    linear = [first["seconds"]["total"] * n / first["nodes"] for n in nodes]
    ax.loglog(nodes, linear, ":", color="grey", label="linear from the first point")
    ax.axhline(10.0, color="red", linewidth=0.8, linestyle=":", label="10 s target")
    ax.set_xlabel("graph nodes before fusion")
    ax.set_ylabel("seconds")
    ax.set_title("fxfuse.optimize time vs graph size")
    ax.legend(fontsize=7)
