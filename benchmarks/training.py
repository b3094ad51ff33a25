"""Training steps of a multi-branch model three ways: as written, online-merged, plain.

One training step (forward, loss, backward, SGD step with momentum) on copies of one
RepOpt-VGG-like model (a stem conv, then CSLA blocks ``s·conv3×3(x) + t·conv1×1(x) + x``
with per-channel constant scales, global pool, linear head), with the same batch:

- ``multi-branch``: the model as written, SGD on its branch parameters;
- ``online merge``: :func:`fxfuse.online_merge` — one conv per block whose kernel is computed
  from the branch parameters on every call (same parameters, same gradients);
- ``plain``: :func:`fxfuse.gradient_reparam` — the fused model, SGD with the per-position
  gradient multiplier (RepOptimizer): plain-model cost.

**Time**: interleaved in one process (each round runs every variant once, in a rotating
order), after two warm-up rounds; median over the rounds, quartiles in the JSON.
**Peak memory**: each variant in a fresh child process (``python -m benchmarks.training SPEC
VARIANT BATCH DEVICE``) after one warm-up step, the resident set's high-water mark during one
step above the resident set before it (CPU), or ``torch.cuda.max_memory_allocated`` (CUDA);
see :mod:`benchmarks.rdrop`, whose method this follows.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from benchmarks import rdrop
from fxfuse.console import progress, table
from fxfuse.testing import relative_error

VARIANTS = ("multi-branch", "online merge", "plain")


class _CSLA(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.register_buffer("s", torch.rand(channels, 1, 1) + 0.5)
        self.register_buffer("t", torch.rand(channels, 1, 1) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.s * self.conv3(x) + self.t * self.conv1(x) + x)


def _csla_net(width: int, blocks: int) -> tuple[nn.Module, tuple[int, ...], int]:
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        *(_CSLA(width) for _ in range(blocks)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )
    return model, (3, 32, 32), 10


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...], int]]] = {
    "csla-w32x8": lambda: _csla_net(32, 8),
    "csla-w64x8": lambda: _csla_net(64, 8),
}
QUICK = ["csla-w32x8"]
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}


class _Setup:
    """The three variants, their optimizers and one batch."""

    def __init__(self, spec: str, batch: int, device: str):
        torch.manual_seed(0)
        model, sample, classes = MODELS[spec]()
        model = model.to(device).train()
        self.x = torch.randn(batch, *sample, device=device)
        self.y = torch.randint(0, classes, (batch,), device=device)
        branches = copy.deepcopy(model)
        online = fxfuse.online_merge(model)
        plain, plain_optimizer = fxfuse.gradient_reparam(model, torch.optim.SGD, **SGD)
        self.models: dict[str, nn.Module] = {
            "multi-branch": branches,
            "online merge": online,
            "plain": plain,
        }
        self.optimizers = {
            "multi-branch": torch.optim.SGD(branches.parameters(), **SGD),
            "online merge": torch.optim.SGD(online.parameters(), **SGD),
            "plain": plain_optimizer,
        }

    def step(self, name: str) -> None:
        loss = F.cross_entropy(self.models[name](self.x), self.y)
        loss.backward()
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def agree(self) -> float:
        """After the same steps, every variant's outputs against the multi-branch model's."""
        with torch.no_grad():
            ref = self.models["multi-branch"](self.x)
            return max(relative_error(ref, self.models[v](self.x)) for v in VARIANTS[1:])


def time_steps(spec: str, batch: int, rounds: int, device: str) -> dict[str, Any]:
    """Interleaved step times of every variant (all take the same steps, so they agree)."""
    setup = _Setup(spec, batch, device)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds + 2):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for name in order:
            rdrop._sync(device)
            start = time.perf_counter()
            setup.step(name)
            rdrop._sync(device)
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {"spec": spec, "batch": batch, "rounds": rounds}
    result["agreement"] = setup.agree()
    result.update(rdrop.summarize(times))
    return result


def memory_here(spec: str, variant: str, batch: int, device: str) -> dict[str, Any]:
    """The child's job: one warm-up step, then the peak of one more."""
    return rdrop.step_peak(_Setup(spec, batch, device), variant, device)


def run(specs: list[str], *, batch: int, rounds: int, device: str) -> list[dict[str, Any]]:
    results = []
    for spec in progress(specs, "training"):
        result = time_steps(spec, batch, rounds, device)
        result["memory"] = {
            v: rdrop.measure_memory(spec, v, batch, device, module="benchmarks.training")
            for v in VARIANTS
        }
        results.append(result)
    print(render(results))
    return results


def render(results: list[dict[str, Any]]) -> str:
    """Step times (median and quartiles, ms), ratios to the multi-branch step, peaks (MiB)."""
    rows = [
        [
            "model",
            "batch",
            *VARIANTS,
            "online / multi",
            "plain / multi",
            *(f"peak MiB, {v}" for v in VARIANTS),
        ]
    ]
    for r in results:
        base = r["multi-branch"]["median_ms"]
        rows.append(
            [
                r["spec"],
                str(r["batch"]),
                *(rdrop._ms(r[v]) for v in VARIANTS),
                f"{r['online merge']['median_ms'] / base:.2f}",
                f"{r['plain']['median_ms'] / base:.2f}",
                *(rdrop._mib(r["memory"][v]["peak_bytes"]) for v in VARIANTS),
            ]
        )
    return table(rows, title="one training step (forward, cross-entropy, backward, SGD step)")


if __name__ == "__main__":
    spec, variant, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(int(os.environ.get("FXFUSE_BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(memory_here(spec, variant, batch, device)))
