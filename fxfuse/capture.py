"""Capture: a module in, a ``torch.fx`` graph out — or the construct that stops it, and where.

:func:`trace_part` traces one module with :class:`Tracer`, ``torch.fx.Tracer`` with these
changes:

- parameter and buffer names are looked up in a map built once per trace. ``torch.fx`` finds a
  tensor's name by scanning every parameter of the model for every functional use
  (``F.batch_norm(x, self.running_mean, …)``), which makes tracing quadratic: on timm's
  mobileone_s0 that is most of fxfuse's time (docs/design.md, trap 9);
- leaves by class (``leaf_modules=``) and by instance (a submodule with hooks, or one whose
  own code cannot be traced): the parent is traced around them;
- arguments are bound the way the module is called: non-tensor arguments with a default
  (``augment=False``, ``mask=None``) are made concrete, and ``torch.fx`` guards them (a call
  with another value raises ``AssertionError: augment has been specialized to have value
  False…``); ``forward(self, x, *args, **kwargs)`` is traced with the arguments given;
- it traces a *structural copy* of the module (new module objects sharing the caller's
  tensors), so nothing a trace writes — ``self.shape = x.shape`` in a ``forward``, the
  ``_tensor_constant0`` attributes ``torch.fx`` adds for tensors ``forward`` builds — ever
  reaches the caller's modules; global module hooks are held back while it traces, so no
  tracing ``Proxy`` reaches them either.

When the trace fails inside a submodule, :func:`trace_part` retries with that submodule
instance as a leaf; when it fails in the module's own code it returns a :class:`Failure`
naming the construct and the line. :func:`export_capture` captures with ``torch.export``
instead, functionalized and with batch and spatial dims dynamic where the model allows.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import operator
import os
import re
import sys
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.nn.modules.module as _module_hooks
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node, Proxy
from torch.fx import Tracer as FxTracer
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.proxy import TraceError
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils._sympy.numbers import int_oo

from fxfuse.effects import _function_info, _method_info
from fxfuse.errors import CaptureError

log = logging.getLogger("fxfuse")

__all__ = [
    "EXPORT",
    "SYMBOLIC",
    "Exported",
    "Failure",
    "Traced",
    "Tracer",
    "export_capture",
    "hooked",
    "is_container",
    "symbolic_capture",
    "trace_part",
]

SYMBOLIC = "torch.fx.symbolic_trace"
EXPORT = "torch.export"

# hook dictionaries of an nn.Module instance; any non-empty one makes the module a leaf
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
# what every nn.Module instance holds itself (parameters, children, hooks and their flags)
_MODULE_STATE = frozenset(nn.Module().__dict__)
_HOOK_SUFFIXES = ("hooks", "_with_kwargs", "_always_called", "_is_full_backward_hook")
# arguments torch.fx stores in a node as they are
_PLAIN_ARGUMENTS = frozenset({int, float, bool, str, type(None)})
# non-tensor defaults that are made concrete (torch.fx guards each of these types)
_CONCRETE = (bool, int, float, str, type(None))


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward or backward (pre-)hooks (global ones aside)."""
    return any(getattr(module, name, None) for name in _HOOKS)


def is_container(module: nn.Module) -> bool:
    """A module without a ``forward`` of its own (``ModuleList``, ``ModuleDict``): its parent
    uses its children, never calls it."""
    return getattr(type(module), "forward", None) is getattr(nn.Module, "forward", None)


def default_leaf(module: nn.Module) -> bool:
    """``torch.fx``'s own leaves: ``torch.nn`` layers (``Sequential`` aside)."""
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(
        module, nn.Sequential
    )


_IN_PLACE_DUNDERS = {
    "__iadd__": operator.iadd,
    "__isub__": operator.isub,
    "__imul__": operator.imul,
    "__itruediv__": operator.itruediv,
    "__ifloordiv__": operator.ifloordiv,
    "__imod__": operator.imod,
    "__ipow__": operator.ipow,
    "__iand__": operator.iand,
    "__ior__": operator.ior,
    "__ixor__": operator.ixor,
    "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
    "__imatmul__": operator.imatmul,
}


class _ModuleStack(OrderedDict):  # type: ignore[type-arg]
    """The tracer's module stack: torch.fx copies it into every node's ``nn_module_stack``
    with ``copy.copy``, which for a plain ``OrderedDict`` goes through ``__reduce_ex__``; a
    copy made by the constructor is the same dictionary at a fraction of the cost."""

    def __copy__(self) -> OrderedDict:  # type: ignore[type-arg]
        return OrderedDict(self)


class InPlaceProxy(Proxy):
    """A ``Proxy`` that records in-place operators as what they are.

    ``torch.fx.Proxy`` defines no ``__iadd__``, so Python runs ``acc += y`` as ``acc = acc + y``
    and the traced graph silently stops updating ``acc`` — a caller's tensor, or a view of
    one (``y.narrow(…)``). Here ``acc += y`` is ``operator.iadd(acc, y)`` and ``x[i] = v`` is
    ``operator.setitem(x, i, v)``, in place as in the model.
    """

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


def _in_place(op: Any) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__i{op.__name__.lstrip('i')}__"
    return method


for _dunder, _op in _IN_PLACE_DUNDERS.items():
    setattr(InPlaceProxy, _dunder, _in_place(_op))


class Tracer(FxTracer):
    """``torch.fx.Tracer`` with O(1) parameter/buffer naming, leaf classes and instances,
    arguments bound as the module is called, and buffers traced like parameters.

    ``torch.fx`` reads buffers at trace time by default, so ``self.running_var.rsqrt()`` is
    computed once and baked into the graph as a constant — and so is ``torch.rand_like(buf)``,
    which makes the traced model deterministic where the model is not. Tracing buffers keeps
    those ops in the graph: the deterministic ones are folded by ``fold-constants``, the
    random ones stay random.
    """

    def __init__(
        self,
        leaf_modules: Iterable[type[nn.Module]] = (),
        *,
        leaf_paths: Iterable[str] = (),
        proxy_buffers: bool = True,
        signature: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.proxy_buffer_attributes = proxy_buffers
        self.extra_leaves = tuple(leaf_modules)
        self.leaf_paths = frozenset(leaf_paths)
        self.signature = signature
        self._names: dict[int, str] = {}
        self._global_hooks = False
        self.module_stack = _ModuleStack()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> Graph:
        self._names = {}
        if isinstance(root, nn.Module):
            for name, buffer in root.named_buffers():
                self._names.setdefault(id(buffer), name)
            for name, param in root.named_parameters():
                self._names.setdefault(id(param), name)
        try:
            with (
                _global_hooks_held_back() as self._global_hooks,
                _RandomCallsRecorded(self),
                _autocast_refused(),
            ):
                return super().trace(root, concrete_args)
        finally:
            self._names = {}

    def create_args_for_root(
        self,
        root_fn: Callable[..., Any],
        is_module: bool,
        concrete_args: dict[str, Any] | tuple[Any, ...] | None = None,
    ) -> tuple[Any, list[Any]]:
        if self.signature is not None:
            root_fn = self.signature(root_fn)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        # torch.fx names a concrete argument's placeholder `flag_1`; the result's forward
        # keeps the module's own names, so `fused(x, augment=False)` still binds
        for node in self.graph.nodes:
            if node.op == "placeholder" and isinstance(concrete_args, dict):
                base = str(node.target).rpartition("_")[0]
                if base in concrete_args and str(node.target) == f"{base}_1":
                    node.target = base
        return fn, args

    def proxy(self, node: Node) -> Proxy:
        return InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaf_paths
            or isinstance(m, self.extra_leaves)
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        # ``nn.Identity`` hands its argument back: no node (timm puts two in every
        # normalization layer, a fifth of a graph's nodes; each costs capture, rules, emit)
        if (
            type(m) is nn.Identity
            and len(args) == 1
            and not kwargs
            and "forward" not in vars(m)  # (replaced on the instance: the user's code)
            and not hooked(m)
            and not self._global_hooks
            and not isinstance(m, self.extra_leaves)
            and self.path_of_module(m) not in self.leaf_paths
        ):
            return args[0]
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Proxy]) -> Any:
        if not isinstance(attr_val, torch.Tensor):
            return attr_val  # (submodules, flags: most attribute reads while tracing)
        if self.proxy_buffer_attributes or isinstance(attr_val, nn.Parameter):
            name = self._names.get(id(attr_val))
            if name is None or self.param_shapes_constant:
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            if name not in parameter_proxy_cache:
                parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
            return parameter_proxy_cache[name]
        return attr_val

    def create_arg(self, a: Any) -> Any:
        kind = type(a)
        if kind in _PLAIN_ARGUMENTS:
            return a  # (what torch.fx returns for them, without its type checks)
        if kind is InPlaceProxy:
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(e) for e in a])
        if kind is list:
            return [self.create_arg(e) for e in a]
        if isinstance(a, torch.Tensor) and not isinstance(a, Proxy):
            name = self._names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


class AutocastRegion(TraceError):
    """An ``autocast`` region inside ``forward``: no graph fxfuse rewrites may hold one (its
    ops compute in another precision, and a fold could move an op across its edge)."""


@contextlib.contextmanager
def _autocast_refused() -> Iterator[None]:
    """An ``autocast`` region inside ``forward`` is not traceable: ``torch.fx`` runs its
    ``__enter__`` at trace time and records nothing, so the graph would compute in another
    precision (and a fold could move an op across the region's edge). Entering one while
    tracing fails the trace, so the module that opens it stays Python around its parts."""
    autocast = torch.amp.autocast_mode.autocast
    enter = autocast.__enter__

    def refuse(self: Any) -> Any:
        raise AutocastRegion(
            "an autocast region (torch.autocast) inside forward: torch.fx cannot record it"
        )

    autocast.__enter__ = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        autocast.__enter__ = enter  # type: ignore[method-assign]


class _RandomCallsRecorded(TorchFunctionMode):
    """Records a random op whose arguments are all concrete (``torch.randn(1)``,
    ``torch.randperm(c)``) as a node, as it is recorded when an argument is traced.

    ``torch.fx`` runs such a call once, at trace time, and bakes its result into the graph:
    the traced model would draw once where the model draws on every call, and a draw nobody
    uses would vanish from the caller's random stream. The op's schema tags say whether it
    draws (:mod:`fxfuse.effects`); other calls run as they do without this mode.
    """

    def __init__(self, tracer: FxTracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if _draws_random(func) and not any(
            isinstance(a, Proxy) for a in tree_flatten((args, kwargs))[0]
        ):
            if _is_tensor_method(func):
                return self.tracer.create_proxy("call_method", func.__name__, tuple(args), kwargs)
            return self.tracer.create_proxy("call_function", func, tuple(args), kwargs)
        return func(*args, **kwargs)


_DRAWS: dict[Any, bool] = {}


def _is_tensor_method(func: Any) -> bool:
    return getattr(func, "__objclass__", None) in (torch._C.TensorBase, Tensor)


def _draws_random(func: Any) -> bool:
    """Whether ``func`` surely draws random numbers (by its schema's tags)."""
    try:
        found = _DRAWS.get(func)
    except TypeError:  # unhashable
        return False
    if found is None:
        method = _is_tensor_method(func)  # (called on a concrete tensor)
        info = _method_info(func.__name__) if method else _function_info(func)
        found = _DRAWS[func] = info.random is True
    return found


@contextlib.contextmanager
def _global_hooks_held_back() -> Iterator[bool]:
    """Global module hooks (``register_module_forward_hook``) see every module call; a trace's
    calls are not calls, and their values are ``Proxy`` objects: hold the hooks back while
    tracing (this thread and every other, for the trace's duration) and restore them. Yields
    whether there were any."""
    saved = [(d, OrderedDict(d)) for d in (getattr(_module_hooks, n) for n in _GLOBAL_HOOKS)]
    if not any(copy for _, copy in saved):
        yield False
        return
    for hooks, _ in saved:
        hooks.clear()
    try:
        yield True
    finally:
        for hooks, copy in saved:
            hooks.clear()
            hooks.update(copy)


# --------------------------------------------------------------------------------------------
# A structural copy to trace
# --------------------------------------------------------------------------------------------


def structural_copy(
    module: nn.Module,
    *,
    hooks: bool = True,
    own_buffers: bool = False,
    own_parameters: bool = False,
) -> nn.Module:
    """New module objects with ``module``'s structure, sharing its tensors and values.

    Tracing runs ``forward``, and ``forward`` may write to ``self`` (``self.shape = …``, a
    cache dict filled per device, ``torch.fx``'s ``_tensor_constant0``); on this copy those
    writes land on objects fxfuse owns: the modules, and the lists, dicts and sets among
    their plain attributes, are new. Parameters and buffers are the caller's own tensors, so
    the graph's targets name them exactly. ``hooks=False`` leaves the copies without the
    modules' hooks (to run it without calling the user's hooks); ``own_buffers`` gives it
    copies of the buffers (to run it: a forward that updates a buffer in place must not
    update the caller's, nor teach the copy a value the caller's model does not hold), and
    ``own_parameters`` of the parameters (a forward may write a weight under ``no_grad``).
    """
    made: dict[int, Any] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in made:
            return made[id(m)]  # type: ignore[no-any-return]
        new = object.__new__(type(m))
        made[id(m)] = new
        state = dict(m.__dict__)
        for key, value in state.items():
            if key in _MODULE_STATE:  # parameters, hooks, …: new containers, same items
                if isinstance(value, (dict, set)):
                    kept = hooks or not key.endswith(_HOOK_SUFFIXES)
                    state[key] = type(value)(value if kept else ())
            elif isinstance(value, (list, dict, set, tuple)):
                state[key] = _unshared(value, made)
        state["_modules"] = {k: None if c is None else visit(c) for k, c in m._modules.items()}
        if own_buffers:
            state["_buffers"] = {
                k: None if b is None else _owned(b, made) for k, b in m._buffers.items()
            }
        if own_parameters:
            state["_parameters"] = {
                k: None if p is None else _owned(p, made, parameter=True)
                for k, p in m._parameters.items()
            }
        new.__dict__.update(state)
        return new

    with _no_collection():
        return visit(module)


def _owned(tensor: torch.Tensor, made: dict[int, Any], parameter: bool = False) -> torch.Tensor:
    """A copy of ``tensor``, one per tensor (a buffer registered twice stays one)."""
    if id(tensor) not in made:
        clone = tensor.detach().clone()
        made[id(tensor)] = nn.Parameter(clone, tensor.requires_grad) if parameter else clone
    return made[id(tensor)]  # type: ignore[no-any-return]


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No garbage collection while a copy makes many small objects that all stay alive: its
    scans would take three quarters of the time (2,000 blocks: 1.7 s, 0.45 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _unshared(value: Any, made: dict[int, Any]) -> Any:
    """``value`` with new lists, dicts and sets (to any depth; tuples rebuilt around them)
    and everything else shared."""
    if id(value) in made:
        return made[id(value)]
    if isinstance(value, (list, dict, set)):
        try:
            new = copy.copy(value)
        except Exception:  # a container that does not copy: shared, as before
            return value
        made[id(value)] = new
        if isinstance(new, dict):
            for key in list(new):
                new[key] = _unshared(new[key], made)
        elif isinstance(new, list):
            new[:] = [_unshared(item, made) for item in new]
        return new
    if type(value) is tuple and any(isinstance(v, (list, dict, set, tuple)) for v in value):
        return tuple(_unshared(v, made) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Tracing one part
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """Why a module's own code cannot be traced: ``construct`` (what ``torch.fx`` met) and
    ``where`` (``file:line `code```), with the error itself."""

    construct: str
    where: str
    error: BaseException = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.construct} at {self.where}" if self.where else self.construct


@dataclass
class Traced:
    """A module's ``forward`` as a graph. Its targets name attributes of ``root`` (a
    :func:`structural_copy`, which also holds the tensors ``forward`` builds); ``leaves``
    maps each submodule kept whole, by path, to why (``leaf_modules``, its hooks, or the
    :class:`Failure` in its own code)."""

    graph: Graph
    root: nn.Module
    leaves: dict[str, str | Failure] = field(default_factory=dict)
    how: str = SYMBOLIC


def trace_part(
    module: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    given: Sequence[Any] | None = None,
    given_kwargs: dict[str, Any] | None = None,
) -> Traced | Failure:
    """Trace ``module``'s ``forward``, keeping whole what cannot be traced through.

    A submodule with hooks is a leaf from the start (its hooks must keep firing, with real
    values). When tracing fails inside a submodule, that instance becomes a leaf and the trace
    is repeated; when it fails in ``module``'s own code, the :class:`Failure` is returned.

    ``given``/``given_kwargs`` are the arguments ``module`` is called with, where they are
    known (the example inputs at the top; a graph's call site for a leaf): plain values
    (bool, int, float, str, None) are made concrete, anything else becomes a placeholder.
    Arguments not given that have a plain default are made concrete to it (but a ``None``
    default annotated as a tensor stays a placeholder unless the call is known);
    ``concrete_args`` (``torch.fx``'s) override both.
    """
    leaf_modules = tuple(leaf_modules)
    leaves: dict[str, str | Failure] = {
        path: "forward hooks"
        for path, m in module.named_modules()
        if path and hooked(m) and not default_leaf(m)
    }
    concrete, signature = _binding(module, given, given_kwargs or {}, concrete_args)
    buffers_tried = False
    for _ in range(sum(1 for _ in module.modules()) + 1):
        copy = structural_copy(module)
        tracer = Tracer(leaf_modules, leaf_paths=leaves, signature=signature)
        try:
            graph = tracer.trace(copy, dict(concrete))
        except Exception as error:  # any error in user code stops the trace
            retrace = None
            if not buffers_tried and _is_control_flow(error):  # once: it costs a trace
                buffers_tried = True
                retrace = _buffer_valued_retrace(
                    module, error, leaf_modules, leaves, signature, concrete
                )
            if retrace is None:
                path = _failing_submodule(error, copy, leaves)
                if path is None:
                    return _failure(error)
                leaves[path] = _failure(error)
                log.debug("fxfuse: %s is kept whole: %s", path, leaves[path])
                continue
            graph, copy = retrace
        for path, m in copy.named_modules():
            if path and path not in leaves and isinstance(m, leaf_modules):
                leaves[path] = "leaf_modules"
        if signature is not None:
            _refuse_further_arguments(graph, module)
        used = {str(n.target) for n in graph.nodes if n.op == "call_module"}
        return Traced(graph, copy, {p: why for p, why in leaves.items() if p in used})
    raise AssertionError("unreachable: every retry keeps one more submodule whole")


def _is_control_flow(error: BaseException) -> bool:
    return isinstance(error, TraceError) and "control flow" in str(error)


def _buffer_valued_retrace(
    module: nn.Module,
    error: Exception,
    leaf_modules: tuple[type[nn.Module], ...],
    leaves: dict[str, Any],
    signature: Callable[[Callable[..., Any]], Callable[..., Any]] | None,
    concrete: dict[str, Any],
) -> tuple[Graph, nn.Module] | None:
    """Some models branch on a buffer's value: read buffers at trace time, as fx does."""
    copy = structural_copy(module)
    try:
        graph = Tracer(
            leaf_modules, leaf_paths=leaves, signature=signature, proxy_buffers=False
        ).trace(copy, dict(concrete))
    except Exception:
        return None
    log.info(
        "fxfuse: tracing %s with traced buffers failed (%s); buffers were read at trace time",
        type(module).__name__,
        str(error).splitlines()[0],
    )
    return graph, copy


def _binding(
    module: nn.Module,
    given: Sequence[Any] | None,
    given_kwargs: dict[str, Any],
    concrete_args: dict[str, Any] | None,
) -> tuple[dict[str, Any], Callable[[Callable[..., Any]], Callable[..., Any]] | None]:
    """The concrete arguments to trace ``module.forward`` with, and for a ``forward`` with
    ``*args``/``**kwargs`` or keyword-only parameters, a signature with named parameters
    only (``torch.fx`` would hand ``*args`` over as one ``Proxy``, which cannot be iterated)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return dict(concrete_args or {}), None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    values = list(given) if given is not None else []
    extra = max(len(values) - len(positional), 0) if varargs else 0
    concrete: dict[str, Any] = {}
    for i, p in enumerate([*positional, *keyword]):
        value = (
            values[i] if i < min(len(values), len(positional)) else given_kwargs.get(p.name, _NOT)
        )
        if value is _NOT and p.default is not p.empty and not _optional_tensor(p, given):
            value = p.default
        if value is not _NOT and isinstance(value, _CONCRETE):
            concrete[p.name] = value
    for i in range(extra):
        if isinstance(values[len(positional) + i], _CONCRETE):
            concrete[f"args_{i}"] = values[len(positional) + i]
    concrete.update(concrete_args or {})
    if len(positional) == len(params):
        return concrete, None
    return concrete, lambda fn: _named_signature(fn, positional, extra, keyword)


_NOT = object()


def _optional_tensor(param: inspect.Parameter, given: Sequence[Any] | None) -> bool:
    """A ``mask: Tensor | None = None`` the caller may pass a tensor for: a placeholder, not
    a concrete ``None``, unless the call is known (example inputs without it)."""
    annotation = param.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return param.default is None and given is None and "Tensor" in text


@torch.fx.node.has_side_effect
def no_further_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], captured: str) -> None:
    """Raise if a call passes arguments the capture did not see (in a graph traced from a
    ``forward(self, x, *args, **kwargs)`` with none of them)."""
    if args or kwargs:
        given = [f"{len(args)} more positional"] if args else []
        given += [f"{k}=" for k in kwargs]
        raise TypeError(
            f"{captured} was fused as called without further arguments, and this call "
            f"passes {', '.join(given)}: fuse it with example inputs that include them"
        )


def _refuse_further_arguments(graph: Graph, module: nn.Module) -> None:
    """Give the traced ``forward`` its ``*args``/``**kwargs`` back, checked to be empty: a
    call with a flag the trace never saw raises instead of running the graph without it."""
    params = list(inspect.signature(type(module).forward).parameters.values())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = ", ".join(str(n.target) for n in placeholders)
    varargs = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    varkw = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
    if varargs is None and varkw is None:
        return
    first = next(n for n in graph.nodes if n.op != "placeholder")  # (the output at least)
    with graph.inserting_before(first):
        rest: Node | tuple[()] = graph.placeholder(f"*{varargs}") if varargs else ()
        options: Node | dict[str, Any] = graph.placeholder(f"**{varkw}") if varkw else {}
        captured = f"{type(module).__name__}.forward({names})"
        graph.call_function(no_further_arguments, (rest, options, captured))


def _named_signature(
    fn: Callable[..., Any],
    positional: list[inspect.Parameter],
    extra: int,
    keyword: list[inspect.Parameter],
) -> Callable[..., Any]:
    """``fn`` behind a function whose parameters are all named: ``forward(self, x, augment,
    args_0, flag=…)`` calling ``fn(self, x, augment, args_0, flag=flag)``."""
    names = [p.name for p in positional] + [f"args_{i}" for i in range(extra)]
    names += [p.name for p in keyword]
    defaults: dict[str, Any] = {p.name: p.default for p in (*positional, *keyword)}
    head: list[str] = []
    required = False  # a parameter without a default: none before it may have one
    for name in reversed(names):
        default = defaults.get(name, inspect.Parameter.empty)
        required = required or default is inspect.Parameter.empty
        head.append(name if required else f"{name}=_defaults[{name!r}]")
    call = names[: len(positional) + extra] + [f"{p.name}={p.name}" for p in keyword]
    source = (
        f"def forward(self, {', '.join(reversed(head))}):\n"
        f"    return _fn(self, {', '.join(call)})\n"
    )
    scope: dict[str, Any] = {"_fn": fn, "_defaults": defaults}
    exec(compile(source, "<fxfuse signature>", "exec"), scope)  # (a signature of names only)
    return scope["forward"]  # type: ignore[no-any-return]


def _failing_submodule(error: BaseException, copy: nn.Module, leaves: dict[str, Any]) -> str | None:
    """The path of the innermost submodule of ``copy`` whose own code raised ``error`` (not
    ``copy`` itself, not one already kept whole), or ``None``."""
    paths = {id(m): p for p, m in copy.named_modules() if p}
    found = None
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        owner = tb.tb_frame.f_locals.get("self") if "self" in code.co_varnames else None
        if (
            isinstance(owner, nn.Module)
            and id(owner) in paths
            and paths[id(owner)] not in leaves
            and not _machinery(code.co_filename)
        ):
            found = paths[id(owner)]
        tb = tb.tb_next
    return found


_TORCH_DIR = os.path.join(os.path.dirname(torch.__file__), "")
_FX_DIR = os.path.join(_TORCH_DIR, "fx", "")
_MODULE_FILE = os.path.join(_TORCH_DIR, "nn", "modules", "module.py")
_OUR_DIR = os.path.join(os.path.dirname(__file__), "")


def _machinery(filename: str) -> bool:
    """Frames of module calls and tracing, never the module's own code."""
    return filename.startswith((_FX_DIR, _OUR_DIR)) or filename == _MODULE_FILE


def _user_frame(tb: TracebackType | None) -> traceback.FrameSummary | None:
    """The innermost traceback frame in the user's code (not torch's, not ours)."""
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, _OUR_DIR)) and not filename.startswith("<"):
            found = traceback.extract_tb(tb, limit=1)[0]
        tb = tb.tb_next
    return found


def short_path(filename: str) -> str:
    """``filename`` relative to site-packages or to the working directory, where it is
    under one of them."""
    for root in (*(p for p in sys.path if p.endswith("-packages")), os.getcwd()):
        base = os.path.join(root, "")
        if root and filename.startswith(base):
            return filename[len(base) :]
    return filename


def _failure(error: BaseException) -> Failure:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "control flow" in message:
        construct = "Python control flow on a traced value"
    elif "cannot be iterated" in message:
        construct = "iterating over a traced value (a loop, unpacking, or *args)"
    elif isinstance(error, TraceError):
        construct = message
    else:
        construct = f"{type(error).__name__}: {message}" if message else type(error).__name__
    frame = _user_frame(error.__traceback__)
    where = ""
    if frame is not None:
        code = f" `{frame.line.strip()}`" if frame.line else ""
        where = f"{short_path(frame.filename)}:{frame.lineno}{code}"
    return Failure(construct, where, error)


def symbolic_capture(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Graph:
    """``model``'s whole forward as a ``torch.fx.Graph`` whose targets name attributes of
    ``model`` (tensors its ``forward`` builds are not among them: fuse through
    :func:`trace_part`, whose ``root`` holds them).

    Raises :class:`CaptureError` when a submodule or ``model`` itself cannot be traced.
    """
    traced = trace_part(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if isinstance(traced, Failure):
        raise capture_error(type(model).__name__, traced) from traced.error
    failed = {p: why for p, why in traced.leaves.items() if isinstance(why, Failure)}
    if failed:
        path, why = next(iter(failed.items()))
        raise capture_error(f"{type(model).__name__}.{path}", why) from why.error
    return traced.graph


# --------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------


@dataclass
class Exported:
    """A ``torch.export`` capture: ``module`` (aten IR, functional: no in-place ops, weights as
    attributes) and what it requires of the dims meant to stay dynamic, e.g.
    ``x.shape[2] == 224`` (an empty list: nothing)."""

    module: GraphModule
    specialized: list[str]


def export_capture(model: nn.Module, example_inputs: Sequence[Any]) -> Exported:
    """``model`` captured by ``torch.export`` with its batch and spatial dims dynamic
    (``Dim.AUTO``: kept dynamic where the model allows, fixed where it does not), then
    functionalized (``run_decompositions({})``: in-place ops become out-of-place ones, so
    they no longer stand between a conv and its batch norm).

    A batch of 1 would be fixed (export specializes sizes 0 and 1), so a batch-1 example is
    first repeated to a batch of 2. :class:`CaptureError` if export fails.
    """
    from fxfuse.verify import fresh_copies

    example = fresh_copies(example_inputs)
    attempts = [example]
    doubled = _doubled(example)
    if doubled is not None:
        attempts.insert(0, doubled)
    error: Exception | None = None
    for args in attempts:
        try:
            with warnings.catch_warnings():  # ("attribute assigned during export": the copy's)
                warnings.filterwarnings("ignore", message=".*assigned during export")
                program = torch.export.export(
                    structural_copy(model, own_buffers=True), args, dynamic_shapes=_auto_dims(args)
                )
        except Exception as failed:  # export fails in many ways
            error = error or failed
            continue
        hop = torch.ops.higher_order
        if any(n.target is getattr(hop, "wrap_with_autocast", None) for n in program.graph.nodes):
            error = error or AutocastRegion(
                "an autocast region (torch.autocast) inside forward: functionalizing the "
                "program inlines it, and a fold could move an op across its edge"
            )
            continue
        # (functionalizing may add guards of its own: a write through ``unbind``'s view fixes
        # the batch, so what the result requires is read from the functional program)
        program = program.run_decompositions({})
        specialized = _specialized(program, args)
        if args is doubled and any(".shape[0]" in g for g in specialized):
            continue  # the model fixes its batch: the example's own batch it is
        module = program.module()
        with torch.no_grad():  # concrete shapes beside export's symbolic ones, for the checks
            ShapeProp(module).propagate(*fresh_copies(example))  # that draw inputs
            # (the runs may have updated buffers the forward writes: the result starts from
            # the caller's values)
            own = dict(model.named_buffers())
            for name, buffer in module.named_buffers():
                if name in own and buffer.shape == own[name].shape:
                    buffer.copy_(own[name])
        return Exported(module, specialized)
    assert error is not None
    failure = _failure(error)
    raise ExportError(
        f"torch.export cannot capture {type(model).__name__}: {failure}",
        failure=failure,
        hint='torch.compile(model, backend="fxfuse") fuses each graph around the graph breaks',
    ) from error


class ExportError(CaptureError):
    """``torch.export`` failed; ``failure`` says on what, and where."""

    def __init__(self, message: str, *, failure: Failure, hint: str = ""):
        super().__init__(message, hint=hint)
        self.failure = failure


def _doubled(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors or not all(t.dim() >= 1 and t.shape[0] == 1 for t in tensors):
        return None
    return tuple(torch.cat([a, a]) if isinstance(a, Tensor) else a for a in args)


def _auto_dims(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``Dim.AUTO`` for the batch dim and every dim after the channels, per tensor input."""
    auto = torch.export.Dim.AUTO
    return tuple(
        {d: auto for d in range(a.dim()) if d != 1} or None if isinstance(a, Tensor) else None
        for a in args
    )


def _specialized(program: torch.export.ExportedProgram, args: tuple[Any, ...]) -> list[str]:
    """What the program requires of its inputs' dynamic dims: fixed (``x.shape[3] == 8``),
    tied (``x.shape[2] == x.shape[3]``) or bounded (``x.shape[2] >= 5``: export keeps the
    range its guards proved, which may be narrower than what the model accepts)."""
    guards = getattr(program, "_guards_code", None)  # (what the unlifted module checks)
    if isinstance(guards, list):
        return [
            re.sub(r"L\[['\"](\w+)['\"]\]", r"\1", g).replace(".size()", ".shape") for g in guards
        ]
    names = program.graph_signature.user_inputs  # (an older torch: read the shapes)
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    fixed = []
    seen: dict[Any, str] = {}
    for name, arg, dims in zip(names, args, _auto_dims(args), strict=False):
        val = values.get(name)
        if not isinstance(arg, Tensor) or not dims or not isinstance(val, Tensor):
            continue
        for d in dims:
            size, where = val.shape[d], f"{name}.shape[{d}]"
            if is_concrete_int(size):
                fixed.append(f"{where} == {int(size)}")
            elif size.node.expr in seen:
                fixed.append(f"{where} == {seen[size.node.expr]}")
            else:
                seen[size.node.expr] = where
                bounds = program.range_constraints.get(size.node.expr)
                if bounds is not None and bounds.lower > 2:  # (2: export's own 0/1 floor)
                    fixed.append(f"{where} >= {bounds.lower}")
                if bounds is not None and bounds.upper != int_oo:
                    fixed.append(f"{where} <= {bounds.upper}")
    return fixed


# --------------------------------------------------------------------------------------------
# The error for what cannot be captured at all
# --------------------------------------------------------------------------------------------


def capture_error(what: str, failure: Failure, *, exported: Failure | None = None) -> CaptureError:
    """One line naming the construct and where, and the one hint that applies: example
    inputs (so ``torch.export`` can try), or, where it tried too, ``torch.compile``."""
    also = ""
    if exported is not None:
        there = exported.where == failure.where or not exported.where
        also = "; torch.export fails there too" if there else f"; torch.export at {exported.where}"
    message = f"torch.fx cannot capture {what}: {failure}{also}"
    if isinstance(failure.error, AutocastRegion):
        hint = (
            "call the model under torch.autocast instead, or put the region's layers in a "
            "submodule of their own (it is then fused on its own)"
        )
        return CaptureError(message, hint=hint, cli_hint=hint)
    if exported is not None:
        return CaptureError(
            message,
            hint='torch.compile(model, backend="fxfuse") fuses each graph around the graph breaks',
            cli_hint='in Python, torch.compile(model, backend="fxfuse") fuses each graph '
            "around the graph breaks; --debug shows the traceback",
        )
    return CaptureError(
        message,
        hint="pass example inputs, fxfuse.optimize(model, (x,)), to capture it with "
        "torch.export instead",
        cli_hint="--debug shows the traceback",
    )
