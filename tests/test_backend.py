"""torch.compile(backend="fxfuse"): fused where users already compile, never stale."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import fxfuse
import fxfuse.backend
from fxfuse.testing import count_ops_profiled, randomize_batch_norms, relative_error
from fxfuse.zoo import ACBlock, CSLABlock, MobileOneBlock, RepVGGBlock, RepViTMixer, repvgg_net

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    fxfuse.backend.REPORTS.clear()


def _compiled(model: nn.Module, **options: object) -> nn.Module:
    return torch.compile(model, backend="fxfuse", options={"inner": "eager", **options})


def test_the_backend_is_registered_by_name() -> None:
    assert "fxfuse" in torch._dynamo.list_backends()


BLOCKS = {
    "repvgg": (lambda: RepVGGBlock(8, 8, groups=2), 8),
    "acnet": (lambda: ACBlock(8, 8, 3, 0), 8),
    "mobileone": (lambda: MobileOneBlock(8, 8, 3, 1, groups=8), 8),
    "csla": (lambda: CSLABlock(8), 8),
    "repvit": (lambda: RepViTMixer(8), 8),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_fuse_under_torch_compile(name: str) -> None:
    factory, channels = BLOCKS[name]
    model = randomize_batch_norms(factory().eval())
    x = torch.randn(2, channels, 9, 9)
    compiled = _compiled(model)
    with torch.no_grad():
        assert relative_error(model(x), compiled(x)) <= 1e-5
    assert count_ops_profiled(compiled, x)["conv"] == 1
    assert count_ops_profiled(compiled, x)["batch_norm"] == 0
    assert fxfuse.backend.REPORTS[-1].after.convs == 1


def test_a_second_instance_uses_its_own_weights() -> None:
    # dynamo does not guard on parameters: both instances share the compiled graph
    a = randomize_batch_norms(repvgg_net().eval(), seed=1)
    b = randomize_batch_norms(repvgg_net().eval(), seed=2)
    x = torch.randn(1, 3, 16, 16)
    ca, cb = _compiled(a), _compiled(b)
    with torch.no_grad():
        assert relative_error(a(x), ca(x)) <= 1e-5
        assert relative_error(b(x), cb(x)) <= 1e-5
        assert relative_error(a(x), ca(x)) <= 1e-5  # and back again
        assert relative_error(b(x), a(x)) > 1e-2  # (they really differ)


def test_weights_updated_in_place_after_compiling_are_seen() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    x = torch.randn(1, 3, 16, 16)
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(x)
        for p in model.parameters():
            p.mul_(1.5)
        model[1].dense[1].running_var.add_(1.0)
        assert relative_error(model(x), compiled(x)) <= 1e-5


def _adam_fused(model: nn.Module) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    model(torch.randn(4, 3, 16, 16)).square().mean().backward()
    optimizer.step()
    model.eval()


def _recalibrate(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))  # batch-norm statistics move, no version bump
    model.eval()


def _data_mul(model: nn.Module) -> None:
    for p in model.parameters():
        p.data.mul_(1.25)


@pytest.mark.parametrize(
    "update", [_adam_fused, _recalibrate, _data_mul], ids=["adam-fused", "bn-stats", "data"]
)
def test_updates_no_version_counter_sees_are_seen(update: Callable[[nn.Module], None]) -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    x = torch.randn(1, 3, 16, 16)
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(x)
    for _ in range(2):
        update(model)
        with torch.no_grad():
            assert relative_error(model(x), compiled(x)) <= 1e-5


def test_with_gradients_the_fused_graph_trains_the_original_parameters() -> None:
    # live weights: the merged kernels are computed from the parameters on every call, so
    # autograd reaches the parameters through them (one conv per block, the multi-branch
    # model's gradients)
    model = randomize_batch_norms(repvgg_net().eval())
    x = torch.randn(2, 3, 16, 16)
    compiled = _compiled(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxfuse.FxFuseWarning)  # nothing to warn about
        compiled(x).square().sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for fused, (name, p) in zip(fused_grads, model.named_parameters(), strict=True):
        assert relative_error(p.grad, fused) <= 1e-5, name
    with torch.no_grad():
        compiled(x)  # dynamo compiles again for no_grad (outside the profiler's count)
    assert count_ops_profiled(compiled, x)["conv"] == 5


def test_frozen_weights_with_gradients_run_unfused_and_say_so_once() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    x = torch.randn(1, 3, 16, 16)
    compiled = _compiled(model, weights="frozen")
    fxfuse.backend._warned.discard("grad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
        out.sum().backward()
        compiled(x)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    messages = [str(w.message) for w in caught if w.category is fxfuse.FxFuseWarning]
    assert sum("gradients are enabled" in m for m in messages) == 1
    assert relative_error(model(x), out) <= 1e-5
    with torch.no_grad():
        compiled(x)  # dynamo compiles again for no_grad (it guards on grad mode): fused
    assert count_ops_profiled(compiled, x)["conv"] == 5


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RepVGGBlock(4, 4), RepVGGBlock(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        if y.mean() > 0:  # a graph break: dynamo captures two graphs around it
            y = y * 2
        return self.b(y)


def test_a_graph_break_fuses_each_graph() -> None:
    model = randomize_batch_norms(DataDependent().eval())
    compiled = _compiled(model)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), compiled(x)) <= 1e-5
        assert relative_error(model(-x), compiled(-x)) <= 1e-5
    assert count_ops_profiled(compiled, x)["conv"] == 2
    assert len(fxfuse.backend.REPORTS) >= 2


def test_dynamic_shapes() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    compiled = torch.compile(model, backend="fxfuse", dynamic=True)
    with torch.no_grad():
        for shape in [(1, 3, 16, 16), (3, 3, 21, 17), (2, 3, 32, 9)]:
            x = torch.randn(*shape)
            assert relative_error(model(x), compiled(x)) <= 1e-5


def test_conv_transpose_bn_in_equals_out_under_inductor() -> None:
    # Inductor's own freezing scales weight dim 0 here (docs/design.md trap 4); fxfuse folds dim 1.
    model = nn.Sequential(nn.ConvTranspose2d(6, 6, 3, stride=2, groups=3), nn.BatchNorm2d(6))
    model = randomize_batch_norms(model.eval())
    compiled = torch.compile(model, backend="fxfuse", options={"inner": "inductor"})
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        assert relative_error(model(x), compiled(x)) <= 1e-5
    assert fxfuse.backend.REPORTS[-1].counts["fold-bn"] == 1


def test_report_option_takes_a_callable_and_verify_checks() -> None:
    reports: list[fxfuse.FusionReport] = []
    model = randomize_batch_norms(repvgg_net().eval())
    compiled = _compiled(model, report=reports.append, verify=True)
    with torch.no_grad():
        compiled(torch.randn(1, 3, 16, 16))
    assert len(reports) == 1 and reports[0].capture.startswith("torch.compile")


def test_unknown_option_is_a_clear_error() -> None:
    compiled = torch.compile(nn.ReLU(), backend="fxfuse", options={"innr": "eager"})
    with pytest.raises(Exception, match="unknown fxfuse backend option"):
        compiled(torch.randn(2))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"inner": 5}, "option inner=5: use a backend name"),
        ({"weights": "frozen", "cache_size": -1}, "option cache_size=-1: use an int ≥ 0"),
        ({"cache_size": "8"}, "option cache_size='8'"),
        ({"verify": "yes"}, "option verify='yes': use True or False"),
    ],
)
def test_bad_option_values_are_clear_errors(options: dict[str, object], named: str) -> None:
    with pytest.raises(fxfuse.FxFuseError, match=named) as info:
        fxfuse.backend.BackendOptions.parse(options)
    assert "\n" not in str(info.value)


def test_a_bad_option_value_is_reported_through_torch_compile() -> None:
    compiled = torch.compile(nn.ReLU(), backend="fxfuse", options={"inner": 5})
    with pytest.raises(Exception, match="option inner=5"):
        compiled(torch.randn(2))


def test_a_weight_swapped_through_data_is_seen() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    x = torch.randn(1, 3, 16, 16)
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(x)
        model[0].dense[0].weight.data = torch.randn_like(model[0].dense[0].weight)
        assert relative_error(model(x), compiled(x)) <= 1e-5


def test_a_model_built_under_inference_mode_compiles() -> None:
    with torch.inference_mode():
        model = randomize_batch_norms(repvgg_net().eval())
        x = torch.randn(1, 3, 16, 16)
        compiled = _compiled(model)
        assert relative_error(model(x), compiled(x)) <= 1e-5


def test_dynamic_shapes_still_fold_batch_norms() -> None:
    # under dynamic=True dynamo lifts each batch norm's eps to a 0-d tensor input (.item())
    model = randomize_batch_norms(repvgg_net().eval())
    compiled = torch.compile(model, backend="fxfuse", dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 17, 17))
    assert fxfuse.backend.REPORTS[-1].after.batch_norms == 0
    assert fxfuse.backend.REPORTS[-1].after.convs == 5


def _fingerprint_changes(weights: list[Tensor], change: Callable[[list[Tensor]], None]) -> bool:
    fingerprint = fxfuse.backend.Fingerprint(weights)
    before = fingerprint(weights)
    assert fxfuse.backend.Fingerprint.same(before, fingerprint(weights))  # deterministic
    change(weights)
    return not fxfuse.backend.Fingerprint.same(before, fingerprint(weights))


def _weights() -> list[Tensor]:
    torch.manual_seed(0)
    return [
        torch.randn(64, 32, 3, 3),  # large: rows of 256 and a tail
        torch.randn(32, 64, 3, 3).transpose(0, 1),  # large, not contiguous
        torch.randn(64),  # small: kept as it is
        torch.randn(16, 100, dtype=torch.float64),
        torch.tensor(7),  # an integer buffer (num_batches_tracked)
        torch.randn(40, 40).half(),
    ]


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w[0].view(-1)[1000].mul_(1 + 1e-4),  # one element of a large tensor, slightly
        lambda w: w[0].view(-1)[-1].add_(1e-3),  # in the tail that is not a whole row
        lambda w: w[0].copy_(w[0].flip(0)),  # whole rows swapped: each row's sum moves
        lambda w: w[0].view(-1)[:512].copy_(w[0].view(-1)[:512].view(2, 256).flip(0).reshape(-1)),
        lambda w: w[0].copy_(w[0].flip(-1)),  # every kernel flipped: values move within rows
        lambda w: w[1][3, 5, 1, 1].add_(1e-3),
        lambda w: w[2][7].add_(1e-7),  # small tensors are compared exactly
        lambda w: w[3][15, 99].add_(1e-12),
        lambda w: w[4].add_(1),
        lambda w: w[5][0, 0].add_(0.01),
        lambda w: [t.mul_(1 - 1e-5) for t in w[:2]],  # a tiny step of every weight (decay)
    ],
)
def test_the_fingerprint_sees_small_changes(change: Callable[[list[Tensor]], None]) -> None:
    assert _fingerprint_changes(_weights(), change)


def test_the_fingerprint_of_unchanged_weights_is_the_same() -> None:
    weights = _weights()
    assert not _fingerprint_changes(weights, lambda w: w[0].view(-1)[3].mul_(1.0))
