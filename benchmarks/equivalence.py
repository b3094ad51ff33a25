"""The README's model table: ops executed before → after for fxfuse and timm's converter.

``python -m benchmarks equivalence`` builds each model with random weights and random batch-norm
statistics, in float64 (repvgg_d2se with random statistics is too ill-conditioned for a
float32 comparison to mean anything), fuses it with ``fxfuse.optimize`` and, for timm's
families, with ``timm.utils.model.reparameterize_model``, and prints a markdown table of the
convolutions / batch norms that execute, the normalised errors and the parameter counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error

TORCHVISION = [
    "resnet50",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "convnext_tiny",
]


def _timm_models() -> list[str]:
    import timm

    return timm.list_models("repvgg*") + timm.list_models("mobileone*")


def _parameters(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def _row(
    label: str, build: Callable[[], nn.Module], converter: Callable[[nn.Module], nn.Module] | None
) -> str:
    torch.manual_seed(0)
    model = randomize_batch_norms(build().eval()).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused = fxfuse.optimize(model)
    before, after = count_ops(model, x), count_ops(fused, x)
    with torch.no_grad():
        reference = model(x)
        ours = relative_error(reference, fused(x))
        theirs_ops, theirs = "—", "—"
        if converter is not None:
            converted = converter(copy.deepcopy(model))
            counted = count_ops(converted, x)
            theirs_ops = f"{counted['conv']} / {counted['batch_norm']}"
            theirs = f"{relative_error(reference, converted(x)):.1e}"
    return (
        f"| {label} | {before['conv']} / {before['batch_norm']} | "
        f"{after['conv']} / {after['batch_norm']} | {theirs_ops} | {ours:.1e} | {theirs} | "
        f"{_parameters(model)} → {_parameters(fused)} |"
    )


def rows() -> Iterator[str]:
    import timm
    import torchvision
    from timm.utils.model import reparameterize_model

    yield (
        "| model | convs / BNs executed | fxfuse | timm's converter | error, fxfuse | "
        "error, timm | parameters |"
    )
    yield "|---|---|---|---|---|---|---|"
    for name in _timm_models():
        yield _row(
            f"timm `{name}`",
            lambda n=name: timm.create_model(n, pretrained=False),
            reparameterize_model,
        )
    for name in TORCHVISION:
        yield _row(
            f"torchvision `{name}`",
            lambda n=name: torchvision.models.get_model(n, weights=None),
            None,
        )


def main() -> None:
    for row in rows():
        print(row, flush=True)
