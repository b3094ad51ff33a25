"""Training-time blocks of the re-parameterization papers, written from the papers.

Each block is what an architecture trains; fxfuse must turn each into one conv (plus its
activation) with no block-specific code — these are test data for the rules, never special
cases in them. They are deliberately written in different styles (Sequential conv-bn pairs,
functional batch norms, crops, buffers as scales) because real code is. The tests, the
command line's built-in default model and the benchmarks use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(
    cin: int,
    cout: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al. 2021): 3×3 conv-bn + 1×1 conv-bn + BN identity when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class Crop(nn.Module):
    """ACNet's crop: drop ``rows``/``cols`` from each border."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: Tensor) -> Tensor:
        if self.rows and self.cols:
            return x[:, :, self.rows : -self.rows, self.cols : -self.cols]
        if self.rows:
            return x[:, :, self.rows : -self.rows, :]
        if self.cols:
            return x[:, :, :, self.cols : -self.cols]
        return x


class ACBlock(nn.Module):
    """ACNet (Ding et al. 2019): k×k + 1×k + k×1 conv-bn branches, summed.

    The asymmetric kernels are centred on the square kernel's centre row/column: with padding
    ``p`` and ``c = p − k//2``, the 1×k branch pads (c, p) and the k×1 branch (p, c); when
    ``c < 0`` the branch pads nothing and crops ``−c`` instead.
    """

    def __init__(
        self, cin: int, cout: int, k: int = 3, padding: int | None = None, stride: int = 1
    ):
        super().__init__()
        p = k // 2 if padding is None else padding
        c = p - k // 2
        self.square = conv_bn(cin, cout, k, stride, p)
        if c >= 0:
            self.hor_crop, self.ver_crop = nn.Identity(), nn.Identity()
            hor_pad, ver_pad = (c, p), (p, c)
        else:
            self.hor_crop, self.ver_crop = Crop(-c, 0), Crop(0, -c)
            hor_pad, ver_pad = (0, p), (p, 0)
        self.hor = conv_bn(cin, cout, (1, k), stride, hor_pad)
        self.ver = conv_bn(cin, cout, (k, 1), stride, ver_pad)

    def forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(self.hor_crop(x)) + self.ver(self.ver_crop(x))


class MobileOneBlock(nn.Module):
    """MobileOne (Vasu et al. 2023): ``k`` over-parameterized conv-bn branches, a 1×1 "scale"
    conv-bn branch (when the kernel is larger than 1) and a BN skip, summed, then ReLU.
    ``groups = cin`` gives the depthwise block; ``kernel = 1`` the pointwise one."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, branches: int = 3
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(branches)
        )
        self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.skip(x) if self.skip is not None else 0
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.branches:
            out = out + branch(x)
        return self.act(out)


class CSLABlock(nn.Module):
    """RepOptimizer's CSLA block: ``s·conv3×3(x) + t·conv1×1(x) + x`` with constant
    per-channel scales and no batch norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.register_buffer("s", torch.rand(channels, 1, 1) + 0.5)
        self.register_buffer("t", torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.s * self.conv3(x) + self.t * self.conv1(x) + x)


class RepViTMixer(nn.Module):
    """RepViT's token mixer (Wang et al. 2024): depthwise 3×3 conv-bn + depthwise 1×1 conv
    + identity, summed, then a batch norm after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv_bn(channels, channels, 3, 1, 1, channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class FunctionalBNAct(nn.BatchNorm2d):
    """A batch norm subclass with its own forward (like timm's ``BatchNormAct2d``): fx traces
    into it and sees ``F.batch_norm`` on the module's buffers."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return F.relu(x)


class DilatedReparam(nn.Module):
    """A dilated 3×3 beside a plain 3×3 and a 1×1 (UniRepLKNet-style): one 5×5 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.plain = conv_bn(channels, channels, 3, 1, 1)
        self.dilated = conv_bn(channels, channels, 3, 1, 2, dilation=2)
        self.point = conv_bn(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.plain(x) + self.dilated(x) + self.point(x)


class BNAndPad(nn.Module):
    """DBB's batch norm that pads its output with its own image of zero: the border holds
    what the batch norm gives for a zero input, written in place into a zero-padded tensor,
    so that a conv after it with no padding of its own folds the batch norm exactly."""

    def __init__(self, pad: int, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad > 0:
            bn = self.bn
            assert bn.running_mean is not None and bn.running_var is not None
            values = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
                bn.running_var + bn.eps
            )
            out = F.pad(out, [self.pad] * 4)
            values = values.view(1, -1, 1, 1)
            p = self.pad
            out[:, :, 0:p, :] = values
            out[:, :, -p:, :] = values
            out[:, :, :, 0:p] = values
            out[:, :, :, -p:] = values
        return out


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1×1 conv that starts as the identity: its kernel is a zero-initialised weight
    plus a fixed identity buffer, added on every call."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        identity = torch.zeros(channels, per_group, 1, 1)
        for c in range(channels):
            identity[c, c % per_group, 0, 0] = 1
        self.register_buffer("id_tensor", identity)
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.weight + self.id_tensor
        return F.conv2d(x, kernel, None, 1, 0, 1, self.groups)


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (Ding et al. 2021), from its repository's description: a k×k
    conv-bn; a 1×1 conv-bn; a 1×1 conv → batch norm padded with its image of zero → k×k
    average pool → batch norm; a 1×1 (identity-initialised when it keeps the channels) → batch
    norm padded the same way → k×k conv → batch norm; all summed. Depthwise blocks (groups =
    channels) have no 1×1 branch and pool the input directly."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        padding = k // 2
        self.origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.avg = nn.Sequential()
        if groups < cout:
            self.avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.avg.add_module("bn", BNAndPad(padding, cout))
            self.avg.add_module("pool", nn.AvgPool2d(k, stride, 0))
            self.branch_1x1: nn.Module | None = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.avg.add_module("pool", nn.AvgPool2d(k, stride, padding))
            self.branch_1x1 = None
        self.avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.kxk = nn.Sequential()
        if internal == cin:
            self.kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, groups=groups, bias=False))
        self.kxk.add_module("bn1", BNAndPad(padding, internal))
        self.kxk.add_module(
            "conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False)
        )
        self.kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin(x)
        if self.branch_1x1 is not None:
            out += self.branch_1x1(x)
        out += self.avg(x)
        out += self.kxk(x)
        return F.relu(out)


class QARepVGGBlockV2(nn.Module):
    """YOLOv6's quantization-aware RepVGG block (v2), from its description: 3×3 conv-bn, a
    bias-free 1×1 conv, the identity and a 3×3 average pool (stride 1, padding 1) summed, then
    one batch norm after the sum and ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.dense = conv_bn(channels, channels, 3, 1, 1)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.avg = nn.AvgPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.dense(x) + self.pointwise(x) + x + self.avg(x)))


class ImplicitHead(nn.Module):
    """YOLOR's implicit knowledge around a detection head's 1×1 conv: a learned per-channel
    shift before it (``ImplicitA``: ``conv(x + a)``) and scale after it (``ImplicitM``)."""

    def __init__(self, channels: int, outputs: int):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, channels, 1, 1) * 0.1)
        self.conv = nn.Conv2d(channels, outputs, 1)
        self.scale = nn.Parameter(1 + torch.randn(1, outputs, 1, 1) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.conv(self.shift + x)


class NormLinearHead(nn.Module):
    """timm's ``NormLinear`` classifier head after global pooling of conv features: batch
    norm → dropout → linear on the pooled features, twice (RepViT's distillation heads,
    averaged)."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.features = conv_bn(3, channels, 3, 1, 1)
        self.head = nn.Sequential(
            nn.BatchNorm1d(channels), nn.Dropout(0.1), nn.Linear(channels, classes)
        )
        self.head_dist = nn.Sequential(
            nn.BatchNorm1d(channels), nn.Dropout(0.1), nn.Linear(channels, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.relu(self.features(x)).mean((2, 3))
        return (self.head(pooled) + self.head_dist(pooled)) / 2


class LinearNorm(nn.Module):
    """LeViT's linear layer + batch norm on tokens ``(B, N, C)``: the batch norm normalizes
    the features of the flattened ``(B·N, C)``, then the tokens get their shape back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenMixer(nn.Module):
    """Conv features as tokens (LeViT's stem hand-off), then ``LinearNorm`` twice."""

    def __init__(self, channels: int):
        super().__init__()
        self.stem = conv_bn(3, channels, 3, 2, 1)
        self.first = LinearNorm(channels, 2 * channels)
        self.second = LinearNorm(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.second(F.hardswish(self.first(tokens)))


__all__ = [
    "ACBlock",
    "BNAndPad",
    "CSLABlock",
    "Crop",
    "DilatedReparam",
    "DiverseBranchBlock",
    "FunctionalBNAct",
    "IdentityBasedConv1x1",
    "ImplicitHead",
    "LinearNorm",
    "MobileOneBlock",
    "NormLinearHead",
    "QARepVGGBlockV2",
    "RepVGGBlock",
    "RepViTMixer",
    "TokenMixer",
    "conv_bn",
    "repvgg_net",
    "training_time_net",
]


def training_time_net(width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """fxfuse's built-in default: a small training-time network mixing every paper's block.

    RepVGG (stride 2, grouped, identity), ACNet (with the crop case), MobileOne (depthwise
    and pointwise), CSLA, a dilated branch and RepViT's post-sum batch norm: 28 convs and 29
    batch norms that fuse to 11 convs.
    """
    return nn.Sequential(
        RepVGGBlock(3, width, stride=2),
        ACBlock(width, width, 3, padding=1),
        RepVGGBlock(width, width, groups=4),
        MobileOneBlock(width, width, 3, 1, groups=width),
        MobileOneBlock(width, 2 * width, 1),
        ACBlock(2 * width, 2 * width, 5, padding=1),
        CSLABlock(2 * width),
        DilatedReparam(2 * width),
        RepViTMixer(2 * width),
        RepVGGBlock(2 * width, 2 * width, stride=2, groups=2),
        RepVGGBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(2 * width, num_classes),
    )


def repvgg_net(width: int = 8, groups: int = 2) -> nn.Sequential:
    """A small RepVGG-style network: stride-2 entry blocks without identity, grouped blocks."""
    return nn.Sequential(
        RepVGGBlock(3, width, stride=2),
        RepVGGBlock(width, width),
        RepVGGBlock(width, width, groups=groups),
        RepVGGBlock(width, 2 * width, stride=2, groups=groups),
        RepVGGBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )
