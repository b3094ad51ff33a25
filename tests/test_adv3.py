"""Adversarial review (adv3) of the capture, assert, cache, border-write and blocked-weight
changes: each test here failed before the fix committed beside it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import randomize_batch_norms, relative_error

f64 = torch.float64


class _IdentityConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.id = nn.Identity()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.id(x)))


def _patch_identity(m: _IdentityConvBN) -> None:
    m.id.forward = lambda x: x * 5  # type: ignore[method-assign]


def _patch_conv_forward(m: _IdentityConvBN) -> None:
    conv = m.conv
    m.conv.forward = lambda x: nn.Conv2d.forward(conv, x) * 2  # type: ignore[method-assign]


def _patch_conv_inner(m: _IdentityConvBN) -> None:
    conv = m.conv
    m.conv._conv_forward = lambda x, w, b: nn.Conv2d._conv_forward(conv, x, w * 2, b)  # type: ignore[method-assign]


def _patch_bn_forward(m: _IdentityConvBN) -> None:
    bn = m.bn
    m.bn.forward = lambda x: nn.BatchNorm2d.forward(bn, x) + 1  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "patch", [_patch_identity, _patch_conv_forward, _patch_conv_inner, _patch_bn_forward]
)
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 3, 6, 7)])
@pytest.mark.parametrize("example", [False, True])
def test_a_forward_replaced_on_the_instance_is_not_torchs(
    patch: Callable[[_IdentityConvBN], None], shape: tuple[int, ...], example: bool
) -> None:
    """A module whose ``forward`` (or ``_conv_forward``) is replaced on the instance computes
    what the replacement does, not what its class does: folding it as the class is wrong."""
    torch.manual_seed(0)
    model = randomize_batch_norms(_IdentityConvBN().to(f64).eval(), 0)
    patch(model)
    x = torch.randn(*shape, dtype=f64)
    fused = fxfuse.optimize(model, example_inputs=(x,) if example else None)
    for _ in range(2):
        with torch.no_grad():
            expected, actual = model(x.clone()), fused(x.clone())
        assert relative_error(expected, actual) <= 1e-12


class _WriteBetweenBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.c1(x)
        p = self.a(y)
        q = self.act(y)  # (its forward is replaced: it doubles y in place)
        return p + self.b(y), q


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 3, 6, 7)])
def test_a_write_by_a_replaced_forward_is_seen(shape: tuple[int, ...]) -> None:
    """A torch module whose forward the user replaced on the instance is opaque to the effect
    analysis: the branches around its in-place write are not merged across it."""
    torch.manual_seed(0)
    model = _WriteBetweenBranches().to(f64).eval()
    model.act.forward = lambda t: t.mul_(2)  # type: ignore[method-assign]
    fused = fxfuse.optimize(model)
    x = torch.randn(*shape, dtype=f64)
    for _ in range(2):
        with torch.no_grad():
            expected, actual = model(x.clone()), fused(x.clone())
        assert relative_error(expected, actual) <= 1e-12


class _ValuePadConvBN(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(nn.functional.pad(x, (1, 1, 1, 1), value=self.value)))


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(float("inf"), f64), (float("nan"), f64), (1e308, f64), (1e4, torch.float32)],
)
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 3, 6, 7)])
def test_a_value_padding_holds_the_input_exactly(
    value: float, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """The fused layer's value padding keeps the input as it is: ``pad(x − v) + v`` made
    every output NaN for an infinite or NaN pad value, lost ``x`` for a huge one, and rounds
    ``x`` to ``v``'s precision in float32."""
    torch.manual_seed(0)
    model = randomize_batch_norms(_ValuePadConvBN(value).to(dtype).eval(), 0)
    fused = fxfuse.optimize(model)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        expected, actual = model(x), fused(x)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # (reads no padding)
    assert relative_error(expected[interior], actual[interior]) <= (1e-12 if dtype == f64 else 1e-6)
    assert torch.equal(expected.isnan(), actual.isnan())
