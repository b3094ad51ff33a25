"""A RepVGG model laid out as the RepVGG repository lays it out, training and deploy forms.

Written from the repository's description (Ding et al. 2021, ``repvgg.py``), to show
:func:`fxfuse.deploy_state_dict` on a deploy class someone else wrote: the state_dict keys are
the repository's (``stage1.0.rbr_reparam.weight``), the code is not.

- training form (``deploy=False``): each block sums ``rbr_dense`` (3×3 conv + BN, a
  ``Sequential`` of ``conv`` and ``bn``), ``rbr_1x1`` (1×1 conv + BN) and, where input and
  output shapes agree, ``rbr_identity`` (a BN), then ReLU;
- deploy form (``deploy=True``): each block is one 3×3 conv with a bias, ``rbr_reparam``,
  then ReLU.

The network: ``stage0`` (one block, stride 2), ``stage1``…``stage4`` (lists of blocks, the
first of each with stride 2), global average pooling ``gap`` and the classifier ``linear``.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int, padding: int, groups: int) -> nn.Module:
    branch = nn.Sequential()
    branch.add_module(
        "conv", nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
    )
    branch.add_module("bn", nn.BatchNorm2d(cout))
    return branch


class RepVGGBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()  # the repository's optional squeeze-excite, off in A0
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
        else:
            same = cin == cout and stride == 1
            self.rbr_identity = nn.BatchNorm2d(cin) if same else None
            self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
            self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + identity))


class RepVGG(nn.Module):
    def __init__(
        self,
        num_blocks: list[int],
        num_classes: int = 1000,
        width_multiplier: list[float] = (1.0, 1.0, 1.0, 1.0),  # type: ignore[assignment]
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(3, self.planes, stride=2, deploy=deploy)
        widths = [int(w * m) for w, m in zip((64, 128, 256, 512), width_multiplier, strict=True)]
        self.stage1, self.stage2, self.stage3, self.stage4 = (
            self._stage(width, n, deploy) for width, n in zip(widths, num_blocks, strict=True)
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _stage(self, width: int, blocks: int, deploy: bool) -> nn.ModuleList:
        stage = nn.ModuleList()
        for i in range(blocks):
            stage.append(RepVGGBlock(self.planes, width, stride=2 if i == 0 else 1, deploy=deploy))
            self.planes = width
        return stage

    def forward(self, x: Tensor) -> Tensor:
        out = self.stage0(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            for block in stage:
                out = block(out)
        out = self.gap(out)
        return self.linear(out.view(out.size(0), -1))


def create_RepVGG_A0(deploy: bool = False, num_classes: int = 1000) -> RepVGG:
    """RepVGG-A0: 1, 2, 4, 14 and 1 blocks per stage, widths 48, 48, 96, 192 and 1280."""
    return RepVGG([2, 4, 14, 1], num_classes, [0.75, 0.75, 0.75, 2.5], deploy=deploy)
