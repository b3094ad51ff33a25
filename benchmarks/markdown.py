"""``python -m benchmarks markdown``: the results file as Markdown tables for RESULTS.md."""

from __future__ import annotations

from typing import Any

_VARIANTS = ["eager", "fxfuse", "timm", "fx.fuse", "jit.freeze", "inductor", "fxfuse+inductor"]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([_row(header), _row(align), *(_row(r) for r in rows)])


def latency(section: dict[str, Any]) -> str:
    rows = []
    for model in section["models"]:
        by = {m["variant"]: m for m in model["measurements"]}
        cells = [model["spec"]]
        for name in _VARIANTS:
            m = by.get(name)
            ok = m is not None and m["status"] == "ok"
            cells.append(f"{m['latency_ms']:.2f}" if ok else (m["status"] if m else "–"))  # type: ignore[index]
        fx, timm = by.get("fxfuse"), by.get("timm")
        both = fx and timm and fx["status"] == timm["status"] == "ok"
        cells.append(f"{fx['latency_ms'] / timm['latency_ms']:.2f}" if both else "–")  # type: ignore[index]
        rows.append(cells)
    return _table(["model", *_VARIANTS, "fxfuse / timm"], rows)


def conversion(section: dict[str, Any]) -> str:
    rows = []
    for model in section["models"]:
        by = {m["variant"]: m for m in model["measurements"]}
        fx, timm, ind = by.get("fxfuse"), by.get("timm"), by.get("inductor")
        if fx is None or fx["status"] != "ok":
            continue
        p = fx["phases"]
        phases = " / ".join(f"{p[k] * 1e3:.0f}" for k in ("capture", "rules", "emit") if k in p)
        t_ok = timm is not None and timm["status"] == "ok"
        i_ok = ind is not None and ind["status"] == "ok"
        rows.append(
            [
                model["spec"],
                f"{fx['convert_s'] * 1e3:.0f} ms ({phases})",
                f"{timm['convert_s'] * 1e3:.0f} ms" if t_ok else "–",  # type: ignore[index]
                f"{fx['convert_s'] / timm['convert_s']:.2f}" if t_ok else "–",  # type: ignore[index]
                f"{ind['convert_s']:.1f} s" if i_ok else "–",  # type: ignore[index]
                f"{ind['convert_s'] / fx['convert_s']:.0f}×" if i_ok else "–",  # type: ignore[index]
            ]
        )
    header = ["model", "fxfuse.optimize (capture / rules / emit)", "timm", "ratio", "Inductor",
              "Inductor / fxfuse"]  # fmt: skip
    return _table(header, rows)


def scaling(section: dict[str, Any]) -> str:
    rows = []
    for p in section["points"]:
        s = p["seconds"]
        rows.append(
            [f"{p['blocks']:,}", f"{p['nodes']:,}"]
            + [f"{s[k]:.2f} s" for k in ("total", "capture", "rules", "emit")]
            + [f"{p['us_per_node']:.0f}"]
        )
    exps = ", ".join(f"{k} {v:.2f}" for k, v in section["exponents"].items() if v is not None)
    header = ["blocks", "nodes", "total", "capture", "rules", "emit", "µs/node"]
    return _table(header, rows) + f"\n\nGrowth exponent (sizes ≥ 100 blocks): {exps}."


def memory(section: dict[str, Any]) -> str:
    rows = []
    for r in section["models"]:
        if "error" in r:
            rows.append([r["spec"], "failed", "", "", ""])
            continue
        mib = 2**20
        rows.append(
            [
                r["spec"],
                f"{r['parameter_bytes'] / mib:.1f}",
                f"{r['rss_peak_bytes'] / mib:.1f}" if r["rss_peak_bytes"] else "–",
                f"{r['rss_peak_bytes'] / r['parameter_bytes']:.1f}×"
                if r["rss_peak_bytes"]
                else "–",
                f"{r['python_heap_peak_bytes'] / mib:.1f}",
            ]
        )
    header = ["model", "parameters MiB", "RSS peak MiB", "× parameters", "Python heap MiB"]
    return _table(header, rows)


def rdrop(section: dict[str, Any]) -> str:
    """R-Drop training steps: step times (median, quartiles), ratios, peak memory."""
    variants = ("two passes", "twin", "cat by hand")

    def ms(m: dict[str, Any]) -> str:
        return f"{m['median_ms']:.1f} ({m['quartiles_ms'][0]:.1f}–{m['quartiles_ms'][1]:.1f})"

    def mib(n: int | None) -> str:
        return "–" if n is None else f"{n / 2**20:.1f}"

    rows = []
    for r in section["models"]:
        peaks = [r["memory"][v]["peak_bytes"] for v in variants]
        rows.append(
            [r["spec"], str(r["batch"]), *(ms(r[v]) for v in variants),
             f"{r['twin']['median_ms'] / r['two passes']['median_ms']:.2f}",
             f"{r['twin']['median_ms'] / r['cat by hand']['median_ms']:.2f}",
             " / ".join(mib(p) for p in peaks),
             f"{peaks[1] / peaks[0]:.2f}" if peaks[0] and peaks[1] else "–",
             f"{r['check_s']:.1f}"]
        )  # fmt: skip
    header = ["model", "batch", "two passes (ms)", "twin (ms)", "cat by hand (ms)",
              "twin / two passes", "twin / by hand", "peak MiB: two passes / twin / by hand",
              "peak, twin / two passes", "capture + check (s)"]  # fmt: skip
    return _table(header, rows)


def render(results: dict[str, Any]) -> str:
    parts = []
    for name, fn in (
        ("latency", latency),
        ("conversion", conversion),
        ("scaling", scaling),
        ("memory", memory),
        ("rdrop", rdrop),
    ):
        section = results.get("latency" if name == "conversion" else name)
        if section:
            machine = section.get("machine", {})
            parts.append(
                f"### {name}\n\n{fn(section)}\n\n(`{machine.get('command', '')}`, "
                f"{machine.get('date', '')}, load {machine.get('load_average')} → "
                f"{machine.get('load_average_after', '?')})"
            )
    return "\n\n".join(parts)
