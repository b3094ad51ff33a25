"""The training side: gradient re-parameterization, expand(), online merge."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfuse
from fxfuse import zoo
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.training import GradientMap


class Scaled(nn.Module):
    """``Σ sᵢ·convᵢ(x) (+ x)`` with constant scales: per channel (buffers) or numbers."""

    def __init__(
        self,
        channels: int,
        kernels: list[tuple[int, int]],
        groups: int = 1,
        identity: bool = True,
        scalar: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, k, padding=(k[0] // 2, k[1] // 2), groups=groups,
                      bias=bias)
            for k in kernels
        )  # fmt: skip
        self.identity = identity
        self.scalars = [0.5 + i / 3 for i in range(len(kernels))] if scalar else None
        for i in range(len(kernels)):
            self.register_buffer(f"s{i}", torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.identity else 0
        for i, conv in enumerate(self.convs):
            scale = self.scalars[i] if self.scalars is not None else getattr(self, f"s{i}")
            out = out + scale * conv(x)
        return F.relu(out)


def _net(*blocks: nn.Module, channels: int = 4, head: bool = True) -> nn.Sequential:
    layers = [*blocks]
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)]
    return nn.Sequential(*layers).double()


CSLA = lambda g=1: Scaled(4, [(3, 3), (1, 1)], groups=g)  # noqa: E731
STRUCTURES = {
    "csla": lambda: _net(CSLA(), CSLA(2), CSLA()),
    "repvgg-scalars": lambda: _net(Scaled(4, [(3, 3), (1, 1)], scalar=True), CSLA()),
    "acb-groups": lambda: _net(
        Scaled(4, [(3, 3), (1, 3), (3, 1)], groups=2, identity=False, bias=True),
        Scaled(4, [(3, 3), (1, 3), (3, 1)], identity=False),
    ),
    "overlap": lambda: _net(Scaled(4, [(3, 3), (3, 3), (1, 1)], groups=4), CSLA()),
}


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for i in range(steps):
        size = (7, 6) if i % 2 else (5, 5)  # odd and even sizes, batch 1 and > 1
        x = torch.randn(1 + i % 2, 4, *size, generator=g, dtype=torch.float64)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _outputs(model: nn.Module) -> Tensor:
    x = torch.randn(3, 4, 9, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True},
        {"lr": 0.02, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.02, "maximize": True},
    ],
    ids=["sgd", "nesterov-decay", "dampening-maximize"],
)
def test_plain_model_follows_multi_branch_sgd(structure: str, settings: dict) -> None:
    model = STRUCTURES[structure]()
    original = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)
    plain, optimizer = fxfuse.gradient_reparam(model, torch.optim.SGD, **settings)
    blocks = sum(isinstance(m, Scaled) for m in model.modules())
    assert count_ops(plain, torch.randn(1, 4, 5, 5, dtype=torch.float64))["conv"] == blocks
    steps = 30 if settings["weight_decay"] == 1e-4 else 10
    _train(reference, torch.optim.SGD(reference.parameters(), **settings), steps, seed=1)
    _train(plain, optimizer, steps, seed=1)
    expected = _outputs(reference)
    assert relative_error(expected, _outputs(plain)) <= 1e-9
    assert relative_error(expected, _outputs(model)) > 1e-3  # (training moved it)
    # the caller's model is untouched, and shares nothing with the plain one
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name])
    ours = {id(p) for p in model.parameters()}
    assert not any(id(p) in ours for p in plain.parameters())


def test_decay_acts_on_the_weight_less_its_constant_part() -> None:
    """The identity is in ``W`` but in no parameter: decaying it too (``C = 0``) drifts."""
    settings = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05}
    reference = STRUCTURES["csla"]()
    plain, optimizer = fxfuse.gradient_reparam(reference, torch.optim.SGD, **settings)
    gmap: GradientMap = optimizer.fxfuse_gradient_map  # type: ignore[attr-defined]
    merged = [p for p in plain.parameters() if gmap.constant(p) is not None]
    assert any(gmap.constant(p).abs().sum() > 0 for p in merged)  # type: ignore[union-attr]
    for p in merged:
        gmap.reparams[p].constant = torch.zeros_like(p)
    _train(reference, torch.optim.SGD(reference.parameters(), **settings), 10, seed=1)
    _train(plain, optimizer, 10, seed=1)
    assert relative_error(_outputs(reference), _outputs(plain)) > 1e-6


def test_gradient_multiplier_is_sum_of_squared_scales_where_branches_land() -> None:
    block = Scaled(4, [(3, 3), (1, 1)], scalar=True)
    plain, optimizer = fxfuse.gradient_reparam(_net(block, head=False), torch.optim.SGD, lr=0.1)
    (weight,) = [p for p in plain.parameters() if p.dim() == 4]
    m = optimizer.fxfuse_gradient_map.multiplier(weight)  # type: ignore[attr-defined]
    s3, s1 = block.scalars  # type: ignore[misc]
    expected = torch.full_like(weight, s3**2)
    expected[:, :, 1, 1] += s1**2
    torch.testing.assert_close(m, expected, rtol=1e-12, atol=0)


def test_optimizers_not_linear_in_the_gradient_are_refused() -> None:
    with pytest.raises(TypeError, match=r"linear in the gradient .*Adam's step is not"):
        fxfuse.gradient_reparam(STRUCTURES["csla"](), torch.optim.Adam, lr=1e-3)


def test_a_closure_is_refused() -> None:
    plain, optimizer = fxfuse.gradient_reparam(STRUCTURES["csla"](), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="cannot take a closure"):
        optimizer.step(lambda: plain(torch.randn(1, 4, 5, 5, dtype=torch.float64)).sum())


def test_trainable_scales_are_refused() -> None:
    class Learned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.s = nn.Parameter(torch.rand(4, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            return self.s * self.a(x) + self.b(x)

    with pytest.raises(ValueError, match="not linear in its parameters"):
        fxfuse.gradient_reparam(Learned().double(), torch.optim.SGD, lr=0.1)


# --------------------------------------------------------------------------------------------
# online merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["csla", "acb-groups", "overlap"])
def test_online_merge_trains_the_branch_parameters_exactly(structure: str) -> None:
    model = STRUCTURES[structure]()
    online = fxfuse.online_merge(model)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    blocks = sum(isinstance(m, Scaled) for m in model.modules())
    assert count_ops(online, x)["conv"] == blocks < count_ops(model, x)["conv"]
    # symmetric zero padding stays in the conv (no padded copy of each input kept for backward)
    assert not any(n.target is F.pad for n in online.graph.nodes)
    reference = copy.deepcopy(model)
    reference.zero_grad()
    reference(x).square().sum().backward()
    online(x).square().sum().backward()
    grads = dict(reference.named_parameters())
    names = [n for n, _ in online.named_parameters()]
    assert sorted(names) == sorted(grads)
    for name, p in online.named_parameters():
        assert relative_error(grads[name].grad, p.grad) <= 1e-12, name
    assert all(p.grad is None for p in model.parameters())
    # any optimizer then trains both alike (Adam included: the gradients are the same)
    for m in (reference, online):
        _train(m, torch.optim.Adam(m.parameters(), lr=1e-2), 5, seed=3)
    assert relative_error(_outputs(reference), _outputs(online)) <= 1e-9


# --------------------------------------------------------------------------------------------
# expand
# --------------------------------------------------------------------------------------------


def _expand_round_trip(model: nn.Module, block: str, x: Tensor, convs: int) -> None:
    model = randomize_batch_norms(model.double().eval(), 0)
    before = copy.deepcopy(model.state_dict())
    expanded = fxfuse.expand(model, block)
    with torch.no_grad():
        assert relative_error(model(x), expanded.eval()(x)) <= 1e-9
    assert count_ops(expanded, x)["conv"] > count_ops(model, x)["conv"]
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.02, momentum=0.9)
    expanded.train()
    for _ in range(3):
        optimizer.zero_grad()
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        expanded(noise).square().mean().backward()
        optimizer.step()
    expanded.eval()
    fused = fxfuse.optimize(expanded)
    with torch.no_grad():
        assert relative_error(expanded(x), fused(x)) <= 1e-9
        assert relative_error(model(x), expanded(x)) > 1e-3  # trained
    assert count_ops(fused, x)["conv"] == convs
    for name, value in model.state_dict().items():  # the caller's model untouched
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("block", ["acb", "repvgg"])
def test_expand_resnet18_round_trip(block: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 33, 32, dtype=torch.float64)
    _expand_round_trip(model, block, x, convs=20)
    fused = fxfuse.optimize(fxfuse.expand(model.double().eval(), block).eval())
    shapes = [tuple(m.weight.shape) for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(shapes) == sorted(
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)
    )


@pytest.mark.parametrize("block", ["acb", "repvgg", "mobileone", "dbb"])
def test_expand_zoo(block: str) -> None:
    model = zoo.repvgg_net(width=8)
    x = torch.randn(2, 3, 15, 14, dtype=torch.float64)
    convs = count_ops(fxfuse.optimize(model.double().eval()), x)["conv"]
    _expand_round_trip(model, block, x, convs=convs)


def test_expand_keeps_grouped_strided_and_dilated_convs_exact() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 5, stride=2, padding=2, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),
        nn.Conv2d(8, 8, 3, padding=0),  # "valid": no branch fits without negative padding
    )
    x = torch.randn(1, 4, 13, 12, dtype=torch.float64)
    for block in ("acb", "repvgg", "mobileone", "dbb"):
        _expand_round_trip(model, block, x, convs=3)


def test_expand_unknown_block() -> None:
    with pytest.raises(ValueError, match="unknown block 'inception'"):
        fxfuse.expand(nn.Conv2d(3, 3, 3), "inception")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv3_small_050"])
def test_expand_timm_round_trip(name: str) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    convs = count_ops(model.double(), x)["conv"]
    _expand_round_trip(model, "acb", x, convs=convs)
