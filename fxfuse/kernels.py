"""The algebra of structural re-parameterization, as pure functions over tensors.

Nothing in this module knows about ``torch.fx``: every function takes tensors and integers and
returns a tensor, so each identity below can be tested on its own. Each function converts its
tensor inputs to float64 itself (:func:`exact`) and keeps autograd (nothing is detached): the
same functions compute a fused model's weights once (``fxfuse.optimize``), or on every call
inside the graph, differentiably (the ``torch.compile`` backend). fxfuse treats every function
here as pure (see :mod:`fxfuse.effects`): keep it so.

Notation: a convolution is ``y = W ⋆ x + b`` with stride ``s``, padding ``p``, dilation ``d``,
groups ``g``; a per-channel affine map is ``y = a·x + t``.

- BN as an affine map (eval, running statistics)::

      σ = sqrt(var + eps);  a = γ / σ;  t = β − μ · a

- affine after a layer (:func:`scale_kernel`, :func:`affine_bias`)::

      W' = W · a  (per output channel; dim 1 per group for a transposed conv);  b' = b · a + t

- affine before a layer (:func:`scale_input_channels`, :func:`input_shift_bias`)::

      W'[o, i] = W[o, i] · a[i];   b' = b + Σ_{i, taps} W[o, i] · t[i]

- a per-channel map as a kernel (:func:`diagonal_kernel`): zero except
  ``W[c, c mod (C/g), centre] = a[c]``, for any ``g`` dividing ``C``;
- pad-and-add: branches reading one input merge when their sampling windows align
  (:func:`align_windows`); each kernel is spread to the merged dilation and placed at its offset
  inside the merged extent (:func:`place_kernel`), grouped kernels densified to the merged
  grouping (:func:`expand_groups`), and the placed kernels summed;
- sequential composition ``k×k ∘ 1×1`` (:func:`compose_kernels`, :func:`compose_bias`)::

      W[o, i, …] = Σ_m W₂[o, m, …] · W₁[m, i];   b = b₂ + Σ_m (Σ_taps W₂[o, m, …]) · b₁[m]

- average pooling as a depthwise kernel of ``1/kᵈ`` (:func:`average_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ONE",
    "MergedWindow",
    "Window",
    "add",
    "affine_bias",
    "align_windows",
    "average_kernel",
    "batch_norm_affine",
    "bn_scale",
    "bn_shift",
    "by_rows",
    "cast",
    "channel_magnitudes",
    "channel_sqnr_db",
    "compose_bias",
    "compose_kernels",
    "diagonal_kernel",
    "equalization_scales",
    "exact",
    "expand_groups",
    "input_ranges",
    "input_shift_bias",
    "merged_bias",
    "output_ranges",
    "place_kernel",
    "placed_sum",
    "product",
    "quantize_symmetric",
    "reciprocal",
    "scale_input_channels",
    "scale_kernel",
    "shaped",
    "sqnr_db",
    "stack_biases",
    "stack_outputs",
]


_Shape = Callable[..., Sequence[int]]


def shaped(shape_of: _Shape) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Declare the shape a kernel function returns, as a function of its arguments' shapes
    (anything with ``.shape`` and ``.numel()``): callers that hold weight *expressions* know
    the shape of a result without computing it."""

    def mark(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn.shape_of = shape_of  # type: ignore[attr-defined]
        return fn

    return mark


Rows = Callable[[Any, int, int], Any]
"""``rows(x, start, stop)``: rows ``start:stop`` (dim 0) of an argument, computed."""
Whole = Callable[[Any], Any]
"""``whole(x)``: an argument, computed whole."""
RowRule = Callable[..., "Tensor | None"]


def by_rows(rule: RowRule) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Declare how a kernel function computes rows ``start:stop`` (dim 0: a kernel's output
    channels) of its result from parts of its arguments:
    ``rule(start, stop, rows, whole, *args, **kwargs)``, where ``rows(x, start, stop)`` and
    ``whole(x)`` give an argument's rows or its whole value (a caller holding expressions
    computes only those). Each row must equal the same row of the whole result, in the same
    float64 operations; ``None``: these rows cannot be computed on their own (the caller
    computes the whole result and slices it). Lets a fused layer's weights be computed a
    block of output channels at a time (:func:`fxfuse.weights.evaluate_as`)."""

    def mark(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn.rows_of = rule  # type: ignore[attr-defined]
        return fn

    return mark


def _channel_rows(x: Any, channels: int, start: int, stop: int, rows: Rows, whole: Whole) -> Any:
    """Entries ``start:stop`` of a per-channel value ``x`` (``channels`` entries, or one for
    all, as :func:`channel_vector` reads it): a number stays whole."""
    if x is None or not hasattr(x, "shape") or x.numel() == 1:
        return x if x is None else whole(x)
    if x.dim() == 1 and int(x.shape[0]) == channels:
        return rows(x, start, stop)
    return channel_vector(whole(x), channels)[start:stop]


def _group_span(start: int, stop: int, out_channels: int, groups: int) -> tuple[int, int] | None:
    """The groups ``first:last`` that output rows ``start:stop`` of a ``groups``-grouped layer
    cover, when those rows are whole groups or lie in one group (else None): the rows are
    then the rows of a layer with ``last − first`` groups (its input channels those groups')."""
    per_group = out_channels // groups
    first, last = start // per_group, -(-stop // per_group)
    if last - first == 1 or not (start % per_group or stop % per_group):
        return first, last
    return None


def _broadcast_rows(fn: Callable[..., Tensor]) -> RowRule:
    """The row rule of an elementwise function of broadcast arguments: an argument spanning
    the result's rows gives its rows, one broadcast along them is read whole."""

    def rule(start: int, stop: int, rows: Rows, whole: Whole, *ts: Any) -> Tensor:
        shape = torch.broadcast_shapes(*(tuple(t.shape) for t in ts))
        parts = [
            rows(t, start, stop)
            if shape and t.dim() == len(shape) and int(t.shape[0]) == int(shape[0]) != 1
            else whole(t)
            for t in ts
        ]
        return fn(*parts)

    return rule


def _same(t: Any, *args: Any, **kwargs: Any) -> Sequence[int]:
    return tuple(t.shape)


def _vector(channels: int) -> _Shape:
    return lambda *args, **kwargs: (channels,)


ONE = torch.tensor(1.0, dtype=torch.float64)
"""The number 1 as fxfuse's constant weights hold it (:func:`fxfuse.weights.const`): a
function handed this very tensor knows it multiplies by one without reading it."""


def exact(t: Tensor) -> Tensor:
    """``t`` as float64, on a device that supports float64 (MPS does not); autograd kept."""
    device = torch.device("cpu") if t.device.type == "mps" else t.device
    return t.to(device=device, dtype=torch.float64)


@by_rows(_broadcast_rows(lambda a, b: product(a, b)))
@shaped(lambda a, b: torch.broadcast_shapes(tuple(a.shape), tuple(b.shape)))
def product(a: Tensor, b: Tensor) -> Tensor:
    """``a · b`` in float64 (broadcasting)."""
    return exact(a) * exact(b).to(exact(a).device)


@by_rows(_broadcast_rows(lambda *ts: add(*ts)))
@shaped(lambda *ts: tuple(ts[0].shape))
def add(*tensors: Tensor) -> Tensor:
    """``Σ tensors`` in float64."""
    total = exact(tensors[0])
    for t in tensors[1:]:
        total = total + exact(t).to(total.device)
    return total


def _stacked_rows(start: int, stop: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(piece, first, last)``: the rows of each stacked piece (``sizes`` rows each) that rows
    ``start:stop`` of the stack cover."""
    spans, offset = [], 0
    for index, size in enumerate(sizes):
        first, last = max(start, offset), min(stop, offset + size)
        if first < last:
            spans.append((index, first - offset, last - offset))
        offset += size
    return spans


def _stack_outputs_rows(start: int, stop: int, rows: Rows, whole: Whole, *weights: Any) -> Tensor:
    spans = _stacked_rows(start, stop, [int(w.shape[0]) for w in weights])
    return stack_outputs(*(rows(weights[i], first, last) for i, first, last in spans))


def _stack_biases_rows(
    start: int, stop: int, rows: Rows, whole: Whole, biases: Sequence[Any], channels: Sequence[int]
) -> Tensor:
    spans = _stacked_rows(start, stop, channels)
    return stack_biases(
        [
            _channel_rows(biases[i], channels[i], first, last, rows, whole)
            for i, first, last in spans
        ],
        [last - first for _, first, last in spans],
    )


@by_rows(_stack_outputs_rows)
@shaped(lambda *ws: (sum(int(w.shape[0]) for w in ws), *ws[0].shape[1:]))
def stack_outputs(*weights: Tensor) -> Tensor:
    """Kernels of layers reading one input, their output channels stacked (a concatenation)."""
    return torch.cat([exact(w).to(exact(weights[0]).device) for w in weights])


@by_rows(_stack_biases_rows)
@shaped(lambda biases, channels: (sum(channels),))
def stack_biases(biases: Sequence[Tensor], channels: Sequence[int]) -> Tensor:
    """Biases of stacked layers, ``biases[i]`` for ``channels[i]`` outputs (a number for all)."""
    return torch.cat([channel_vector(b, n) for b, n in zip(biases, channels, strict=True)])


@by_rows(lambda start, stop, rows, whole, a: reciprocal(rows(a, start, stop)))
@shaped(_same)
def reciprocal(a: Tensor) -> Tensor:
    """``1 / a`` in float64."""
    return 1.0 / exact(a)


@by_rows(lambda start, stop, rows, whole, t, *a, **kw: cast(rows(t, start, stop), *a, **kw))
@shaped(_same)
def cast(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` in a layer's own dtype and device: where exact weights end."""
    return t.to(device=device, dtype=dtype)


def _on(t: Tensor, like: Tensor) -> Tensor:
    return exact(t).to(like.device)


def _column(t: Tensor, like: Tensor, dims: int) -> Tensor:
    """A per-channel vector shaped to scale dim 0 of a ``dims``-d tensor like ``like``."""
    return _on(t, like).reshape(-1, *([1] * (dims - 1)))


# --------------------------------------------------------------------------------------------
# Batch norm and per-channel affine maps
# --------------------------------------------------------------------------------------------


@shaped(_same)
def bn_scale(running_var: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``a = γ / sqrt(var + eps)`` (``γ = 1`` without affine parameters)."""
    scale = torch.rsqrt(exact(running_var) + eps)
    return scale if weight is None else scale * _on(weight, scale)


@shaped(_same)
def bn_shift(running_mean: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``t = β − μ · a`` (``β = 0`` without affine parameters)."""
    shift = -_on(running_mean, scale) * exact(scale)
    return shift if bias is None else shift + _on(bias, shift)


def batch_norm_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """An eval-mode batch norm as ``y = a · x + t`` per channel: ``(a, t)`` in float64."""
    scale = bn_scale(running_var, weight, eps)
    return scale, bn_shift(running_mean, scale, bias)


@by_rows(
    lambda start, stop, rows, whole, t, channels: channel_vector(
        _channel_rows(t, channels, start, stop, rows, whole), stop - start
    )
)
@shaped(lambda t, channels: (channels,))
def channel_vector(t: Tensor, channels: int) -> Tensor:
    """A scalar or a tensor with ``channels`` elements (``(C,)``, ``(1, C, 1, 1)``…) as a
    float64 ``(channels,)`` vector."""
    t = exact(t)
    return t.reshape(1).expand(channels) if t.numel() == 1 else t.reshape(channels)


def _scale_kernel_rows(
    start: int,
    stop: int,
    rows: Rows,
    whole: Whole,
    weight: Any,
    scale: Any,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> Tensor | None:
    if transposed:  # (dim 0 is the input channels)
        return None
    channels = int(weight.shape[0])
    return scale_kernel(
        rows(weight, start, stop), _channel_rows(scale, channels, start, stop, rows, whole)
    )


@by_rows(_scale_kernel_rows)
@shaped(_same)
def scale_kernel(
    weight: Tensor, scale: Tensor, *, transposed: bool = False, groups: int = 1
) -> Tensor:
    """``W · a`` along the output-channel axis (``scale``: one value per output channel, or
    one for all).

    A transposed conv's weight is ``[in, out/g, k…]``: output channel ``o`` of group ``G``
    lives at ``W[G·in/g : (G+1)·in/g, o − G·out/g]``, so the scale applies per group on dim 1
    (never on dim 0: docs/design.md trap 4)."""
    w = exact(weight)
    if transposed:
        in_channels, out_per_group = w.shape[0], w.shape[1]
        scale = channel_vector(scale, out_per_group * groups).to(w.device)
        grouped = w.reshape(groups, in_channels // groups, out_per_group, *w.shape[2:])
        per_group = scale.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 2)))
        return (grouped * per_group).reshape(w.shape)
    scale = channel_vector(scale, w.shape[0]).to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
    if w is not weight:  # the float64 copy is this function's own: scale it in place
        return w.mul_(scale)
    return w * scale


@by_rows(
    lambda start, stop, rows, whole, bias, scale, shift, channels: affine_bias(
        *(_channel_rows(t, channels, start, stop, rows, whole) for t in (bias, scale, shift)),
        stop - start,
    )
)
@shaped(lambda bias, scale, shift, channels: (channels,))
def affine_bias(
    bias: Tensor | None, scale: Tensor | None, shift: Tensor | None, channels: int
) -> Tensor:
    """``b · a + t`` per channel, as a float64 ``(channels,)`` vector (a missing ``b`` or ``t``
    is 0, a missing ``a`` is 1)."""
    parts = [t for t in (bias, scale, shift) if t is not None]
    device = exact(parts[0]).device if parts else torch.device("cpu")
    b = torch.zeros(channels, dtype=torch.float64, device=device)
    if bias is not None:
        b = channel_vector(bias, channels).to(device)
    if scale is not None:
        b = b * channel_vector(scale, channels).to(device)
    if shift is not None:
        b = b + channel_vector(shift, channels).to(device)
    return b


def _scale_input_channels_rows(
    start: int, stop: int, rows: Rows, whole: Whole, weight: Any, scale: Any, *, groups: int = 1
) -> Tensor | None:
    span = _group_span(start, stop, int(weight.shape[0]), groups)
    if span is None:
        return None
    per_group = int(weight.shape[1])
    a = _channel_rows(
        scale, per_group * groups, span[0] * per_group, span[1] * per_group, rows, whole
    )
    return scale_input_channels(rows(weight, start, stop), a, groups=span[1] - span[0])


@by_rows(_scale_input_channels_rows)
@shaped(_same)
def scale_input_channels(weight: Tensor, scale: Tensor, *, groups: int = 1) -> Tensor:
    """``W'[o, i] = W[o, i] · a[i]``: a per-channel scale of a layer's input folded into it.

    ``weight`` is ``[out, in/g, k…]`` (a conv) or ``[out, in]`` (a linear layer); input channel
    ``i`` of output ``o`` in group ``G`` is ``G·in/g + i``."""
    w = exact(weight)
    in_per_group = w.shape[1]
    a = channel_vector(scale, in_per_group * groups).to(w.device)
    out_per_group = w.shape[0] // groups
    rows = a.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
    return w * rows.reshape(w.shape[0], in_per_group, *([1] * (w.dim() - 2)))


def _vector_through_rows(
    fn: Callable[..., Tensor],
    start: int,
    stop: int,
    rows: Rows,
    whole: Whole,
    weight: Any,
    bias: Any,
    vector: Any,
    *,
    groups: int = 1,
) -> Tensor | None:
    """Rows ``[start, stop)`` of ``fn(weight, bias, vector, groups=…)``: a bias plus a kernel
    applied to a vector over its input channels (``input_shift_bias``, ``compose_bias``); a
    block of whole groups reads its groups' part of the vector, one inside a group reads that
    group's part."""
    out_channels, per_group = int(weight.shape[0]), int(weight.shape[1])
    span = _group_span(start, stop, out_channels, groups)
    if span is None:
        return None
    return fn(
        rows(weight, start, stop),
        _channel_rows(bias, out_channels, start, stop, rows, whole),
        _channel_rows(
            vector, per_group * groups, span[0] * per_group, span[1] * per_group, rows, whole
        ),
        groups=span[1] - span[0],
    )


@by_rows(lambda *rows, **kw: _vector_through_rows(input_shift_bias, *rows, **kw))
@shaped(lambda weight, *args, **kwargs: (int(weight.shape[0]),))
def input_shift_bias(
    weight: Tensor, bias: Tensor | None, shift: Tensor, *, groups: int = 1
) -> Tensor:
    """``b' = b + Σ_{i, taps} W[o, i] · t[i]``: a per-channel shift of a layer's input folded
    into its bias (exact where the layer reads no padding, or padding holding the shifted
    value)."""
    w = exact(weight)
    in_per_group = w.shape[1]
    t = channel_vector(shift, in_per_group * groups).to(w.device)
    out_per_group = w.shape[0] // groups
    per_input = w.reshape(w.shape[0], in_per_group, -1).sum(dim=2)
    shifts = t.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
    added = (per_input * shifts.reshape(w.shape[0], in_per_group)).sum(dim=1)
    return added if bias is None else added + channel_vector(bias, w.shape[0]).to(w.device)


@by_rows(
    lambda start, stop, rows, whole, scale, in_channels, groups, kernel_size, centre: (
        _diagonal_rows(
            channel_vector(
                _channel_rows(scale, in_channels, start, stop, rows, whole), stop - start
            ),
            start,
            stop,
            in_channels,
            groups,
            kernel_size,
            centre,
        )
    )
)
@shaped(
    lambda scale, in_channels, groups, kernel_size, centre: (
        in_channels,
        in_channels // groups,
        *kernel_size,
    )
)
def diagonal_kernel(
    scale: Tensor, in_channels: int, groups: int, kernel_size: Sequence[int], centre: Sequence[int]
) -> Tensor:
    """The conv kernel of the per-channel map ``y[c] = a[c] · x[c]`` (float64).

    Shape ``[C, C/g, *kernel_size]``, zero except ``W[c, c mod (C/g), *centre] = a[c]``.
    The identity is ``a = 1``. Needs ``g | C``."""
    return _diagonal_rows(
        channel_vector(scale, in_channels), 0, in_channels, in_channels, groups, kernel_size, centre
    )


def _diagonal_rows(
    a: Tensor,
    start: int,
    stop: int,
    in_channels: int,
    groups: int,
    kernel_size: Sequence[int],
    centre: Sequence[int],
) -> Tensor:
    """Rows ``start:stop`` of :func:`diagonal_kernel`, from ``a``: those channels' scales."""
    if in_channels % groups:
        raise ValueError(
            f"a per-channel map needs in = out channels divisible by groups; "
            f"got in={in_channels}, groups={groups}"
        )
    per_group = in_channels // groups
    kernel = a.new_zeros((stop - start, per_group, *kernel_size))
    index = torch.arange(start, stop, device=a.device)
    taps = [torch.full_like(index, c) for c in centre]
    return kernel.index_put_((index - start, index % per_group, *taps), a)  # (a fresh tensor)


# --------------------------------------------------------------------------------------------
# Placing kernels (pad-and-add)
# --------------------------------------------------------------------------------------------


def _expand_groups(
    w: Tensor, first: int, count: int, in_channels: int, groups: int, new_groups: int
) -> Tensor:
    """:func:`expand_groups` of ``w``: the rows of ``count`` groups from group ``first``."""
    if groups % new_groups:
        raise ValueError(f"cannot regroup {groups} groups into {new_groups}")
    if groups == new_groups:
        return w
    in_per_group = w.shape[1]
    out_per_group = w.shape[0] // count
    new_in_per_group = in_channels // new_groups
    blocks = []
    for index in range(count):
        start = ((first + index) * in_per_group) % new_in_per_group
        rows = w[index * out_per_group : (index + 1) * out_per_group]
        pad = [0, 0] * (w.dim() - 2) + [start, new_in_per_group - start - in_per_group]
        blocks.append(F.pad(rows, pad))
    return torch.cat(blocks)


def _expand_groups_rows(
    start: int,
    stop: int,
    rows: Rows,
    whole: Whole,
    weight: Any,
    in_channels: int,
    groups: int,
    new_groups: int,
) -> Tensor | None:
    if groups == new_groups:  # (rows of any groups: nothing to regroup)
        return exact(rows(weight, start, stop))
    span = _group_span(start, stop, int(weight.shape[0]), groups)
    if span is None:
        return None
    w = exact(rows(weight, start, stop))
    return _expand_groups(w, span[0], span[1] - span[0], in_channels, groups, new_groups)


@by_rows(_expand_groups_rows)
@shaped(
    lambda weight, in_channels, groups, new_groups: (
        int(weight.shape[0]),
        in_channels // new_groups,
        *weight.shape[2:],
    )
)
def expand_groups(weight: Tensor, in_channels: int, groups: int, new_groups: int) -> Tensor:
    """A grouped conv kernel rewritten for a coarser grouping ``new_groups`` (dividing ``groups``).

    A conv with ``g`` groups is a conv with ``g' | g`` groups whose kernel is block-diagonal
    inside each coarse group: exact, but denser (it costs ``g / g'`` times the MACs)."""
    return _expand_groups(exact(weight), 0, groups, in_channels, groups, new_groups)


@by_rows(
    lambda start, stop, rows, whole, weight, *args, **kwargs: place_kernel(
        rows(weight, start, stop), *args, **kwargs
    )
)
@shaped(lambda weight, extent, offsets, steps: (*weight.shape[:2], *extent))
def place_kernel(
    weight: Tensor, extent: Sequence[int], offsets: Sequence[int], steps: Sequence[int]
) -> Tensor:
    """Zero-pad ``weight`` ``[O, I, k…]`` into ``[O, I, *extent]`` (float64).

    Tap ``j`` of spatial dim ``i`` lands at ``offsets[i] + j·steps[i]``: a step above 1 spreads
    a dilated kernel onto a finer grid (``d − 1`` zeros between taps)."""
    w = exact(weight)
    if all(step == 1 for step in steps):
        pad: list[int] = []
        for k, offset, size in reversed(list(zip(w.shape[2:], offsets, extent, strict=True))):
            pad += [offset, size - offset - k]
        return F.pad(w, pad)
    index = tuple(
        slice(offset, offset + (k - 1) * step + 1, step)
        for offset, step, k in zip(offsets, steps, w.shape[2:], strict=True)
    )
    placed = w.new_zeros((*w.shape[:2], *extent))
    placed[(slice(None), slice(None), *index)] = w
    return placed


def _placed_sum_rows(
    start: int,
    stop: int,
    rows: Rows,
    whole: Whole,
    kernels: Sequence[Any],
    scales: Sequence[Any],
    *,
    in_channels: int,
    groups: Sequence[int],
    new_groups: int,
    extent: Sequence[int],
    offsets: Sequence[Sequence[int]],
    steps: Sequence[Sequence[int]],
) -> Tensor | None:
    out_channels = int(kernels[0].shape[0])
    if any(_group_span(start, stop, out_channels, g) is None for g in groups if g != new_groups):
        return None

    def term(kernel: Any, g: int) -> Tensor:
        value = _expand_groups_rows(start, stop, rows, whole, kernel, in_channels, g, new_groups)
        assert value is not None  # (the groups were checked above)
        return value

    terms = (term(k, g) for k, g in zip(kernels, groups, strict=True))
    row_scales = [_channel_rows(s, out_channels, start, stop, rows, whole) for s in scales]
    return _place_terms(terms, row_scales, extent, offsets, steps)


@by_rows(_placed_sum_rows)
@shaped(
    lambda kernels, scales, *, in_channels, groups, new_groups, extent, offsets, steps: (
        int(kernels[0].shape[0]),
        in_channels // new_groups,
        *extent,
    )
)
def placed_sum(
    kernels: Sequence[Tensor],
    scales: Sequence[Tensor],
    *,
    in_channels: int,
    groups: Sequence[int],
    new_groups: int,
    extent: Sequence[int],
    offsets: Sequence[Sequence[int]],
    steps: Sequence[Sequence[int]],
) -> Tensor:
    """``Σ aᵢ · place(expand_groups(Wᵢ))``: the merged kernel of branches reading one input.

    Each scaled kernel is added into its window of one zero kernel, in branch order: the same
    sums as adding the zero-padded kernels (a tap a branch does not reach adds 0), without a
    padded float64 copy per branch. A scale that is fxfuse's own constant 1 multiplies
    nothing."""
    terms = (
        expand_groups(k, in_channels, g, new_groups) for k, g in zip(kernels, groups, strict=True)
    )
    return _place_terms(terms, scales, extent, offsets, steps)


def _place_terms(
    terms: Iterable[Tensor],
    scales: Sequence[Tensor],
    extent: Sequence[int],
    offsets: Sequence[Sequence[int]],
    steps: Sequence[Sequence[int]],
) -> Tensor:
    """``Σ aᵢ · place(termᵢ)``, one term computed at a time (``terms`` may be lazy)."""
    total: Tensor | None = None
    for term, scale, offset, step in zip(terms, scales, offsets, steps, strict=True):
        if scale is not ONE:
            term = scale_kernel(term, scale)
        if total is None:
            total = term.new_zeros((*term.shape[:2], *extent))
        window = tuple(
            slice(o, o + (k - 1) * s + 1, s)
            for o, s, k in zip(offset, step, term.shape[2:], strict=True)
        )
        total[(slice(None), slice(None), *window)] += term
    assert total is not None
    return total


@by_rows(
    lambda start, stop, rows, whole, biases, scales, channels: merged_bias(
        [_channel_rows(b, channels, start, stop, rows, whole) for b in biases],
        [_channel_rows(s, channels, start, stop, rows, whole) for s in scales],
        stop - start,
    )
)
@shaped(lambda biases, scales, channels: (channels,))
def merged_bias(biases: Sequence[Tensor | None], scales: Sequence[Tensor], channels: int) -> Tensor:
    """``Σ aᵢ · bᵢ`` per channel, float64 ``(channels,)`` (a missing ``bᵢ`` is 0)."""
    total = torch.zeros(channels, dtype=torch.float64, device=exact(scales[0]).device)
    for bias, scale in zip(biases, scales, strict=True):
        if bias is not None:
            total = total + channel_vector(bias, channels).to(total.device) * channel_vector(
                scale, channels
            ).to(total.device)
    return total


# --------------------------------------------------------------------------------------------
# Composition, pooling
# --------------------------------------------------------------------------------------------


def _compose_kernels_rows(
    start: int, stop: int, rows: Rows, whole: Whole, outer: Any, inner: Any, *, groups: int = 1
) -> Tensor | None:
    span = _group_span(start, stop, int(outer.shape[0]), groups)
    if span is None:
        return None
    mid = int(outer.shape[1])
    return compose_kernels(
        rows(outer, start, stop),
        rows(inner, span[0] * mid, span[1] * mid),
        groups=span[1] - span[0],
    )


@by_rows(_compose_kernels_rows)
@shaped(
    lambda outer, inner, *, groups=1: (
        int(outer.shape[0]),
        int(inner.shape[1]),
        *outer.shape[2:],
    )
)
def compose_kernels(outer: Tensor, inner: Tensor, *, groups: int = 1) -> Tensor:
    """The kernel of ``outer ⋆ (inner ⋆ x)`` where ``inner`` is pointwise (a 1×1 conv or a
    linear layer, ``[M, I/g]``) and ``outer`` any kernel ``[O, M/g, k…]``, both with ``groups``
    groups: ``W[o, i, …] = Σ_m outer[o, m, …] · inner[m, i]`` within each group."""
    w2, w1 = exact(outer), exact(inner).to(exact(outer).device)
    w1 = w1.reshape(w1.shape[0], w1.shape[1])
    out_channels, mid_per_group = w2.shape[0], w2.shape[1]
    in_per_group = w1.shape[1]
    o_g, m_g = out_channels // groups, mid_per_group
    a = w2.reshape(groups, o_g, m_g, -1)
    b = w1.reshape(groups, m_g, in_per_group)
    composed = torch.einsum("gomk,gmi->goik", a, b)
    return composed.reshape(out_channels, in_per_group, *w2.shape[2:])


@by_rows(lambda *rows, **kw: _vector_through_rows(compose_bias, *rows, **kw))
@shaped(lambda outer, outer_bias, inner_bias, *, groups=1: (int(outer.shape[0]),))
def compose_bias(
    outer: Tensor, outer_bias: Tensor | None, inner_bias: Tensor | None, *, groups: int = 1
) -> Tensor:
    """``b = b₂ + Σ_m (Σ_taps W₂[o, m, …]) · b₁[m]`` within each group."""
    w2 = exact(outer)
    out_channels = w2.shape[0]
    b = torch.zeros(out_channels, dtype=torch.float64, device=w2.device)
    if inner_bias is not None:
        b = input_shift_bias(w2, None, inner_bias, groups=groups)
    if outer_bias is not None:
        b = b + channel_vector(outer_bias, out_channels).to(b.device)
    return b


def average_kernel(channels: int, kernel_size: Sequence[int], divisor: int | None = None) -> Tensor:
    """Average pooling as a depthwise kernel ``[C, 1, k…]`` of ``1/Πk`` (or ``1/divisor``)."""
    taps = math.prod(kernel_size) if divisor is None else divisor
    return torch.full((channels, 1, *kernel_size), 1.0 / taps, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Windows: where each branch's taps land
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """How a conv samples one spatial dim.

    Output position ``o`` reads input positions ``o·s − left + j·dilation`` for taps
    ``j = 0 … kernel−1``; ``left``/``right`` are the padding (negative: a crop)."""

    kernel: int
    dilation: int
    left: int
    right: int

    @property
    def span(self) -> int:
        """How many input positions one output reads, first tap to last."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def size_offset(self) -> int:
        """The output size is ``floor((L + size_offset) / stride) + 1`` for input size ``L``."""
        return self.left + self.right - self.span


@dataclass(frozen=True)
class MergedWindow:
    """The window of a merged conv, and where each branch's taps land inside it.

    Branch ``i``'s tap ``j`` becomes merged tap ``offsets[i] + j·steps[i]``."""

    kernel: int
    dilation: int
    left: int
    right: int
    offsets: tuple[int, ...]
    steps: tuple[int, ...]


def align_windows(windows: Sequence[Window]) -> MergedWindow:
    """Place branches that read the same input (one spatial dim) into one merged window.

    With ``P = max left_i``, branch ``i``'s first tap reads ``o·s − left_i``, which is merged tap
    ``P − left_i`` at dilation 1. The merged dilation is the largest ``d`` dividing every
    offset and every branch dilation (a 1×1 has no taps to spread), so branches that share a
    dilation keep it. The right padding ``max right_i`` keeps the output size.

    All windows must have the same ``size_offset`` (same output size for every input size);
    the caller checks that and gives the reason when they do not."""
    if not windows:
        raise ValueError("no windows to align")
    if len({w.size_offset for w in windows}) != 1:
        raise ValueError(f"windows give different output sizes: {list(windows)}")
    left = max(w.left for w in windows)
    shifts = [left - w.left for w in windows]
    dilation = 0
    for w, shift in zip(windows, shifts, strict=True):
        dilation = math.gcd(dilation, shift)
        if w.kernel > 1:
            dilation = math.gcd(dilation, w.dilation)
    dilation = max(dilation, 1)
    offsets = tuple(shift // dilation for shift in shifts)
    steps = tuple(w.dilation // dilation if w.kernel > 1 else 1 for w in windows)
    kernel = max(
        offset + (w.kernel - 1) * step + 1
        for w, offset, step in zip(windows, offsets, steps, strict=True)
    )
    right = max(w.right for w in windows)
    return MergedWindow(kernel, dilation, left, right, offsets, steps)


# --------------------------------------------------------------------------------------------
# Gradient re-parameterization (RepOptimizer)
# --------------------------------------------------------------------------------------------


@shaped(lambda columns: tuple(columns[0].shape))
def gradient_multiplier(columns: Sequence[Tensor]) -> Tensor:
    """``M = Σ uᵢ²`` (float64), where ``uᵢ = Jᵢ·1`` is where branch ``i``'s parameter lands in
    the merged weight ``W = Σ Jᵢ θᵢ + C``, each element at one position, scaled:
    ``uᵢ = sᵢ·maskᵢ`` and ``M = Σ sᵢ²·maskᵢ``. For such ``J``, ``J Jᵀ = diag(M)``: SGD on the
    ``θᵢ`` moves ``W`` as SGD on ``W`` with the gradient ``M ⊙ ∂L/∂W``."""
    total = exact(columns[0]) ** 2
    for u in columns[1:]:
        total = total + exact(u).to(total.device) ** 2
    return total


@shaped(lambda grad, multiplier, constant, decay: tuple(grad.shape))
def reparam_gradient(grad: Tensor, multiplier: Tensor, constant: Tensor, decay: float) -> Tensor:
    """The gradient a plain SGD step (which adds ``decay · W`` itself) needs to move ``W`` as
    SGD with weight decay moves the branches: ``M ⊙ G − decay · C``, so that the step uses
    ``M ⊙ G + decay · (W − C)`` (``J (Jᵀ G + decay·θ)``). In ``grad``'s dtype."""
    g = exact(grad) * exact(multiplier).to(exact(grad).device)
    if decay:
        g = g - decay * exact(constant).to(g.device)
    return g.to(grad.dtype)


# --------------------------------------------------------------------------------------------
# Cross-layer equalization and INT8 weight quantization (the numbers the rule and the report
# compute from weights; never part of a fused weight's expression)
# --------------------------------------------------------------------------------------------


def channel_magnitudes(weight: Tensor) -> Tensor:
    """``M[o, i] = max_taps |W[o, i, taps]|``: a ``[out, in/g]`` float64 matrix (a conv's
    ``[out, in/g, k…]`` weight or a linear layer's ``[out, in]``)."""
    w = exact(weight).detach().abs()
    return w.reshape(w.shape[0], w.shape[1], -1).amax(dim=2)


def output_ranges(magnitudes: Tensor, in_scale: Tensor, out_scale: Tensor, groups: int) -> Tensor:
    """``r[o] = max_i M[o, i]·in_scale[i] / out_scale[o]``: the range of output channel ``o`` of
    a layer whose input channels are multiplied by ``in_scale`` and outputs divided by
    ``out_scale`` (``in_scale`` has ``in`` entries; input ``i`` of group ``G`` is
    ``G·in/g + i``)."""
    out_channels, in_per_group = magnitudes.shape
    rows = in_scale.reshape(groups, 1, in_per_group)
    scaled = magnitudes.reshape(groups, out_channels // groups, in_per_group) * rows
    return scaled.amax(dim=2).reshape(out_channels) / out_scale


def input_ranges(magnitudes: Tensor, in_scale: Tensor, out_scale: Tensor, groups: int) -> Tensor:
    """``r[i] = max_o M[o, i]·in_scale[i] / out_scale[o]``, over the outputs of ``i``'s group:
    the range of input channel ``i`` (an ``in``-vector; see :func:`output_ranges`)."""
    out_channels, in_per_group = magnitudes.shape
    columns = (1.0 / out_scale).reshape(groups, out_channels // groups, 1)
    scaled = magnitudes.reshape(groups, out_channels // groups, in_per_group) * columns
    return scaled.amax(dim=1).reshape(groups * in_per_group) * in_scale


def equalization_scales(
    magnitudes: Sequence[Tensor],
    groups: Sequence[int],
    *,
    tolerance: float = 1e-3,
    max_sweeps: int = 200,
) -> list[Tensor]:
    """Scales ``s₁ … s_{n−1}`` (``s_k > 0`` per channel) equalizing a chain of ``n`` layers.

    Layer ``k``'s output channel ``c`` is divided by ``s_k[c]`` and layer ``k+1``'s input
    channel ``c`` multiplied by it (exact through a positively homogeneous activation). Each
    pair is balanced with the data-free-quantization rule ``s = √(r₁·r₂) / r₂`` — after it,
    output channel ``c`` of layer ``k`` and input channel ``c`` of layer ``k+1`` have the same
    range ``√(r₁·r₂)`` — and the pairs are swept in order until no scale moves by more than
    ``tolerance`` (relative), or ``max_sweeps``. A channel one side never uses (``r = 0``)
    keeps ``s = 1``. ``magnitudes`` are :func:`channel_magnitudes` of each layer."""
    n = len(magnitudes)
    ins = [
        torch.ones(int(m.shape[1]) * g, dtype=torch.float64)
        for m, g in zip(magnitudes, groups, strict=True)
    ]
    outs = [torch.ones(int(m.shape[0]), dtype=torch.float64) for m in magnitudes]
    for _ in range(max_sweeps):
        moved = 0.0
        for k in range(n - 1):
            r1 = output_ranges(magnitudes[k], ins[k], outs[k], groups[k])
            r2 = input_ranges(magnitudes[k + 1], ins[k + 1], outs[k + 1], groups[k + 1])
            step = torch.sqrt(r1 / r2)
            step = torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(step), step, 1.0)
            outs[k] = outs[k] * step
            ins[k + 1] = ins[k + 1] * step
            moved = max(moved, float((step.log().abs()).max()))
        if moved <= tolerance:
            break
    return outs[:-1]


def quantize_symmetric(weight: Tensor, *, bits: int = 8, per_channel: bool = False) -> Tensor:
    """``W`` rounded to a symmetric signed ``bits``-bit grid and back (fake quantization):
    step ``max|W| / (2^{bits−1} − 1)``, over the whole tensor or per output channel (dim 0);
    values ``−q … q``. A zero range keeps zeros."""
    w = exact(weight).detach()
    levels = 2 ** (bits - 1) - 1
    if per_channel:
        top = w.reshape(w.shape[0], -1).abs().amax(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        top = w.abs().amax()
    step = torch.where(top > 0, top / levels, torch.ones_like(top))
    return torch.clamp(torch.round(w / step), -levels, levels) * step


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − approx‖²)`` in dB
    (``inf`` when they are equal)."""
    ref = exact(reference).detach()
    noise = float((ref - exact(approximation).detach().to(ref.device)).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def channel_sqnr_db(reference: Tensor, approximation: Tensor) -> Tensor:
    """:func:`sqnr_db` of each output channel (dim 0) on its own, a float64 vector (``inf``
    for a channel reproduced exactly, ``nan`` for an all-zero one)."""
    ref = exact(reference).detach()
    ref = ref.reshape(ref.shape[0], -1)
    noise = (ref - exact(approximation).detach().to(ref.device).reshape(ref.shape)).pow(2).sum(1)
    signal = ref.pow(2).sum(dim=1)
    return 10.0 * torch.log10(signal / noise)
