"""What each aten op does along its dims: the knowledge :mod:`fxfuse.batch_audit` follows the
batch with.

An op *works along* a dim of an argument where an element of its result depends on elements
of that argument at several positions of the dim: a softmax along its ``dim``, a reduction
over its dims, a matrix product along the contracted dims, a convolution along channels and
space, indexing along the indexed dims. Every other dim maps one to one onto the result, so a
batch held there stays apart. :func:`kind_of` gives, for an aten op, its :class:`Kind`: a
function from the call to the dims it works along, per tensor argument, and what else matters
(batch norm's statistics, ops that read only shapes, reshapes, random draws). Pointwise-tagged
ops work along no dim; an op with no entry is unknown, and the check refuses it where it reads
the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

__all__ = [
    "CARRY_POSITIONS",
    "RANDOM",
    "SIZE_ARGUMENTS",
    "Batch",
    "Call",
    "Info",
    "Kind",
    "Op",
    "TensorArg",
    "kind_of",
    "mixing",
    "op_name",
    "shape_text",
    "tensors_in",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class Batch:
    """Where a tensor holds the batch: dim ``dim`` has ``outer · batch · inner`` elements,
    sample ``i`` occupying the ``inner`` consecutive ones at ``i · inner`` in each outer block.
    A dim that *is* the batch has ``outer == inner == 1``."""

    dim: int
    outer: int = 1
    inner: int = 1

    @property
    def merged(self) -> bool:
        return self.outer != 1 or self.inner != 1

    @property
    def per_sample(self) -> int:
        return self.outer * self.inner


@dataclass(frozen=True)
class TensorArg:
    """A tensor as one run saw it: a handle (the same in both runs) and its shape."""

    handle: int
    shape: tuple[int, ...]
    stride: tuple[int, ...] = ()


@dataclass
class Call:
    """One aten op as a run saw it, its tensors as handles."""

    func: torch._ops.OpOverload
    node: Node | None
    args: dict[str, Any]  # schema name -> value; tensors as TensorArg, lists of them as lists
    outs: list[Any]  # the returns, flattened; tensors as TensorArg
    written: list[int]  # handles the op writes in place
    views: dict[int, int]  # output handle -> the argument handle it is a view of


def tensors_in(value: Any) -> list[TensorArg]:
    """The tensors of an argument: one, a list of them, or none."""
    if isinstance(value, TensorArg):
        return [value]
    if isinstance(value, list):
        return [t for v in value for t in tensors_in(v)]
    return []


@dataclass
class Info:
    """What the check knows of one tensor."""

    batch: Batch | None = None
    random: bool = False  # depends on a random draw
    iota: bool = False  # holds each sample's position (torch.arange over the batch)
    state: str | None = None  # the parameter or buffer it is, or a view of
    input: int | None = None  # the input leaf it is, or a view of


@dataclass
class Op:
    """One op as both runs saw it, with what is known of the tensors it reads."""

    call: Call
    other: Call
    info_of: Callable[[int], Info]

    def arg(self, name: str, default: Any = None) -> Any:
        return self.call.args.get(name, default)

    def tensors(self, name: str) -> list[TensorArg]:
        return tensors_in(self.call.args.get(name))

    def ndim(self, name: str) -> int:
        ts = self.tensors(name)
        return len(ts[0].shape) if ts else 0


Acting = dict[str, set[int]]  # argument name -> the dims of that tensor the op works along


@dataclass(frozen=True)
class Kind:
    """How an op treats dims: ``acting`` gives the dims of each tensor argument it works
    along (mixing the elements at different positions); every other dim maps one to one onto
    its result. ``statistics``: results without the batch are statistics of it (batch norm's
    means and variances). ``value_free``: reads only its arguments' shapes, dtypes and
    devices. ``reshape``: moves elements in row-major order. ``random``: may draw random
    numbers, element by element. ``results``: only the first ``results`` returns are results
    (attention's other returns are random-number-generator state)."""

    acting: Callable[[Op], Acting]
    statistics: bool = False
    value_free: bool = False
    reshape: bool = False
    random: bool = False
    results: int | None = None


def op_name(func: Any) -> str:
    return f"{func.namespace}.{func.overloadpacket.__name__}"


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _dims(value: Any, ndim: int, *, empty_is_all: bool = True) -> set[int]:
    """A ``dim``-style argument (an int, a list; ``None`` or ``[]`` for all) as a set."""
    if value is None or (isinstance(value, (list, tuple)) and not value and empty_is_all):
        return set(range(ndim))
    if isinstance(value, int):
        return {_norm(value, max(ndim, 1))}
    return {_norm(int(v), max(ndim, 1)) for v in value}


def _nothing(op: Op) -> Acting:
    return {}


def _along(*names: str, arg: str = "dim", default: Any = None) -> Callable[[Op], Acting]:
    """Works along its ``dim`` argument (a reduction, scan, softmax, sort, gather)."""

    def acting(op: Op) -> Acting:
        value = op.call.args.get(arg, default)
        return {name: _dims(value, op.ndim(name)) for name in names if op.tensors(name)}

    return acting


def _all_dims(*names: str) -> Callable[[Op], Acting]:
    def acting(op: Op) -> Acting:
        return {name: set(range(op.ndim(name))) for name in names}

    return acting


def _last(name: str, *dims: int) -> Callable[[Op], Acting]:
    """Works along fixed dims counted from the end (contracted dims of a matrix product,
    the dims a pooling, upsampling or layer norm works on)."""

    def acting(op: Op) -> Acting:
        ndim = op.ndim(name)
        return {name: {d + ndim for d in dims if d + ndim >= 0}} if op.tensors(name) else {}

    return acting


def _trailing(k: int, *names: str) -> Callable[[Op], Acting]:
    return _merge(*(_last(name, *range(-k, 0)) for name in names))


def _merge(*parts: Callable[[Op], Acting]) -> Callable[[Op], Acting]:
    def acting(op: Op) -> Acting:
        out: Acting = {}
        for part in parts:
            for name, dims in part(op).items():
                out.setdefault(name, set()).update(dims)
        return out

    return acting


def _all_but_first(name: str, *whole: str) -> Callable[[Op], Acting]:
    """Treats dim 0 as its batch and mixes the rest (group norm, pixel shuffle)."""

    def acting(op: Op) -> Acting:
        out = {name: set(range(1, op.ndim(name)))}
        out.update({w: set(range(op.ndim(w))) for w in whole})
        return out

    return acting


def _convolution(op: Op) -> Acting:
    weight, ndim = op.ndim("weight"), op.ndim("input")
    batched = ndim == weight  # an unbatched input convolves over all its dims
    return {
        "input": set(range(1 if batched else 0, ndim)),
        "weight": set(range(weight)),
        "bias": {0},
    }


def _layer_norm(op: Op) -> Acting:
    k, ndim = len(op.arg("normalized_shape") or ()), op.ndim("input")
    return {"input": set(range(ndim - k, ndim)), "weight": set(range(k)), "bias": set(range(k))}


def _batch_norm(op: Op) -> Acting:
    no_training = "no_training" in op.call.func.overloadpacket.__name__
    if no_training or not op.arg("training", True):
        return {}  # running statistics: a per-channel affine map
    return {"input": {d for d in range(op.ndim("input")) if d != 1}}


def _slice(op: Op) -> Acting:
    dim = _norm(op.arg("dim", 0), op.ndim("self"))
    for call in (op.call, op.other):
        size = tensors_in(call.args["self"])[0].shape[dim]
        start, end, step = call.args.get("start"), call.args.get("end"), call.args.get("step", 1)
        if start not in (None, 0) or (end is not None and end < size) or step != 1:
            return {"self": {dim}}
    return {}  # x[:] along it: the identity


def _pieces(op: Op) -> Acting:
    """split, unbind: along their dim, unless the whole tensor is the one piece."""
    pieces = [o for o in op.call.outs if isinstance(o, TensorArg)]
    return {} if len(pieces) == 1 else {"self": {_norm(op.arg("dim", 0), op.ndim("self"))}}


def _cat(op: Op) -> Acting:
    ndim = max((len(t.shape) for t in op.tensors("tensors")), default=1)
    return {"tensors": {_norm(op.arg("dim", 0), ndim)}}


def _repeat(op: Op) -> Acting:
    repeats, ndim = list(op.arg("repeats")), op.ndim("self")
    offset = len(repeats) - ndim
    return {"self": {d for d in range(ndim) if repeats[d + offset] != 1}}


def _pad(op: Op) -> Acting:
    pad, ndim = list(op.arg("pad")), op.ndim("self")
    return {"self": {ndim - 1 - i // 2 for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]}}


def _unfold(op: Op) -> Acting:
    if op.arg("size") == 1 and op.arg("step") == 1:
        return {}
    return {"self": {_norm(op.arg("dimension"), op.ndim("self"))}}


def _diagonal(op: Op) -> Acting:
    ndim = op.ndim("self")
    return {"self": {_norm(op.arg("dim1", 0), ndim), _norm(op.arg("dim2", 1), ndim)}}


def _renorm(op: Op) -> Acting:
    ndim = op.ndim("self")
    dim = _norm(op.arg("dim"), ndim)
    return {"self": {d for d in range(ndim) if d != dim}}


def _index(op: Op) -> Acting:
    """``x[i, j]`` works along every indexed dim, except the dim holding the batch when it is
    indexed by ``torch.arange(batch)``: each sample then picks from itself
    (``x[torch.arange(b), labels]``)."""
    selves = op.tensors("self")
    batch = op.info_of(selves[0].handle).batch if selves else None
    dims = set()
    for d, index in enumerate(op.arg("indices") or []):
        if not isinstance(index, TensorArg):
            continue
        by_position = op.info_of(index.handle).iota
        if not (by_position and batch is not None and batch.dim == d and not batch.merged):
            dims.add(d)
    return {"self": dims}


def _as_strided(op: Op) -> Acting:
    """A view with explicit strides: the identity where it keeps the sizes and the strides of
    every dim longer than 1 (a result's layout set after the fact: ``adaptive_avg_pool2d``
    of a channels-last tensor); anything else may reorder elements across every dim."""
    t = op.tensors("self")[0]
    size, stride = list(op.arg("size")), list(op.arg("stride"))
    same = list(t.shape) == size and all(
        n == 1 or a == b for n, a, b in zip(size, t.stride, stride, strict=True)
    )
    return {} if same and op.arg("storage_offset") in (None, 0) else {"self": set(range(len(size)))}


def _nll_loss(op: Op) -> Acting:
    if op.arg("reduction", 1) == 0:  # per-sample losses
        return {"self": {1} if op.ndim("self") > 1 else {0}}
    return _all_dims("self", "target")(op)


def _attention(op: Op) -> Acting:
    return _merge(
        _last("query", -1),
        _last("key", -2, -1),
        _last("value", -2, -1),
        _last("attn_mask", -1),
        _last("attn_bias", -1),
    )(op)


#: Integer arguments that size a result. The batch size may be one of them (a view to
#: ``(b, -1)``, ``new_empty((b, 1, 1))``); any other argument that changes with the batch size
#: uses it as a number, or a position.
SIZE_ARGUMENTS = frozenset({
    "size", "sizes", "shape", "stride", "split_size", "split_sizes", "repeats", "pad", "end",
    "length", "output_size", "N", "C", "HxW"})  # fmt: skip


def _table() -> dict[Any, Kind]:
    """Every aten op the check knows, by overload packet (pointwise-tagged overloads aside:
    they work along no dim)."""
    table: dict[Any, Kind] = {}

    def add(names: str, kind: Kind) -> None:
        for name in names.split():
            packet = getattr(aten, name, None)
            if packet is not None:
                table[packet] = kind

    # moves, copies and element-wise ops without the pointwise tag
    add(
        "alias detach detach_ clone _to_copy lift_fresh lift_fresh_copy copy copy_ permute "
        "transpose transpose_ t t_ squeeze squeeze_ unsqueeze unsqueeze_ expand expand_copy "
        "stack fill_ zero_ resolve_conj resolve_neg hardswish hardswish_ hardsigmoid "
        "hardsigmoid_ log_sigmoid_forward _prelu_kernel hardshrink softshrink",
        Kind(_nothing),
    )
    add("view _unsafe_view reshape _reshape_alias view_copy", Kind(_nothing, reshape=True))
    add("select", Kind(_along("self", default=0)))
    add("slice", Kind(_slice))
    add("split split_with_sizes unbind", Kind(_pieces))
    add("cat", Kind(_cat))
    add("repeat", Kind(_repeat))
    add("constant_pad_nd", Kind(_pad))
    add("unfold", Kind(_unfold))
    add("diagonal", Kind(_diagonal))
    add("as_strided as_strided_", Kind(_as_strided))
    add(
        "view_as_real view_as_complex masked_select take nonzero tensor_split",
        Kind(_all_dims("self")),
    )
    add("flip roll", Kind(_along("self", arg="dims")))
    add("renorm", Kind(_renorm))
    add("triu tril", Kind(_last("self", -2, -1)))
    # along a dim: scans, normalisations, sorts, reductions, gathers and scatters
    add(
        "_softmax _log_softmax _safe_softmax cumsum cumsum_ cumprod cummax cummin logcumsumexp "
        "glu sort argsort topk kthvalue mode",
        Kind(_along("self", default=-1)),
    )
    add(
        "sum mean amax amin max min argmax argmin prod var std var_mean std_mean logsumexp norm "
        "linalg_vector_norm any all nansum nanmean count_nonzero median nanmedian aminmax",
        Kind(_along("self")),
    )
    add(
        "gather index_select scatter scatter_ scatter_add scatter_add_ scatter_reduce "
        "scatter_reduce_ index_add index_add_ index_copy index_copy_ index_fill index_fill_",
        Kind(_merge(_along("self", "src", "source"), _all_dims("index"))),
    )
    add("index _unsafe_index index_put index_put_ _index_put_impl_ _unsafe_index_put", Kind(_index))
    add("embedding", Kind(_all_dims("weight")))
    add("bucketize searchsorted", Kind(_all_dims("boundaries", "sorted_sequence")))
    add("nll_loss_forward nll_loss2d_forward", Kind(_nll_loss))
    # matrix products: along the contracted dims
    add("mm bmm", Kind(_merge(_last("self", -1), _last("mat2", -2))))
    add("addmm addmm_", Kind(_merge(_last("mat1", -1), _last("mat2", -2))))
    add("baddbmm baddbmm_", Kind(_merge(_last("batch1", -1), _last("batch2", -2))))
    add("addbmm", Kind(_merge(_last("batch1", -3, -1), _last("batch2", -3, -2))))
    add("mv addmv", Kind(_merge(_last("self", -1), _last("mat", -1), _all_dims("vec"))))
    add("dot vdot", Kind(_all_dims("self", "tensor")))
    add("_cdist_forward", Kind(_merge(_last("x1", -1), _last("x2", -2, -1))))
    add(
        "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_flash_attention "
        "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention "
        "_scaled_dot_product_fused_attention_overrideable",
        Kind(_attention, random=True, results=1),
    )
    # convolution, pooling, resampling and normalisation
    add(
        "convolution _convolution convolution_overrideable cudnn_convolution "
        "cudnn_convolution_transpose mkldnn_convolution miopen_convolution",
        Kind(_convolution),
    )
    for k in (1, 2, 3):
        add(
            f"max_pool{k}d_with_indices max_pool{k}d avg_pool{k}d adaptive_avg_pool{k}d "
            f"_adaptive_avg_pool{k}d adaptive_max_pool{k}d upsample_nearest{k}d "
            f"_upsample_nearest_exact{k}d reflection_pad{k}d replication_pad{k}d "
            f"mkldnn_max_pool{k}d max_unpool{k}d",
            Kind(_trailing(k, "self", "input")),
        )
        add(f"fractional_max_pool{k}d", Kind(_trailing(k, "self"), random=True))
    add("upsample_linear1d", Kind(_trailing(1, "self", "input")))
    add(
        "upsample_bilinear2d upsample_bicubic2d _upsample_bilinear2d_aa _upsample_bicubic2d_aa",
        Kind(_trailing(2, "self", "input")),
    )
    add("upsample_trilinear3d", Kind(_trailing(3, "self", "input")))
    add(
        "grid_sampler_2d cudnn_grid_sampler",
        Kind(_merge(_trailing(2, "input", "self"), _last("grid", -1))),
    )
    add("grid_sampler_3d", Kind(_merge(_trailing(3, "input"), _last("grid", -1))))
    add(
        "im2col col2im pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle",
        Kind(_all_but_first("self")),
    )
    add("native_group_norm", Kind(_all_but_first("input", "weight", "bias")))
    add("native_layer_norm _fused_rms_norm", Kind(_layer_norm))
    add(
        "native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_functional "
        "_native_batch_norm_legit_no_training cudnn_batch_norm miopen_batch_norm",
        Kind(_batch_norm, statistics=True),
    )
    # reading only shapes, dtypes and devices
    add(
        "new_empty new_empty_strided new_zeros new_ones new_full empty_like zeros_like "
        "ones_like full_like sym_size sym_stride sym_numel sym_storage_offset is_same_size",
        Kind(_nothing, value_free=True),
    )
    add("rand_like randn_like randint_like", Kind(_nothing, value_free=True, random=True))
    # random draws, element by element (multinomial: row by row)
    add(
        "bernoulli bernoulli_ native_dropout normal normal_ uniform_ exponential_ geometric_ "
        "cauchy_ log_normal_ random_ poisson binomial _standard_gamma rrelu_with_noise "
        "rrelu_with_noise_ _fused_dropout rand randn randint",
        Kind(_nothing, random=True),
    )
    add("multinomial _sample_dirichlet", Kind(_last("self", -1), random=True))
    return table


_TABLE = _table()
POINTWISE = Kind(_nothing)
RANDOM = torch.Tag.nondeterministic_seeded
#: Ops that move ``torch.arange(batch)`` about without computing with it.
CARRY_POSITIONS = frozenset(getattr(aten, name) for name in (
    "unsqueeze", "view", "_unsafe_view", "expand", "_to_copy", "clone", "alias", "detach",
    "lift_fresh", "slice"))  # fmt: skip


def kind_of(func: Any) -> Kind | None:
    if torch.Tag.pointwise in func.tags:  # (max.other beside the reduction max.dim)
        return POINTWISE
    return _TABLE.get(func.overloadpacket)


def shape_text(s: Sequence[int]) -> str:
    return "×".join(str(n) for n in s) if s else "0-d"


_WHAT = {
    "convolution": "convolves over",
    "_softmax": "normalises over",
    "_log_softmax": "normalises over",
    "_safe_softmax": "normalises over",
    "native_group_norm": "normalises over",
    "native_layer_norm": "normalises over",
    "cat": "concatenates along",
    "index": "indexes",
    "select": "picks one entry of",
    "slice": "slices",
    "flip": "reverses",
    "roll": "rolls",
    "sort": "sorts along",
    "cumsum": "accumulates along",
    "bmm": "contracts",
    "mm": "contracts",
    "addmm": "contracts",
}


def mixing(name: str, call: Call, arg: str, t: TensorArg, batch: Batch) -> str:
    if torch.Tag.reduction in call.func.tags:
        what = "reduces over"
    else:
        what = _WHAT.get(str(call.func.overloadpacket.__name__), "works along")
    holds = "the batch merged with other elements" if batch.merged else "the batch"
    return (
        f"{name} {what} dim {batch.dim} of its {arg} ({shape_text(t.shape)}), which holds {holds}: "
        "it mixes samples"
    )
