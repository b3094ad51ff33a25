"""drop-identity and drop-eval-dropout: ops that compute nothing at inference disappear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops
from tests.helpers import declined, fuse_and_check


class Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.2)
        self.skip = nn.Identity()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.skip(self.drop(self.conv(x)))
        y = F.dropout(y, 0.3, training=self.training)
        return self.drop2d(self.bn(y))


def test_eval_dropout_and_identity_disappear_and_unblock_the_fold() -> None:
    fused, _before, _after = fuse_and_check(
        Noise(), torch.randn(2, 3, 8, 8), convs=1, batch_norms=0
    )
    counts = fused.fxfuse_report.counts
    assert counts["drop-eval-dropout"] == 3 and counts["drop-identity"] == 1
    assert counts["fold-bn"] == 1
    assert not any(isinstance(m, (nn.Dropout, nn.Identity)) for m in fused.modules())


def test_training_mode_dropout_is_kept_and_reported() -> None:
    model = Noise().eval()
    model.drop.train()
    fused = fxfuse.optimize(model)
    (reason,) = declined(fused, "drop-eval-dropout")
    assert "training mode" in reason
    assert count_ops(fused, torch.randn(1, 3, 8, 8))["batch_norm"] == 1


def test_dropout_with_p_zero_is_dropped_even_in_training_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.0), nn.BatchNorm2d(3)).eval()
    model[1].train()
    fuse_and_check(model, torch.randn(1, 3, 4, 4), convs=1, batch_norms=0)
