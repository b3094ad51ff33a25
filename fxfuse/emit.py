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
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from fxfuse.effects import Effects
from fxfuse.ops import FusedLayer, fused_layer, pad_calls

__all__ = ["build_module", "emit"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _parameter(value: Tensor, layer: FusedLayer) -> nn.Parameter:
    return nn.Parameter(
        value.to(device=layer.device, dtype=layer.dtype), requires_grad=layer.requires_grad
    )


def build_module(
    layer: FusedLayer,
) -> tuple[nn.Module, tuple[tuple[int, int], ...] | None]:
    """A fresh module computing ``layer``, and the padding to apply first (or None).

    Modules are built on the meta device and given their parameters afterwards: no random
    initialisation is computed only to be thrown away.
    """
    weight, bias = layer.weight, layer.bias
    has_bias = bias is not None
    pad: tuple[tuple[int, int], ...] | None = None
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
                pad = geo.padding
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


class _Paths:
    """Which dotted paths of the result are taken, so new modules get names of their own.

    A path is free when nothing uses it, nothing lives under it, and it does not go inside
    something used (a new module must never be added to a layer of the caller's).
    """

    def __init__(self, targets: Iterable[str]):
        self.taken: set[str] = set()
        self.prefixes: set[str] = set()
        for target in targets:
            self.take(target)

    def take(self, path: str) -> None:
        self.taken.add(path)
        parts = path.split(".")
        self.prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def free(self, path: str) -> bool:
        if path in self.taken or path in self.prefixes:
            return False
        parts = path.split(".")
        return not any(".".join(parts[:i]) in self.taken for i in range(1, len(parts)))

    def claim(self, hint: str) -> str:
        hint = hint.strip(".") or "conv"
        if not all(part.isidentifier() or part.isdigit() for part in hint.split(".")):
            hint = "fused"
        candidates = itertools.chain(
            [hint, f"{hint}_fused"], (f"{hint}_fused_{i}" for i in itertools.count(1))
        )
        path = next(c for c in candidates if self.free(c))
        self.take(path)
        return path


def _emit_padding(graph: Graph, x: Node, pairs: tuple[tuple[int, int], ...], mode: str) -> Node:
    for amounts, kwargs in pad_calls(pairs, mode):
        x = graph.call_function(F.pad, (x, amounts), kwargs)
    return x


def _lower(graph: Graph, node: Node, paths: _Paths, owned: dict[str, Any]) -> None:
    x, layer = node.args
    assert isinstance(x, Node) and isinstance(layer, FusedLayer)
    module, pad = build_module(layer)
    path = paths.claim(layer.name)
    owned[path] = module
    with graph.inserting_before(node):
        if pad is not None:
            assert layer.geometry is not None
            x = _emit_padding(graph, x, pad, layer.geometry.padding_mode)
        new = graph.call_module(path, (x,))
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _drop_dead_pure_nodes(graph: Graph, effects: Effects) -> None:
    """Erase unused attribute reads and pure function calls (``x.ndim`` nobody reads any more).

    Unused module calls stay: a module may have side effects fxfuse cannot see. A call that
    writes something, draws random numbers (the generator's state is the caller's) or runs
    unknown code stays too.
    """
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("get_attr", "call_function", "call_method"):
            continue
        if effects.pure(node):
            graph.erase_node(node)


def _held(node: Node, resolve: Callable[[str], Any], created: dict[str, Any]) -> Tensor | None:
    if node.op != "get_attr":
        return None
    target = str(node.target)
    value = created[target] if target in created else resolve(target)
    return value if isinstance(value, Tensor) else None


def _copy(value: Any, memo: dict[int, Any], target: str, notes: list[str] | None) -> Any:
    try:
        return copy.deepcopy(value, memo)
    except RuntimeError as error:  # e.g. torch.nn.utils.weight_norm's computed weight
        if notes is not None:
            notes.append(
                f"{target} ({type(value).__name__}) cannot be copied ("
                f"{str(error).splitlines()[0][:80]}…): the result shares it with your "
                "model"
            )
        return value


def emit(
    graph: Graph,
    resolve: Callable[[str], Any],
    created: dict[str, Any],
    class_name: str,
    notes: list[str] | None = None,
    effects: Effects | None = None,
) -> GraphModule:
    """The rewritten ``graph`` as a fresh, self-contained, eval-mode ``GraphModule``.

    ``resolve`` looks up a target in the caller's model; ``created`` holds what fxfuse added
    (by target). Everything the caller's model would share with the result is deep-copied,
    with one memo so weight tying survives; what cannot be copied (a module with the legacy
    ``weight_norm`` hook) is shared, and said so in ``notes``.
    """
    # new call_module targets are checked against a graph's owning module; the result owns it
    graph.owning_module = None
    if effects is None:
        effects = Effects(graph, resolve, lambda n: _held(n, resolve, created))
    _drop_dead_pure_nodes(graph, effects)
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    owned: dict[str, Any] = {t: created[t] for t in targets if t in created}
    paths = _Paths(targets)
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is fused_layer]:
        _lower(graph, node, paths, owned)
    graph.lint()
    memo: dict[int, Any] = {}
    attributes = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in attributes:
            target = str(node.target)
            attributes[target] = (
                owned[target] if target in owned else _copy(resolve(target), memo, target, notes)
            )
    fused = GraphModule(attributes, graph, class_name=class_name)
    # Eval mode for what fxfuse made (the root, containers, fused layers); a copied layer of
    # the caller's keeps its own mode: a batch norm left in training mode must stay so.
    made = {id(o) for o in owned.values()}
    kept = {
        id(m)
        for v in attributes.values()
        if isinstance(v, nn.Module) and id(v) not in made
        for m in v.modules()
    }
    for module in fused.modules():
        if id(module) not in kept:
            module.training = False
    return fused
