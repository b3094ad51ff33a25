"""Emission: turn the rewritten graph into a self-contained, eval-mode ``GraphModule``.

- every :class:`~fxfuse.maps.FusedLayer` becomes a fresh ``nn.Conv*d``/``nn.ConvTranspose*d``/
  ``nn.Linear`` whose parameters are the exact weights cast to the layer's dtype; asymmetric
  or negative padding becomes an ``F.pad`` in front of it;
- the result keeps only what its graph uses, and owns all of it: modules and tensors it
  would otherwise share with the caller's model are deep-copied (weight tying preserved), so
  neither model can change the other;
- ``print(result)`` lists submodules in the order the graph first uses them, and a container
  that holds what is left of one of the model's blocks is named after it (``FusedRepVGGBlock``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import MethodType
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from fxfuse import kernels
from fxfuse.asserts import drop_proven_rank_asserts
from fxfuse.effects import Effects
from fxfuse.geometry import Geometry, pad_calls, pad_with_value
from fxfuse.maps import FusedLayer, fused_layer
from fxfuse.rules import weight_of
from fxfuse.weights import Weight, emit_weight, evaluate, evaluate_as

_LOWERED = frozenset({fused_layer, weight_of})

__all__ = [
    "build_module",
    "copy_hooks",
    "copy_shell",
    "emit",
    "keep_attributes",
    "share_hook_functions",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _parameter(value: Tensor, layer: FusedLayer) -> nn.Parameter:
    """``value`` (already in the layer's dtype, on its device) as the layer's parameter."""
    return nn.Parameter(value, requires_grad=layer.requires_grad)


def _bare(cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` on the meta device without its ``reset_parameters``: the
    random initialisation runs through meta-tensor decompositions (~0.3 ms a conv, 3 s at
    10,000 blocks) for values that are replaced at once. An instance attribute shadows the
    method while ``__init__`` runs, and is gone before the module is returned."""
    module = cls.__new__(cls)
    object.__setattr__(module, "reset_parameters", lambda: None)
    try:
        cls.__init__(module, *args, device="meta", **kwargs)
    finally:
        vars(module).pop("reset_parameters", None)
    return module


def _module_stack(stack: Any, target: str, module: nn.Module) -> Any:
    """``stack`` (``nn_module_stack``: key -> (path, class)) cut to the modules that contain
    ``target``, then ``target`` itself."""
    if not isinstance(stack, dict):
        return stack
    kept = {
        key: entry
        for key, entry in stack.items()
        if isinstance(entry, tuple) and (not entry[0] or target.startswith(f"{entry[0]}."))
    }
    kept[target] = (target, f"{type(module).__module__}.{type(module).__qualname__}")
    return kept


def build_module(layer: FusedLayer) -> tuple[nn.Module, tuple[tuple[int, int], ...] | None]:
    """A fresh module computing ``layer``, and the padding to apply first (or None).

    The layer's weights are computed here, exactly (float64), and cast once (a large layer a
    block of output channels at a time, :func:`fxfuse.weights.evaluate_as`); modules are
    built on the meta device and given their parameters afterwards: no random initialisation
    is computed only to be thrown away."""
    if layer.kind == "conv_transpose":  # (the kernel's dim 0 is its input channels)
        (weight,) = evaluate_as([layer.weight], layer.dtype, layer.device)
        (bias,) = evaluate_as([layer.bias], layer.dtype, layer.device)
    else:
        weight, bias = evaluate_as([layer.weight, layer.bias], layer.dtype, layer.device)
    assert weight is not None
    has_bias = bias is not None
    pad: tuple[tuple[int, int], ...] | None = None
    module: nn.Module
    if layer.kind == "linear":
        module = _bare(nn.Linear, weight.shape[1], weight.shape[0], bias=has_bias)
    else:
        geo = layer.geometry
        assert geo is not None
        k = tuple(weight.shape[2:])
        if layer.kind == "conv_transpose":
            module = _bare(
                _CONVT[geo.ndim],
                weight.shape[0],
                weight.shape[1] * geo.groups,
                k,
                geo.stride,
                tuple(left for left, _ in geo.padding),
                geo.output_padding,
                geo.groups,
                has_bias,
                geo.dilation,
            )
        else:
            symmetric = geo.padding_mode != "value" and all(
                left == right >= 0 for left, right in geo.padding
            )
            padding = tuple(left for left, _ in geo.padding) if symmetric else 0
            if not symmetric:
                pad = geo.padding
            module = _bare(
                _CONV[geo.ndim],
                weight.shape[1] * geo.groups,
                weight.shape[0],
                k,
                geo.stride,
                padding,
                geo.dilation,
                geo.groups,
                has_bias,
                geo.padding_mode if symmetric else "zeros",
            )
    module.weight = _parameter(weight, layer)
    if bias is not None:
        module.bias = _parameter(bias, layer)
    return module, pad


def _reserved_names() -> frozenset[str]:
    """Names a ``GraphModule`` uses itself (``graph``, ``code``, ``meta``, ``_graph``, …) and
    the report's: a submodule of the caller's with one of them needs another name."""
    probe = GraphModule(nn.Module(), Graph())
    return frozenset({*dir(probe), *probe.__dict__, "fxfuse_report"})


_RESERVED = _reserved_names()


class _Paths:
    """Which dotted paths of the result are taken, so new modules get names of their own.

    A path is free when nothing uses it, nothing lives under it, it does not go inside
    something used (a new module must never be added to a layer of the caller's), and its
    first name is not one ``GraphModule`` needs itself. A target whose first name is such a
    name (a submodule called ``graph``) is renamed (``graph_``) by :meth:`rename`.
    """

    def __init__(self, targets: Iterable[str] = ()):
        self.taken: set[str] = set()
        self.prefixes: set[str] = set()
        self.heads: dict[str, str] = {}
        targets = list(targets)
        for target in targets:
            if target.partition(".")[0] not in _RESERVED:
                self.take(target)
        for target in targets:
            if target.partition(".")[0] in _RESERVED:
                self.take(self.rename(target))

    def take(self, path: str) -> None:
        self.taken.add(path)
        parts = path.split(".")
        self.prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def free(self, path: str) -> bool:
        if path in self.taken or path in self.prefixes:
            return False
        parts = path.split(".")
        if parts[0] in _RESERVED:
            return False
        return not any(".".join(parts[:i]) in self.taken for i in range(1, len(parts)))

    def rename(self, path: str) -> str:
        """``path``, with a first name ``GraphModule`` needs replaced by a free one."""
        head, dot, rest = path.partition(".")
        if head not in _RESERVED:
            return path
        if head not in self.heads:
            candidates = (f"{head}_{i}" if i else f"{head}_" for i in itertools.count())
            self.heads[head] = next(
                c
                for c in candidates
                if c not in _RESERVED and c not in self.taken and c not in self.prefixes
            )
        return self.heads[head] + dot + rest

    def claim(self, hint: str) -> str:
        hint = self.rename(hint.strip(".") or "conv")
        if not all(part.isidentifier() or part.isdigit() for part in hint.split(".")):
            hint = "fused"
        candidates = itertools.chain(
            [hint, f"{hint}_fused"], (f"{hint}_fused_{i}" for i in itertools.count(1))
        )
        path = next(c for c in candidates if self.free(c))
        self.take(path)
        return path


class _Lowering:
    """Turns the rules' graph functions into plain PyTorch: each :class:`FusedLayer` into a
    fresh ``nn.Conv*d``/``nn.Linear`` (or, with live weights, into the ops that compute its
    weights from the graph's inputs on every call and a functional conv), each ``weight_of``
    into an attribute (or those ops)."""

    def __init__(self, graph: Graph, paths: _Paths, owned: dict[str, Any], live: bool):
        self.graph, self.paths, self.owned, self.live = graph, paths, owned, live
        self.emitted: dict[int, Node] = {}

    def constant(self, value: Tensor) -> Node:
        path = self.paths.claim("_fxfuse_constant")
        self.owned[path] = value.detach().clone()
        return self.graph.get_attr(path)

    def weight(self, weight: Weight, layer: FusedLayer | None = None) -> Node:
        if not self.live:
            if layer is None:
                return self.constant(evaluate(weight))
            (value,) = evaluate_as([weight], layer.dtype, layer.device)
            assert value is not None
            return self.constant(value)
        node = emit_weight(weight, self.graph, self.constant, self.emitted)
        if layer is not None:
            node = self.graph.call_function(
                kernels.cast, (node,), {"dtype": layer.dtype, "device": layer.device}
            )
        return node

    def lower(self, node: Node) -> None:
        with self.graph.inserting_before(node):
            if node.target is weight_of:
                (weight,) = node.args
                assert isinstance(weight, Weight)
                new = self.weight(weight)
            else:
                new = self._layer(node)
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        module = self.owned.get(str(new.target)) if new.op == "call_module" else None
        if isinstance(module, nn.Module) and "nn_module_stack" in new.meta:
            # the stack of the node it replaced (a batch norm, a sum) is not where the new
            # module lives: torch.export keeps it, and PT2E quantizers match layers by it
            new.meta["nn_module_stack"] = _module_stack(
                new.meta["nn_module_stack"], str(new.target), module
            )
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def _layer(self, node: Node) -> Node:
        x, layer = node.args
        assert isinstance(x, Node) and isinstance(layer, FusedLayer)
        geo = layer.geometry
        if self.live:
            weight = self.weight(layer.weight, layer)
            bias = None if layer.bias is None else self.weight(layer.bias, layer)
            if geo is not None and layer.kind == "conv":
                x = self._pad(x, geo.padding, geo)
            return self.graph.call_function(
                _functional(layer), (x, weight, bias), _arguments(layer)
            )
        module, pad = build_module(layer)
        path = self.paths.claim(layer.name)
        self.owned[path] = module
        if pad is not None:
            assert geo is not None
            x = self._pad(x, pad, geo)
        return self.graph.call_module(path, (x,))

    def _pad(self, x: Node, pairs: tuple[tuple[int, int], ...], geo: Geometry) -> Node:
        value = None
        if geo.padding_mode == "value":
            assert geo.pad_value is not None
            value = self.weight(geo.pad_value)
        for amounts, kwargs in pad_calls(pairs, geo.padding_mode):
            if value is not None and kwargs:
                x = self.graph.call_function(pad_with_value, (x, amounts, value))
            else:
                x = self.graph.call_function(F.pad, (x, amounts), kwargs)
        return x


def _functional(layer: FusedLayer) -> Callable[..., Tensor]:
    if layer.kind == "linear" or layer.geometry is None:
        return F.linear
    n = layer.geometry.ndim
    if layer.kind == "conv_transpose":
        return {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]


def _arguments(layer: FusedLayer) -> dict[str, Any]:
    geo = layer.geometry
    if layer.kind == "linear" or geo is None:
        return {}
    if layer.kind == "conv_transpose":
        return {
            "stride": geo.stride,
            "padding": tuple(left for left, _ in geo.padding),
            "output_padding": geo.output_padding,
            "groups": geo.groups,
            "dilation": geo.dilation,
        }
    return {"stride": geo.stride, "padding": 0, "dilation": geo.dilation, "groups": geo.groups}


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


# what every nn.Module instance holds itself (parameters, children, hooks, flags): the rest of
# a module's __dict__ is its own plain attributes (``self.stride = 2``, ``self.f = -1``)
_MODULE_STATE = frozenset(nn.Module().__dict__)
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _deepcopy(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy``, leaving ``memo`` as it was when it fails (a failed copy registers
    half-built objects, which later copies would otherwise reuse)."""
    known = len(memo)
    try:
        return copy.deepcopy(value, memo)
    except Exception:
        for key in list(memo)[known:]:
            if key != id(memo):
                del memo[key]
        raise


def _copy(value: Any, memo: dict[int, Any], target: str, notes: list[str] | None) -> Any:
    """A deep copy of ``value`` (with ``memo``: weight tying survives). What cannot be copied
    — a lock, an open file, ``weight_norm``'s computed weight — is shared with the caller's
    model, one attribute at a time (a module around it is still copied), and said so in
    ``notes``."""
    try:
        return _deepcopy(value, memo)
    except Exception as error:
        if isinstance(value, nn.Module) and not hasattr(value, "__deepcopy__"):
            return _copy_module(value, memo, target, notes)
        if notes is not None:
            reason = str(error).strip().splitlines()[0][:80] if str(error).strip() else ""
            notes.append(
                f"{target} ({type(value).__name__}) cannot be copied"
                + (f" ({reason}…)" if reason else "")
                + ": the result shares it with your model"
            )
        return value


def _copy_module(
    module: nn.Module, memo: dict[int, Any], target: str, notes: list[str] | None
) -> nn.Module:
    """``module`` copied attribute by attribute, for a module ``copy.deepcopy`` cannot copy
    as a whole."""
    new = object.__new__(type(module))
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key in ("_modules", "_parameters", "_buffers"):
            state[key] = {
                name: None if item is None else _copy(item, memo, f"{target}.{name}", notes)
                for name, item in value.items()
            }
        else:
            state[key] = _copy(value, memo, f"{target}.{key}", notes)
    new.__dict__.update(state)
    return new


def share_hook_functions(model: nn.Module, memo: dict[int, Any]) -> None:
    """Make copies of ``model``'s modules call the same hook objects as the originals.

    A hook records into something of the user's (a dict a closure or a ``functools.partial``
    holds, an object a bound method belongs to): a copied hook would record into a copy no
    one reads. Only a bound method of the hooked module itself (or of a module inside it) is
    copied with it, so it keeps acting on its own module.
    """
    for module in model.modules():
        inside: set[int] | None = None
        for name in _HOOK_DICTS:
            for hook in getattr(module, name, {}).values():
                owner = getattr(hook, "__self__", None)
                if isinstance(hook, MethodType) and isinstance(owner, nn.Module):
                    inside = inside if inside is not None else {id(m) for m in module.modules()}
                    if id(owner) in inside:
                        continue
                memo.setdefault(id(hook), hook)


def copy_hooks(source: nn.Module, target: nn.Module, memo: dict[int, Any]) -> None:
    """Give ``target`` the forward/backward (pre-)hooks of ``source``, in order, with the same
    hook objects (a bound method of a module that has a copy in ``memo`` acts on the copy)."""
    for name in (*_HOOK_DICTS, *_HOOK_FLAGS):
        hooks = getattr(source, name, None)
        if hooks is None:
            continue
        copied = OrderedDict()
        for key, hook in hooks.items():
            owner = getattr(hook, "__self__", None)
            if id(hook) in memo:
                hook = memo[id(hook)]
            elif isinstance(hook, MethodType) and id(owner) in memo:
                hook = MethodType(hook.__func__, memo[id(owner)])
            copied[key] = hook
        target.__dict__[name] = copied


_HOOK_FLAGS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_is_full_backward_hook",
)


def copy_shell(
    module: nn.Module,
    children: dict[str, nn.Module | None],
    memo: dict[int, Any],
    notes: list[str] | None,
    *,
    target: str,
    shell: nn.Module | None = None,
) -> nn.Module:
    """A copy of ``module`` that keeps its class, its plain attributes (copied) and its hooks,
    with ``children`` in place of its submodules: the module kept as Python code around the
    parts fxfuse fused. ``shell`` is the object to fill (made in advance, so references to
    ``module`` met while copying resolve to it); its parameters and buffers are copies."""
    new = shell if shell is not None else object.__new__(type(module))
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {name: children.get(name) for name in value}
        elif key in ("_parameters", "_buffers"):
            state[key] = {
                name: None if item is None else _copy(item, memo, f"{target}.{name}", notes)
                for name, item in value.items()
            }
        elif key in _HOOK_DICTS or key in _HOOK_FLAGS:
            continue
        else:
            state[key] = _copy(value, memo, f"{target}.{key}" if target else key, notes)
    new.__dict__.update(state)
    copy_hooks(module, new, memo)
    return new


def keep_attributes(
    part: GraphModule, module: nn.Module, memo: dict[int, Any], notes: list[str] | None
) -> GraphModule:
    """Make ``part`` (``module`` fused into a graph) answer as ``module`` did to the Python code
    around it: an instance of ``module``'s class (``isinstance`` holds, its other methods
    work) whose plain attributes (``m.f``, ``m.stride``) are copies of ``module``'s.

    Every method of ``nn.Module`` itself — calling, ``train``, ``state_dict``, ``repr`` —
    stays the ``GraphModule``'s; a name ``GraphModule`` uses itself is not copied.
    """
    names = set(dir(part)) | set(part.__dict__)
    for key, value in module.__dict__.items():
        if key not in _MODULE_STATE and key not in names:
            part.__dict__[key] = _copy(value, memo, key, notes)
    # (a class with a metaclass or __slots__ of its own: a plain GraphModule it stays)
    with contextlib.suppress(TypeError):
        part.__class__ = _fused_class(type(part), type(module))
    return part


def _fused_class(graph_class: type, original: type) -> type:
    """``graph_class`` with ``original`` behind it: ``nn.Module``'s own methods stay the
    ``GraphModule``'s (``original``'s overrides of them, a ``train`` or ``_apply`` that reads
    submodules fused away, are skipped), ``original``'s other methods and properties answer."""
    own = set().union(*(vars(k) for k in graph_class.__mro__ if k not in (nn.Module, object)))
    pinned = {
        name: value
        for name, value in vars(nn.Module).items()
        if name not in own
        and name not in ("__dict__", "__weakref__", "__module__", "__doc__", "__annotations__")
    }
    # GraphModule.recompile (pickling runs it) wraps the class's __call__ once per class; the
    # one the GraphModule class already has must stay the one used, or calls recurse
    for name in ("_wrapped_call", "__call__"):
        if name in vars(graph_class):
            pinned[name] = vars(graph_class)[name]
    pinned["__deepcopy__"] = _deepcopy_part
    pinned["__qualname__"] = pinned["__name__"] = graph_class.__name__
    return type(graph_class.__name__, (graph_class, original), pinned)


def _deepcopy_part(self: GraphModule, memo: dict[int, Any]) -> GraphModule:
    """``copy.deepcopy`` of a part that keeps its module's class: a copy of its state on the
    same class (``GraphModule``'s own copy would run the module's ``__init__``)."""
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    new._graph.owning_module = new  # type: ignore[attr-defined]
    return new


def emit(
    graph: Graph,
    resolve: Callable[[str], Any],
    created: dict[str, Any],
    class_name: str,
    notes: list[str] | None = None,
    effects: Effects | None = None,
    live: bool = False,
    *,
    memo: dict[int, Any] | None = None,
) -> GraphModule:
    """The rewritten ``graph`` as a fresh, self-contained, eval-mode ``GraphModule``.

    ``resolve`` looks up a target in the caller's model; ``created`` holds what fxfuse added
    or built itself (by target), which the result holds as it is. Everything the caller's
    model would share with the result is deep-copied, with one ``memo`` (pass one to share it
    across results) so weight tying survives; what cannot be copied (a module with the legacy
    ``weight_norm`` hook, a lock) is shared, and said so in ``notes``. A target whose name
    ``GraphModule`` needs itself (a submodule called ``graph`` or ``meta``) is renamed. With
    ``live`` weights, fused layers compute their weights from the graph's inputs on every call
    (the compile backend).
    """
    # new call_module targets are checked against a graph's owning module; the result owns it
    graph.owning_module = None
    if effects is None:
        effects = Effects(graph, resolve, lambda n: _held(n, resolve, created))
    drop_proven_rank_asserts(
        graph, lambda target: created[target] if target in created else resolve(target)
    )
    _drop_dead_pure_nodes(graph, effects)
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    owned: dict[str, Any] = {t: created[t] for t in targets if t in created}
    paths = _Paths(targets)
    source: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            new = paths.rename(str(node.target))
            source.setdefault(new, str(node.target))
            node.target = new
    lowering = _Lowering(graph, paths, owned, live)
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _LOWERED]:
        lowering.lower(node)
    graph.lint()
    memo = {} if memo is None else memo
    attributes = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in attributes:
            target = str(node.target)
            old = source.get(target, target)
            attributes[target] = (
                owned[target]
                if target in owned
                else owned[old]
                if old in owned
                else _copy(resolve(old), memo, old, notes)
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
    _tidy(fused, resolve)
    return fused


class FusedContainer(nn.Module):
    """A submodule that only holds others: what is left of one of the model's blocks.
    Printed as ``Fused`` + that block's class name."""

    block_name = "Module"

    def _get_name(self) -> str:
        return f"Fused{self.block_name}"


def _tidy(fused: GraphModule, resolve: Callable[[str], Any]) -> None:
    """Order every module's children by first use in the graph (``GraphModule`` installs the
    shallowest paths first, so a head printed before the blocks), and turn the plain
    containers ``GraphModule`` makes into :class:`FusedContainer` named after the original."""
    first_use: dict[str, int] = {}
    for node in fused.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            for i in range(1, len(parts) + 1):
                first_use.setdefault(".".join(parts[:i]), len(first_use))
    for path, module in fused.named_modules():
        prefix = f"{path}." if path else ""
        if len(module._modules) > 1:
            module._modules = dict(
                sorted(
                    module._modules.items(),
                    key=lambda item: first_use.get(prefix + item[0], len(first_use)),
                )
            )
        if path and type(module) is nn.Module:
            try:
                original = resolve(path)
            except AttributeError:
                original = None
            module.__class__ = FusedContainer
            if isinstance(original, nn.Module):
                vars(module)["block_name"] = type(original).__name__
