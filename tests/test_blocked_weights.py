"""A large layer's weights computed a block of output channels at a time
(``fxfuse.weights.evaluate_as``) are the very values the whole computation gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse import emit, kernels, weights, zoo
from fxfuse.testing import randomize_batch_norms, relative_error
from fxfuse.weights import Weight, apply, const, evaluate, evaluate_as, leaf

f64 = torch.float64


def _leaf(*shape: int, dtype: torch.dtype = torch.float32) -> Weight:
    return leaf(torch.randn(*shape, dtype=dtype))


def _positive(*shape: int) -> Weight:
    return leaf(torch.rand(*shape) + 0.5)


def _blocked(
    expressions: list[Weight | None], rows: int, dtype: torch.dtype
) -> list[Tensor | None]:
    """``expressions`` computed ``rows`` rows (of the largest) at a time."""
    largest = max(w.numel() // int(w.shape[0]) for w in expressions if w is not None)
    return evaluate_as(expressions, dtype, torch.device("cpu"), block_bytes=rows * largest * 8)


def _bn() -> tuple[Weight, Weight]:
    """A batch norm's scale and shift as expressions (8 channels)."""
    scale = apply(kernels.bn_scale, _positive(8), _leaf(8), 1e-5)
    return scale, apply(kernels.bn_shift, _leaf(8), scale, _leaf(8))


def _expressions() -> dict[str, Callable[[], list[Weight | None]]]:
    """A layer's (weight, bias) expressions, one per kernel function with a row rule, each
    with 8 output channels."""
    scale, shift = _bn()
    w4 = _leaf(8, 4, 3, 3)

    def scaled(groups: int) -> list[Weight | None]:
        w = apply(kernels.scale_kernel, _leaf(8, 8 // groups, 3, 3), scale, groups=groups)
        return [w, apply(kernels.affine_bias, _leaf(8), scale, shift, 8)]

    def input_affine(groups: int) -> list[Weight | None]:
        w = _leaf(8, 8 // groups, 3, 3)
        return [
            apply(kernels.scale_input_channels, w, scale, groups=groups),
            apply(kernels.input_shift_bias, w, _leaf(8), shift, groups=groups),
        ]

    def merged(groups: int) -> list[Weight | None]:
        dense = apply(kernels.scale_kernel, _leaf(8, 8, 3, 3), scale)
        grouped = apply(kernels.scale_kernel, _leaf(8, 8 // groups, 1, 1), scale, groups=groups)
        identity = apply(kernels.diagonal_kernel, scale, 8, groups, (3, 3), (1, 1))
        kernel = apply(
            kernels.placed_sum,
            [dense, grouped, identity],
            [const(1.0), scale, const(0.5)],
            in_channels=8,
            groups=[1, groups, groups],
            new_groups=1,
            extent=[3, 3],
            offsets=[[0, 0], [1, 1], [0, 0]],
            steps=[[1, 1], [1, 1], [1, 1]],
        )
        bias = apply(kernels.merged_bias, [shift, None, shift], [const(1.0), scale, const(0.5)], 8)
        return [kernel, bias]

    def composed(groups: int) -> list[Weight | None]:
        inner, outer = _leaf(8, 8 // groups, 1, 1), _leaf(8, 8 // groups, 3, 3)
        return [
            apply(kernels.compose_kernels, outer, inner, groups=groups),
            apply(kernels.compose_bias, outer, _leaf(8), shift, groups=groups),
        ]

    return {
        "scale_kernel": lambda: scaled(1),
        "scale_kernel grouped": lambda: scaled(4),
        "input affine": lambda: input_affine(1),
        "input affine grouped": lambda: input_affine(2),
        "input affine depthwise": lambda: input_affine(8),
        "placed_sum": lambda: merged(1),
        "placed_sum grouped": lambda: merged(4),
        "compose": lambda: composed(1),
        "compose grouped": lambda: composed(2),
        "place_kernel": lambda: [
            apply(kernels.place_kernel, w4, [5, 7], [1, 0], [1, 3]),
            apply(kernels.channel_vector, shift, 8),
        ],
        "expand_groups": lambda: [apply(kernels.expand_groups, _leaf(8, 2, 3, 3), 8, 4, 2), None],
        "stacked": lambda: [
            apply(kernels.stack_outputs, _leaf(3, 4, 3, 3), _leaf(5, 4, 3, 3, dtype=f64)),
            apply(kernels.stack_biases, [_leaf(3), const(2.0)], [3, 5]),
        ],
        "broadcast products and sums": lambda: [
            apply(
                kernels.add,
                apply(kernels.product, w4, apply(kernels.reciprocal, _positive(8, 1, 1, 1))),
                apply(kernels.product, _leaf(1, 4, 3, 3), _leaf(8, 1, 1, 1)),
            ),
            apply(kernels.product, _leaf(8), const(3.0)),
        ],
        "transposed (no row rule: whole, then sliced)": lambda: [
            apply(kernels.scale_kernel, _leaf(8, 6, 3, 3), _leaf(6), transposed=True),
            None,
        ],
    }


@pytest.mark.parametrize("name", list(_expressions()))
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_blocks_of_rows_equal_the_whole_computation(
    name: str, rows: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    expressions = _expressions()[name]()
    expected = [None if w is None else evaluate(w).to(dtype) for w in expressions]
    got = _blocked(expressions, rows, dtype)
    for want, value in zip(expected, got, strict=True):
        assert (want is None) == (value is None)
        if want is not None:
            assert value is not None and value.dtype == dtype
            if name.startswith("compose"):  # (a matmul's summation order follows its size)
                assert relative_error(want, value) <= (1e-15 if dtype == f64 else 1e-7), name
            else:
                assert torch.equal(want, value), name


def test_a_small_layer_is_computed_whole_and_a_large_one_in_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, int]] = []
    rows = weights._rows

    def spy(weight: Weight, start: int, stop: int, *args: Any) -> Tensor:
        seen.append((start, stop))
        return rows(weight, start, stop, *args)

    monkeypatch.setattr(weights, "_rows", spy)
    w = _leaf(10, 4, 3, 3)
    scaled = apply(kernels.scale_kernel, w, _leaf(10))
    evaluate_as([scaled], torch.float32, torch.device("cpu"))
    assert seen == []  # (1440 float64 bytes: one block)
    evaluate_as([scaled], torch.float32, torch.device("cpu"), block_bytes=4 * 36 * 8)
    assert {(0, 4), (4, 8), (8, 10)} <= set(seen)


def _fused_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in fxfuse.optimize(model).state_dict().items()}


_MODELS: dict[str, Callable[[], nn.Module]] = {
    "training_time_net": lambda: zoo.training_time_net(8),
    "diverse branch blocks": lambda: nn.Sequential(
        zoo.DiverseBranchBlock(4, 8, 3), zoo.DiverseBranchBlock(8, 8, 3, groups=2)
    ),
    "transposed conv + bn": lambda: nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)
    ),
}


@pytest.mark.parametrize("name", list(_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_fused_models_computed_in_blocks_are_bit_identical(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fused layer computed one row at a time (where its kernel functions have row
    rules) gives the same bits as the whole computation; no kernel-shaped expression of these
    models is computed whole on the blocked path (only per-channel vectors are)."""
    torch.manual_seed(0)
    model = randomize_batch_norms(_MODELS[name]().to(dtype).eval(), 0)
    monkeypatch.setattr(weights, "BLOCK_BYTES", 2**40)
    expected = _fused_state(model)

    whole: list[Weight] = []
    emitting: list[bool] = []
    evaluate_whole, evaluate_layer = weights._evaluate, weights.evaluate_as

    def spy(weight: Weight, memo: dict[int, Tensor]) -> Tensor:
        kernel = isinstance(weight, weights.Apply) and weight.dim() > 1
        kernel = kernel and weight.numel() > int(weight.shape[0])
        if emitting and kernel:  # (a per-channel vector may be computed whole)
            whole.append(weight)
        return evaluate_whole(weight, memo)

    def layer(*args: Any, **kwargs: Any) -> list[Tensor | None]:
        emitting.append(True)
        try:
            return evaluate_layer(*args, **kwargs)
        finally:
            emitting.pop()

    monkeypatch.setattr(weights, "BLOCK_BYTES", 0)
    monkeypatch.setattr(weights, "_evaluate", spy)
    monkeypatch.setattr(emit, "evaluate_as", layer)
    got = _fused_state(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if name.startswith("diverse"):  # (composed kernels: a matmul's order follows its size)
            assert relative_error(value, got[key]) <= (1e-15 if dtype == f64 else 1e-7), key
        else:
            assert torch.equal(value, got[key]), key
    transposed = name.startswith("transposed")
    assert bool(whole) == transposed, whole  # (a transposed kernel's dim 0 is its input)
