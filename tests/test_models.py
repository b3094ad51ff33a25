"""Real models end to end: torchvision, timm's re-parameterizable families, ONNX, saving.

A representative subset runs by default; the full lists are marked slow (``--runslow``, and
CI). Every model is built with random weights and random batch-norm statistics.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import training_time_net

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

TV_DEFAULT = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "regnet_x_400mf",
    "densenet121",
    "googlenet",
    "convnext_tiny",
    "vgg11_bn",
]
# Input sizes that keep each network's spatial maps valid and the suite fast.
TV_SIZES = {"inception_v3": 299, "googlenet": 64}
TV_FIXED = ("vit_", "swin", "maxvit")  # fixed 224 input (position embeddings, windows)


def _tv_models() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if n not in TV_DEFAULT]


def _size(name: str) -> int:
    if name.startswith(TV_FIXED):
        return 224
    return TV_SIZES.get(name, 64)


def _check(model: nn.Module, x: torch.Tensor, tolerance: float = 1e-5) -> nn.Module:
    """Fuse ``model``: equivalent within ``tolerance``, never more convs, every BN left
    explained."""
    model = randomize_batch_norms(model.eval())
    fused = fxfuse.optimize(model)
    with torch.no_grad():
        error = relative_error(model(x), fused(x))
    report = fused.fxfuse_report
    assert error <= tolerance, f"normalised error {error:.2e}\n{report}"
    before, after = count_ops(model, x), count_ops(fused, x)
    assert after["conv"] <= before["conv"]
    assert after["batch_norm"] <= before["batch_norm"]
    explained = {d.node for d in report.declines if "fold-bn" in d.rule}
    assert after["batch_norm"] <= len(explained), f"unexplained batch norms\n{report}"
    return fused


def _torchvision(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None)
    if name.startswith("inception") or name == "googlenet":
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    size = _size(name)
    _check(model, torch.randn(1, 3, size, size))


@pytest.mark.parametrize("name", TV_DEFAULT)
def test_torchvision_subset(name: str) -> None:
    _torchvision(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _tv_models())
def test_torchvision_all(name: str) -> None:
    _torchvision(name)


def test_resnet_folds_every_batch_norm() -> None:
    model = torchvision.models.resnet18(weights=None)
    fused = _check(model, torch.randn(1, 3, 32, 32))
    assert fused.fxfuse_report.after.batch_norms == 0
    assert fused.fxfuse_report.counts["fold-bn"] == 20


def test_densenet_says_why_pre_activation_batch_norms_stay() -> None:
    fused = _check(torchvision.models.densenet121(weights=None), torch.randn(1, 3, 48, 48))
    reasons = {d.reason for d in fused.fxfuse_report.declines if d.rule == "fold-bn"}
    assert any("(cat)" in r and "not a conv or linear layer" in r for r in reasons)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large"]
)
def test_segmentation_models(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False)

    class Out(nn.Module):  # the dict output, as a tensor
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)["out"]

    _check(Out(model), torch.randn(1, 3, 64, 64))


# -- timm's training-time re-parameterizable families ----------------------------------------

TIMM_DEFAULT = ["repvgg_a0", "mobileone_s0"]


def _timm_models() -> list[str]:
    names = timm.list_models("repvgg*") + timm.list_models("mobileone*")
    return [n for n in names if n not in TIMM_DEFAULT]


def _against_timm(name: str) -> None:
    """fxfuse leaves no more convs and batch norms than timm's own converter, and matches the
    training-time model as closely (compared in float64: repvgg_d2se with random statistics
    is too ill-conditioned for a float32 comparison to mean anything)."""
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name, pretrained=False).eval()).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused = fxfuse.optimize(model)
    theirs = reparameterize_model(copy.deepcopy(model))
    with torch.no_grad():
        reference = model(x)
        ours_error = relative_error(reference, fused(x))
        theirs_error = relative_error(reference, theirs(x))
    ours, timm_ops = count_ops(fused, x), count_ops(theirs, x)
    assert ours["conv"] <= timm_ops["conv"]
    assert ours["batch_norm"] <= timm_ops["batch_norm"] == 0
    floor = _rounding_floor(model, x, reference)
    assert ours_error <= max(4 * theirs_error, 4 * floor, 1e-12), (ours_error, theirs_error, floor)


def _rounding_floor(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """How far the model's output moves when its weights move by float64 rounding (1e-15,
    relative): any two exact conversions differ by about this much (repvgg_d2se's
    squeeze-excite blocks with random statistics amplify it to ~1e-7)."""
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.mul_(1 + 1e-15 * noise)
        return relative_error(reference, perturbed(x))


@pytest.mark.parametrize("name", TIMM_DEFAULT)
def test_timm_subset_against_timm(name: str) -> None:
    _against_timm(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _timm_models())
def test_timm_all_against_timm(name: str) -> None:
    _against_timm(name)


@pytest.mark.parametrize("name", TIMM_DEFAULT)
def test_timm_float32_equivalence(name: str) -> None:
    torch.manual_seed(0)
    _check(timm.create_model(name, pretrained=False), torch.randn(1, 3, 64, 64))


# -- structures no library ships -------------------------------------------------------------


class FPNLikeNeck(nn.Module):
    """A detection-neck-shaped block: two re-parameterizable paths, one upsampled and added."""

    def __init__(self) -> None:
        super().__init__()
        self.lateral = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.top = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.smooth3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.smooth1 = nn.Sequential(
            nn.Conv2d(8, 8, (1, 5), padding=(0, 2), bias=False), nn.BatchNorm2d(8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(self.top(x), scale_factor=2.0, mode="nearest")
        y = self.lateral(x) + up
        return self.smooth3(y) + self.smooth1(y) - 0.5 * y


class Conv1dMixer(nn.Module):
    """1-d branches (audio/sequence models): k=7, k=3 and a dilated k=3, plus the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv1d(6, 6, 7, padding=3, groups=3), nn.BatchNorm1d(6))
        self.b = nn.Sequential(nn.Conv1d(6, 6, 3, padding=1, groups=3), nn.BatchNorm1d(6))
        self.c = nn.Sequential(
            nn.Conv1d(6, 6, 3, padding=2, dilation=2, groups=3), nn.BatchNorm1d(6)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x) + x


class Conv3dBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4))
        self.b = nn.Sequential(nn.Conv3d(4, 4, (1, 1, 3), padding=(0, 0, 1)), nn.BatchNorm3d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + self.b(x) + x)


@pytest.mark.parametrize(
    ("factory", "shape", "convs"),
    [
        (FPNLikeNeck, (1, 8, 16, 16), 3),
        (Conv1dMixer, (2, 6, 20), 1),
        (Conv3dBlock, (1, 4, 6, 6, 6), 1),
    ],
    ids=["fpn-neck", "conv1d-mixer", "conv3d"],
)
def test_structures_no_library_ships(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], convs: int
) -> None:
    model = factory()
    x = torch.randn(*shape)
    _check(model, x)
    fused = fxfuse.optimize(randomize_batch_norms(model.eval()))
    assert count_ops(fused, x)["conv"] == convs


# -- ONNX and saving -------------------------------------------------------------------------


def _onnx_check(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    fused = fxfuse.optimize(randomize_batch_norms(model.eval()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), str(path), dynamo=False, opset_version=17)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == count_ops(fused, x)["conv"]
    assert "BatchNormalization" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    with torch.no_grad():
        assert relative_error(fused(x), torch.from_numpy(out)) <= 1e-5


def test_onnx_export_of_the_builtin_network(tmp_path: Path) -> None:
    _onnx_check(training_time_net(), torch.randn(1, 3, 32, 32), tmp_path / "net.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_DEFAULT)
def test_onnx_export_of_timm_models(name: str, tmp_path: Path) -> None:
    _onnx_check(
        timm.create_model(name, pretrained=False),
        torch.randn(1, 3, 64, 64),
        tmp_path / f"{name}.onnx",
    )


def test_saved_program_loads_without_the_model_source(tmp_path: Path) -> None:
    model = randomize_batch_norms(training_time_net().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "fused.pt2"
    torch.export.save(torch.export.export(fused, (x,)), str(path))
    # A fresh interpreter that never imports fxfuse.zoo (the model's source) loads and runs it.
    script = (
        "import sys, torch\n"
        "torch.manual_seed(0)\n"
        f"program = torch.export.load({str(path)!r})\n"
        "x = torch.load(sys.argv[1])\n"
        "torch.save(program.module()(x), sys.argv[2])\n"
        "assert 'fxfuse' not in sys.modules\n"
    )
    import subprocess
    import sys

    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    with torch.no_grad():  # another process may sum in another order (thread count)
        assert relative_error(fused(x), torch.load(tmp_path / "y.pt")) <= 1e-6


def test_frozen_batch_norm_resnet_folds_completely() -> None:
    # torchvision's detection backbones use FrozenBatchNorm2d: x * scale + bias with scale
    # and bias computed from buffers on every call.
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 3, 32, 32)
    fused = _check(model, x)
    ops = count_ops(fused, x)
    assert ops["conv"] == 20 and ops["mul"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "ssdlite320_mobilenet_v3_large"])
def test_detection_backbones(name: str) -> None:
    # the whole detectors branch on data (torch.compile(backend="fxfuse") handles those);
    # their backbones trace and fuse
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)

    class Features(nn.Module):  # the backbone's dict of feature maps, as a tuple
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.backbone(x).values())

    _check(Features(model.backbone), torch.randn(1, 3, 128, 128))
