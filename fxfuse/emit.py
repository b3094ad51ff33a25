"""Emission: turn the rewritten graph into a self-contained, eval-mode ``GraphModule``.

- every :class:`~fxfuse.ops.FusedLayer` becomes a fresh ``nn.Conv*d``/``nn.ConvTranspose*d``/
  ``nn.Linear`` whose parameters are the exact weights cast to the layer's dtype; asymmetric
  or negative padding becomes an ``F.pad`` in front of it;
- the result keeps only what its graph uses, and owns all of it: modules and tensors it
  would otherwise share with the caller's model are deep-copied (weight tying preserved), so
  neither model can change the other.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from fxfuse.ops import FusedLayer, fused_layer

__all__ = ["build_module", "emit"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _parameter(value: Tensor, layer: FusedLayer) -> nn.Parameter:
    return nn.Parameter(
        value.to(device=layer.device, dtype=layer.dtype), requires_grad=layer.requires_grad
    )


def build_module(layer: FusedLayer) -> tuple[nn.Module, list[int] | None]:
    """A fresh module computing ``layer``, and the ``F.pad`` amounts to apply first (or None).

    Modules are built on the meta device and given their parameters afterwards: no random
    initialisation is computed only to be thrown away.
    """
    weight, bias = layer.weight, layer.bias
    has_bias = bias is not None
    pad: list[int] | None = None
    module: nn.Module
    if layer.kind == "linear":
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    else:
        geo = layer.geometry
        assert geo is not None
        k = tuple(weight.shape[2:])
        if layer.kind == "conv_transpose":
            module = _CONVT[geo.ndim](
                weight.shape[0],
                weight.shape[1] * geo.groups,
                k,
                geo.stride,
                tuple(left for left, _ in geo.padding),
                geo.output_padding,
                geo.groups,
                has_bias,
                geo.dilation,
                device="meta",
            )
        else:
            symmetric = all(left == right >= 0 for left, right in geo.padding)
            padding = tuple(left for left, _ in geo.padding) if symmetric else 0
            if not symmetric:
                pad = [a for pair in reversed(geo.padding) for a in pair]
            module = _CONV[geo.ndim](
                weight.shape[1] * geo.groups,
                weight.shape[0],
                k,
                geo.stride,
                padding,
                geo.dilation,
                geo.groups,
                has_bias,
                geo.padding_mode if symmetric else "zeros",
                device="meta",
            )
    module.weight = _parameter(weight, layer)
    if bias is not None:
        module.bias = _parameter(bias, layer)
    return module, pad


def _path_is_free(root: nn.Module, path: str) -> bool:
    """Whether ``path`` can hold a new module without touching anything else.

    Intermediate modules must be missing or plain ``nn.Module`` containers (the kind fx makes
    when it copies a module hierarchy), never a layer of the caller's.
    """
    *parents, leaf = path.split(".")
    module = root
    for name in parents:
        child = module._modules.get(name)
        if child is None:
            return not hasattr(module, name)
        if type(child) is not nn.Module:
            return False
        module = child
    return not hasattr(module, leaf)


def _free_path(root: nn.Module, hint: str) -> str:
    hint = hint.strip(".") or "conv"
    if not all(part.isidentifier() or part.isdigit() for part in hint.split(".")):
        hint = "fused"
    candidates = [hint, f"{hint}_fused"]
    for candidate in candidates:
        if _path_is_free(root, candidate):
            return candidate
    i = 1
    while not _path_is_free(root, f"{hint}_fused_{i}"):
        i += 1
    return f"{hint}_fused_{i}"


def _emit_padding(graph: Graph, x: Node, pad: list[int], mode: str) -> Node:
    crop = [min(a, 0) for a in pad]
    grow = [max(a, 0) for a in pad]
    if any(crop):
        x = graph.call_function(F.pad, (x, crop))
    if any(grow):
        x = graph.call_function(F.pad, (x, grow), {"mode": "constant" if mode == "zeros" else mode})
    return x


def _lower(gm: GraphModule, node: Node, created: set[int]) -> None:
    x, layer = node.args
    assert isinstance(x, Node) and isinstance(layer, FusedLayer)
    module, pad = build_module(layer)
    path = _free_path(gm, layer.name)
    gm.add_submodule(path, module)
    created.update(id(t) for t in [module, *module.parameters()])
    graph = gm.graph
    with graph.inserting_before(node):
        if pad is not None:
            assert layer.geometry is not None
            x = _emit_padding(graph, x, pad, layer.geometry.padding_mode)
        new = graph.call_module(path, (x,))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _resolve(root: nn.Module, target: str) -> tuple[nn.Module, str, Any]:
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, name, getattr(owner, name)


def _own(gm: GraphModule, created: set[int]) -> None:
    """Deep-copy whatever ``gm`` would share with the caller's model (one memo: ties stay)."""
    memo: dict[int, Any] = {}
    targets = sorted(
        {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")},
        key=lambda t: t.count("."),
    )
    done: set[str] = set()
    for target in targets:
        # Copied with its owner if a proper prefix was done: look the prefixes up (depth
        # lookups) rather than scan every done target (quadratic on a 10,000-block graph).
        parts = target.split(".")
        if any(".".join(parts[:i]) in done for i in range(1, len(parts))):
            continue
        owner, name, value = _resolve(gm, target)
        done.add(target)
        if id(value) in created or not isinstance(value, (nn.Module, Tensor)):
            continue
        if (
            isinstance(value, Tensor)
            and not isinstance(value, nn.Parameter)
            and (name in owner._buffers)
        ):
            owner._buffers[name] = copy.deepcopy(value, memo)
        else:
            setattr(owner, name, copy.deepcopy(value, memo))


def emit(gm: GraphModule, class_name: str) -> GraphModule:
    """The rewritten ``gm`` as a fresh, self-contained, eval-mode ``GraphModule``."""
    gm.delete_all_unused_submodules()
    created: set[int] = {id(b) for name, b in gm.named_buffers() if "_fxfuse_" in name}
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_layer]:
        _lower(gm, node, created)
    gm.graph.lint()
    fused = GraphModule(gm, gm.graph, class_name=class_name)
    _own(fused, created)
    fused.eval()
    return fused
