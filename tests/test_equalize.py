"""equalize-layers: cross-layer equalization after fusion — exact, balancing, and declining
where a scale would be seen (a branch point, a residual sum, a non-homogeneous activation)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import Tensor, nn

import fxfuse
from fxfuse import kernels
from fxfuse.quant import fake_quantize_weights, output_sqnr
from fxfuse.testing import count_ops, relative_error, trained_like_batch_norms
from fxfuse.testing.strategies import DrawnModel, LayerChain, chains, models
from fxfuse.zoo import (
    ACBlock,
    CSLABlock,
    DilatedReparam,
    DiverseBranchBlock,
    MobileOneBlock,
    QARepVGGBlockV2,
    RepVGGBlock,
    RepViTMixer,
    conv_bn,
    repvgg_net,
    training_time_net,
)
from tests.helpers import declined

RULE = "equalize-layers"
EXACT = 1e-9  # float64


def _fused_pair(model: nn.Module, *inputs: Tensor) -> tuple[nn.Module, nn.Module]:
    return fxfuse.optimize(model), fxfuse.optimize(model, equalize=True)


def _check_exact(model: nn.Module, x: Tensor) -> nn.Module:
    """Equalized: the same function as ``model`` (float64); returns the equalized model."""
    equalized = fxfuse.optimize(model, equalize=True)
    with torch.no_grad():
        error = relative_error(model(x), equalized(x))
    assert error <= EXACT, f"relative error {error:.3g}\n{equalized.fxfuse_report}"
    return equalized


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- exact on the zoo -------------------------------------------------------------------------

ZOO: dict[str, Callable[[], nn.Module]] = {
    "repvgg": lambda: nn.Sequential(
        RepVGGBlock(4, 8, 2), RepVGGBlock(8, 8), RepVGGBlock(8, 8, 1, 4)
    ),
    "acnet": lambda: nn.Sequential(
        ACBlock(4, 6, 3, 1), ACBlock(6, 6, 5, 2), nn.ReLU(), ACBlock(6, 6, 3, 1)
    ),
    "mobileone": lambda: nn.Sequential(
        MobileOneBlock(6, 6, 3, 1, groups=6),
        MobileOneBlock(6, 12, 1),
        MobileOneBlock(12, 12, 3, 2, 12),
    ),
    "csla": lambda: nn.Sequential(CSLABlock(6), nn.ReLU(), CSLABlock(6)),
    "repvit": lambda: nn.Sequential(RepViTMixer(6), nn.ReLU(), conv_bn(6, 6, 1, 1, 0)),
    "dilated": lambda: nn.Sequential(DilatedReparam(6), nn.LeakyReLU(0.2), DilatedReparam(6)),
    "dbb": lambda: nn.Sequential(DiverseBranchBlock(4, 6), DiverseBranchBlock(6, 6, groups=2)),
    "qarepvgg": lambda: nn.Sequential(QARepVGGBlockV2(6), QARepVGGBlockV2(6)),
    "training_time_net": training_time_net,
    "repvgg_net": repvgg_net,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_exact_on_the_zoo(name: str) -> None:
    torch.manual_seed(0)
    model = trained_like_batch_norms(ZOO[name]().eval().double())
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    for shape in ((1, in_channels, 9, 9), (2, in_channels, 12, 12)):
        x = torch.randn(shape, dtype=torch.float64)
        equalized = _check_exact(model, x)
    fired = equalized.fxfuse_report.counts[RULE]
    assert fired >= 1, equalized.fxfuse_report
    # the chains were replaced, not run beside their replacements
    assert count_ops(equalized, x)["conv"] == count_ops(fxfuse.optimize(model), x)["conv"]


# -- positive ---------------------------------------------------------------------------------


def _two_convs(between: nn.Module, groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    return trained_like_batch_norms(
        nn.Sequential(conv_bn(4, 8, 3, 1, 1), between, conv_bn(8, 8, 3, 1, 1, groups)).eval()
    ).double()


@pytest.mark.parametrize(
    "between",
    [nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.PReLU(8), nn.PReLU(), nn.Identity()],
    ids=["relu", "relu-inplace", "leaky-relu", "prelu-per-channel", "prelu", "identity"],
)
def test_pair_is_balanced(between: nn.Module) -> None:
    model = _two_convs(between)
    equalized = _check_exact(model, torch.randn(2, 4, 7, 7, dtype=torch.float64))
    assert equalized.fxfuse_report.counts[RULE] == 1
    first, second = [m for m in equalized.modules() if isinstance(m, nn.Conv2d)]
    r1 = first.weight.abs().amax(dim=(1, 2, 3))
    r2 = second.weight.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(r1, r2, rtol=1e-9, atol=0)


def test_depthwise_and_functional_relu() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.dw, self.b = (
                conv_bn(4, 8, 1, 1, 0),
                conv_bn(8, 8, 3, 1, 1, 8),
                conv_bn(8, 6, 1, 1, 0),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.relu(self.dw(F.relu(self.a(x)))))

    model = trained_like_batch_norms(Block().eval()).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    plain, equalized = _fused_pair(model, x)
    with torch.no_grad():
        assert relative_error(model(x), equalized(x)) <= EXACT
    assert "1x1 conv -> 3x3 conv g8 -> 1x1 conv (equalized)" in [
        r.detail for r in equalized.fxfuse_report.rewrites if r.rule == RULE
    ]
    # what equalization is for: per-tensor INT8 weights lose less
    sqnr = [output_sqnr(model, fake_quantize_weights(m), (x,)) for m in (plain, equalized)]
    assert sqnr[1] > sqnr[0] + 3, sqnr


def test_shape_asserts_on_the_layers_move_to_the_new_ones() -> None:
    """timm's ``BatchNormAct2d`` asserts ``x.ndim == 4`` on each conv's output: the fused graph
    keeps those reads of the conv's shape; they must read the equalized conv, or the old
    chain stays alive beside the new one."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = conv_bn(4, 8, 3, 1, 1), conv_bn(8, 8, 3, 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.a(x)
            torch._assert(y.ndim == 4, "expected a 4-d input")
            y = F.relu(y)
            torch._assert(y.dim() == 4, "expected a 4-d input")
            return self.b(y)

    model = trained_like_batch_norms(Block().eval()).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    equalized = _check_exact(model, x)
    assert equalized.fxfuse_report.counts[RULE] == 1
    assert count_ops(equalized, x)["conv"] == 2


def test_linear_layers() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 7, dtype=torch.float64)[:, None])
    equalized = _check_exact(model, torch.randn(3, 5, dtype=torch.float64))
    assert equalized.fxfuse_report.counts[RULE] == 1


def test_off_by_default_and_caller_model_untouched() -> None:
    model = _two_convs(nn.ReLU())
    before = _weights(model)
    assert fxfuse.optimize(model).fxfuse_report.counts[RULE] == 0
    fxfuse.optimize(model, equalize=True)
    for a, b in zip(before, _weights(model), strict=True):
        assert torch.equal(a, b)


def test_with_example_inputs_and_verify() -> None:
    model = _two_convs(nn.ReLU()).float()
    x = torch.randn(2, 4, 7, 7)
    equalized = fxfuse.optimize(model, (x,), equalize=True, verify=True)
    assert equalized.fxfuse_report.counts[RULE] == 1


# -- near misses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("between", "reason"),
    [
        (nn.ReLU6(), "ReLU6"),
        (nn.SiLU(), "SiLU"),
        (nn.GELU(), "GELU"),
        (nn.Hardswish(), "Hardswish"),
    ],
)
def test_not_across_a_non_homogeneous_activation(between: nn.Module, reason: str) -> None:
    model = _two_convs(between)
    plain, equalized = _fused_pair(model)
    assert equalized.fxfuse_report.counts[RULE] == 0
    assert any(reason in r and "not positively homogeneous" in r for r in declined(equalized, RULE))
    for a, b in zip(_weights(plain), _weights(equalized), strict=True):
        assert torch.equal(a, b)


class BranchPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (
            conv_bn(4, 8, 3, 1, 1),
            conv_bn(8, 8, 3, 1, 1),
            conv_bn(8, 8, 1, 1, 0),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.a(x))
        return self.b(y) * self.c(y)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        # (a sum with ``x`` itself would merge as an identity branch: add a value of its own)
        return self.b(F.relu(self.a(x) + x.flip(1)))


@pytest.mark.parametrize(
    ("module", "reason"),
    [(BranchPoint, "branch point"), (Residual, "residual")],
)
def test_not_across_a_branch_point_or_a_residual(module: type[nn.Module], reason: str) -> None:
    torch.manual_seed(0)
    model = trained_like_batch_norms(module().eval()).double()
    x = torch.randn(2, model.a[0].in_channels, 6, 6, dtype=torch.float64)
    plain, equalized = _fused_pair(model)
    assert equalized.fxfuse_report.counts[RULE] == 0
    assert any(reason in r for r in declined(equalized, RULE)), declined(equalized, RULE)
    for a, b in zip(_weights(plain), _weights(equalized), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert relative_error(model(x), equalized(x)) <= EXACT


def test_a_residual_after_the_chain_keeps_the_last_layer_output() -> None:
    """``x + l₂(relu(l₁(x)))``: l₁'s outputs and l₂'s inputs trade ranges; l₂'s outputs,
    which the sum reads, stay exactly as they were."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = conv_bn(6, 6, 3, 1, 1), conv_bn(6, 6, 3, 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.b(F.relu(self.a(x)))

    model = trained_like_batch_norms(Block().eval()).double()
    equalized = _check_exact(model, torch.randn(2, 6, 7, 7, dtype=torch.float64))
    assert equalized.fxfuse_report.counts[RULE] == 1


# -- properties -------------------------------------------------------------------------------


@given(chains())
def test_drawn_chains_are_exact_and_balanced(chain: LayerChain) -> None:
    x = chain.example()
    equalized = _check_exact(chain, x)
    layers = [m for m in equalized.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    # (layers with no activation between them may have composed into one first)
    assert 1 <= len(layers) <= len(chain.spec.groups)
    # every pair balanced: output channel c of one layer and input channel c of the next
    # have the same range, where both are used
    for first, second in itertools.pairwise(layers):
        groups = getattr(second, "groups", 1)
        ones_in = torch.ones(second.weight.shape[1] * groups, dtype=torch.float64)
        ones_out = torch.ones(second.weight.shape[0], dtype=torch.float64)
        r1 = first.weight.detach().abs().reshape(first.weight.shape[0], -1).amax(dim=1)
        m2 = kernels.channel_magnitudes(second.weight.detach())
        r2 = kernels.input_ranges(m2, ones_in, ones_out, groups)
        used = (r1 > 0) & (r2 > 0)
        ratio = (r1[used] / r2[used]).log().abs()
        assert ratio.numel() == 0 or float(ratio.max()) < 0.05, (r1, r2)


# (each example fuses a whole model twice and counts its ops: fewer than the profile's)
@settings(max_examples=min(settings.default.max_examples, 12))
@given(models(torch.float64, max_blocks=3))
def test_drawn_models_stay_exact(model: DrawnModel) -> None:
    """Whole drawn models (multi-branch blocks, activations, heads): equalizing what fused
    changes nothing they compute, and runs no more convs than fusing alone."""
    x = model.spec.example_input(dtype=torch.float64)
    equalized = _check_exact(model, x)
    assert count_ops(equalized, x)["conv"] == count_ops(fxfuse.optimize(model), x)["conv"]
