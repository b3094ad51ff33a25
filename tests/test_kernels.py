"""The algebra in fxfuse.kernels, checked against torch's own convolutions (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxfuse.kernels import (
    Window,
    affine_bias,
    align_windows,
    average_kernel,
    batch_norm_affine,
    compose_bias,
    compose_kernels,
    diagonal_kernel,
    expand_groups,
    input_shift_bias,
    place_kernel,
    placed_sum,
    scale_input_channels,
    scale_kernel,
)
from fxfuse.testing import relative_error

f64 = torch.float64


def test_batch_norm_affine_matches_eval_batch_norm() -> None:
    x = torch.randn(2, 5, 4, 4, dtype=f64)
    mean, var = torch.randn(5, dtype=f64), torch.rand(5, dtype=f64) + 0.1
    gamma, beta = torch.randn(5, dtype=f64), torch.randn(5, dtype=f64)
    scale, shift = batch_norm_affine(mean, var, gamma, beta, 1e-3)
    expected = F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-3)
    assert relative_error(expected, x * scale[:, None, None] + shift[:, None, None]) < 1e-14


def test_batch_norm_affine_without_affine_parameters() -> None:
    mean, var = torch.randn(3, dtype=f64), torch.rand(3, dtype=f64) + 0.1
    scale, shift = batch_norm_affine(mean, var, None, None, 1e-5)
    torch.testing.assert_close(scale, 1 / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(shift, -mean / torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_scale_output_channels_conv(groups: int) -> None:
    w, b = torch.randn(8, 4 // groups, 3, 3, dtype=f64), torch.randn(8, dtype=f64)
    scale, shift = torch.randn(8, dtype=f64), torch.randn(8, dtype=f64)
    x = torch.randn(1, 4, 6, 6, dtype=f64)
    w2, b2 = scale_kernel(w, scale, groups=groups), affine_bias(b, scale, shift, 8)
    expected = F.conv2d(x, w, b, groups=groups) * scale[:, None, None] + shift[:, None, None]
    assert relative_error(expected, F.conv2d(x, w2, b2, groups=groups)) < 1e-14


@pytest.mark.parametrize(("cin", "cout", "groups"), [(6, 6, 1), (6, 6, 3), (4, 8, 2), (6, 6, 6)])
def test_scale_output_channels_transposed_scales_dim_one_per_group(
    cin: int, cout: int, groups: int
) -> None:
    # in == out is the case Inductor's freezing gets wrong (it scales dim 0): docs/design.md trap 4.
    w = torch.randn(cin, cout // groups, 3, 3, dtype=f64)
    b = torch.randn(cout, dtype=f64)
    scale, shift = torch.randn(cout, dtype=f64), torch.randn(cout, dtype=f64)
    x = torch.randn(2, cin, 5, 5, dtype=f64)
    w2 = scale_kernel(w, scale, transposed=True, groups=groups)
    b2 = affine_bias(b, scale, shift, cout)
    expected = F.conv_transpose2d(x, w, b, stride=2, groups=groups)
    expected = expected * scale[:, None, None] + shift[:, None, None]
    assert relative_error(expected, F.conv_transpose2d(x, w2, b2, stride=2, groups=groups)) < 1e-14


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_diagonal_kernel_is_the_per_channel_map(groups: int) -> None:
    scale = torch.randn(8, dtype=f64)
    kernel = diagonal_kernel(scale, 8, groups, (3, 3), (1, 1))
    x = torch.randn(2, 8, 5, 5, dtype=f64)
    out = F.conv2d(x, kernel, padding=1, groups=groups)
    assert relative_error(x * scale[:, None, None], out) < 1e-15


def test_diagonal_kernel_rejects_groups_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="divisible"):
        diagonal_kernel(torch.ones(6, dtype=f64), 6, 4, (1, 1), (0, 0))


@pytest.mark.parametrize(("groups", "new_groups"), [(4, 2), (4, 1), (8, 4), (3, 3)])
def test_expand_groups_is_exact(groups: int, new_groups: int) -> None:
    cin, cout = 24, 48
    w = torch.randn(cout, cin // groups, 3, 3, dtype=f64)
    x = torch.randn(1, cin, 6, 6, dtype=f64)
    dense = expand_groups(w, cin, groups, new_groups)
    assert dense.shape == (cout, cin // new_groups, 3, 3)
    expected = F.conv2d(x, w, groups=groups)
    assert relative_error(expected, F.conv2d(x, dense, groups=new_groups)) < 1e-14


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize(
    ("kernel", "dilation", "left", "right"),
    [(3, 2, 1, 3), (1, 1, 0, 0), (5, 1, 2, 2), (3, 1, -1, 0)],
)
def test_window_size_offset_gives_output_size(
    kernel: int, dilation: int, left: int, right: int, stride: int
) -> None:
    window = Window(kernel, dilation, left, right)
    for length in range(7, 14):
        x = F.pad(torch.zeros(1, 1, length), (left, right))
        out = F.conv1d(x, torch.zeros(1, 1, kernel), stride=stride, dilation=dilation)
        assert out.shape[-1] == (length + window.size_offset) // stride + 1


def test_align_windows_repvgg() -> None:
    merged = align_windows([Window(3, 1, 1, 1), Window(1, 1, 0, 0)])
    assert (merged.kernel, merged.dilation, merged.left, merged.right) == (3, 1, 1, 1)
    assert merged.offsets == (0, 1)


def test_align_windows_keeps_a_shared_dilation() -> None:
    merged = align_windows([Window(3, 2, 2, 2), Window(1, 1, 0, 0)])
    assert (merged.kernel, merged.dilation, merged.left) == (3, 2, 2)
    assert merged.offsets == (0, 1)


def test_align_windows_spreads_mixed_dilations() -> None:
    merged = align_windows([Window(3, 1, 1, 1), Window(3, 2, 2, 2), Window(1, 1, 0, 0)])
    assert (merged.kernel, merged.dilation, merged.left, merged.right) == (5, 1, 2, 2)
    assert merged.offsets == (1, 0, 2) and merged.steps == (1, 2, 1)


def test_align_windows_refuses_different_output_sizes() -> None:
    with pytest.raises(ValueError, match="different output sizes"):
        align_windows([Window(3, 1, 1, 1), Window(1, 1, 1, 1)])


@st.composite
def aligned_branches(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], int]:
    """1-d branches (kernel, dilation, left, right) with one output size, and a stride."""
    size_offset = draw(st.integers(-5, 1))
    stride = draw(st.integers(1, 3))
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(1, 5))
        d = draw(st.integers(1, 3)) if k > 1 else 1
        span = d * (k - 1) + 1
        left = draw(st.integers(-2, 4))
        right = size_offset + span - left
        branches.append((k, d, left, right))
    return branches, stride


@given(aligned_branches(), st.integers(8, 20), st.data())
def test_place_kernel_merges_aligned_branches(
    spec: tuple[list[tuple[int, int, int, int]], int], length: int, data: st.DataObject
) -> None:
    branches, stride = spec
    x = torch.randn(1, 2, length, dtype=f64)
    merged = align_windows([Window(*b) for b in branches])
    total = None
    weight = torch.zeros(3, 2, merged.kernel, dtype=f64)
    for i, (k, d, left, right) in enumerate(branches):
        w = torch.randn(3, 2, k, dtype=f64)
        padded = _pad1d(x, left, right)
        if padded.shape[-1] < d * (k - 1) + 1:
            return  # input too short for this branch: nothing to compare
        y = F.conv1d(padded, w, stride=stride, dilation=d)
        total = y if total is None else total + y
        weight += place_kernel(w, [merged.kernel], [merged.offsets[i]], [merged.steps[i]])
    out = F.conv1d(
        _pad1d(x, merged.left, merged.right), weight, stride=stride, dilation=merged.dilation
    )
    assert total is not None and out.shape == total.shape
    assert relative_error(total, out) < 1e-12


def test_placed_sum_is_the_sum_of_scaled_placed_kernels() -> None:
    a, b = torch.randn(4, 2, 3, 2, dtype=f64), torch.randn(4, 4, 1, 1, dtype=f64)
    sa, sb = torch.randn(4, dtype=f64), torch.tensor(0.5, dtype=f64)
    merged = placed_sum(
        [a, b],
        [sa, sb],
        in_channels=4,
        groups=[2, 1],
        new_groups=1,
        extent=[7, 5],
        offsets=[[1, 0], [3, 2]],
        steps=[[2, 3], [1, 1]],
    )
    dense_a = expand_groups(a, 4, 2, 1)
    expected = place_kernel(dense_a, [7, 5], [1, 0], [2, 3]) * sa.reshape(-1, 1, 1, 1)
    expected = expected + place_kernel(b, [7, 5], [3, 2], [1, 1]) * 0.5
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_an_affine_before_a_conv_folds_into_its_weights_and_bias(groups: int) -> None:
    w, b = torch.randn(8, 8 // groups, 3, 3, dtype=f64), torch.randn(8, dtype=f64)
    scale, shift = torch.randn(8, dtype=f64), torch.randn(8, dtype=f64)
    x = torch.randn(2, 8, 6, 6, dtype=f64)
    expected = F.conv2d(x * scale[:, None, None] + shift[:, None, None], w, b, groups=groups)
    w2 = scale_input_channels(w, scale, groups=groups)
    b2 = input_shift_bias(w, b, shift, groups=groups)
    assert relative_error(expected, F.conv2d(x, w2, b2, groups=groups)) < 1e-14


@pytest.mark.parametrize("groups", [1, 2])
def test_a_kxk_after_a_1x1_composes_into_one_kernel(groups: int) -> None:
    inner, inner_bias = torch.randn(6, 4 // groups, 1, 1, dtype=f64), torch.randn(6, dtype=f64)
    outer, outer_bias = torch.randn(8, 6 // groups, 3, 3, dtype=f64), torch.randn(8, dtype=f64)
    x = torch.randn(2, 4, 7, 7, dtype=f64)
    expected = F.conv2d(
        F.conv2d(x, inner, inner_bias, groups=groups), outer, outer_bias, groups=groups
    )
    w = compose_kernels(outer, inner, groups=groups)
    b = compose_bias(outer, outer_bias, inner_bias, groups=groups)
    assert relative_error(expected, F.conv2d(x, w, b, groups=groups)) < 1e-14


def test_average_kernel_is_average_pooling() -> None:
    x = torch.randn(2, 3, 7, 7, dtype=f64)
    kernel = average_kernel(3, (3, 3))
    expected = F.avg_pool2d(x, 3, 1, 1)  # count_include_pad=True
    assert relative_error(expected, F.conv2d(x, kernel, padding=1, groups=3)) < 1e-15


def test_kernels_keep_autograd() -> None:
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    scale = torch.randn(4, requires_grad=True)
    scale_kernel(w, scale).sum().backward()
    assert w.grad is not None and scale.grad is not None


def _pad1d(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    return F.pad(x, (left, right))
