"""What INT8 will do to a fused model's weights, before deploying it.

Folding batch norms multiplies every output channel of a conv by its ``γ/σ``, and merging
branches sums kernels of different scales: fused layers whose channels' weight ranges differ by
orders of magnitude. Symmetric per-tensor INT8 gives every channel the step of the widest one;
a channel 100× narrower keeps barely one bit. :func:`quant_report` says, per layer, how bad it
is — the per-tensor over the typical per-channel range, the outlier channels, and the SQNR of
the weights rounded to symmetric INT8 per tensor and per channel (computed, not estimated) —
so a user sees which layers will suffer and whether ``fxfuse.optimize(..., equalize=True)``
helped. :func:`fake_quantize_weights` gives the model with its weights so rounded, to measure
the output (:func:`output_sqnr`). :func:`pt2e_quantize` takes a fused model the whole way to
INT8 with torch's own flow — ``torch.export``, then torchao's PT2E ``prepare_pt2e`` /
calibration / ``convert_pt2e`` with the X86 inductor quantizer (weights per channel, its
default, or per tensor) — ``pip install fxfuse[quant]``.

The arithmetic is in :mod:`fxfuse.kernels` (``quantize_symmetric``, ``sqnr_db``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from fxfuse import kernels

__all__ = [
    "LayerQuantization",
    "QuantReport",
    "fake_quantize_weights",
    "output_sqnr",
    "pt2e_quantize",
    "quant_report",
]

#: a channel whose range exceeds this many times the median channel's is an outlier
OUTLIER_RATIO = 8.0


@dataclass(frozen=True)
class LayerQuantization:
    """One layer's weights under symmetric INT8.

    ``range_ratio``: the per-tensor range (the widest channel's) over the median per-channel
    range — how many times coarser per-tensor steps are than a typical channel needs.
    ``outliers``: output channels wider than ``OUTLIER_RATIO`` × the median. ``sqnr_per_tensor``
    and ``sqnr_per_channel``: each output channel's ``10·log10(‖W_c‖² / ‖W_c − Q(W)_c‖²)``,
    averaged in dB over the channels (each output channel carries its own signal on; the SQNR
    of the whole tensor would be the widest channels' alone)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    range_ratio: float
    outliers: tuple[int, ...]
    sqnr_per_tensor: float
    sqnr_per_channel: float

    @property
    def loss_db(self) -> float:
        """What per-tensor quantization costs over per-channel, in dB."""
        return self.sqnr_per_channel - self.sqnr_per_tensor


@dataclass
class QuantReport:
    """Per-layer weight statistics under symmetric ``bits``-bit quantization; ``str()`` is a
    table, worst per-tensor SQNR first."""

    bits: int
    layers: list[LayerQuantization] = field(default_factory=list)

    def worst(self, n: int = 5) -> list[LayerQuantization]:
        """The ``n`` layers with the lowest per-tensor SQNR."""
        return sorted(self.layers, key=lambda layer: layer.sqnr_per_tensor)[:n]

    @property
    def mean_sqnr_per_tensor(self) -> float:
        return _mean(layer.sqnr_per_tensor for layer in self.layers)

    @property
    def mean_sqnr_per_channel(self) -> float:
        return _mean(layer.sqnr_per_channel for layer in self.layers)

    def __str__(self) -> str:
        lines = [
            f"INT{self.bits} weight report ({len(self.layers)} layers; symmetric; "
            f"mean SQNR per-tensor {self.mean_sqnr_per_tensor:.1f} dB, "
            f"per-channel {self.mean_sqnr_per_channel:.1f} dB)",
            f"  {'layer':<28} {'kind':<14} {'range':>7} {'outliers':>8} "
            f"{'tensor dB':>9} {'channel dB':>10}",
        ]
        for layer in self.worst(len(self.layers)):
            lines.append(
                f"  {_short(layer.name, 28):<28} {layer.kind:<14} {layer.range_ratio:>6.1f}x "
                f"{len(layer.outliers):>8} {layer.sqnr_per_tensor:>9.1f} "
                f"{layer.sqnr_per_channel:>10.1f}"
            )
        return "\n".join(lines)


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


WeightLayer = _ConvNd | nn.Linear


def _layers(model: nn.Module) -> list[tuple[str, WeightLayer]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (_ConvNd, nn.Linear)) and isinstance(module.weight, Tensor)
    ]


def _output_major(module: WeightLayer) -> Tensor:
    """The weight with output channels on dim 0 (a transposed conv's are on dim 1, per group)."""
    weight = module.weight.detach()
    if isinstance(module, _ConvNd) and module.transposed:
        g = module.groups
        w = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:]).transpose(1, 2)
        return w.reshape(weight.shape[1] * g, weight.shape[0] // g, *weight.shape[2:])
    return weight


def _kind(module: WeightLayer) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    text = "x".join(map(str, module.kernel_size)) + (" convT" if module.transposed else " conv")
    return text + (f" g{module.groups}" if module.groups != 1 else "")


def layer_quantization(name: str, module: WeightLayer, bits: int = 8) -> LayerQuantization:
    """:class:`LayerQuantization` of one conv or linear ``module``."""
    weight = kernels.exact(_output_major(module))
    ranges = weight.reshape(weight.shape[0], -1).abs().amax(dim=1)
    median = float(ranges.median())
    top = float(ranges.max())
    ratio = top / median if median > 0 else (1.0 if top == 0 else math.inf)
    outliers = tuple(int(c) for c in torch.nonzero(ranges > OUTLIER_RATIO * median).flatten())
    return LayerQuantization(
        name=name,
        kind=_kind(module),
        shape=tuple(module.weight.shape),
        range_ratio=ratio,
        outliers=outliers,
        sqnr_per_tensor=_mean_db(weight, kernels.quantize_symmetric(weight, bits=bits)),
        sqnr_per_channel=_mean_db(
            weight, kernels.quantize_symmetric(weight, bits=bits, per_channel=True)
        ),
    )


def _mean_db(weight: Tensor, rounded: Tensor) -> float:
    """The channels' SQNR averaged in dB (channels kept exactly, or all zero, left out)."""
    db = kernels.channel_sqnr_db(weight, rounded)
    db = db[torch.isfinite(db)]
    return float(db.mean()) if db.numel() else math.inf


def quant_report(model: nn.Module, *, bits: int = 8) -> QuantReport:
    """Per conv and linear layer of ``model`` (fused or not), how its weights fare under
    symmetric ``bits``-bit quantization, per tensor and per output channel. Reads the
    weights; changes nothing."""
    return QuantReport(bits, [layer_quantization(n, m, bits) for n, m in _layers(model)])


def fake_quantize_weights(
    model: nn.Module, *, bits: int = 8, per_channel: bool = False
) -> nn.Module:
    """A copy of ``model`` whose conv and linear weights are rounded to symmetric ``bits``-bit
    values (per tensor, or per output channel) and stored back in their dtype; biases and
    activations stay as they are. The caller's model is not changed."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in _layers(quantized):
            weight = _output_major(module)
            rounded = kernels.quantize_symmetric(weight, bits=bits, per_channel=per_channel)
            if isinstance(module, _ConvNd) and module.transposed:
                g = module.groups
                rounded = rounded.reshape(g, weight.shape[0] // g, *weight.shape[1:])
                rounded = rounded.transpose(1, 2).reshape(module.weight.shape)
            module.weight.copy_(rounded.to(module.weight.dtype))
    return quantized


def output_sqnr(reference: nn.Module, candidate: nn.Module, inputs: Sequence[Any]) -> float:
    """SQNR (dB) of ``candidate``'s output against ``reference``'s on the same ``inputs``."""
    with torch.no_grad():
        return kernels.sqnr_db(reference(*inputs), candidate(*inputs))


def pt2e_quantize(
    model: nn.Module,
    example_inputs: Sequence[Any],
    calibration: Iterable[Sequence[Any]],
    *,
    per_channel: bool = True,
) -> nn.Module:
    """``model`` quantized to INT8 by torchao's PT2E flow: ``torch.export`` with
    ``example_inputs``, ``prepare_pt2e`` with the X86 inductor quantizer (activations uint8
    per tensor, histogram-calibrated; weights int8 symmetric, per output channel — its default
    — or, with ``per_channel=False``, per tensor), one forward per item of ``calibration``,
    then ``convert_pt2e``. Returns the converted ``GraphModule`` (quantize/dequantize ops
    around float ops: it computes what the INT8 kernels will). ``model`` is not changed.

    Raises:
        ImportError: torchao is not installed (``pip install fxfuse[quant]``).
    """
    try:
        from torchao.quantization.pt2e import MinMaxObserver
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import QuantizationSpec
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as error:
        raise ImportError(
            f"fxfuse.quant.pt2e_quantize needs torchao ({error}); pip install 'fxfuse[quant]'"
        ) from error
    config = get_default_x86_inductor_quantization_config()
    if not per_channel:
        weight = QuantizationSpec(
            dtype=torch.int8,
            quant_min=-127,
            quant_max=127,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=False,
            observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
        )
        config = dataclasses.replace(config, weight=weight)
    program = torch.export.export(model, tuple(example_inputs))
    prepared = prepare_pt2e(program.module(), X86InductorQuantizer().set_global(config))
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    return convert_pt2e(prepared)
