"""Deploy checkpoints: fused weights as a state_dict for someone else's deploy-time class.

The RepVGG repository's layout (examples/repvgg.py), timm's reparameterized models, deploy
classes that keep batch norms, and the ways a pairing fails; ``fxfuse convert`` as a user
runs it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.cli import main
from fxfuse.deploy import DeployMatchError, deploy_state_dict, read_checkpoint
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import RepVGGBlock, conv_bn
from tests.helpers import ROOT, fxfuse_cli

REPVGG = ROOT / "examples" / "repvgg.py"
sys.path.insert(0, str(ROOT))
from examples.repvgg import create_RepVGG_A0  # noqa: E402

sys.path.remove(str(ROOT))


def assert_loads_and_matches(
    train: nn.Module, deploy: nn.Module, state: dict[str, Tensor], x: Tensor, tolerance: float
) -> None:
    """``state`` loads strictly into ``deploy``, which then computes what ``train`` does."""
    assert set(state) == set(deploy.state_dict())
    deploy.load_state_dict(state, strict=True)
    deploy.eval()
    with torch.no_grad():
        error = relative_error(train(x), deploy(x))
    assert error <= tolerance, error


# -- the RepVGG repository's layout ------------------------------------------------------------


def test_repvgg_a0_training_weights_load_into_the_repository_deploy_class() -> None:
    train = randomize_batch_norms(create_RepVGG_A0(num_classes=10).eval()).double()
    deploy = create_RepVGG_A0(deploy=True, num_classes=10).double()
    untouched = {k: v.clone() for k, v in deploy.state_dict().items()}
    example = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    state = deploy_state_dict(fxfuse.optimize(train), deploy, (example,))
    # neither model was changed; the deploy one is still fresh from its constructor
    assert all(torch.equal(v, deploy.state_dict()[k]) for k, v in untouched.items())
    assert deploy.training and not train.training
    assert "stage3.13.rbr_reparam.bias" in state and "linear.weight" in state
    x = torch.randn(2, 3, 37, 30, dtype=torch.float64)  # another batch, odd and even sizes
    assert_loads_and_matches(train, deploy, state, x, 1e-10)
    after = count_ops(deploy, x)
    assert (after["conv"], after["batch_norm"]) == (22, 0)  # one conv per block, as deployed


# -- deploy classes that differ from fxfuse's result -------------------------------------------


class KeptBatchNorms(nn.Module):
    """A deploy class that keeps a batch norm after each merged conv (bias or not)."""

    def __init__(self, conv_bias: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=conv_bias),
                    nn.BatchNorm2d(cout, eps=1e-3),
                    nn.ReLU(),
                )
                for cin, cout, stride in ((3, 8, 2), (8, 8, 1))
            )
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


class TrainingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


@pytest.mark.parametrize("conv_bias", [False, True])
def test_a_deploy_class_that_keeps_batch_norms_gets_them_as_identities(conv_bias: bool) -> None:
    train = randomize_batch_norms(TrainingNet().eval()).double()
    deploy = KeptBatchNorms(conv_bias).double()
    x = torch.randn(2, 3, 15, 16, dtype=torch.float64)
    state = deploy_state_dict(train, deploy, (x,))  # an unfused model is fused first
    assert_loads_and_matches(train, deploy, state, torch.randn(1, 3, 20, 9).double(), 1e-10)
    bn = deploy.blocks[0][1]
    assert torch.equal(bn.running_mean, torch.zeros(8))
    if conv_bias:  # the bias stays in the conv and the batch norm adds nothing
        assert torch.equal(bn.bias, torch.zeros(8))
    else:  # the fused bias moved into the batch norm's shift
        assert bool(bn.bias.ne(0).all())
    assert count_ops(deploy, x)["batch_norm"] == 2


@pytest.mark.parametrize("conv_bias", [False, True])
def test_a_kept_batch_norm_that_is_the_last_layer_gets_it_as_an_identity(conv_bias: bool) -> None:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(5),
        )

    train = randomize_batch_norms(make().eval()).double()
    deploy = make().double().eval()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    state = deploy_state_dict(fxfuse.optimize(train), deploy, (x,))
    assert_loads_and_matches(train, deploy, state, torch.randn(1, 3, 9, 6).double(), 1e-10)
    assert torch.equal(deploy[4].running_mean, torch.zeros(5))


class BatchNormBeforeConv(nn.Module):
    """conv → ReLU → BN → padded conv: the middle batch norm reads a ReLU and feeds a conv
    that reads padding, so fxfuse keeps it; a deploy class with another ``eps`` pairs."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, eps=eps)
        self.second = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.bn(torch.relu(self.first(x))))


def test_batch_norms_pair_with_batch_norms_across_eps() -> None:
    train = randomize_batch_norms(BatchNormBeforeConv(1e-5).eval()).double()
    fused = fxfuse.optimize(train)
    assert count_ops(fused, torch.randn(1, 3, 8, 8).double())["batch_norm"] == 1
    deploy = BatchNormBeforeConv(1e-1).double()
    state = deploy_state_dict(fused, deploy, (torch.randn(1, 3, 8, 8).double(),))
    assert_loads_and_matches(train, deploy, state, torch.randn(2, 3, 9, 12).double(), 1e-10)


# -- what cannot pair is named -----------------------------------------------------------------


class Plain(nn.Module):
    """A deploy class: one conv per block, then a linear head (none for ``head=0``)."""

    def __init__(self, strides: tuple[int, ...], head: int = 4, extra: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else 8, 8, 3, s, 1) for i, s in enumerate(strides)
        )
        self.head = nn.Linear(8, head) if head else None
        self.unused = nn.Linear(8, 2) if extra else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        x = x.mean((2, 3))
        return x if self.head is None else self.head(x)


class PlainTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            RepVGGBlock(cin, 8, stride=s) for cin, s in ((3, 2), (8, 1), (8, 2))
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def fused_plain() -> nn.Module:
    return fxfuse.optimize(randomize_batch_norms(PlainTraining().eval()))


def test_the_first_layer_that_does_not_pair_is_named_with_the_difference(
    fused_plain: nn.Module,
) -> None:
    with pytest.raises(DeployMatchError) as info:
        deploy_state_dict(fused_plain, Plain((2, 1, 1)))
    message = str(info.value)
    assert "fused layer 3 (blocks.2.reparam_conv: 3x3 conv s2 8→8)" in message
    assert "deploy layer 3 (blocks.2: 3x3 conv 8→8)" in message
    assert message.endswith("stride (2, 2) vs (1, 1)")
    assert len(message.splitlines()) == 1 and "execution order" in info.value.hint
    with pytest.raises(DeployMatchError, match=r"output features 4 vs 5"):
        deploy_state_dict(fused_plain, Plain((2, 1, 2), head=5))
    with pytest.raises(DeployMatchError, match=r"a linear 8→4 cannot fill a 3x3 conv 8→8$"):
        deploy_state_dict(fused_plain, Plain((2, 1, 2, 1)))
    with pytest.raises(DeployMatchError, match=r"a 3x3 conv s2 8→8 cannot fill a linear 8→4$"):
        deploy_state_dict(fused_plain, Plain((2, 1)))
    with pytest.raises(DeployMatchError, match=r"no layer for fused layer 4 \(head: linear"):
        deploy_state_dict(fused_plain, Plain((2, 1, 2), head=0))


def test_a_parameter_the_deploy_forward_never_reads_keeps_its_value_and_is_named(
    fused_plain: nn.Module,
) -> None:
    deploy = Plain((2, 1, 2), extra=True)
    with pytest.warns(UserWarning, match=r"does not read unused.weight, unused.bias"):
        state = deploy_state_dict(fused_plain, deploy, (torch.randn(1, 3, 16, 16),))
    assert torch.equal(state["unused.weight"], deploy.unused.weight)
    deploy.load_state_dict(state, strict=True)


class CrossedBranches(nn.Module):
    """Two same-shaped branches: ``crossed`` runs the right one first."""

    def __init__(self, crossed: bool) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.crossed = crossed

    def forward(self, x: Tensor) -> Tensor:
        if self.crossed:
            right = self.right(x)
            left = self.left(x)
        else:
            left, right = self.left(x), self.right(x)
        return torch.cat([left, right], 1)


def test_layers_that_pair_crosswise_are_caught_by_the_check() -> None:
    train = nn.Sequential(conv_bn(3, 3, 1), CrossedBranches(crossed=False)).eval()
    deploy = nn.Sequential(nn.Conv2d(3, 3, 1), CrossedBranches(crossed=True))
    with pytest.raises(DeployMatchError, match="computes something else"):
        deploy_state_dict(randomize_batch_norms(train), deploy)  # the input is guessed
    uncrossed = nn.Sequential(nn.Conv2d(3, 3, 1), CrossedBranches(crossed=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked on a guessed input: nothing to warn about
        state = deploy_state_dict(randomize_batch_norms(train), uncrossed)
    assert_loads_and_matches(train, uncrossed, state, torch.randn(2, 3, 7, 6), 1e-5)


def test_training_mode_is_refused() -> None:
    with pytest.raises(fxfuse.TrainingModeError):
        deploy_state_dict(PlainTraining(), Plain((2, 1, 2)))


# -- timm's own reparameterized models ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "convs"), [("repvgg_a0", 22), ("mobileone_s0", 43)])
def test_fused_weights_load_into_timms_reparameterized_model(name: str, convs: int) -> None:
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    train = randomize_batch_norms(timm.create_model(name, num_classes=10).eval()).double()
    fused = fxfuse.optimize(train)
    deploy = reparameterize_model(timm.create_model(name, num_classes=10).eval()).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    state = deploy_state_dict(fused, deploy, (x,))
    deploy.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 35, 32, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused(x), deploy(x)) <= 1e-9
    assert count_ops(deploy, x)["conv"] == convs


# -- checkpoints and `fxfuse convert` ----------------------------------------------------------


def test_read_checkpoint_finds_the_state_dict(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in plain.items()}}, path)
    found = read_checkpoint(str(path))
    assert found.keys() == plain.keys() and all(torch.equal(found[k], plain[k]) for k in plain)
    torch.save({"epoch": 3, "ema": plain, "optimizer": {"lr": 0.1}}, path)
    assert read_checkpoint(str(path)).keys() == plain.keys()  # the only state_dict inside
    torch.save({"a": plain, "b": plain}, path)
    with pytest.raises(DeployMatchError, match="holds no state_dict") as info:
        read_checkpoint(str(path))
    assert "its keys are a, b; choose one with --key" in info.value.hint
    assert read_checkpoint(str(path), key="b").keys() == plain.keys()
    torch.save(model, path)  # a pickled model: loading it would run code from the file
    with pytest.raises(DeployMatchError, match="cannot read") as info:
        read_checkpoint(str(path))
    assert "torch.save(model.state_dict(), path)" in info.value.hint


@pytest.fixture
def repvgg_checkpoint(tmp_path: Path) -> Path:
    """A training checkpoint as a DataParallel run saves it: nested, ``module.`` keys."""
    torch.manual_seed(1)
    train = randomize_batch_norms(create_RepVGG_A0(num_classes=10))
    path = tmp_path / "train.pth"
    state = {f"module.{k}": v for k, v in train.state_dict().items()}
    torch.save({"epoch": 120, "state_dict": state}, path)
    return path


def test_convert_writes_a_checkpoint_the_deploy_class_loads(repvgg_checkpoint: Path) -> None:
    result = fxfuse_cli(
        "convert",
        str(repvgg_checkpoint),
        "--model",
        f"{REPVGG}:create_RepVGG_A0(num_classes=10)",
        "--into",
        f"{REPVGG}:create_RepVGG_A0(deploy=True, num_classes=10)",
        "--input-shape",
        "1,3,32,32",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "convolutions 44 → 22, batch norms 61 → 0" in out and ": ok" in out
    saved = repvgg_checkpoint.with_name("train_deploy.pt")
    assert f"saved 46 entries to {saved}" in out
    train = create_RepVGG_A0(num_classes=10)
    train.load_state_dict(read_checkpoint(str(repvgg_checkpoint)))
    deploy = create_RepVGG_A0(deploy=True, num_classes=10)
    state = torch.load(saved, weights_only=True)
    assert_loads_and_matches(train.eval(), deploy, state, torch.randn(2, 3, 40, 36), 1e-5)


def test_convert_errors_are_one_line_and_a_hint(
    repvgg_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["convert", str(repvgg_checkpoint), "--input-shape", "1,3,32,32"]
    a0 = f"{REPVGG}:create_RepVGG_A0(num_classes=10)"
    assert main([*args, "--model", "builtin:repvgg_net", "--into", a0]) == 2
    err = capsys.readouterr().err
    assert "does not fit builtin:repvgg_net" in err and "missing keys" in err
    assert "hint: --model must build the training-time network" in err
    narrower = f"{REPVGG}:RepVGG([2, 4, 14, 1], 10, [0.5, 0.75, 0.75, 2.5], deploy=True)"
    assert main([*args, "--model", a0, "--into", narrower]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("hint: ")
    assert "deploy layer 1 (stage0.rbr_reparam: 3x3 conv s2 3→32)" in err[0]
    assert err[0].endswith("output channels 48 vs 32")
