"""DBB, YOLOR's implicit knowledge and value padding: the structures of issue 11 fuse like their
own converters fuse them, with plain ``optimize(m)`` and through torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import BNAndPad, DiverseBranchBlock, ImplicitHead
from tests.helpers import fuse_and_check

DBB = [(8, 8, 1, 1), (8, 8, 1, 8), (8, 8, 2, 1), (8, 16, 2, 2)]
DBB_IDS = ["groups1", "groups8", "groups1-stride2", "groups2-stride2"]


@pytest.mark.parametrize(("cin", "cout", "stride", "groups"), DBB, ids=DBB_IDS)
def test_dbb_block_is_one_conv(cin: int, cout: int, stride: int, groups: int) -> None:
    block = DiverseBranchBlock(cin, cout, stride=stride, groups=groups).double()
    for size in (9, 10):  # odd and even: stride-2 alignment
        x = torch.randn(2 if size == 9 else 1, cin, size, size, dtype=torch.float64)
        _, before, after = fuse_and_check(block, x, convs=1)
        assert before["conv"] >= 3 and before["avg_pool2d"] == 1 and after["avg_pool2d"] == 0


class ShapeGate(nn.Module):
    """A branch on a shape: torch.fx cannot trace it, so ``optimize(m, example_inputs)``
    captures with torch.export (dynamic dims, functionalized)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        if out.shape[1] == 3:
            return out * 0
        return out


@pytest.mark.parametrize("groups", [1, 8])
def test_dbb_block_is_one_conv_through_export(groups: int) -> None:
    model = randomize_batch_norms(ShapeGate(DiverseBranchBlock(8, 8, groups=groups)).eval())
    model = model.double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    fused = fxfuse.optimize(model, (x,))
    assert fused.fxfuse_report.capture.startswith("torch.export")
    for y in (x, torch.randn(3, 8, 12, 11, dtype=torch.float64)):  # dims stay dynamic
        with torch.no_grad():
            assert relative_error(model(y), fused(y)) <= 1e-9
        ops = count_ops(fused, y)
        assert ops["conv"] == 1 and ops["batch_norm"] == 0 and ops["avg_pool2d"] == 0


@pytest.mark.parametrize(("cin", "cout", "stride", "groups"), DBB, ids=DBB_IDS)
def test_dbb_block_exported_and_decomposed_is_one_conv(
    cin: int, cout: int, stride: int, groups: int
) -> None:
    """An ExportedProgram in functional aten IR: border writes are ``slice_scatter`` chains."""
    model = randomize_batch_norms(DiverseBranchBlock(cin, cout, stride=stride, groups=groups))
    model = model.eval().double()
    x = torch.randn(2, cin, 9, 9, dtype=torch.float64)
    program = torch.export.export(model, (x,)).run_decompositions({})
    fused = fxfuse.optimize(program)
    with torch.no_grad():
        assert relative_error(model(x), fused.module()(x)) <= 1e-9
    assert count_ops(fused.module(), x)["conv"] == 1


@pytest.mark.parametrize(("cin", "cout", "stride", "groups"), DBB, ids=DBB_IDS)
def test_dbb_block_exported_in_training_ir_is_one_conv(
    cin: int, cout: int, stride: int, groups: int
) -> None:
    """An ExportedProgram as ``torch.export.export`` gives it (not functionalized): border
    writes are ``copy_(aten.slice(out, …), v)``, which die with the pad they write into."""
    model = randomize_batch_norms(DiverseBranchBlock(cin, cout, stride=stride, groups=groups))
    model = model.eval().double()
    for size in (9, 10):  # odd and even: stride-2 alignment
        x = torch.randn(2, cin, size, size, dtype=torch.float64)
        program = torch.export.export(model, (x,))
        assert any(n.target is torch.ops.aten.copy_.default for n in program.graph.nodes)
        fused = fxfuse.optimize(program)
        with torch.no_grad():
            assert relative_error(model(x), fused.module()(x)) <= 1e-9
        ops = count_ops(fused.module(), x)
        assert ops["conv"] == 1 and ops["batch_norm"] == 0 and ops["avg_pool2d"] == 0, ops


class WrittenBorder(nn.Module):
    """:class:`PaddedBN` written out, with near misses: the border holds the batch norm's
    image of zero plus ``offset``, or a strip of the written tensor is also returned."""

    def __init__(self, channels: int, offset: float = 0.0, read_strip: bool = False):
        super().__init__()
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3)
        self.offset, self.read_strip = offset, read_strip

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        zero = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        values = (zero + self.offset).view(1, -1, 1, 1)
        out = nn.functional.pad(bn(self.pointwise(x)), [1, 1, 1, 1])
        out[:, :, 0:1, :] = values
        out[:, :, -1:, :] = values
        out[:, :, :, 0:1] = values
        out[:, :, :, -1:] = values
        y = self.conv(out)
        return (y, out[:, :, 0:1, :] * 2) if self.read_strip else y


@pytest.mark.parametrize(
    ("offset", "read_strip", "convs"),
    [(0.0, False, 1), (0.5, False, 2), (0.0, True, 2)],
    ids=["border-is-bn-of-zero", "border-is-not-bn-of-zero", "written-strip-read-after"],
)
def test_border_writes_fold_only_when_the_border_is_bn_of_zero_and_read_by_the_conv_alone(
    offset: float, read_strip: bool, convs: int
) -> None:
    model = randomize_batch_norms(WrittenBorder(4, offset, read_strip).eval()).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    captures = {
        "symbolic": fxfuse.optimize(model),
        "training-ir": fxfuse.optimize(torch.export.export(model, (x,))),
    }
    for name, fused in captures.items():
        run = fused.module() if isinstance(fused, torch.export.ExportedProgram) else fused
        with torch.no_grad():
            assert relative_error(model(x), run(x)) <= 1e-9, name  # the strip's writes kept
        assert count_ops(run, x)["conv"] == convs, (name, fused.fxfuse_report)
        if offset:
            reasons = [d.reason for d in fused.fxfuse_report.declines]
            assert any("pads with values other than" in r for r in reasons), reasons


class PaddedBN(nn.Module):
    """A 1×1 conv, a batch norm padded with its image of zero, a k×k conv: DBB's 1×1 → k×k."""

    def __init__(self, channels: int, pad: int = 1):
        super().__init__()
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = BNAndPad(pad, channels)
        self.conv = nn.Conv2d(channels, channels, 2 * pad + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.bn(self.pointwise(x)))


def test_value_padding_written_in_place_folds_in_every_capture() -> None:
    model = randomize_batch_norms(PaddedBN(4).eval()).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 2: auto, 3: auto},)
    captures = {
        "symbolic": fxfuse.optimize(model),
        "functional": fxfuse.optimize(torch.export.export(model, (x,)).run_decompositions({})),
        "functional-dynamic": fxfuse.optimize(
            torch.export.export(model, (x,), dynamic_shapes=dynamic).run_decompositions({})
        ),
        "training-ir": fxfuse.optimize(torch.export.export(model, (x,))),
    }
    for name, fused in captures.items():
        run = fused.module() if isinstance(fused, torch.export.ExportedProgram) else fused
        with torch.no_grad():
            assert relative_error(model(x), run(x)) <= 1e-9, name
        ops = count_ops(run, x)
        assert ops["conv"] == 1 and ops["batch_norm"] == 0, (name, fused.fxfuse_report)


class LengthValuedBorder(nn.Module):
    """``BNAndPad`` with its batch norm's image of zero written without ``.view(1, -1, 1)``:
    the values then vary along the length, not per channel (2 channels, 2 border positions
    each side: the values' count alone cannot tell the two apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.conv = nn.Conv1d(2, 3, 5)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        values = bn.bias - bn.running_mean * scale  # shape (2,): broadcast along the length
        out = nn.functional.pad(bn(x), [2, 2])
        out[:, :, 0:2] = values
        out[:, :, -2:] = values
        return self.conv(out)


def test_a_border_that_is_not_one_value_per_channel_is_no_padding() -> None:
    model = LengthValuedBorder().double()
    x = torch.randn(2, 2, 7, dtype=torch.float64)
    fuse_and_check(model, x, batch_norms=1, convs=1)  # (exact: the check inside)


def test_implicit_shift_and_scale_fold_into_the_conv() -> None:
    """YOLOR's ``ImplicitA`` (``conv(x + a)``) and ``ImplicitM`` (``m * conv(x)``)."""
    head = ImplicitHead(8, 6).double()
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    fused, _, after = fuse_and_check(head, x, convs=1)
    assert after["add"] == 0 and after["mul"] == 0, fused.code
    rules = {r.rule for r in fused.fxfuse_report.rewrites}
    assert "fold-affine-into-layer" in rules


def test_implicit_shift_before_a_padded_conv_is_left_with_the_reason() -> None:
    """``conv(x + a)`` with zero padding: the border would read ``a``, not 0."""

    class PaddedImplicit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x + self.shift)

    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    fused, _, after = fuse_and_check(PaddedImplicit().double(), x)
    assert after["add"] == 1
    reasons = [d.reason for d in fused.fxfuse_report.declines]
    assert any("pads with zeros" in r for r in reasons), fused.fxfuse_report
