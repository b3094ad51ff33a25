"""The algebra of structural re-parameterization, as pure functions over tensors.

Nothing in this module knows about ``torch.fx``: every function takes tensors and integers
and returns tensors and integers, so each identity below can be tested on its own.

Notation: a convolution is ``y = W ⋆ x + b`` with stride ``s``, padding ``p``, dilation ``d``,
groups ``g``. All arithmetic is done in float64 (:func:`exact`) and cast back by the caller.

- BN fold (eval, running statistics)::

      σ = sqrt(var + eps);  scale = γ / σ;  shift = β − μ · scale
      W' = W · scale  (per output channel);  b' = b · scale + shift

  ConvTranspose weights are ``[in, out/g, k…]``: the output channel is dim 1, per group.
- A per-channel affine ``scale · x + shift`` (identity, a lone BN, a constant scale) is a conv
  whose kernel is zero except ``W[c, c mod (C/g), centre] = scale[c]``; valid for any ``g``
  dividing ``C``.
- Pad-and-add: branches reading the same input with equal stride merge when their sampling
  windows align (:func:`align_windows`); each kernel is spread to the merged dilation and placed
  at its offset inside the merged extent (:func:`place_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MergedWindow",
    "Window",
    "add_diagonal",
    "add_placed",
    "align_windows",
    "batch_norm_affine",
    "diagonal_kernel",
    "exact",
    "expand_groups",
    "place_kernel",
    "scale_output_channels",
]


def exact(t: Tensor) -> Tensor:
    """``t`` detached, as float64, on a device that supports float64 (MPS does not)."""
    device = torch.device("cpu") if t.device.type == "mps" else t.device
    return t.detach().to(device=device, dtype=torch.float64)


def batch_norm_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """An eval-mode batch norm as ``y = scale · x + shift`` per channel (float64).

    ``scale = γ / sqrt(var + eps)`` and ``shift = β − μ · scale``; a missing ``γ`` is 1 and a
    missing ``β`` is 0 (``affine=False``).
    """
    mean = exact(running_mean)
    scale = torch.rsqrt(exact(running_var) + eps)
    if weight is not None:
        scale = scale * exact(weight)
    shift = -mean * scale
    if bias is not None:
        shift = shift + exact(bias)
    return scale, shift


def scale_output_channels(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``y ↦ scale · y + shift`` (per output channel) into a conv or linear layer.

    ``W' = W · scale`` along the output-channel axis and ``b' = b · scale + shift``. For a
    transposed conv the weight is ``[in, out/g, k…]`` and output channel ``o`` of group ``G``
    lives at ``W[G·in/g : (G+1)·in/g, o − G·out/g]``, so the scale is applied per group on
    dim 1. Returns float64 tensors; ``bias`` may be ``None`` (treated as 0).
    """
    scale = exact(scale).reshape(-1)
    w = _on_math_device(weight)
    # (a float32 weight times a float64 scale is computed, and stored, in float64: exact,
    # with one allocation instead of a float64 copy and then a product)
    if transposed:
        in_channels, out_per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, in_channels // groups, out_per_group, *w.shape[2:])
        per_group = scale.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 2)))
        w = (grouped * per_group).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = torch.zeros_like(scale) if bias is None else exact(bias)
    b = b * scale
    if shift is not None:
        b = b + exact(shift).reshape(-1)
    return w, b


def _on_math_device(t: Tensor) -> Tensor:
    """``t`` detached, on a device that supports float64 (its dtype unchanged)."""
    return t.detach().cpu() if t.device.type == "mps" else t.detach()


def diagonal_kernel(
    scale: Tensor, in_channels: int, groups: int, kernel_size: Sequence[int], centre: Sequence[int]
) -> Tensor:
    """The conv kernel of the per-channel map ``y[c] = scale[c] · x[c]`` (float64).

    Shape ``[C, C/g, *kernel_size]``, zero except ``W[c, c mod (C/g), *centre] = scale[c]``.
    The identity is ``scale = 1``. Needs ``in_channels == len(scale)`` and ``g | C``.
    """
    scale = exact(scale).reshape(-1)
    channels = scale.numel()
    if channels != in_channels or in_channels % groups:
        raise ValueError(
            f"a per-channel map needs in = out channels divisible by groups; "
            f"got in={in_channels}, out={channels}, groups={groups}"
        )
    per_group = in_channels // groups
    kernel = scale.new_zeros((channels, per_group, *kernel_size))
    index = torch.arange(channels, device=scale.device)
    kernel[(index, index % per_group, *centre)] = scale
    return kernel


def expand_groups(weight: Tensor, in_channels: int, groups: int, new_groups: int) -> Tensor:
    """A grouped conv kernel rewritten for a coarser grouping ``new_groups`` (dividing ``groups``).

    A conv with ``g`` groups is a conv with ``g' | g`` groups whose kernel is block-diagonal
    inside each coarse group: exact, but denser (it costs ``g / g'`` times the MACs).
    """
    if groups % new_groups:
        raise ValueError(f"cannot regroup {groups} groups into {new_groups}")
    if groups == new_groups:
        return weight
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // groups
    new_in_per_group = in_channels // new_groups
    dense = weight.new_zeros((out_channels, new_in_per_group, *weight.shape[2:]))
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        start = (group * in_per_group) % new_in_per_group
        dense[rows, start : start + in_per_group] = weight[rows]
    return dense


@dataclass(frozen=True)
class Window:
    """How a conv samples one spatial dim.

    Output position ``o`` reads input positions ``o·s − left + j·dilation`` for taps
    ``j = 0 … kernel−1``; ``left``/``right`` are the padding (negative: a crop).
    """

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

    Branch ``i``'s tap ``j`` becomes merged tap ``offsets[i] + j·steps[i]``.
    """

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
    the caller checks that and gives the reason when they do not.
    """
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


def place_kernel(
    weight: Tensor, extent: Sequence[int], offsets: Sequence[int], steps: Sequence[int]
) -> Tensor:
    """Zero-pad ``weight`` ``[O, I, k…]`` into ``[O, I, *extent]`` (float64).

    Tap ``j`` of spatial dim ``i`` lands at ``offsets[i] + j·steps[i]``: a step above 1 spreads
    a dilated kernel onto a finer grid (``d − 1`` zeros between taps).
    """
    placed = exact(weight).new_zeros((*weight.shape[:2], *extent))
    add_placed(placed, weight, offsets, steps)
    return placed


def add_placed(
    target: Tensor,
    weight: Tensor,
    offsets: Sequence[int],
    steps: Sequence[int],
    scale: Tensor | None = None,
) -> None:
    """``target += place_kernel(weight) · scale`` in place, without building the placed kernel.

    ``target`` is float64 ``[O, I, *extent]``; ``scale`` (optional) is per output channel.
    """
    index = tuple(
        slice(offset, offset + (k - 1) * step + 1, step)
        for offset, step, k in zip(offsets, steps, weight.shape[2:], strict=True)
    )
    view = target[(slice(None), slice(None), *index)]
    source = _on_math_device(weight).to(target.device)
    if scale is None:
        view.add_(source)
    else:
        view.addcmul_(source, scale.to(target).reshape(-1, *[1] * (source.dim() - 1)))


def add_diagonal(target: Tensor, scale: Tensor, groups: int, centre: Sequence[int]) -> None:
    """``target[c, c mod (C/g), *centre] += scale[c]`` in place: a per-channel map added to a
    conv kernel (see :func:`diagonal_kernel`)."""
    channels = scale.numel()
    per_group = channels // groups
    index = torch.arange(channels, device=target.device)
    target.index_put_(
        (index, index % per_group, *[torch.tensor(c, device=target.device) for c in centre]),
        exact(scale).reshape(-1).to(target.device),
        accumulate=True,
    )
