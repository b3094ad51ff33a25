"""Dialects: the same op as a module, a ``torch``/``F`` function, a tensor method or an aten op.

One registry binds every dialect's arguments by name — :func:`bind` reads the signature of a
Python function, the TorchScript schemas of a ``torch`` builtin, or an aten op's schema, with
defaults filled in — so a view reads ``args["stride"]`` whatever form the graph used. The
tables name the callables of each kind fxfuse recognizes.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node
from torch.fx.operator_schemas import _torchscript_schema_to_signature, get_signature_for_torch_op
from torch.nn.modules import module as _module_hooks

if TYPE_CHECKING:
    from fxfuse.effects import Effects
    from fxfuse.weights import Weight

_T = TypeVar("_T")
__all__ = [
    "AVG_POOL_FUNCTIONS",
    "BATCH_NORM_FUNCTIONS",
    "CONV_FUNCTIONS",
    "CONV_TRANSPOSE_FUNCTIONS",
    "LINEAR_FUNCTIONS",
    "TUPLE_BATCH_NORMS",
    "Resolver",
    "aten",
    "bind",
    "has_hooks",
    "inherits_forward",
    "module_path_of",
    "target_name",
]

aten = torch.ops.aten

CONV_FUNCTIONS: dict[Any, int] = {
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
}
CONV_TRANSPOSE_FUNCTIONS: dict[Any, int] = {
    F.conv_transpose1d: 1,
    F.conv_transpose2d: 2,
    F.conv_transpose3d: 3,
    aten.conv_transpose1d.default: 1,
    aten.conv_transpose2d.input: 2,
    aten.conv_transpose3d.input: 3,
}
LINEAR_FUNCTIONS = frozenset({F.linear, aten.linear.default})
# aten's batch norms that return (output, mean, invstd): the normalized value is item 0
TUPLE_BATCH_NORMS = frozenset(
    {aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default}
)
BATCH_NORM_FUNCTIONS = frozenset(
    {F.batch_norm, torch.batch_norm, aten.batch_norm.default, *TUPLE_BATCH_NORMS}
)
AVG_POOL_FUNCTIONS: dict[Any, int] = {
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    aten.avg_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool3d.default: 3,
}

# signatures torch does not describe the way the graph calls them
_OVERRIDES: dict[Any, inspect.Signature] = {}


def _override(fn: Any, names: tuple[str, ...], defaults: dict[str, Any]) -> None:
    params = [
        inspect.Parameter(
            n,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=defaults.get(n, inspect.Parameter.empty),
        )
        for n in names
    ]
    _OVERRIDES[fn] = inspect.Signature(params)


# F.avg_pool2d is a builtin whose schema names the arguments as torch does; operator.getitem
# and friends have C signatures inspect cannot read
_override(operator.getitem, ("input", "index"), {})
_override(operator.setitem, ("input", "index", "value"), {})


@functools.cache
def _signatures(fn: Any) -> tuple[inspect.Signature, ...]:
    if fn in _OVERRIDES:
        return (_OVERRIDES[fn],)
    if isinstance(fn, torch._ops.OpOverload):
        return (_torchscript_schema_to_signature(fn._schema),)
    try:
        return (inspect.signature(fn),)
    except (TypeError, ValueError):
        pass
    try:
        return tuple(get_signature_for_torch_op(fn) or ())
    except Exception:  # not a torch op
        return ()


def bind(fn: Callable[..., Any], node: Node) -> dict[str, Any] | None:
    """``node``'s arguments by parameter name, defaults filled in; ``None`` when no signature
    of ``fn`` binds them. ``fn`` is the callable the node runs (for a ``call_method`` node,
    the corresponding ``torch`` function, whose first parameter is the tensor)."""
    for signature in _signatures(fn):
        try:
            bound = signature.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        return dict(bound.arguments)
    return None


def target_name(node: Node) -> str:
    """What a person would call the op a node runs: ``conv2d``, ``add``, ``relu_``."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return str(getattr(target, "__name__", target))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks: its own (``weight_norm`` is one)
    or global ones. A hook can change what the module computes, so such a module is never
    replaced by a fused one."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
    )


def inherits_forward(module: nn.Module, *methods: str) -> bool:
    """True when ``module`` runs ``forward`` (and ``methods``) as defined in ``torch.nn``.

    A subclass that redefines them (weight standardization, fake quantization, dynamic
    "same" padding) computes something else and is not the op its base class is; so does an
    instance whose own attribute replaces one of them (``module.forward = ...``)."""
    for name in ("forward", *methods):
        if name in vars(module):
            return False
        fn = getattr(type(module), name, None)
        if not (getattr(fn, "__module__", None) or "").startswith("torch.nn."):
            return False
    return not has_hooks(module)


def module_path_of(node: Node) -> str:
    """The module a node belongs to, as a dotted path ('' for the root)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(next(reversed(stack.values()))[0])
    return ""


class Resolver(Protocol):
    """What views need from the graph they read (a :class:`~fxfuse.rules.RewriteContext`)."""

    def weight(self, arg: Any) -> Weight | None:
        """``arg`` as a constant weight expression (an attribute, a lifted weight, a pure op of
        constants, a Python number), or ``None`` when it varies (an activation)."""
        ...

    def module_weight(self, path: str, name: str) -> Weight | None:
        """A module's own parameter or buffer as a weight (``None``: it may change)."""
        ...

    def number(self, arg: Any) -> float | None:
        """A Python number, or a constant's ``.item()``."""
        ...

    def tensors(self) -> Iterator[torch.Tensor]:
        """The model's parameters and buffers."""
        ...

    def module(self, target: str) -> nn.Module: ...

    def derived(self, key: Hashable, build: Callable[[], _T]) -> _T:
        """``build()``, computed once per ``key`` for the whole rewrite: for what follows from
        constants alone (weights, modules), never from the graph around a node."""
        ...

    def shape(self, node: Node) -> torch.Size | None: ...

    def rank(self, node: Node) -> int | None: ...

    @property
    def effects(self) -> Effects: ...
