"""R-Drop training steps: ``fxfuse.rdrop``'s twin against two forward passes.

One training step (forward, :func:`fxfuse.rdrop_loss`, backward, optimizer step) three ways,
on copies of one model, with the same batch:

- ``two passes``: ``out1, out2 = model(x), model(x)`` — R-Drop as the paper's code writes it;
- ``twin``: ``out1, out2 = fxfuse.rdrop(model)(x)`` — one pass over the batch written twice;
- ``cat by hand``: ``model(torch.cat([x, x])).chunk(2)`` — what the twin does, written out,
  to show the twin's own overhead.

**Time**: all three in one process, interleaved (each round runs every variant once, in a
rotating order), after two warm-up rounds; the median over the rounds, quartiles in the JSON.
The twin's one-time check of the model runs in the warm-up, and is timed apart.
**Peak memory**: each variant in a fresh child process (``python -m benchmarks.rdrop SPEC
VARIANT BATCH``) after one warm-up step: the resident set's high-water mark during one step
above the resident set before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``),
on CPU; ``torch.cuda.max_memory_allocated`` on CUDA. Children run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fxfuse
from benchmarks.memory import _reset_peak, _status_kib
from fxfuse.console import progress, table
from fxfuse.testing import relative_error

VARIANTS = ("two passes", "twin", "cat by hand")
ALPHA = 1.0


def _mlp() -> tuple[nn.Module, tuple[int, ...], int]:
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(256, 10),
    )
    return model, (64,), 10


def _resnet18() -> tuple[nn.Module, tuple[int, ...], int]:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.fc = nn.Sequential(nn.Dropout(0.2), model.fc)
    return model, (3, 32, 32), 10


def _vit_tiny() -> tuple[nn.Module, tuple[int, ...], int]:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        num_classes=10,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        drop_path_rate=0.1,
    )
    return model, (3, 32, 32), 10


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...], int]]] = {
    "mlp": _mlp,
    "resnet18+dropout": _resnet18,
    "vit-tiny": _vit_tiny,
}
QUICK = ["resnet18+dropout", "vit-tiny"]


class _Setup:
    """A model's three copies, their optimizers, one batch and a step function per variant."""

    def __init__(self, spec: str, batch: int, device: str):
        torch.manual_seed(0)
        model, sample, classes = MODELS[spec]()
        model = model.to(device).train()
        self.x = torch.randn(batch, *sample, device=device)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.models = {name: copy.deepcopy(model) for name in VARIANTS}
        self.optimizers = {
            name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            for name, m in self.models.items()
        }
        start = time.perf_counter()
        self.twin = fxfuse.rdrop(self.models["twin"])
        self.twin.check(self.x)
        self.check_s = time.perf_counter() - start

    def outputs(self, name: str) -> tuple[Tensor, Tensor]:
        model, x = self.models[name], self.x
        if name == "twin":
            return self.twin(x)
        if name == "two passes":
            return model(x), model(x)
        out1, out2 = model(torch.cat([x, x])).chunk(2)
        return out1, out2

    def step(self, name: str) -> None:
        out1, out2 = self.outputs(name)
        loss = fxfuse.rdrop_loss(out1, out2, self.y, ALPHA)
        loss.backward()
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def agree(self) -> float:
        """The twin's halves against the hand-written doubled batch, from equal weights and
        the same random numbers (the worst normalised error of the two halves)."""
        twin_model, hand = self.models["twin"], self.models["cat by hand"]
        hand.load_state_dict(twin_model.state_dict())
        torch.manual_seed(1)
        a = self.twin(self.x)
        torch.manual_seed(1)
        b = hand(torch.cat([self.x, self.x])).chunk(2)
        return relative_error(list(b), list(a))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(spec: str, batch: int, rounds: int, device: str) -> dict[str, Any]:
    """Interleaved step times of every variant, and the twin's one-time check."""
    setup = _Setup(spec, batch, device)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds + 2):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            setup.step(name)
            _sync(device)
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {"spec": spec, "batch": batch, "rounds": rounds}
    result["check_s"] = setup.check_s
    result["agreement"] = setup.agree()
    result.update(summarize(times))
    return result


def summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    """Per variant: the median and the quartiles of its step times, in ms."""
    result: dict[str, Any] = {}
    for name, samples in times.items():
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        result[name] = {
            "median_ms": statistics.median(samples) * 1e3,
            "quartiles_ms": [q[0] * 1e3, q[2] * 1e3],
        }
    return result


def memory_here(spec: str, variant: str, batch: int, device: str) -> dict[str, Any]:
    """The child's job: one warm-up step, then the peak of one more."""
    return step_peak(_Setup(spec, batch, device), variant, device)


def step_peak(setup: Any, variant: str, device: str) -> dict[str, Any]:
    """One warm-up ``setup.step(variant)``, then the peak memory of one more."""
    setup.step(variant)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        setup.step(variant)
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "how": "cuda allocator"}
    before = _status_kib("VmRSS")
    if not _reset_peak():
        return {"peak_bytes": None, "how": "unavailable (no /proc/self/clear_refs)"}
    setup.step(variant)
    hwm = _status_kib("VmHWM")
    peak = (hwm - before) * 1024 if hwm is not None and before is not None else None
    return {"peak_bytes": peak, "how": "RSS high-water mark"}


def measure_memory(
    spec: str, variant: str, batch: int, device: str, module: str = "benchmarks.rdrop"
) -> dict[str, Any]:
    """``module``'s ``memory_here`` in a fresh child process (``python -m module SPEC VARIANT
    BATCH DEVICE``)."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "FXFUSE_BENCH_THREADS": str(torch.get_num_threads()),
    }
    done = subprocess.run(
        [sys.executable, "-m", module, spec, variant, str(batch), device],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0:
        return {
            "peak_bytes": None,
            "how": "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1],
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(specs: list[str], *, batch: int, rounds: int, device: str) -> list[dict[str, Any]]:
    results = []
    for spec in progress(specs, "rdrop"):
        result = time_steps(spec, batch, rounds, device)
        result["memory"] = {v: measure_memory(spec, v, batch, device) for v in VARIANTS}
        results.append(result)
    print(render(results))
    return results


def _ms(m: dict[str, Any]) -> str:
    low, high = m["quartiles_ms"]
    return f"{m['median_ms']:.1f} ({low:.1f}–{high:.1f})"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def render(results: list[dict[str, Any]]) -> str:
    """The step times (median and quartiles, ms), ratios and peak memory (MiB)."""
    rows = [
        [
            "model",
            "batch",
            *VARIANTS,
            "twin / two passes",
            "twin / by hand",
            *(f"peak MiB, {v}" for v in VARIANTS),
            "peak, twin / two passes",
        ]
    ]
    for r in results:
        peaks = [r["memory"][v]["peak_bytes"] for v in VARIANTS]
        ratio = f"{peaks[1] / peaks[0]:.2f}" if peaks[0] and peaks[1] else "–"
        rows.append(
            [
                r["spec"],
                str(r["batch"]),
                *(_ms(r[v]) for v in VARIANTS),
                f"{r['twin']['median_ms'] / r['two passes']['median_ms']:.2f}",
                f"{r['twin']['median_ms'] / r['cat by hand']['median_ms']:.2f}",
                *(_mib(p) for p in peaks),
                ratio,
            ]
        )
    return table(rows, title="one R-Drop training step (forward, loss, backward, SGD step)")


if __name__ == "__main__":
    spec, variant, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(int(os.environ.get("FXFUSE_BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(memory_here(spec, variant, batch, device)))
