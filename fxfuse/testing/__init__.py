"""Helpers for testing fused models: op counting at run time, errors, random statistics.

``count_ops`` counts the ops that really execute (a ``TorchDispatchMode``), not the nodes a
graph happens to contain, so "one conv per block" is checked where it matters.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "OpCounter",
    "count_flops",
    "count_ops",
    "count_ops_profiled",
    "randomize_batch_norms",
    "relative_error",
    "trained_like_batch_norms",
]


def _category(name: str) -> str | None:
    if "convolution" in name:
        return "conv"
    if "batch_norm" in name:
        return "batch_norm"
    return None


class OpCounter(TorchDispatchMode):
    """Counts executed aten ops: ``counts["conv"]``, ``counts["batch_norm"]`` and by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket.__name__)
        self.counts[name] += 1
        category = _category(name)
        if category is not None:
            self.counts[category] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: Callable[..., Any], *inputs: Any) -> Counter[str]:
    """Run ``model(*inputs)`` once without grad and count the aten ops it executed.

    Works on eager and ``torch.fx`` modules. (Under ``torch.compile`` the mode makes compiled
    code fall back to eager; count those with ``torch.profiler`` instead.)
    """
    counter = OpCounter()
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.counts


def count_ops_profiled(model: Callable[..., Any], *inputs: Any) -> Counter[str]:
    """Like :func:`count_ops` (op names keyed ``"aten::…"``), but with ``torch.profiler``,
    which sees inside compiled code.

    Under ``torch.compile`` a dispatch mode makes the compiled function fall back to eager, so
    :func:`count_ops` would count the unfused model (docs/design.md, trap 10); the profiler
    records the operators that really run: ``aten::…`` and the ``mkldnn::…`` convolutions
    Inductor's CPU freezing uses. A kernel Inductor generated is not an operator, even where its
    name says what it fused (``triton_poi_fused__native_batch_norm_legit_…_relu`` is one kernel,
    not a batch norm). ``counts["conv"]``/``counts["batch_norm"]`` count the outermost event of
    each kind (``aten::conv2d`` → ``aten::convolution`` → … is one convolution).

    TorchScript's frozen mkldnn convolutions record no profiler event; for a
    ``torch.jit.ScriptModule`` the nodes of its (inlined) graph are counted instead.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return _count_script_nodes(model)
    counts: Counter[str] = Counter()
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile,
    ):
        model(*inputs)
    for event in profile.events():
        if not event.name.startswith(("aten::", "mkldnn::")):
            continue
        counts[event.name] += 1  # keyed "aten::name": "batch_norm" is a category here
        category = _category(event.name)
        if category is None:
            continue
        parent = event.cpu_parent
        while parent is not None and _category(parent.name) != category:
            parent = parent.cpu_parent
        if parent is None:
            counts[category] += 1
    return counts


def _count_script_nodes(module: torch.jit.ScriptModule) -> Counter[str]:
    counts: Counter[str] = Counter()
    for node in module.graph.nodes():
        kind = node.kind()  # aten::conv2d, prim::mkldnn_convolution, aten::batch_norm, …
        counts[kind] += 1
        if "conv" in kind:
            counts["conv"] += 1
        elif "batch_norm" in kind:
            counts["batch_norm"] += 1
    return counts


def count_flops(model: Callable[..., Any], *inputs: Any) -> int:
    """Floating-point operations of one ``model(*inputs)`` call, as
    ``torch.utils.flop_counter`` counts them (convolutions and matrix products; a multiply-add
    is two)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return int(counter.get_total_flops())


def relative_error(reference: Any, candidate: Any) -> float:
    """``‖candidate − reference‖ / ‖reference‖``, the worst over matching tensors of a nested
    output (0 when both are zero). Computed in float64."""
    refs, cands = _leaves(reference), _leaves(candidate)
    if len(refs) != len(cands):
        raise ValueError(f"outputs differ in structure: {len(refs)} vs {len(cands)} tensors")
    worst = 0.0
    for r, c in zip(refs, cands, strict=True):
        if r.shape != c.shape:
            raise ValueError(f"output shapes differ: {tuple(r.shape)} vs {tuple(c.shape)}")
        r64, c64 = r.detach().double(), c.detach().double()
        scale = r64.norm()
        delta = (c64 - r64).norm()
        error = float(delta / scale) if scale > 0 else float(delta)
        worst = max(worst, error if error == error else float("inf"))
    return worst


def _leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [t for v in value for t in _leaves(v)]
    return []


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm in ``model`` random statistics and affine parameters (in place).

    Default statistics (mean 0, var 1, γ 1, β 0) make a wrong fold look right; tests and
    benchmarks should never compare with them.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: Tensor, low: float, high: float) -> None:
        values = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        t.copy_((low + (high - low) * values).to(t.dtype))

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            if module.running_mean is not None and module.running_var is not None:
                uniform(module.running_mean, -1.0, 1.0)
                uniform(module.running_var, 0.25, 2.0)
            if module.weight is not None:
                uniform(module.weight, 0.5, 1.5)
            if module.bias is not None:
                uniform(module.bias, -0.5, 0.5)
    return model


def trained_like_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm in ``model`` statistics like a trained network's (in place): γ
    log-uniform over [0.02, 5], running means N(0, 0.2²), variances U(0.5, 1.5), β 0.

    Folded into the convs, these spread the channels' weight ranges as trained models do
    (what breaks per-tensor INT8); default or mildly random statistics do not show it."""
    generator = torch.Generator().manual_seed(seed)
    low, high = math.log(0.02), math.log(5.0)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            n = module.num_features
            draw = torch.rand(n, generator=generator, dtype=torch.float64)
            if module.weight is not None:
                module.weight.copy_(torch.exp(low + (high - low) * draw).to(module.weight.dtype))
            if module.bias is not None:
                module.bias.zero_()
            if module.running_mean is not None and module.running_var is not None:
                mean = 0.2 * torch.randn(n, generator=generator, dtype=torch.float64)
                var = 0.5 + torch.rand(n, generator=generator, dtype=torch.float64)
                module.running_mean.copy_(mean.to(module.running_mean.dtype))
                module.running_var.copy_(var.to(module.running_var.dtype))
    return model
