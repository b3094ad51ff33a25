"""drop-identity and drop-eval-dropout: ops that compute nothing at inference disappear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops
from tests.helpers import declined, fuse_and_check


class Skip(nn.Identity):
    """An ``nn.Identity`` kept whole (``leaf_modules``) reaches the graph, and drop-identity
    removes it. A plain ``nn.Identity`` never does: capture hands its argument back."""


class Noise(nn.Module):
    def __init__(self, skip: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.2)
        self.skip = Skip() if skip is None else skip
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.skip(self.drop(self.conv(x)))
        y = F.dropout(y, 0.3, training=self.training)
        return self.drop2d(self.bn(y))


def test_eval_dropout_and_identity_disappear_and_unblock_the_fold() -> None:
    fused, _before, _after = fuse_and_check(
        Noise(), torch.randn(2, 3, 8, 8), convs=1, batch_norms=0, leaf_modules=(Skip,)
    )
    counts = fused.fxfuse_report.counts
    assert counts["drop-eval-dropout"] == 3 and counts["drop-identity"] == 1
    assert counts["fold-bn"] == 1
    assert not any(isinstance(m, (nn.Dropout, nn.Identity)) for m in fused.modules())


def test_a_plain_identity_module_is_no_node_of_the_captured_graph() -> None:
    from fxfuse.capture import symbolic_capture

    graph = symbolic_capture(Noise(nn.Identity()).eval())
    targets = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    assert "skip" not in targets and {"conv", "bn"} <= targets
    fused, _before, _after = fuse_and_check(
        Noise(nn.Identity()), torch.randn(2, 3, 8, 8), convs=1, batch_norms=0
    )
    assert fused.fxfuse_report.counts["drop-identity"] == 0


def test_an_identity_with_a_hook_stays_a_module_call() -> None:
    calls: list[tuple[int, ...]] = []
    model = Noise(nn.Identity()).eval()
    model.skip.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    fused = fxfuse.optimize(model)
    fused(torch.randn(1, 3, 8, 8))
    assert calls == [(1, 4, 6, 6)]


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


def test_an_identity_seen_by_a_global_hook_stays_a_module_call() -> None:
    from torch.nn.modules.module import register_module_forward_hook

    calls: list[str] = []
    model = Noise(nn.Identity()).eval()
    handle = register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__) if type(m) is nn.Identity else None
    )
    try:
        fused = fxfuse.optimize(model)
        calls.clear()
        fused(torch.randn(1, 3, 8, 8))
    finally:
        handle.remove()
    assert calls == ["Identity"]


class InPlaceThroughIdentity(nn.Module):
    """``nn.Identity`` hands back its argument itself: ``y += 1`` on its output changes the
    caller's ``x``, before the conv reads it; the fused model must do the same."""

    def __init__(self) -> None:
        super().__init__()
        self.skip, self.conv, self.bn = nn.Identity(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.skip(x)
        y += 1
        return self.bn(self.conv(y))


def test_an_in_place_update_through_an_identity_reaches_the_callers_tensor() -> None:
    from fxfuse.testing import randomize_batch_norms

    model = randomize_batch_norms(InPlaceThroughIdentity().eval(), 0)
    fused = fxfuse.optimize(model)
    for shape in ((1, 3, 7, 8), (2, 3, 8, 7), (2, 3, 8, 7)):
        x = torch.randn(shape)
        a, b = x.clone(), x.clone()
        expected, actual = model(a), fused(b)
        assert torch.equal(a, x + 1) and torch.equal(b, a)  # the caller's tensor, updated
        assert (actual - expected).norm() / expected.norm() < 1e-6
    assert count_ops(fused, torch.randn(1, 3, 8, 8))["batch_norm"] == 0
