"""torch.export: aten IR through the same rules, an ExportedProgram in and out."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import (
    ACBlock,
    CSLABlock,
    MobileOneBlock,
    RepVGGBlock,
    RepViTMixer,
    training_time_net,
)

warnings.filterwarnings("ignore", category=UserWarning)

BLOCKS = {
    "repvgg": lambda: RepVGGBlock(8, 8, groups=2),
    "acnet-crop": lambda: ACBlock(8, 8, 3, 0),
    "mobileone": lambda: MobileOneBlock(8, 8, 3, 1, groups=8),
    "csla": lambda: CSLABlock(8),
    "repvit": lambda: RepViTMixer(8),
}


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-ir", "core-aten"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_fuse_through_export(name: str, decomposed: bool) -> None:
    model = randomize_batch_norms(BLOCKS[name]().eval())
    x = torch.randn(2, 8, 9, 9)
    program = torch.export.export(model, (x,))
    if decomposed:  # convolution, _native_batch_norm_legit_no_training + getitem, slice
        program = program.run_decompositions()
    fused = fxfuse.optimize(program)
    assert isinstance(fused, torch.export.ExportedProgram)
    with torch.no_grad():
        assert relative_error(model(x), fused.module()(x)) <= 1e-5
    ops = count_ops(fused.module(), x)
    assert ops["conv"] == 1 and ops["batch_norm"] == 0
    assert fused.fxfuse_report.capture == "torch.export"


def test_dynamic_dims_survive_the_round_trip() -> None:
    model = randomize_batch_norms(training_time_net().eval())
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: auto, 2: auto, 3: auto},)
    )
    fused = fxfuse.optimize(program)
    x = torch.randn(3, 3, 40, 36)
    with torch.no_grad():
        assert relative_error(model(x), fused.module()(x)) <= 1e-5
    assert count_ops(fused.module(), x)["conv"] == 11


class ShapeBranch(nn.Module):
    """Branches on a shape: torch.fx cannot trace it, torch.export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > 3:
            return self.block(x)
        return x


def test_untraceable_model_falls_back_to_export_with_dynamic_dims() -> None:
    model = randomize_batch_norms(ShapeBranch().eval())
    x = torch.randn(1, 4, 8, 8)  # batch 1: export alone would fix it (0/1 specialization)
    fused = fxfuse.optimize(model, (x,))
    report = fused.fxfuse_report
    assert report.capture.startswith("torch.export (symbolic tracing failed")
    assert report.specialized == [] and "specialized" not in str(report)
    for y in (x, torch.randn(3, 4, 11, 6)):  # another batch, odd and even sizes
        with torch.no_grad():
            assert relative_error(model(y), fused(y)) <= 1e-5
        assert count_ops(fused, y)["conv"] == 1


def test_without_example_inputs_the_model_fuses_part_by_part() -> None:
    model = randomize_batch_norms(ShapeBranch().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert relative_error(model(x), fused(x)) <= 1e-5
    assert count_ops(fused, x)["conv"] == 1 and count_ops(fused, x)["batch_norm"] == 0
    kinds = {p.path: p.kind for p in fused.fxfuse_report.parts}
    assert kinds == {"": "python", "block": "graph"}
    assert isinstance(fused, ShapeBranch)  # its own code, around the fused block


class WidthFlag(nn.Module):
    """A conv and batch norm in the model's own code, and a test of the width: only a capture
    of the whole forward folds the BN, and export can do that only at the example's width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return y * 2 if y.shape[-1] == 8 else y


def test_export_says_plainly_when_it_fixed_a_dim() -> None:
    model = randomize_batch_norms(WidthFlag().eval())
    fused = fxfuse.optimize(model, (torch.randn(1, 3, 8, 8),))
    report = fused.fxfuse_report
    assert report.specialized == ["x.shape[3] == 8"]
    assert "specialized to the example's shape (other sizes raise): x.shape[3] == 8" in str(report)
    for x in (torch.randn(3, 3, 5, 8), torch.randn(1, 3, 8, 8)):  # batch and height stay free
        with torch.no_grad():
            assert relative_error(model(x), fused(x)) <= 1e-5
        assert count_ops(fused, x)["batch_norm"] == 0
    with pytest.raises(Exception, match="Guard failed"):
        fused(torch.randn(1, 3, 8, 6))  # never a silently wrong answer at another width


class InPlaceActs(nn.Module):
    """Conv-BN pairs between in-place ops (relu_, hardswish_, add_); ``gate`` adds a Python
    test on a shape, which only torch.export captures as one graph."""

    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.gate = gate
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.b1(self.c1(x)))
        z = nn.functional.hardswish(self.b2(self.c2(y)), inplace=True)
        z.add_(1.0)
        out = self.b3(self.c3(z))
        if self.gate and out.shape[1] != 8:
            return out * 0
        return out


def test_export_folds_every_batch_norm_the_module_path_folds() -> None:
    x = torch.randn(2, 3, 10, 10)
    traced = fxfuse.optimize(randomize_batch_norms(InPlaceActs(gate=False).eval()), (x,))
    model = randomize_batch_norms(InPlaceActs(gate=True).eval())
    exported = fxfuse.optimize(model, (x,))
    assert exported.fxfuse_report.capture.startswith("torch.export")
    assert traced.fxfuse_report.capture == "torch.fx.symbolic_trace"
    assert count_ops(traced, x)["batch_norm"] == count_ops(exported, x)["batch_norm"] == 0
    assert count_ops(exported, x)["conv"] == 3
    with torch.no_grad():
        assert relative_error(model(x), exported(x)) <= 1e-5


def test_when_both_captures_fail_the_error_gives_both_reasons() -> None:
    class Dynamic(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(fxfuse.CaptureError, match=r"torch\.export fails there too") as info:
        fxfuse.optimize(Dynamic().eval(), (torch.randn(3),))
    assert len(info.value.message.splitlines()) == 1 and "torch.compile" in info.value.hint
