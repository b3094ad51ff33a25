"""Deploy checkpoints: the fused weights as a state_dict for *your* inference-time class.

Re-parameterization repositories ship a deploy-time class of their own (``RepVGG(deploy=True)``,
a timm model after ``reparameterize_model``, a detector with fused blocks) and users want its
``state_dict`` made from a training checkpoint, without renaming keys by hand.
:func:`deploy_state_dict` reads both models as graphs, lists the layers each one runs, in
execution order, and pairs them one for one **by structure, never by name**:

- a conv with a conv of the same channels, kernel, stride, padding, dilation, groups and
  padding mode (pads applied in front of a conv count as its padding); a linear layer with a
  linear layer of the same shape; a batch norm with a batch norm of the same width;
- any other module with parameters (``LayerNorm``, ``PReLU``, …) with one of its own class and
  shapes; a tensor the graph reads directly (a layer scale, a token) with one of its shape;
- a batch norm the deploy model keeps right after a conv, where fxfuse folded it away, is set
  to the identity (the conv's bias goes into its shift when the conv has none).

The first layer that does not pair stops it with a :class:`DeployMatchError` naming both
layers and the difference. The result is then checked: the deploy model loaded with it must
compute what the fused model computes, on ``example_inputs`` (or an input guessed from the
first layer). That check matters, since what runs between the layers is not compared: a
deploy class that keeps, as code, a constant scale fxfuse folded into a conv (``2 *
conv(x)``), or runs two same-shaped branches in the other order, pairs but computes
something else.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from fxfuse.capture import symbolic_capture
from fxfuse.compare import tolerance_for
from fxfuse.dialects import BATCH_NORM_FUNCTIONS, TUPLE_BATCH_NORMS, bind, module_path_of
from fxfuse.errors import FxFuseError, TrainingModeError
from fxfuse.maps import Affine, as_affine, as_layer
from fxfuse.maps import Layer as LayerView
from fxfuse.rules import RewriteContext
from fxfuse.testing import relative_error
from fxfuse.weights import Leaf, Weight

__all__ = ["DeployMatchError", "deploy_state_dict", "read_checkpoint"]

log = logging.getLogger("fxfuse")


class DeployMatchError(FxFuseError, ValueError):
    """The fused model's layers do not pair with the deploy model's; ``hint`` says what to
    check."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


# -- the layers a graph runs -------------------------------------------------------------------


@dataclass
class Layer:
    """One unit of a graph that holds tensors: a conv, linear or batch norm (any form), another
    module with parameters, or a tensor read directly.

    ``tensors`` maps a role (``weight``, ``bias``, ``running_mean``…; a module's own names for
    other modules; ``""`` for a bare tensor) to the tensor, ``None`` where the layer has none.
    ``shape`` is what must agree for two layers to pair, ``text`` how a person would say it.
    """

    kind: str
    node: Node
    where: str
    tensors: dict[str, Tensor | None]
    shape: tuple[Any, ...]
    text: str
    input: Node | None = None
    eps: float = 0.0
    reason: dict[int, str] = field(default_factory=dict)  # per field of ``shape``, its name


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _tensor(weight: Weight | None) -> Tensor | None:
    """The tensor a layer holds as it is (a parameter or buffer), else ``None``."""
    return weight.tensor if isinstance(weight, Leaf) else None


def _conv_layer(node: Node, consts: RewriteContext) -> Layer | None:
    view = as_layer(node, consts)
    if not isinstance(view, LayerView) or view.label:
        return None
    tensors = {"weight": _tensor(view.weight), "bias": _tensor(view.bias)}
    if tensors["weight"] is None:
        return None
    shape: tuple[Any, ...]
    if view.geometry is None:
        text = f"linear {view.in_channels}→{view.out_channels}"
        shape = (view.in_channels, view.out_channels)
        reason = {0: "input features", 1: "output features"}
        return Layer("linear", node, view.name, tensors, shape, text, view.input, reason=reason)
    geo = view.geometry
    shape = (
        view.in_channels,
        view.out_channels,
        view.kernel_size,
        geo.stride,
        geo.padding,
        geo.dilation,
        geo.groups,
        geo.padding_mode,
        geo.output_padding,
    )
    names = (
        "input channels",
        "output channels",
        "kernel size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding mode",
        "output padding",
    )
    text = f"{view.describe()} {view.in_channels}→{view.out_channels}"
    return Layer(
        view.kind, node, view.name, tensors, shape, text, view.input, reason=dict(enumerate(names))
    )


_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _batch_norm_tensors(view: Affine, consts: RewriteContext) -> tuple[dict[str, Any], float]:
    """A batch norm's own tensors (a module's attributes, or a functional one's arguments)
    and its ``eps``."""
    node = view.node
    if node.op == "call_module":
        module = consts.module(str(node.target))
        return {n: getattr(module, n) for n in _BN_TENSORS}, float(module.eps)
    if node.target is operator.getitem and node.args[0].target in TUPLE_BATCH_NORMS:  # type: ignore[union-attr]
        node = node.args[0]  # type: ignore[assignment]
    assert node.target in BATCH_NORM_FUNCTIONS
    args = bind(node.target, node) or {}  # type: ignore[arg-type]
    tensors = {
        n: consts._held(args[n]) if isinstance(args.get(n), Node) else None for n in _BN_TENSORS
    }
    return tensors, float(consts.number(args.get("eps")) or 1e-5)


def _batch_norm_layer(node: Node, consts: RewriteContext) -> Layer | None:
    view = as_affine(node, consts)
    if not isinstance(view, Affine):
        return None
    tensors, eps = _batch_norm_tensors(view, consts)
    width = next((t.numel() for t in tensors.values() if isinstance(t, Tensor)), view.channels)
    where = view.sources[0] if view.sources else module_path_of(node)
    layer = Layer(
        "batch_norm",
        node,
        where,
        tensors,
        # a deploy model fresh from its constructor is in training mode: what matters is
        # whether it keeps running statistics to load, not its mode
        (width, tensors["running_mean"] is not None),
        f"batch norm ({width})",
        view.input,
        eps,
        reason={0: "width", 1: "having running statistics"},
    )
    return layer


def _module_layer(node: Node, consts: RewriteContext) -> Layer | None:
    module = consts.module(str(node.target))
    tensors: dict[str, Tensor | None] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    if not tensors:
        return None
    shape = (type(module), tuple((k, tuple(t.shape)) for k, t in tensors.items() if t is not None))
    name = type(module).__name__
    return Layer("module", node, str(node.target), tensors, shape, name, reason={0: "class"})


def graph_layers(graph: Graph, root: nn.Module) -> list[Layer]:
    """The layers ``graph`` runs, in its (execution) order; see the module docstring."""
    consts = RewriteContext(graph, root)
    layers: dict[Node, Layer] = {}
    claimed: set[int] = set()
    for node in graph.nodes:
        layer = _conv_layer(node, consts) or _batch_norm_layer(node, consts)
        if layer is None and node.op == "call_module":
            layer = _module_layer(node, consts)
        if layer is not None:
            layers[node] = layer
            claimed.update(id(t) for t in layer.tensors.values() if t is not None)
    ordered: list[Layer] = []
    for node in graph.nodes:
        if node in layers:
            ordered.append(layers[node])
        elif node.op == "get_attr":
            value = consts._held(node)
            if value is not None and id(value) not in claimed:
                claimed.add(id(value))
                shape = (tuple(value.shape), value.dtype)
                text = f"tensor {tuple(value.shape)}"
                ordered.append(Layer("tensor", node, str(node.target), {"": value}, shape, text))
    return ordered


# -- pairing -----------------------------------------------------------------------------------


def _difference(source: Layer, target: Layer) -> str | None:
    """Why ``source`` cannot give its tensors to ``target`` (``None``: it can)."""
    if source.kind != target.kind:
        return f"a {source.text} cannot fill a {target.text}"
    for i, (a, b) in enumerate(zip(source.shape, target.shape, strict=True)):
        if a != b:
            what = source.reason.get(i, "shape")
            return f"{what} {_show(a)} vs {_show(b)}"
    return None


def _show(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else str(value)


class _Pairing:
    """Walks the two layer lists in step, filling ``state`` (the deploy model's keys)."""

    def __init__(
        self, source: list[Layer], target: list[Layer], names: Mapping[int, list[str]]
    ) -> None:
        self.source, self.target, self.names = source, target, names
        self.state: dict[str, Tensor] = {}
        self.pairs = 0

    def where(self, layer: Layer, index: int, deploy: bool) -> str:
        name = layer.where
        if deploy:
            keys = [k for t in layer.tensors.values() if t is not None for k in self.names[id(t)]]
            if keys:
                name = keys[0].rpartition(".")[0] if layer.kind != "tensor" else keys[0]
        return f"layer {index + 1} ({name or 'the top level'}: {layer.text})"

    def put(self, target: Tensor | None, value: Tensor) -> None:
        assert target is not None
        for key in self.names[id(target)]:
            self.state[key] = value.detach().to(target.dtype).to(target.device).clone()

    def run(self) -> dict[str, Tensor]:
        i = j = 0
        while j < len(self.target):
            d = self.target[j]
            f = self.source[i] if i < len(self.source) else None
            why = None if f is None else _difference(f, d)
            if f is not None and why is None:
                j = self.give(f, d, j)
                i += 1
            elif d.kind == "batch_norm" and self.after_conv(d, j):
                # a kept batch norm is matched before "no layer left": it may be the last layer
                self.identity(d, shift=None)  # the conv's own bias stays in the conv
            elif f is None:
                raise DeployMatchError(
                    f"the fused model has no layer left for deploy {self.where(d, j, True)}: "
                    f"it runs {len(self.source)} layers",
                    "is the deploy model the same network (depth, heads) as the trained one?",
                )
            else:
                raise DeployMatchError(
                    f"cannot pair fused {self.where(f, i, False)} with deploy "
                    f"{self.where(d, j, True)}: {why}",
                    "both models are read in execution order; the layers before these paired",
                )
            j += 1
        if i < len(self.source):
            f = self.source[i]
            raise DeployMatchError(
                f"the deploy model has no layer for fused {self.where(f, i, False)}: "
                f"it runs {len(self.target)} layers",
                "is the deploy model the same network (depth, heads) as the trained one?",
            )
        return self.state

    def after_conv(self, bn: Layer, j: int) -> bool:
        """Whether ``bn`` (deploy layer ``j``) directly reads the deploy conv before it."""
        previous = self.target[j - 1] if j > 0 else None
        return (
            previous is not None
            and previous.kind in ("conv", "conv_transpose", "linear")
            and bn.input is previous.node
        )

    def give(self, f: Layer, d: Layer, j: int) -> int:
        """Copy ``f``'s tensors into ``d``'s keys; returns the last deploy index used."""
        self.pairs += 1
        bias = f.tensors.get("bias")
        if d.kind in ("conv", "conv_transpose", "linear") and d.tensors["bias"] is None:
            self.put(d.tensors["weight"], _required(f.tensors["weight"]))
            if bias is None or not bool(bias.ne(0).any()):
                return j
            after = self.target[j + 1] if j + 1 < len(self.target) else None
            if after is not None and after.kind == "batch_norm" and self.after_conv(after, j + 1):
                self.identity(after, shift=bias)
                return j + 1
            raise DeployMatchError(
                f"deploy {self.where(d, j, True)} has no bias, and the fused layer's bias is "
                "not zero",
                "give that layer bias=True, or keep a batch norm after it",
            )
        if d.kind == "batch_norm" and f.eps != d.eps:
            f = _with_eps(f, d.eps)
        for role, target in d.tensors.items():
            if target is None:
                continue
            value = f.tensors.get(role)
            if value is None and role == "bias":
                value = torch.zeros_like(target)
            if value is None:
                raise DeployMatchError(
                    f"the fused layer has no {role} for deploy {self.where(d, j, True)}",
                    "the deploy layer holds a tensor the fused one does not",
                )
            self.put(target, value)
        if d.kind in ("conv", "conv_transpose", "linear", "batch_norm"):
            for role in ("bias", "weight"):
                value = f.tensors.get(role)
                if d.tensors.get(role) is None and value is not None and bool(value.ne(0).any()):
                    if d.kind == "batch_norm" and role == "weight" and bool(value.eq(1).all()):
                        continue
                    raise DeployMatchError(
                        f"deploy {self.where(d, j, True)} has no {role}, and the fused one's "
                        "is not the identity",
                        "give that layer the same affine parameters",
                    )
        return j

    def identity(self, bn: Layer, shift: Tensor | None) -> None:
        """Make a kept batch norm compute ``x + shift``: mean 0, variance 1 and a scale of
        ``sqrt(1 + eps)``, so that ``scale / sqrt(var + eps)`` is 1."""
        t = bn.tensors
        if t["running_mean"] is None:
            raise DeployMatchError(
                f"{self.where(bn, self.target.index(bn), True)} uses batch statistics "
                "(no running statistics): it cannot be set to pass values through",
                "build the deploy model with track_running_stats=True",
            )
        n = t["running_mean"].numel()
        self.put(t["running_mean"], torch.zeros(n, dtype=torch.float64))
        if t["weight"] is None:
            self.put(t["running_var"], torch.full((n,), 1.0 - bn.eps, dtype=torch.float64))
        else:
            self.put(t["running_var"], torch.ones(n, dtype=torch.float64))
            self.put(t["weight"], torch.full((n,), math.sqrt(1.0 + bn.eps), dtype=torch.float64))
        if t["bias"] is not None:
            self.put(t["bias"], torch.zeros(n) if shift is None else shift)
        elif shift is not None and bool(shift.ne(0).any()):
            raise DeployMatchError(
                f"{self.where(bn, self.target.index(bn), True)} has no shift to hold the "
                "fused conv's bias",
                "give the conv bias=True or the batch norm affine=True",
            )


def _required(value: Tensor | None) -> Tensor:
    assert value is not None
    return value


def _with_eps(layer: Layer, eps: float) -> Layer:
    """The same batch norm with another ``eps``: ``var + eps`` kept, so it computes the same."""
    var = layer.tensors["running_var"]
    if var is None:
        return layer
    tensors = dict(layer.tensors, running_var=var.double() + (layer.eps - eps))
    return Layer(layer.kind, layer.node, layer.where, tensors, layer.shape, layer.text, eps=eps)


# -- the public function -----------------------------------------------------------------------


def _names(model: nn.Module) -> dict[int, list[str]]:
    """Every state_dict key of each tensor of ``model`` (tied tensors have several)."""
    names: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for key, value in state.items():
        names.setdefault(id(value), []).append(key)
    return names


def _graph(model: nn.Module, what: str) -> tuple[Graph, nn.Module]:
    if isinstance(model, GraphModule):
        return model.graph, model
    try:
        return symbolic_capture(model), model
    except FxFuseError as error:
        raise DeployMatchError(
            f"cannot read the {what} model as a graph: {str(error).splitlines()[0]}",
            "deploy_state_dict traces both models with torch.fx",
        ) from error


def deploy_state_dict(
    model: nn.Module,
    deploy_model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
) -> dict[str, Tensor]:
    """A ``state_dict`` for ``deploy_model`` holding the weights of ``model`` fused.

    ``model`` is a model fused by :func:`fxfuse.optimize`, or an eval-mode model, which is
    fused here first. Its layers and ``deploy_model``'s are paired by structure, in execution
    order (see the module docstring); the result has every key of
    ``deploy_model.state_dict()``, so ``deploy_model.load_state_dict(result)`` (strict)
    accepts it. Entries the deploy model's forward never reads (``num_batches_tracked``, an
    unused head) keep the deploy model's own values; other than a batch-norm counter, they
    are named in a warning. Neither model is changed.

    A copy of ``deploy_model`` loaded with the result is run on ``example_inputs`` and
    compared with the fused model (normalised error within the dtype's tolerance). Without
    them, an input is guessed from the first layer (a batch of two 32×32 images for a 2-d
    conv); where none can be guessed or the model rejects it, a warning says the result is
    unchecked: pairing in execution order cannot tell apart two same-shaped layers that the
    two models run in different orders.

    Raises:
        DeployMatchError: a layer does not pair (the message names the first one on each side
            and the difference), or the loaded copy computes something else.
        TrainingModeError: ``model`` is in training mode.
    """
    if model.training:
        raise TrainingModeError(
            "deploy_state_dict needs the model in eval mode (batch norms fold with their "
            "running statistics): call model.eval() first"
        )
    if getattr(model, "fxfuse_report", None) is None:
        from fxfuse.api import optimize
        from fxfuse.passes import default_rules

        # a deploy class collapses each block into its layer; it keeps layers that are
        # concatenated or follow each other, which merge-concat and compose-layers would join
        rules = default_rules().without("merge-concat", "compose-layers")
        model = optimize(model, example_inputs, rules=rules)
    source = graph_layers(*_graph(model, "fused"))
    graph, root = _graph(deploy_model, "deploy")
    target = graph_layers(graph, root)
    names = _names(deploy_model)
    state = _Pairing(source, target, names).run()
    result = {}
    unused = []
    for key, value in deploy_model.state_dict().items():
        if key in state:
            result[key] = state[key]
        else:
            result[key] = value.clone()
            if not key.endswith("num_batches_tracked"):
                unused.append(key)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        warnings.warn(
            f"deploy_state_dict: the deploy model's forward does not read {shown}; "
            "they keep the deploy model's own values",
            stacklevel=2,
        )
    log.info("fxfuse: deploy_state_dict paired %d layers", len(target))
    inputs = example_inputs if example_inputs is not None else _guess_inputs(source)
    if inputs is None:
        warnings.warn(
            "deploy_state_dict: pass example_inputs to check the result; the layers paired, "
            "but two same-shaped layers run in a different order would pair crosswise",
            stacklevel=2,
        )
    else:
        _check(model, deploy_model, result, inputs, guessed=example_inputs is None)
    return result


_GUESSED_SIZE = {1: 64, 2: 32, 3: 16}


def _guess_inputs(layers: list[Layer]) -> tuple[Tensor] | None:
    """An input for a model whose first layer is a conv (or linear) reading the model's only
    input: a batch of two, 32×32 for a 2-d conv. ``None`` when there is no such layer."""
    first = layers[0] if layers else None
    if first is None or first.input is None:
        return None
    placeholders = [n for n in first.node.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or first.input is not placeholders[0]:
        return None
    weight = first.tensors["weight"]
    assert weight is not None
    if first.kind == "linear":
        return (torch.randn(2, weight.shape[1], dtype=weight.dtype, device=weight.device),)
    if first.kind != "conv":
        return None
    channels, ndim = first.shape[0], weight.dim() - 2
    size = (_GUESSED_SIZE.get(ndim, 8),) * ndim
    return (torch.randn(2, channels, *size, dtype=weight.dtype, device=weight.device),)


def _check(
    fused: nn.Module,
    deploy_model: nn.Module,
    state: dict[str, Tensor],
    example_inputs: Sequence[Any],
    guessed: bool = False,
) -> None:
    """Load ``state`` into a copy of ``deploy_model`` and compare it with ``fused``."""
    candidate = copy.deepcopy(deploy_model).eval()
    candidate.load_state_dict(state, strict=True)
    with torch.no_grad():
        try:
            expected = fused(*example_inputs)
        except Exception as rejected:
            if not guessed:
                raise
            shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
            warnings.warn(
                f"deploy_state_dict: could not check the result on a guessed input {shapes} "
                f"({type(rejected).__name__}); pass example_inputs",
                stacklevel=3,
            )
            return
        error = relative_error(expected, candidate(*example_inputs))
    dtype = next((p.dtype for p in candidate.parameters()), torch.float32)
    tolerance = tolerance_for(dtype)
    if not error <= tolerance:
        raise DeployMatchError(
            f"the deploy model loaded with the paired weights computes something else: "
            f"normalised error {error:.2e} (tolerance {tolerance:g})",
            "every layer paired, so what runs between them differs (an activation, the "
            "order of two same-shaped branches, a pad outside the convs)",
        )


# -- checkpoints -------------------------------------------------------------------------------

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def read_checkpoint(path: str, key: str | None = None) -> dict[str, Tensor]:
    """The state_dict a training checkpoint holds, loaded with ``weights_only=True``.

    Accepts a plain state_dict or a dict that holds one under ``key`` (by default the first of
    ``state_dict``, ``model_state_dict``, ``model``, ``net``, ``module`` that is one, else
    its only value that is one); a ``module.`` prefix on every key (``DataParallel``) is
    dropped. A pickled model is refused: loading one runs code from the file.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DeployMatchError(
            f"cannot read {path} as a checkpoint of tensors: {str(error).splitlines()[0]}",
            "save the training model's state_dict: torch.save(model.state_dict(), path)",
        ) from error
    state = _find_state(loaded, key, path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_state(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _find_state(loaded: Any, key: str | None, path: str) -> dict[str, Tensor]:
    if key is not None:
        value = loaded.get(key) if isinstance(loaded, Mapping) else None
        if value is None or not _is_state(value):
            raise DeployMatchError(f"{path} holds no state_dict under {key!r}", _keys(loaded))
        return dict(value)
    if _is_state(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping):
        for name in _STATE_KEYS:
            if _is_state(loaded.get(name)):
                return dict(loaded[name])
        found = [k for k, v in loaded.items() if _is_state(v)]
        if len(found) == 1:
            return dict(loaded[found[0]])
    raise DeployMatchError(f"{path} holds no state_dict", _keys(loaded))


def _keys(loaded: Any) -> str:
    if isinstance(loaded, Mapping):
        return f"its keys are {', '.join(map(str, list(loaded)[:8]))}; choose one with --key"
    return f"it holds a {type(loaded).__name__}"
