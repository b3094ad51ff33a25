"""The training side of re-parameterization, from the same graph algebra as :func:`fxfuse.optimize`.

- :func:`gradient_reparam` (RepOptimizer, gradient re-parameterization): a multi-branch model
  whose branches are linear in their parameters with constant scales (CSLA:
  ``s·conv3×3(x) + t·conv1×1(x) + x``) becomes the plain model, and an SGD optimizer whose steps
  keep it the fusion of the multi-branch model trained with SGD. The merged weight is
  ``W = Σ Jᵢ θᵢ + C`` (``Jᵢ``: where merge-branches places branch ``i``, scaled; ``C``: the
  identity and other constants). An SGD step on the ``θᵢ`` (gradient ``Jᵢᵀ G``, decay
  ``λ·θᵢ``) moves ``W`` by ``J(Jᵀ G + λθ) = M ⊙ G + λ(W − C)`` with ``M = Σ sᵢ²·maskᵢ``;
  momentum, dampening and Nesterov are linear in that, so the plain step is exact. ``M`` and
  ``C`` are computed from the merged weight's own expression (the placement merge-branches
  computes), never per architecture.
- :func:`expand`: the other way, any model's k×k convs (and their batch norms) become
  training-time blocks (ACNet, RepVGG, MobileOne, DBB) whose new branches start with zero
  effect, so fine-tuning starts from the trained model; :func:`fxfuse.optimize` of the result
  runs the original architecture again.
- :func:`online_merge`: the multi-branch model as one conv per block whose kernel is computed
  from the branch parameters on every call (differentiably): the branch parameters train as
  in the multi-branch model, at the activation cost of the plain one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from fxfuse import kernels
from fxfuse.capture import Failure, Traced, capture_error, structural_copy, trace_part
from fxfuse.emit import build_module, emit
from fxfuse.geometry import pad_calls
from fxfuse.maps import FusedLayer, fused_layer
from fxfuse.rules import RewriteContext, weight_of
from fxfuse.weights import Apply, Const, Leaf, Weight

__all__ = ["ExpandedConv", "GradientMap", "expand", "gradient_reparam", "online_merge"]

log = logging.getLogger("fxfuse.training")

_CHECK_TOLERANCE = 1e-9  # float64 identities checked on random probes


# --------------------------------------------------------------------------------------------
# Capture and rules, for training (batch norms in training mode stay as they are)
# --------------------------------------------------------------------------------------------


def _traced(model: nn.Module, what: str) -> Traced:
    """``model``'s whole forward as one graph, traced on a copy in training mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module, got {type(model).__name__}")
    copy = structural_copy(model)
    copy.train()  # (a new module tree: the caller's modes are untouched)
    traced = trace_part(copy)
    if isinstance(traced, Failure):
        raise capture_error(type(model).__name__, traced) from traced.error
    if traced.leaves:
        path, why = next(iter(traced.leaves.items()))
        reason = why.construct if isinstance(why, Failure) else why
        raise ValueError(
            f"{what} needs the whole forward as one graph, but {path} could not be traced "
            f"through ({reason}); make it traceable by torch.fx"
        )
    return traced


def _rewritten(traced: Traced, live: bool = False) -> RewriteContext:
    from fxfuse.passes import default_rules

    traced.graph.owning_module = None
    ctx = RewriteContext(traced.graph, traced.root, live=live)
    default_rules().run(ctx)
    return ctx


def _fused_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is fused_layer]


# --------------------------------------------------------------------------------------------
# Weight expressions as functions of the parameters
# --------------------------------------------------------------------------------------------


def _variables(weight: Weight | None, found: dict[int, Leaf] | None = None) -> dict[int, Leaf]:
    """The trainable parameters ``weight`` reads, by ``id`` of the tensor."""
    found = {} if found is None else found
    if isinstance(weight, Leaf):
        if isinstance(weight.tensor, nn.Parameter) and weight.tensor.requires_grad:
            found.setdefault(id(weight.tensor), weight)
    elif isinstance(weight, Apply):
        for arg in _weights_in((weight.args, weight.kwargs)):
            _variables(arg, found)
    return found


def _weights_in(value: Any) -> Iterator[Weight]:
    if isinstance(value, Weight):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _weights_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _weights_in(v)


def _at(weight: Weight, values: Mapping[int, Tensor], memo: dict[int, Tensor]) -> Tensor:
    """``weight`` with the parameters in ``values`` (by ``id``) replaced; autograd kept."""
    found = memo.get(id(weight))
    if found is not None:
        return found
    if isinstance(weight, Leaf):
        value = values.get(id(weight.tensor), weight.tensor.detach())
    elif isinstance(weight, Const):
        value = weight.tensor
    elif isinstance(weight, Apply):

        def sub(v: Any) -> Any:
            if isinstance(v, Weight):
                return _at(v, values, memo)
            if isinstance(v, (tuple, list)):
                return type(v)(sub(x) for x in v)
            if isinstance(v, dict):
                return {k: sub(x) for k, x in v.items()}
            return v

        value = weight.fn(*sub(weight.args), **sub(weight.kwargs))
    else:  # pragma: no cover - a new kind of weight
        raise TypeError(f"cannot evaluate {weight!r}")
    memo[id(weight)] = value
    return value


def _relative(a: Tensor, b: Tensor) -> float:
    scale = max(float(b.norm()), float(a.norm()), 1e-300)
    return float((a - b).norm()) / scale


@dataclass
class _Reparam:
    """One plain parameter ``W = J θ + C``: its gradient multiplier ``M`` and constant ``C``."""

    multiplier: Tensor
    constant: Tensor


def _reparam(weight: Weight, name: str, seed: int) -> _Reparam:
    """``M`` and ``C`` of ``weight``, checked: ``W`` affine in its parameters, and ``J Jᵀ``
    the diagonal ``M`` (each parameter element lands at one position)."""
    leaves = list(_variables(weight).values())
    f = lambda values: _at(weight, values, {})  # noqa: E731
    zeros = {id(leaf.tensor): torch.zeros(leaf.shape, dtype=torch.float64) for leaf in leaves}
    with torch.no_grad():
        constant = kernels.exact(f(zeros))
    if not leaves:
        return _Reparam(torch.zeros_like(constant), constant)
    g = torch.Generator().manual_seed(seed)

    def draw() -> dict[int, Tensor]:
        return {
            id(leaf.tensor): torch.randn(leaf.shape, dtype=torch.float64, generator=g)
            for leaf in leaves
        }

    with torch.no_grad():
        r1, r2 = draw(), draw()
        both = {k: r1[k] + 2 * r2[k] for k in r1}
        lhs = kernels.exact(f(both)) - constant
        rhs = (kernels.exact(f(r1)) - constant) + 2 * (kernels.exact(f(r2)) - constant)
    if _relative(lhs, rhs) > _CHECK_TOLERANCE:
        names = ", ".join(sorted(str(leaf.path or leaf.node) for leaf in leaves))
        raise ValueError(
            f"the merged {name} is not linear in its parameters ({names}): a trainable scale or "
            "a batch norm in a branch? Gradient re-parameterization needs branches that are "
            "linear with constant scales (make the scales buffers, drop the batch norms)"
        )
    columns = []
    with torch.no_grad():
        for leaf in leaves:
            ones = dict(zeros)
            ones[id(leaf.tensor)] = torch.ones(leaf.shape, dtype=torch.float64)
            columns.append(kernels.exact(f(ones)) - constant)
    multiplier = kernels.gradient_multiplier(columns)
    # J Jᵀ G must be M ⊙ G: probe with a random G through autograd (Jᵀ) and the map (J)
    probe = torch.randn(constant.shape, dtype=torch.float64, generator=g)
    point = {k: v.requires_grad_() for k, v in draw().items()}
    out = kernels.exact(f(point))
    grads = torch.autograd.grad(out, list(point.values()), probe, allow_unused=True)
    back = {
        k: torch.zeros_like(v) if gr is None else gr
        for (k, v), gr in zip(point.items(), grads, strict=True)
    }
    with torch.no_grad():
        moved = kernels.exact(f(back)) - constant
    if _relative(moved, multiplier * probe) > _CHECK_TOLERANCE:
        raise ValueError(
            f"in the merged {name} a parameter element lands on more than one position (or two "
            "on one position through one branch), so the gradient map is not per position"
        )
    return _Reparam(multiplier, constant)


# --------------------------------------------------------------------------------------------
# gradient_reparam
# --------------------------------------------------------------------------------------------


class GradientMap:
    """The optimizer hooks of :func:`gradient_reparam`: before each step, each merged
    parameter's gradient ``G`` becomes ``M ⊙ G − λ·C`` (``λ`` its group's weight decay, negated
    under ``maximize``), so the optimizer's own step applies ``M ⊙ G + λ·(W − C)``; after the
    step the gradients are put back as they were."""

    def __init__(self, reparams: dict[nn.Parameter, _Reparam]):
        self.reparams = reparams
        self._saved: dict[nn.Parameter, Tensor] = {}

    def multiplier(self, parameter: nn.Parameter) -> Tensor | None:
        """``M`` of a parameter of the plain model (``None``: an ordinary parameter)."""
        found = self.reparams.get(parameter)
        return None if found is None else found.multiplier

    def constant(self, parameter: nn.Parameter) -> Tensor | None:
        """``C``, the part of a merged weight no parameter moves (the identity, ...)."""
        found = self.reparams.get(parameter)
        return None if found is None else found.constant

    def before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        given = args[1:] if args and args[0] is optimizer else args  # (step's own self)
        if any(a is not None for a in given) or kwargs.get("closure") is not None:
            raise ValueError(
                "gradient_reparam's optimizer maps the gradients before the step, so it cannot "
                "take a closure that computes them inside it: call loss.backward(), then step()"
            )
        for group in optimizer.param_groups:
            decay = float(group.get("weight_decay", 0.0))
            if group.get("maximize", False):
                decay = -decay
            for p in group["params"]:
                found = self.reparams.get(p)
                if found is None or p.grad is None:
                    continue
                self._saved[p] = p.grad
                p.grad = kernels.reparam_gradient(p.grad, found.multiplier, found.constant, decay)

    def after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for p, grad in self._saved.items():
            p.grad = grad
        self._saved.clear()


_LINEAR_IN_GRADIENT = (torch.optim.SGD,)


def gradient_reparam(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], **optimizer_kwargs: Any
) -> tuple[GraphModule, torch.optim.Optimizer]:
    """The plain model of ``model`` and an optimizer that trains it as ``model`` would train.

    ``model``'s branches must be linear in their parameters with constant scales (RepOptimizer's
    CSLA: ``s·conv3×3(x) + t·conv1×1(x) + x`` with per-channel scales held as buffers, no batch
    norm in a branch); they are merged as :func:`fxfuse.optimize` merges them. ``optimizer``
    (``optimizer_cls(plain.parameters(), **optimizer_kwargs)``) multiplies each merged
    weight's gradient per position by ``M = Σ sᵢ²·maskᵢ`` and applies weight decay to
    ``W − C`` only (``C``: the identity, which no parameter moves), so step for step ``plain``
    equals the fusion of ``model`` trained by ``optimizer_cls`` on its own parameters. Exact
    for SGD (momentum, dampening, Nesterov, weight decay, ``maximize``), whose step is linear
    in the gradient. Layers left unmerged (a batch norm in training mode, the head) train as
    they are. ``model`` is never modified; ``plain`` owns fresh parameters, in training mode.

    Args:
        model: the multi-branch model.
        optimizer_cls: ``torch.optim.SGD`` or a subclass.
        optimizer_kwargs: the optimizer's settings (``lr``, ``momentum``, ...).

    Returns:
        ``(plain, optimizer)``; ``optimizer.fxfuse_gradient_map`` is the :class:`GradientMap`.

    Raises:
        TypeError: an optimizer that is not linear in the gradient (Adam, ...).
        ValueError: a merged weight that is not linear in the parameters, or a parameter that
            a merged conv shares with another op.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, _LINEAR_IN_GRADIENT)):
        name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
        raise TypeError(
            f"gradient_reparam is exact only for optimizers linear in the gradient "
            f"(torch.optim.SGD): {name}'s step is not (Adam-like steps divide by a running "
            "RMS of the gradient), so no per-position gradient multiplier reproduces the "
            "multi-branch training"
        )
    traced = _traced(model, "gradient_reparam")
    ctx = _rewritten(traced)
    graph = traced.graph
    for node in graph.nodes:
        if node.op == "call_function" and node.target is weight_of:
            shared = _variables(node.args[0])
            if shared:
                leaf = next(iter(shared.values()))
                raise ValueError(
                    f"parameter {leaf.path} is used as a constant scale of a kept branch; "
                    "gradient_reparam needs constant scales (buffers)"
                )
    created: dict[str, nn.Module] = {}
    plans: list[tuple[nn.Module, FusedLayer, dict[str, _Reparam]]] = []
    owner: dict[int, str] = {}
    for index, node in enumerate(_fused_nodes(graph)):
        x, layer = node.args
        assert isinstance(x, Node) and isinstance(layer, FusedLayer)
        reparams = {"weight": _reparam(layer.weight, f"{layer.name}.weight", seed=2 * index)}
        if layer.bias is not None:
            reparams["bias"] = _reparam(layer.bias, f"{layer.name}.bias", seed=2 * index + 1)
        for part, expr in (("weight", layer.weight), ("bias", layer.bias)):
            for key, leaf in _variables(expr).items():
                if key in owner:
                    raise ValueError(
                        f"parameter {leaf.path} feeds both {owner[key]} and "
                        f"{layer.name}.{part}; merged weights need parameters of their own"
                    )
                owner[key] = f"{layer.name}.{part}"
        module = _lower(graph, node, layer, created)
        plans.append((module, layer, reparams))
    memo: dict[int, Any] = {}
    plain = emit(
        graph, ctx.attribute, {**ctx.attributes, **created}, "Plain" + type(model).__name__,
        effects=ctx.effects, memo=memo,
    )  # fmt: skip
    for key, where in owner.items():
        if key in memo:
            raise ValueError(
                f"a parameter merged into {where} is also read by an op that stays in the "
                "plain model; merged weights need parameters of their own"
            )
    reparams: dict[nn.Parameter, _Reparam] = {}
    for module, _, parts in plans:
        for part, found in parts.items():
            p = getattr(module, part)
            p.requires_grad_(True)
            reparams[p] = _Reparam(
                found.multiplier.to(device=p.device, dtype=p.dtype),
                found.constant.to(device=p.device, dtype=p.dtype),
            )
    plain.train()
    optimizer = optimizer_cls(plain.parameters(), **optimizer_kwargs)
    gradient_map = GradientMap(reparams)
    optimizer.register_step_pre_hook(gradient_map.before_step)
    optimizer.register_step_post_hook(gradient_map.after_step)
    optimizer.fxfuse_gradient_map = gradient_map  # type: ignore[attr-defined]
    log.info("fxfuse.gradient_reparam: %d merged layers", len(plans))
    return plain, optimizer


def _lower(graph: Graph, node: Node, layer: FusedLayer, created: dict[str, nn.Module]) -> nn.Module:
    """``fused_layer(x, layer)`` as a fresh module (and an ``F.pad`` where the padding is
    asymmetric), so the caller knows which parameters are the merged ones."""
    module, pad = build_module(layer)
    taken = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    base = layer.name.replace(".", "_") + "_merged"
    path, i = base, 1
    while path in taken or path in created:
        path, i = f"{base}{i}", i + 1
    created[path] = module
    x = node.args[0]
    with graph.inserting_before(node):
        if pad is not None:
            assert layer.geometry is not None
            if layer.geometry.padding_mode == "value":
                raise ValueError(f"{layer.name}: a value padding is not supported in training")
            for amounts, kwargs in pad_calls(pad, layer.geometry.padding_mode):
                x = graph.call_function(F.pad, (x, amounts), kwargs)
        new = graph.call_module(path, (x,))
    new.meta.update({k: node.meta[k] for k in ("nn_module_stack",) if k in node.meta})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return module


# --------------------------------------------------------------------------------------------
# online_merge
# --------------------------------------------------------------------------------------------


def online_merge(model: nn.Module) -> GraphModule:
    """``model`` with each group of merged branches run as one conv whose kernel is computed
    from the branch parameters on every call (float64, differentiably, then cast).

    The result holds fresh copies of ``model``'s parameters under their own names; its
    gradients with respect to them are ``model``'s (exactly, in real arithmetic), so any
    optimizer trains it as it would train ``model``, while each block stores one conv's
    activations. Branches with a batch norm in training mode are not linear and stay as
    they are. ``model`` is never modified; the result is in training mode."""
    traced = _traced(model, "online_merge")
    ctx = _rewritten(traced, live=True)
    _read_by_path(traced.graph)
    merged = emit(
        traced.graph,
        ctx.attribute,
        dict(ctx.attributes),
        "OnlineMerged" + type(model).__name__,
        effects=ctx.effects,
        live=True,
    )
    _pads_into_convs(merged)
    merged.train()
    return merged


_CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2,
                   F.conv3d: 3}  # fmt: skip


def _pads_into_convs(module: GraphModule) -> None:
    """``conv(F.pad(x, symmetric zeros), padding=0) -> conv(x, padding=p)``: live emission pads
    apart (any padding), but a separate pad would keep a padded copy of every block's input
    alive for the backward pass."""
    graph = module.graph
    for conv in list(graph.nodes):
        dims = _CONV_FUNCTIONS.get(conv.target) if conv.op == "call_function" else None
        if dims is None or conv.kwargs.get("padding", 0) != 0 or not conv.args:
            continue
        pad = conv.args[0]
        if not (isinstance(pad, Node) and pad.op == "call_function" and pad.target is F.pad):
            continue
        amounts = pad.args[1] if len(pad.args) > 1 else None
        mode = pad.kwargs.get("mode", "constant")
        value = pad.kwargs.get("value", None)
        if (
            len(pad.users) != 1
            or len(pad.args) != 2
            or mode != "constant"
            or value not in (None, 0, 0.0)
            or not isinstance(amounts, (list, tuple))
            or len(amounts) != 2 * dims
        ):
            continue
        pairs = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(dims)][::-1]
        if any(left != right or left < 0 for left, right in pairs):
            continue
        conv.args = (pad.args[0], *conv.args[1:])
        conv.kwargs = {**conv.kwargs, "padding": tuple(left for left, _ in pairs)}
        graph.erase_node(pad)
    graph.lint()
    module.recompile()


def _read_by_path(graph: Graph) -> None:
    """Leaves held by ``get_attr`` nodes read by their path instead: a merge may have erased
    the node (its only user was the branch), and a live weight reads its constants where the
    merged conv runs."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (fused_layer, weight_of):
            held = node.args[1] if node.target is fused_layer else node.args[0]
            if isinstance(held, FusedLayer):
                geo = held.geometry
                held = (held.weight, held.bias, None if geo is None else geo.pad_value)
            for weight in _weights_in(held):
                for leaf in _leaves(weight):
                    if leaf.node is not None and leaf.node.op == "get_attr":
                        leaf.node, leaf.path = None, str(leaf.node.target)


def _leaves(weight: Weight) -> Iterator[Leaf]:
    if isinstance(weight, Leaf):
        yield weight
    elif isinstance(weight, Apply):
        for arg in _weights_in((weight.args, weight.kwargs)):
            yield from _leaves(arg)


# --------------------------------------------------------------------------------------------
# expand
# --------------------------------------------------------------------------------------------


class ExpandedConv(nn.Module):
    """A k×k conv (and its batch norm) with extra branches, summed: ``main(x) + Σ bᵢ(x)``.

    Each extra branch ends in a batch norm whose γ (and β) start at 0, so the block computes
    exactly what ``main`` computes until training moves them."""

    def __init__(self, main: nn.Module, branches: list[nn.Module]):
        super().__init__()
        self.main = main
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        out = self.main(x)
        for branch in self.branches:
            out = out + branch(x)
        return out


def _zero_bn(channels: int, like: Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, device=like.device, dtype=like.dtype)
    nn.init.zeros_(bn.weight)
    return bn


def _branch_conv(
    conv: nn.Conv2d, kernel: tuple[int, int], padding: tuple[int, int], groups: int | None = None
) -> nn.Sequential:
    w = conv.weight
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel,
        conv.stride,
        padding,
        conv.dilation,
        conv.groups if groups is None else groups,
        bias=False,
        padding_mode=conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    return nn.Sequential(new, _zero_bn(conv.out_channels, w))


def _centre_padding(conv: nn.Conv2d, kernel: tuple[int, int]) -> tuple[int, int] | None:
    """The padding that centres a ``kernel`` branch in ``conv``'s window (``None``: negative)."""
    pads = []
    for k_main, k, p, d in zip(conv.kernel_size, kernel, conv.padding, conv.dilation, strict=True):
        pad = p - (k_main - k) // 2 * d
        if pad < 0:
            return None
        pads.append(pad)
    return (pads[0], pads[1])


def _expandable(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        return "not a plain nn.Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] < 2 or k[0] % 2 == 0:
        return f"kernel {k[0]}x{k[1]}: only odd square kernels above 1x1 are expanded"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if conv.padding[0] != conv.padding[1]:
        return "asymmetric padding"
    return None


_BLOCKS = ("acb", "repvgg", "mobileone", "dbb")


def _branches(conv: nn.Conv2d, block: str, copies: int) -> list[nn.Module]:
    k = conv.kernel_size[0]
    w = conv.weight
    branches: list[nn.Module] = []

    def centred(kernel: tuple[int, int]) -> nn.Sequential | None:
        pad = _centre_padding(conv, kernel)
        return None if pad is None else _branch_conv(conv, kernel, pad)

    identity = (
        conv.in_channels == conv.out_channels
        and conv.stride == (1, 1)
        and _centre_padding(conv, (1, 1)) == (0, 0)  # (the output keeps the input's size)
    )
    if block == "acb":
        branches += [b for b in (centred((1, k)), centred((k, 1))) if b is not None]
    elif block in ("repvgg", "mobileone"):
        if block == "mobileone":
            branches += [centred((k, k)) for _ in range(copies - 1)]  # type: ignore[misc]
        one = centred((1, 1))
        if one is not None:
            branches.append(one)
        if identity:
            branches.append(_zero_bn(conv.out_channels, w))
    elif block == "dbb":
        one = centred((1, 1))
        if one is not None:
            branches.append(one)
        pad = _centre_padding(conv, (k, k))
        assert pad is not None
        mid = nn.Conv2d(
            conv.in_channels, conv.in_channels, 1, groups=conv.groups, bias=False,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
        identity = kernels.diagonal_kernel(
            torch.ones(conv.in_channels), conv.in_channels, conv.groups, (1, 1), (0, 0)
        )
        with torch.no_grad():  # the identity (DBB's IdentityBasedConv1x1 starts there)
            mid.weight.copy_(identity)
        tail = _branch_conv(conv, (k, k), pad)
        branches.append(nn.Sequential(mid, *tail))
        if conv.dilation == (1, 1) and conv.padding_mode == "zeros" and conv.padding[0] <= k // 2:
            pool = nn.Sequential(
                nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=False,
                          device=w.device, dtype=w.dtype),
                nn.AvgPool2d(k, conv.stride, conv.padding, count_include_pad=True),
                _zero_bn(conv.out_channels, w),
            )  # fmt: skip
            branches.append(pool)
    return [b for b in branches if b is not None]


def _conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """conv path -> path of the batch norm that is its only user (both called once)."""
    try:
        traced = trace_part(structural_copy(model))
    except Exception:  # (a model fx cannot read: its convs are expanded without their BNs)
        return {}
    if isinstance(traced, Failure):
        return {}
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = {}
    modules = dict(traced.root.named_modules())
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn = modules.get(str(users[0].target))
        conv_path, bn_path = str(node.target), str(users[0].target)
        if (
            type(bn) is nn.BatchNorm2d
            and calls[conv_path] == 1
            and calls[bn_path] == 1
            and users[0].args[0] is node
        ):
            pairs[conv_path] = bn_path
    return pairs


def expand(model: nn.Module, block: str = "acb", *, copies: int = 2) -> nn.Module:
    """A training-time copy of ``model``: each odd k×k ``nn.Conv2d`` (k > 1), with the batch
    norm that follows it where there is one, becomes a multi-branch block.

    - ``"acb"`` (ACNet): + a 1×k and a k×1 conv-BN;
    - ``"repvgg"``: + a 1×1 conv-BN, + a BN of the input where in = out channels and stride 1;
    - ``"mobileone"``: as ``"repvgg"``, with ``copies`` k×k conv-BNs in all;
    - ``"dbb"`` (Diverse Branch Block): + 1×1 conv-BN, + 1×1 (identity) → k×k conv-BN, +
      1×1 → k×k average pool → BN.

    Every new branch ends in a batch norm with γ = β = 0: the result computes exactly what
    ``model`` computes, in training and eval mode, and fine-tuning starts from its weights.
    Branches keep the conv's stride, dilation, groups and padding mode; those that would need
    negative padding (a conv with less than "same" padding) are left out. The result is a
    deep copy (``model`` is never modified); :func:`fxfuse.optimize` of it, in eval mode,
    runs ``model``'s convs again, with the trained weights.

    Raises:
        ValueError: an unknown ``block``.
    """
    if block not in _BLOCKS:
        raise ValueError(f"unknown block {block!r}: choose one of {', '.join(_BLOCKS)}")
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    pairs = _conv_bn_pairs(model)
    result = _deepcopy(model)
    modules = dict(result.named_modules())
    expanded = 0
    for path, conv in list(modules.items()):
        why = _expandable(conv)
        if why is not None:
            if isinstance(conv, nn.Conv2d) and type(conv) is nn.Conv2d:
                log.debug("fxfuse.expand: %s left as it is: %s", path, why)
            continue
        assert isinstance(conv, nn.Conv2d)
        branches = _branches(conv, block, copies)
        if not branches:
            continue
        main: nn.Module = conv
        bn_path = pairs.get(path)
        if bn_path is not None:
            main = nn.Sequential(conv, modules[bn_path])
            _set(result, bn_path, nn.Identity())
        _set(result, path, ExpandedConv(main, branches))
        expanded += 1
    log.info("fxfuse.expand: %d convs became %s blocks", expanded, block)
    return result


def _deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
