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
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: auto, 2: auto, 3: auto},))
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


def test_untraceable_model_falls_back_to_export_and_says_so() -> None:
    model = randomize_batch_norms(ShapeBranch().eval())
    x = torch.randn(1, 4, 8, 8)
    fused = fxfuse.optimize(model, (x,))
    report = fused.fxfuse_report
    assert report.capture.startswith("torch.export (symbolic tracing failed")
    with torch.no_grad():
        assert relative_error(model(x), fused(x)) <= 1e-5
    assert count_ops(fused, x)["conv"] == 1


def test_without_example_inputs_the_error_says_to_pass_them() -> None:
    with pytest.raises(fxfuse.CaptureError, match="pass example inputs"):
        fxfuse.optimize(ShapeBranch().eval())


def test_when_both_captures_fail_the_error_gives_both_reasons() -> None:
    class Dynamic(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(fxfuse.CaptureError, match="fallback failed too"):
        fxfuse.optimize(Dynamic().eval(), (torch.randn(3),))
