"""drop-proven-rank-asserts: a ``torch._assert(x.ndim == k)`` leaves the fused graph only when
an earlier check (carried through rank-keeping ops) proves it; every other check stays, and
the fused model raises where the original raises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from tests.helpers import fuse_and_check


def _asserts(module: nn.Module) -> int:
    return sum(1 for n in module.graph.nodes if n.target is torch._assert)


class CheckedBatchNorm(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in small: checks its input's rank, then a functional BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class Block(nn.Module):
    """A RepVGG block whose two batch norms each check the rank: two checks per block."""

    def __init__(self, c: int):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), CheckedBatchNorm(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), CheckedBatchNorm(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)))


def test_checks_proven_by_the_first_are_dropped() -> None:
    model = nn.Sequential(Block(4), Block(4), Block(4))
    fused, _, _ = fuse_and_check(model, torch.randn(2, 4, 7, 9), convs=3)
    assert _asserts(torch.fx.symbolic_trace(model)) == 6
    # the first reads a conv of the input (which may be unbatched): it stays; the second
    # reads the same value, and every later one a conv of a relu of a checked value
    assert _asserts(fused) == 1
    # and what computed the dropped conditions went with them
    assert sum(n.target is getattr for n in fused.graph.nodes) == 1
    with pytest.raises(AssertionError, match="expected 4D"):
        model(torch.randn(4, 7, 9))
    with pytest.raises(AssertionError, match="expected 4D"):
        fused(torch.randn(4, 7, 9))  # the unbatched input fails where it failed before


class Flattening(nn.Module):
    """A rank fixed by one check, then changed: a check after the change is not proven."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4d")
        z = y.flatten(2)
        torch._assert(z.ndim == 3, "3d")  # flatten is not rank-keeping: stays
        torch._assert(z.dim() == 3, "3d again")  # proven by the one before: dropped
        return z.relu()


def test_a_check_after_a_rank_change_stays() -> None:
    fused = fxfuse.optimize(Flattening().eval())
    assert _asserts(fused) == 2
    messages = [n.args[1] for n in fused.graph.nodes if n.target is torch._assert]
    assert messages == ["4d", "3d"]


class OtherRank(nn.Module):
    """A check of a rank other than the one proven: it fails, so it must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4d")
        z = torch.relu(y)
        torch._assert(z.ndim == 3, "never 3d")
        return z


def test_a_check_of_another_rank_stays_and_fails() -> None:
    model = OtherRank().eval()
    fused = fxfuse.optimize(model)
    assert _asserts(fused) == 2
    with pytest.raises(AssertionError, match="never 3d"):
        fused(torch.randn(1, 3, 5, 5))


def grow(x: torch.Tensor) -> torch.Tensor:
    """Opaque code (``torch.fx.wrap``) that changes its argument's rank in place."""
    x.unsqueeze_(0)
    return x.sum()


torch.fx.wrap("grow")


class Grown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4d")
        s = grow(y)
        torch._assert(y.ndim == 4, "still 4d")  # not after opaque code wrote y: stays
        return y + s


def test_a_value_passed_to_code_that_may_change_it_loses_its_rank() -> None:
    model = Grown().eval()
    fused = fxfuse.optimize(model)
    assert _asserts(fused) == 2
    for m in (model, fused):
        with pytest.raises(AssertionError, match="still 4d"):
            m(torch.randn(1, 3, 4, 4))


def test_timm_repvgg_keeps_one_check_of_sixty_one() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("repvgg_a0").eval()
    assert _asserts(torch.fx.symbolic_trace(model)) == 61
    fused = fxfuse.optimize(model)
    assert _asserts(fused) == 1
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(model(x), fused(x), rtol=1e-4, atol=1e-5)


class Nameless(nn.Module):
    """User code whose ``forward`` names no module (made by ``exec``, or a C extension)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


Nameless.forward.__module__ = None  # type: ignore[assignment]


class AroundUserCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.user = nn.Conv2d(3, 3, 1), Nameless()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4d")
        z = self.user(y)
        torch._assert(y.ndim == 4, "still 4d")  # y went through user code: not proven
        return z


def test_a_value_passed_to_a_user_module_loses_its_rank() -> None:
    fused = fxfuse.optimize(AroundUserCode().eval(), leaf_modules=[Nameless])
    assert _asserts(fused) == 2


class CheckAfterBatchNorm(nn.Module):
    """A check after a ``BatchNorm2d`` module: before the rules run, the batch norm proves no
    rank (it folds into the conv, which accepts 3-d input), so the check must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        torch._assert(y.ndim == 4, f"expected 4D input (got {y.ndim}D)")
        return y.relu()


def test_a_check_after_a_folded_batch_norm_still_rejects_unbatched_input() -> None:
    model = CheckAfterBatchNorm().eval()
    fused, _, _ = fuse_and_check(model, torch.randn(2, 3, 7, 8), convs=1, batch_norms=0)
    assert _asserts(fused) == 1
    with pytest.raises(ValueError):
        model(torch.randn(3, 7, 8))  # the batch norm rejects it
    with pytest.raises(AssertionError, match="expected 4D"):
        fused(torch.randn(3, 7, 8))  # the check left in place does


def test_checks_are_gone_before_the_rules_run() -> None:
    from fxfuse.capture import symbolic_capture
    from fxfuse.rules import RewriteContext

    seen: list[int] = []
    real = RewriteContext.__init__

    def spy(self: RewriteContext, graph: torch.fx.Graph, *args: object, **kwargs: object) -> None:
        seen.append(sum(n.target is torch._assert for n in graph.nodes))
        seen.append(sum(n.target is getattr for n in graph.nodes))
        real(self, graph, *args, **kwargs)  # type: ignore[arg-type]

    model = nn.Sequential(Block(4), Block(4)).eval()
    captured = symbolic_capture(model)
    assert sum(n.target is torch._assert for n in captured.nodes) == 4
    RewriteContext.__init__ = spy  # type: ignore[method-assign]
    try:
        fused = fxfuse.optimize(model)
    finally:
        RewriteContext.__init__ = real  # type: ignore[method-assign]
    # the rules see the first block's two checks (each reads a conv of the input, which may
    # be unbatched) and their ndim reads, not the messages' reads; once the two convs are
    # one, emission drops the second
    assert seen == [2, 2]
    assert _asserts(fused) == 1


def test_a_batch_norm_with_a_forward_of_its_own_proves_no_rank() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.bn.forward = lambda x: x.flatten(2)  # type: ignore[method-assign]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            torch._assert(y.ndim == 4, "4d")
            z = self.bn(y)
            torch._assert(z.ndim == 4, "still 4d")  # false: the replaced forward flattens
            return z

    model = Model().eval()
    with pytest.raises(AssertionError, match="still 4d"):
        model(torch.randn(1, 3, 8, 8))
    fused = fxfuse.optimize(model)
    with pytest.raises(AssertionError, match="still 4d"):
        fused(torch.randn(1, 3, 8, 8))


def test_a_hook_that_changes_the_rank_proves_nothing() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.bn.register_forward_hook(lambda m, i, o: o.flatten(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            torch._assert(y.ndim == 4, "4d")
            z = self.bn(y)
            torch._assert(z.ndim == 4, "still 4d")  # false: the hook flattens
            return z

    model = Model().eval()
    with pytest.raises(AssertionError, match="still 4d"):
        model(torch.randn(1, 3, 8, 8))
    fused = fxfuse.optimize(model)
    with pytest.raises(AssertionError, match="still 4d"):
        fused(torch.randn(1, 3, 8, 8))
