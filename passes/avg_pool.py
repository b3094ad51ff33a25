"""Average pooling is a layer: a depthwise conv whose every tap is ``1/kᵈ``.

    # avg_pool(x, k, s, p) -> conv(x, W = 1/kᵈ per channel, groups = C)   (count_include_pad)

Once pooling is a layer, every rule that knows layers knows pooling: a batch norm after it
folds into it (``fold-bn``), a pooling branch summed with conv branches on the same input merges
into them (``merge-branches``: YOLOv6's ``QARepVGGBlockV2``, DBB's average-pool branch after
its 1×1), and a pointwise layer before it composes with it inside a merge. A pooling left on
its own is never rewritten (no rule turns a lone layer into another).

Exact where every window divides by the same count: ``count_include_pad=True`` (the default)
or no padding, and no ``ceil_mode`` (whose last, partial window divides by fewer). The channel
count comes from the op that made the input (a layer, a batch norm, through activations and
pads, :func:`fxfuse.maps.channels_of`).

This file is the recipe for a new kind of layer: a recognizer registered with
:func:`fxfuse.maps.register_layer`, and its tests (``tests/test_avg_pool.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Node
from torch.nn.modules.pooling import _AvgPoolNd

from fxfuse import kernels
from fxfuse.dialects import AVG_POOL_FUNCTIONS, Resolver, bind, has_hooks, inherits_forward
from fxfuse.geometry import Geometry, Padding, as_ints, peel_padding
from fxfuse.maps import Layer, Refusal, as_layer, channels_of, register_layer
from fxfuse.weights import const

__all__ = ["as_average_pool"]


@register_layer
def as_average_pool(node: Node, ctx: Resolver) -> Layer | Refusal | None:
    """``nn.AvgPool{1,2,3}d``, ``F.avg_pool{1,2,3}d`` or ``aten.avg_pool2d`` as a layer."""
    if node.op == "call_module":
        module = ctx.module(str(node.target))
        if not isinstance(module, _AvgPoolNd):
            return None
        if has_hooks(module) or not inherits_forward(module):
            return Refusal(node, f"{node.target} ({type(module).__name__}) is not a plain pool")
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], Node):
            return None
        n = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(module)]  # type: ignore[index]
        params = {
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "ceil_mode": module.ceil_mode,
            "count_include_pad": module.count_include_pad,
            "divisor_override": getattr(module, "divisor_override", None),
        }
        x, name = node.args[0], str(node.target)
    elif node.op == "call_function" and node.target in AVG_POOL_FUNCTIONS:
        n = AVG_POOL_FUNCTIONS[node.target]
        params = bind(node.target, node)  # type: ignore[arg-type]
        if params is None or not isinstance(params["input"], Node):
            return None
        x, name = params["input"], node.name
    else:
        return None
    try:
        kernel = as_ints(params["kernel_size"], n)
        stride = as_ints(params["stride"] or kernel, n)
        padding = as_ints(params["padding"], n)
    except TypeError:
        return Refusal(node, f"{name}: pooling geometry computed at run time")
    if params["ceil_mode"]:
        return Refusal(node, f"{name}: ceil_mode pools a last, partial window by fewer taps")
    if any(padding) and not params["count_include_pad"]:
        return Refusal(
            node, f"{name}: count_include_pad=False divides border windows by fewer taps"
        )
    divisor = params.get("divisor_override")
    if divisor is not None and not isinstance(divisor, int):
        return Refusal(node, f"{name}: divisor computed at run time")
    channels = channels_of(x, ctx)
    if channels is None:
        return Refusal(node, f"{name}: its input's channel count is not fixed by the program")
    source, pad, barrier = peel_padding(x, Padding(tuple((p, p) for p in padding)), ctx, node)
    geometry = Geometry(stride, pad.pairs, (1,) * n, channels, pad.mode, pad_value=pad.value)
    dtype, device = _values_of(x, ctx)
    weight = const(kernels.average_kernel(channels, kernel, divisor).to(device))
    k = "x".join(map(str, kernel))
    return Layer(
        node,
        source,
        weight,
        None,
        geometry,
        "conv",
        dtype,
        device,
        (name,),
        False,
        name,
        barrier,
        label=f"{k} avg-pool",
    )


def _values_of(node: Node, ctx: Resolver) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the values pooled: those of the layer that made them, else of
    the model's first weight (the pooled values meet a layer of the model's)."""
    layer = as_layer(node, ctx)
    if isinstance(layer, Layer):
        return layer.dtype, layer.device
    meta = node.meta.get("tensor_meta")
    for tensor in ctx.tensors():
        return getattr(meta, "dtype", None) or tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")
