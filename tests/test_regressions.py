"""Bugs a review found, one test each: fxfuse must decline, not return a different model."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error

warnings.filterwarnings("ignore", category=UserWarning)


def _same(model: nn.Module, *inputs: Tensor, **kwargs: object) -> nn.Module:
    """Fuse and compare on fresh copies of the inputs (some models change them in place)."""
    model = randomize_batch_norms(model.eval())
    fused = fxfuse.optimize(model, **kwargs)
    with torch.no_grad():
        expected = model(*[x.clone() for x in inputs])
        actual = fused(*[x.clone() for x in inputs])
    assert relative_error(expected, actual) <= 1e-5, fused.fxfuse_report
    return fused


class Module(nn.Module):
    """A module whose forward a test writes, with the submodules it names."""

    def __init__(self, forward: object, **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)
        self._forward = forward
        self._two = len(inspect.signature(forward).parameters) == 3  # type: ignore[arg-type]

    def forward(self, x: Tensor, p: Tensor | None = None) -> object:  # (fx cannot trace *args)
        if self._two:
            return self._forward(self, x, p)  # type: ignore[operator]
        return self._forward(self, x)  # type: ignore[operator]


X = torch.randn(2, 4, 6, 6)


# -- in-place ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        torch.relu_,
        lambda y: F.relu(y, inplace=True),
        lambda y: torch.clamp_(y, 0),
        lambda y: torch.add(y, 1, out=y),
        lambda y: F.elu(y, inplace=True),
    ],
    ids=["relu_", "inplace=True", "clamp_", "out=", "elu-inplace"],
)
def test_an_in_place_op_whose_result_is_unused_is_kept(mutate: object) -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        y = s.a(x)
        mutate(y)  # type: ignore[operator]
        return y

    _same(Module(forward, a=nn.Conv2d(4, 4, 3, padding=1)), X)


def test_a_fold_never_moves_a_read_past_an_in_place_op() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        y = s.c(x)
        x.relu_()
        return s.bn(y)

    fused = _same(Module(forward, c=nn.Conv2d(4, 4, 3, padding=1), bn=nn.BatchNorm2d(4)), X)
    assert any("in place" in d.reason for d in fused.fxfuse_report.declines)


def test_a_merge_never_moves_a_read_past_an_in_place_op() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        a = s.c(x)
        x.relu_()
        return a + s.d(x)

    _same(Module(forward, c=nn.Conv2d(4, 4, 3, padding=1), d=nn.Conv2d(4, 4, 1)), X)


def test_an_in_place_activation_module_between_branches() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        out = s.bn(s.conv(x))
        y = s.act(x)  # nn.ReLU(inplace=True) changes x
        return out + x + s.conv2(y)

    _same(
        Module(
            forward,
            conv=nn.Conv2d(4, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            act=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(4, 4, 1),
        ),
        X,
    )


# -- fold-constants ---------------------------------------------------------------------------


def test_a_constant_changed_in_place_later_is_not_folded() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        t = s.base * 2
        t.add_(1)
        return s.c(x) * t

    model = Module(forward, c=nn.Conv2d(4, 4, 3, padding=1))
    model.register_buffer("base", torch.rand(4, 1, 1))
    fused = _same(model, X)
    _same(model, X)  # and again: nothing accumulated in a folded buffer
    with torch.no_grad():
        assert relative_error(model(X), fused(X)) <= 1e-5


def test_folding_never_changes_the_callers_buffers() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        return s.c(x) * F.relu(s.w, inplace=True)

    model = Module(forward, c=nn.Conv2d(4, 4, 3, padding=1)).eval()
    model.register_buffer("w", torch.randn(4, 1, 1))
    before = model.w.clone()
    fxfuse.optimize(model)
    assert torch.equal(model.w, before)


def test_a_computed_output_stays_fresh_on_every_call() -> None:
    def forward(s: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        return s.c(x), s.base * 2

    model = Module(forward, c=nn.Conv2d(4, 4, 3, padding=1)).eval()
    model.register_buffer("base", torch.arange(4.0))
    fused = fxfuse.optimize(model)
    _, anchors = fused(X)
    anchors += 100  # the caller post-processes its output in place
    assert fused(X)[1].tolist() == [0.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    "random",
    [
        lambda b: F.dropout(b, 0.5, training=True),
        lambda b: F.rrelu(b, training=True),
        lambda b: b.sigmoid().bernoulli(),
        lambda b: torch.rand_like(b),
    ],
    ids=["dropout", "rrelu", "bernoulli", "rand_like"],
)
def test_random_ops_on_constants_stay_random(random: object) -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        return s.c(x) * random(s.b)  # type: ignore[operator]

    model = Module(forward, c=nn.Conv2d(4, 4, 3, padding=1)).eval()
    # negative values (rrelu is random there) and probabilities strictly inside (0, 1)
    model.register_buffer("b", torch.tensor([-0.8, -0.3, 0.4, 0.9]).reshape(4, 1, 1))
    fused = fxfuse.optimize(model)
    torch.manual_seed(1)
    first = fused(X)
    assert not torch.equal(first, fused(X))


# -- module hooks -----------------------------------------------------------------------------


def test_a_forward_hook_keeps_its_module() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].register_forward_hook(lambda module, args, out: out * 2)
    fused = _same(model, X)
    assert any("hooks" in note for note in fused.fxfuse_report.notes)


def test_a_forward_pre_hook_keeps_its_module() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    _same(model, X)


def test_legacy_weight_norm_is_left_alone_and_shared() -> None:
    conv = torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3))
    model = nn.Sequential(conv, nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        conv.weight_g.mul_(2)  # the hook recomputes weight on the next call
    fused = _same(model, X)
    assert any("shares it" in note for note in fused.fxfuse_report.notes)


# -- shapes -------------------------------------------------------------------------------------


def test_shape_reads_follow_a_node_of_the_same_shape_when_branches_broadcast() -> None:
    def forward(s: nn.Module, x: Tensor, p: Tensor) -> Tensor:
        g = s.a(p) + s.b(p)  # (N, C, 1, 1), like a squeeze-excite branch
        return (x + g) * g.shape[-1]

    _same(Module(forward, a=nn.Conv2d(4, 4, 1), b=nn.Conv2d(4, 4, 1)), X, torch.randn(2, 4, 1, 1))


def test_shape_reads_of_distributed_branches_keep_their_own_shape() -> None:
    def forward(s: nn.Module, x: Tensor, p: Tensor) -> Tensor:
        b = s.b(p)
        return s.bn(s.a(x) + b) * b.shape[-1]

    _same(
        Module(
            forward, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1), bn=nn.BatchNorm2d(4)
        ),
        X,
        torch.randn(2, 4, 1, 1),
    )


def test_linear_on_3d_input_with_a_batch_norm_branch() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        return s.l(x) + s.bn(x)  # BatchNorm1d normalizes dim 1; the Linear mixes the last dim

    x = torch.randn(2, 8, 8)
    model = Module(forward, l=nn.Linear(8, 8), bn=nn.BatchNorm1d(8))
    _same(model, x)
    _same(model, x, example_inputs=(x,))


def test_unbatched_crops_are_checked_when_shapes_are_known() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        y = x[:, :, 1:-1]
        return s.c(y) + s.d(y)

    x = torch.randn(3, 6, 6)  # (C, H, W): the crop is on W, not on a spatial dim 1
    _same(Module(forward, c=nn.Conv2d(3, 3, 1), d=nn.Conv2d(3, 3, 1)), x, example_inputs=(x,))


def test_a_float64_scale_keeps_the_result_float64() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        return s.c(x) * s.s

    model = Module(forward, c=nn.Conv2d(4, 4, 3, padding=1)).eval()
    model.register_buffer("s", torch.rand(4, 1, 1, dtype=torch.float64))
    fused = _same(model, X)
    assert fused(X).dtype == torch.float64


# -- inputs that used to crash --------------------------------------------------------------------


def _pad_of(x: Tensor) -> list[int]:
    return [1, 1, 1, 1]


torch.fx.wrap("_pad_of")


def test_a_pad_computed_at_run_time() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        return s.c(F.pad(x, _pad_of(x)))

    _same(Module(forward, c=nn.Conv2d(4, 4, 3)), X)


def test_conv_padding_computed_from_a_shape() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        p = x.shape[-1] // x.shape[-1]
        return s.bn(F.conv2d(x, s.w, None, 1, (p, p)))

    model = Module(forward, bn=nn.BatchNorm2d(4))
    model.w = nn.Parameter(torch.randn(4, 4, 3, 3))
    _same(model, X)


def test_a_bool_in_a_sum() -> None:
    def forward(s: nn.Module, x: Tensor) -> Tensor:
        return s.c(x) * True + s.d(x)

    _same(Module(forward, c=nn.Conv2d(4, 4, 1), d=nn.Conv2d(4, 4, 1)), X)


def test_a_batch_norm_view_names_the_batch_norm() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = self.c(x)
            bn = self.bn
            z = F.batch_norm(
                y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
            )
            return z, y.relu()

    fused = _same(Functional(), X)
    (decline,) = [d for d in fused.fxfuse_report.declines if d.rule == "fold-bn"]
    assert decline.node == "batch_norm" and "batch_norm" not in decline.reason
    assert count_ops(fused, X)["batch_norm"] == 1
