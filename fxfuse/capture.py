"""Capture: a model in, a ``torch.fx.GraphModule`` out, or an error that says why not.

:class:`Tracer` is ``torch.fx.Tracer`` with two changes:

- parameter and buffer names are looked up in a map built once per trace. ``torch.fx`` finds a
  tensor's name by scanning every parameter of the model for every functional use
  (``F.batch_norm(x, self.running_mean, …)``), which makes tracing quadratic: on timm's
  mobileone_s0 that is most of fxfuse's time (DESIGN.md, trap 9);
- extra leaf modules: a submodule fx cannot trace through can be kept whole, and fxfuse fuses
  around it.
"""

from __future__ import annotations

import logging
import operator
import os
import traceback
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node, Proxy
from torch.fx import Tracer as FxTracer
from torch.fx.proxy import TraceError

from fxfuse.errors import CaptureError

log = logging.getLogger("fxfuse")

__all__ = ["Tracer", "export_capture", "symbolic_capture"]


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
    """``torch.fx.Tracer`` with O(1) parameter/buffer naming, user-chosen leaf modules, and
    buffers traced like parameters.

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
        proxy_buffers: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.proxy_buffer_attributes = proxy_buffers
        self.extra_leaves = tuple(leaf_modules)
        self._names: dict[int, str] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> Graph:
        self._names = {}
        if isinstance(root, nn.Module):
            for name, buffer in root.named_buffers():
                self._names.setdefault(id(buffer), name)
            for name, param in root.named_parameters():
                self._names.setdefault(id(param), name)
        try:
            return super().trace(root, concrete_args)
        finally:
            self._names = {}

    def proxy(self, node: Node) -> Proxy:
        return InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Proxy]) -> Any:
        if isinstance(attr_val, nn.Parameter) or (
            self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)
        ):
            name = self._names.get(id(attr_val))
            if name is None or self.param_shapes_constant:
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            if name not in parameter_proxy_cache:
                parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
            return parameter_proxy_cache[name]
        return attr_val

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, Proxy):
            name = self._names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def symbolic_capture(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Graph:
    """``model``'s forward as a ``torch.fx.Graph`` whose targets name attributes of ``model``.

    Raises :class:`CaptureError` when symbolic tracing fails. No ``GraphModule`` is built here:
    fxfuse builds exactly one, for the result.
    """
    try:
        return Tracer(leaf_modules).trace(model, concrete_args)
    except Exception as error:
        try:  # some models branch on a buffer's value: read buffers at trace time, as fx does
            graph = Tracer(leaf_modules, proxy_buffers=False).trace(model, concrete_args)
        except Exception:
            raise CaptureError(_explain(model, error)) from error
        log.info(
            "fxfuse: tracing %s with traced buffers failed (%s); buffers were read at "
            "trace time instead",
            type(model).__name__,
            str(error).splitlines()[0],
        )
        return graph


def export_capture(
    model: nn.Module, example_inputs: Sequence[Any]
) -> tuple[torch.export.ExportedProgram, GraphModule]:
    """``model`` captured by ``torch.export`` on ``example_inputs``: the program and its
    module (aten IR, weights as attributes). :class:`CaptureError` if export fails."""
    try:
        program = torch.export.export(model, tuple(example_inputs))
    except Exception as error:
        raise CaptureError(_explain(model, error, "torch.export")) from error
    return program, program.module()


_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIR = os.path.dirname(__file__)


def _user_frame(tb: TracebackType | None) -> tuple[traceback.FrameSummary, Any] | None:
    """The innermost traceback frame in the user's code (not torch's, not ours)."""
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, _OUR_DIR)) and "<" not in filename[:1]:
            summary = traceback.extract_tb(tb, limit=1)[0]
            found = (summary, tb.tb_frame.f_locals.get("self"))
        tb = tb.tb_next
    return found


def _explain(model: nn.Module, error: Exception, how: str = "torch.fx.symbolic_trace") -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "control flow" in message:
        what = "data-dependent control flow (an `if`/`while` on a tensor value)"
    elif "cannot be iterated" in message:
        what = "iterating over a traced tensor"
    elif isinstance(error, TraceError):
        what = message
    else:
        what = f"{type(error).__name__}: {message}"
    lines = [f"{how} cannot capture {type(model).__name__}: {what}"]
    frame = _user_frame(error.__traceback__)
    owner = None
    if frame is not None:
        summary, owner = frame
        code = f": `{summary.line.strip()}`" if summary.line else ""
        lines.append(f"  at {summary.filename}:{summary.lineno} in {summary.name}{code}")
    lines.append("What to try:")
    if isinstance(owner, nn.Module) and owner is not model:
        lines.append(
            f"  - keep that submodule whole: fxfuse.optimize(model, "
            f"leaf_modules=[{type(owner).__name__}]); fxfuse fuses around it"
        )
    else:
        lines.append(
            "  - keep the submodule that does this whole: "
            "fxfuse.optimize(model, leaf_modules=[ThatModule])"
        )
    lines.append(
        "  - if it branches on a Python flag argument, fix it: "
        "fxfuse.optimize(model, concrete_args={'flag': value})"
    )
    if how == "torch.fx.symbolic_trace":
        lines.append(
            "  - pass example inputs, fxfuse.optimize(model, (x,)), and fxfuse captures it with "
            "torch.export instead where symbolic tracing fails"
        )
    lines.append(
        '  - or compile it: torch.compile(model, backend="fxfuse") fuses each graph around '
        "the graph breaks"
    )
    return "\n".join(lines)
