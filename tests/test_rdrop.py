"""fxfuse.rdrop: two dropout samples from one pass over the doubled batch; fxfuse.rdrop_loss.

Exactness is checked with every dropout's p = 0 (then both halves are the model's output),
independence with dropout on (drop rates, and the correlation of the halves' masks), the one
pass by counting what runs, and the refusals by models that mix samples in every way the
check knows, beside near misses that do not.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import fxfuse
from fxfuse.batch_audit import BatchError, audit_batch
from fxfuse.errors import CaptureError
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.testing.strategies import models

# ConvNet's second batch norm follows a dropout: the twin says so, which one test checks
pytestmark = pytest.mark.filterwarnings("ignore:fxfuse.rdrop. training-mode batch norm after")

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Batch norms in training mode, dropout as modules and as functions."""

    def __init__(self, p: float = 0.0, channels: int = 6, classes: int = 5):
        super().__init__()
        self.p = p
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.drop2d = nn.Dropout2d(p)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop2d(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.dropout(x, self.p, self.training)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(self.drop(x))


class Attention(nn.Module):
    """A transformer classifier (batch first): layer norm, attention with dropout, MLP."""

    def __init__(self, p: float = 0.0, dim: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.layer = nn.TransformerEncoderLayer(dim, heads, 16, dropout=p, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.p, self.heads = p, heads
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = self.layer(self.embed(x) + self.pos[:, :n])
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(b, n, -1)
        return self.head((x + y).mean(1))


def train64(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, training mode, random batch-norm statistics and affine parameters."""
    torch.manual_seed(seed)
    return randomize_batch_norms(model.double().train(), seed)


def inputs(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Exact with dropout off
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (ConvNet, (1, 3, 5, 6)),
        (ConvNet, (2, 3, 6, 6)),
        (ConvNet, (3, 3, 7, 5)),
        (Attention, (1, 5, 4)),
        (Attention, (4, 3, 4)),
    ],
)
def test_with_dropout_off_both_halves_are_the_model(make: Any, shape: tuple[int, ...]) -> None:
    model = train64(make(p=0.0))
    reference = copy.deepcopy(model)
    twin = fxfuse.rdrop(model)
    for call in range(3):  # batch norm statistics move on: outputs stay equal
        x = inputs(shape, seed=call)
        expected = reference(x)
        out1, out2 = twin(x)
        assert out1.shape == out2.shape == expected.shape
        assert relative_error(expected, out1) <= 1e-12
        assert relative_error(expected, out2) <= 1e-12


def test_batch_norm_running_variance_uses_the_doubled_count() -> None:
    """Same running mean; the running variance is updated with var·2n/(2n−1) on the doubled
    batch where the model uses var·n/(n−1), n = values per channel."""
    model = train64(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3)))
    reference = copy.deepcopy(model)
    bn, ref_bn = model[1], reference[1]
    start = bn.running_var.clone()
    x = inputs((2, 3, 6, 5))
    reference(x)
    fxfuse.rdrop(model)(x)
    n = 2 * 4 * 3  # batch × H × W after the 3×3 conv
    m = 0.3
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, rtol=1e-12, atol=0)
    assert bn.num_batches_tracked == ref_bn.num_batches_tracked == 1
    twin_update = (bn.running_var - (1 - m) * start) / m  # the variance each one used
    model_update = (ref_bn.running_var - (1 - m) * start) / m
    biased = twin_update * (2 * n - 1) / (2 * n)
    assert torch.allclose(biased, model_update * (n - 1) / n, rtol=1e-12, atol=0)
    assert not torch.allclose(bn.running_var, ref_bn.running_var, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Independent dropout samples
# --------------------------------------------------------------------------------------------


class Dropouts(nn.Module):
    """One dropout, in one of the forms fxfuse sees."""

    def __init__(self, form: str, p: float):
        super().__init__()
        self.form, self.p = form, p
        modules = {
            "nn.Dropout": nn.Dropout,
            "nn.Dropout1d": nn.Dropout1d,
            "nn.Dropout2d": nn.Dropout2d,
            "nn.Dropout3d": nn.Dropout3d,
            "nn.AlphaDropout": nn.AlphaDropout,
            "nn.FeatureAlphaDropout": nn.FeatureAlphaDropout,
        }
        self.module = modules[form](p) if form in modules else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        form, p, t = self.form, self.p, self.training
        if form == "F.dropout":
            return F.dropout(x, p, t)
        if form == "F.dropout(inplace)":
            return F.dropout(x * 1.0, p, t, inplace=True)
        if form == "F.dropout1d":
            return F.dropout1d(x.flatten(2), p, t).view_as(x)
        if form == "F.dropout2d":
            return F.dropout2d(x, p, t)
        if form == "F.dropout3d":
            return F.dropout3d(x.unsqueeze(2), p, t).squeeze(2)
        if form == "F.alpha_dropout":
            return F.alpha_dropout(x, p, t)
        if form == "F.feature_alpha_dropout":
            return F.feature_alpha_dropout(x, p, t)
        if form == "torch.dropout":
            return torch.dropout(x, p, t)
        if form == "drop path":  # timm's DropPath: one draw per sample
            keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
            return x * keep / (1 - p)
        if form == "nn.Dropout1d":
            return self.module(x.flatten(2)).view_as(x)
        if form == "nn.Dropout3d":
            return self.module(x.unsqueeze(2)).squeeze(2)
        return self.module(x)


# form -> what one draw covers: an element, a (sample, channel) pair or a sample
FORMS = {
    "nn.Dropout": "element",
    "F.dropout": "element",
    "F.dropout(inplace)": "element",
    "torch.dropout": "element",
    "nn.AlphaDropout": "element",
    "F.alpha_dropout": "element",
    "nn.Dropout1d": "channel",
    "nn.Dropout2d": "channel",
    "nn.Dropout3d": "channel",
    "F.dropout1d": "channel",
    "F.dropout2d": "channel",
    "F.dropout3d": "channel",
    "nn.FeatureAlphaDropout": "channel",
    "F.feature_alpha_dropout": "channel",
    "drop path": "sample",
}


def _kept(out: Tensor, per: str) -> Tensor:
    """Which draws kept their input (x = ones: kept values are the larger of two values)."""
    kept = out > (out.max() + out.min()) / 2
    if per == "channel":
        return kept.flatten(2).all(2)
    if per == "sample":
        return kept.flatten(1).all(1)
    return kept


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_dropout_draws_independent_masks_for_the_two_halves(form: str) -> None:
    p, per = 0.3, FORMS[form]
    batch = {"element": 32, "channel": 64, "sample": 2048}[per]
    twin = fxfuse.rdrop(Dropouts(form, p).double().train())
    x = torch.ones(batch, 16, 3, 3, dtype=torch.float64)
    out1, out2 = twin(x)
    assert not torch.equal(out1, out2)
    kept1, kept2 = _kept(out1, per).double(), _kept(out2, per).double()
    n = kept1.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    for kept in (kept1, kept2):
        assert abs((1 - kept.mean().item()) - p) < 5 * sigma, (form, kept.mean())
    a, b = kept1.flatten() - kept1.mean(), kept2.flatten() - kept2.mean()
    correlation = (a @ b / (a.norm() * b.norm())).item()
    assert abs(correlation) < 5 / math.sqrt(n), (form, correlation)
    again1, _ = twin(x)
    assert not torch.equal(_kept(again1, per), _kept(out1, per))  # drawn on every call


# --------------------------------------------------------------------------------------------
# One pass, shared parameters, the same step as a hand-written doubled batch
# --------------------------------------------------------------------------------------------


def test_the_model_runs_once_per_call_on_the_doubled_batch() -> None:
    model = train64(ConvNet(p=0.2))
    reference = copy.deepcopy(model)
    x = inputs((3, 3, 6, 6))
    seen: list[int] = []
    model.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    twin = fxfuse.rdrop(model)  # (conv1 is kept whole by tracing: its hook runs)
    twin_ops, model_ops = count_ops(twin, x), count_ops(reference, x)
    assert seen == [6]
    for op in ("conv", "native_batch_norm", "addmm", "bernoulli_"):
        assert twin_ops[op] == model_ops[op] > 0, op
    twin(x)
    assert seen == [6, 6]


def test_a_twin_step_is_the_hand_written_doubled_batch_step() -> None:
    model = train64(ConvNet(p=0.3))
    by_hand = copy.deepcopy(model)
    twin = fxfuse.rdrop(model)
    twin_optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    hand_optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.5, momentum=0.9)
    start = copy.deepcopy(model.state_dict())
    for step in range(2):
        x, y = inputs((4, 3, 6, 6), seed=step), torch.tensor([0, 3, 1, 4])
        torch.manual_seed(100 + step)
        out1, out2 = twin(x)
        fxfuse.rdrop_loss(out1, out2, y, alpha=2.0).backward()
        twin_optimizer.step()
        twin_optimizer.zero_grad()
        torch.manual_seed(100 + step)
        hand1, hand2 = by_hand(torch.cat([x, x])).chunk(2)
        fxfuse.rdrop_loss(hand1, hand2, y, alpha=2.0).backward()
        hand_optimizer.step()
        hand_optimizer.zero_grad()
        assert not torch.equal(out1, out2)
    after, expected = model.state_dict(), by_hand.state_dict()
    assert any(not torch.equal(after[k], start[k]) for k in after)
    for name in after:
        assert torch.allclose(after[name], expected[name], rtol=1e-12, atol=1e-14), name


def test_the_model_is_not_changed_and_the_twin_shares_it() -> None:
    model = ConvNet(p=0.1)
    state = copy.deepcopy(model.state_dict())
    attributes = set(vars(model))
    twin = fxfuse.rdrop(model, (torch.randn(2, 3, 5, 5),))
    assert set(vars(model)) == attributes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert twin.model is model
    assert [id(p) for p in twin.parameters()] == [id(p) for p in model.parameters()]
    twin.eval()
    assert not model.training and not model.bn1.training
    twin.train()
    assert model.training and model.drop.training


class Functional(nn.Module):
    """Dropout and batch norm as functions: tracing reads ``self.training`` once, and the
    batch norm's buffers are graph attributes rather than a module's."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.rand(4))
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training
        )
        return F.dropout(x, 0.5, self.training)


def test_the_twin_follows_the_models_mode() -> None:
    """``F.dropout(x, p, self.training)`` is traced with the mode of the moment: the twin
    captures the model again when its mode changes."""
    model = Functional().double().eval()
    twin = fxfuse.rdrop(model)
    x = inputs((3, 4))
    out1, out2 = twin(x)
    assert torch.equal(out1, out2)
    assert relative_error(model(x), out1) <= 1e-12
    model.train()
    out1, out2 = twin(x)
    assert not torch.equal(out1, out2)
    twin.eval()
    assert not model.training
    assert torch.equal(*twin(x))


def test_a_twin_moved_after_its_creation_reads_the_models_new_buffers() -> None:
    """``.double()`` replaces buffers by new tensors: the twin reads them through the model,
    so its batch norm updates the model's new running mean."""
    model = Functional().train()
    twin = fxfuse.rdrop(model)
    twin.double()
    x = inputs((3, 4))
    twin(x)
    assert model.running_mean.dtype == torch.float64
    assert torch.allclose(model.running_mean, 0.1 * x.mean(0), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Outputs, inputs, effects
# --------------------------------------------------------------------------------------------


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Any:
        logits = self.linear(x) * scale
        if mask is not None:
            logits = logits.masked_fill(mask, 0.0)
        return {"logits": logits, "pair": (logits.sum(1), 7), "temperature": self.temperature}


def test_outputs_are_split_leaf_by_leaf_and_shared_leaves_are_kept() -> None:
    model = Structured().double()
    twin = fxfuse.rdrop(model)
    x = inputs((3, 4))
    mask = torch.tensor([[True, False, False]] * 3)
    first, second = twin(x, mask=mask, scale=2.0)
    expected = model(x, mask=mask, scale=2.0)
    for half in (first, second):
        assert relative_error(expected["logits"], half["logits"]) <= 1e-12
        assert relative_error(expected["pair"][0], half["pair"][0]) <= 1e-12
        assert half["pair"][1] == 7
        assert half["temperature"] is model.temperature


def test_an_input_the_model_writes_in_place_is_written_as_the_model_writes_it() -> None:
    class Normalize(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            x.sub_(1.0)  # the model's effect on its caller's input
            return F.dropout(x, 0.5, self.training)

    x, y = inputs((3, 4)), inputs((3, 4))
    out1, _ = fxfuse.rdrop(Normalize())(x)
    assert torch.equal(x, y - 1.0)
    assert ((out1 == 0) | torch.isclose(out1, 2 * x)).all()


def test_checking_runs_nothing_of_the_model() -> None:
    """The check runs on fake tensors: no statistics move, no random number is drawn, no
    hook of a module kept whole fires."""
    model = train64(ConvNet(p=0.5))
    calls: list[int] = []
    model.conv1.register_forward_hook(lambda *args: calls.append(1))
    state = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    audit = fxfuse.rdrop(model).check(inputs((4, 3, 6, 6)))
    assert audit.outputs == (True,) and audit.ops > 10
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert calls == []


def test_a_batch_norm_after_a_dropout_is_named_in_a_warning() -> None:
    class DropThenNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop, self.bn = nn.Dropout(0.2), nn.BatchNorm1d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.drop(x))

    with pytest.warns(UserWarning, match=r"batch norm after a dropout \(`return self.bn"):
        fxfuse.rdrop(DropThenNorm())(torch.randn(3, 4))
    audit = fxfuse.rdrop(ConvNet(p=0.5)).check(torch.randn(2, 3, 5, 5))
    assert len(audit.batch_norms_after_random) == 1  # bn2 follows drop2d; bn1 follows no draw


def test_a_new_input_shape_is_checked_once() -> None:
    twin = fxfuse.rdrop(ConvNet())
    twin(torch.randn(2, 3, 5, 5))
    twin(torch.randn(4, 3, 5, 5))  # another batch size: the same plan
    assert len(twin._plans) == 1
    twin(torch.randn(2, 3, 7, 7))
    assert len(twin._plans) == 2
    assert "duplicate_batch" in twin.graph_module.code


# --------------------------------------------------------------------------------------------
# Refusals, and the near misses that are not
# --------------------------------------------------------------------------------------------


class Fn(nn.Module):
    """``forward(x)`` is ``fn(self, x)``, with a linear layer and buffers to use."""

    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn
        self.linear = nn.Linear(4, 4)
        self.register_buffer("queue", torch.zeros(8, 4))
        self.register_buffer("const", torch.ones(1, 4))

    def forward(self, x: Tensor) -> Any:
        return self.fn(self, x)


class Fn2(Fn):
    def forward(self, x: Tensor, y: Tensor) -> Any:  # type: ignore[override]
        return self.fn(self, x, y)


def _enqueue(m: Fn, x: Tensor) -> Tensor:
    m.queue[: x.shape[0]] = x.detach()
    return x


def _seq_first(m: Fn, x: Tensor) -> Tensor:
    return m.layer(x)


REFUSED = {
    "sum over the batch": (lambda m, x: m.linear(x).sum(0), "aten.sum"),
    "batch-norm-like statistics": (lambda m, x: x - x.mean(0, keepdim=True), "aten.mean"),
    "x.view(-1)": (lambda m, x: m.linear(x).view(-1).softmax(0), "aten._softmax"),
    "flatten the batch, then a linear map": (
        lambda m, x: x.view(-1) @ m.queue[:3].view(-1),
        "at batch size 2 failed",
    ),
    "matmul with the batch on another dim": (lambda m, x: x.T @ x, "aten.mm"),
    "gram matrix of samples": (lambda m, x: x @ x.T, "pairs samples"),
    "cat with a constant": (lambda m, x: torch.cat([x, m.const]), "aten.cat"),
    "softmax over dim 0": (lambda m, x: F.softmax(x, dim=0), "aten._softmax"),
    "cumsum over dim 0": (lambda m, x: x.cumsum(0), "aten.cumsum"),
    "flip of the batch": (lambda m, x: x.flip(0), "aten.flip"),
    "sort along the batch": (lambda m, x: x.sort(0).values, "aten.sort"),
    "first sample": (lambda m, x: x + x[0], "aten.select"),
    "first two samples": (lambda m, x: x[:2], "aten.slice"),
    "a shuffle of the batch": (lambda m, x: x[torch.rand_like(x[:, 0]).argsort()], "aten.sort"),
    "batch size as a number": (lambda m, x: x / x.shape[0], "uses the batch size"),
    "mask shared by the batch": (
        lambda m, x: x * x.new_empty(1, 4).bernoulli_(0.5),
        "without the batch",
    ),
    "dropout of a weight": (
        lambda m, x: F.linear(x, F.dropout(m.linear.weight, 0.5)),
        "without the batch",
    ),
    "writes the batch into a buffer": (_enqueue, "into 'queue'"),
    "batch size as an output": (lambda m, x: (x, x.shape[0]), "depends on the batch size"),
    "output with the batch at dim 1": (lambda m, x: x.T.contiguous(), "at dim 1"),
    "position in the batch": (lambda m, x: x + torch.arange(x.shape[0])[:, None], "position"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_models_that_mix_samples_are_refused_with_the_op_and_the_line(case: str) -> None:
    fn, expected = REFUSED[case]
    with pytest.raises(BatchError) as raised:
        fxfuse.rdrop(Fn(fn).train(), (torch.randn(3, 4),))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("fxfuse.rdrop cannot ")
    assert expected in message
    assert "test_rdrop.py:" in message, message


def test_a_sequence_first_transformer_is_refused() -> None:
    """Its dim 0 is the sequence: attention pairs the 'samples' with each other."""
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=False))
    with pytest.raises(BatchError, match="pairs samples with each other"):
        fxfuse.rdrop(model, (torch.randn(5, 2, 8),))
    batch_first = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    fxfuse.rdrop(batch_first, (torch.randn(2, 5, 8),))


def test_inputs_of_different_batch_sizes_are_refused() -> None:
    twin = fxfuse.rdrop(Fn2(lambda m, x, y: x + y.sum()))
    with pytest.raises(BatchError, match=r"differ in size along dim 0 \(input leaf 0: 3, input"):
        twin(torch.randn(3, 4), torch.randn(5, 4))


def test_random_numbers_drawn_from_no_input_are_recorded_and_refused_as_shared() -> None:
    # tracing records the draw (it used to run once, at trace time); drawn once per call for
    # the doubled batch, both copies would share it: the batch audit refuses
    twin = fxfuse.rdrop(Fn(lambda m, x: x * torch.rand(1, 4)))
    with pytest.raises(BatchError, match=r"aten\.rand draws random numbers for a 1×4 tensor"):
        twin(torch.randn(3, 4))


def test_hooks_on_a_traced_through_module_are_refused_unless_kept_whole() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(self.linear(x), 0.5, self.training)

    model = nn.Sequential(Block(), nn.ReLU())
    sizes: list[int] = []
    model[0].register_forward_hook(lambda module, args, out: sizes.append(out.shape[0]))
    with pytest.raises(CaptureError, match=r"0 \(Block\) has forward hooks.*leaf_modules=\[Bl"):
        fxfuse.rdrop(model)
    twin = fxfuse.rdrop(model, leaf_modules=[Block])
    twin(torch.randn(3, 4))
    assert sizes == [6]


def test_a_model_fx_cannot_trace_raises_a_capture_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match=r"fxfuse\.rdrop\(model, leaf_modules"):
        fxfuse.rdrop(Branchy())


ACCEPTED = {
    "group, layer and instance norm": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.LayerNorm([4, 2, 3])
    ),
    "sync batch norm, one process": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)),
    "flatten(1) and view(b, -1)": lambda: Fn(lambda m, x: x.flatten(1) + x.view(x.shape[0], -1)),
    "softmax over the classes": lambda: Fn(lambda m, x: F.log_softmax(x.flatten(1), -1)),
    "cat along the channels": lambda: Fn(lambda m, x: torch.cat([x, x.relu()], 1)),
    "each sample picks its class": lambda: Fn(
        lambda m, x: x.flatten(1)[torch.arange(x.shape[0]), x.flatten(1).argmax(1)]
    ),
    "merging the batch with time, per frame": lambda: Fn(
        lambda m, x: F.relu(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1))
    ),
    "positions along the features": lambda: Fn(lambda m, x: x + torch.arange(x.shape[-1])),
    "element-wise max of two tensors": lambda: Fn(lambda m, x: torch.max(x, x.flip(-1))),
    "a batch-first transformer layer": lambda: nn.Sequential(
        nn.Flatten(2), nn.TransformerEncoderLayer(20, 2, 8, dropout=0.0, batch_first=True)
    ),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_near_misses_are_accepted_and_exact(case: str) -> None:
    model = train64(ACCEPTED[case]())
    x = inputs((3, 3, 4, 5))
    reference = copy.deepcopy(model)
    out1, out2 = fxfuse.rdrop(model)(x)
    expected = reference(x)
    assert relative_error(expected, out1) <= 1e-12
    assert relative_error(expected, out2) <= 1e-12


def test_the_check_follows_a_merged_batch_through_reshapes() -> None:
    """``Linear`` on a 3-d input runs as one matrix product over batch × length rows."""
    model = Attention(p=0.1).train()
    audit = fxfuse.rdrop(model).check(torch.randn(2, 5, 4))
    assert audit.outputs == (True,)
    body = fxfuse.rdrop(model)._capture().body
    with pytest.raises(BatchError, match="splits the batch across dims"):
        audit_batch(_with(body, lambda x: x.reshape(2, -1)), [torch.randn(3, 4)], model_name="M")


def _with(body: Any, fn: Any) -> Any:
    return torch.fx.symbolic_trace(Fn(lambda m, x: fn(x)))


# --------------------------------------------------------------------------------------------
# Drawn models: exact with dropout off
# --------------------------------------------------------------------------------------------


@given(models(dtype=torch.float64, max_blocks=2), st.integers(2, 3))
def test_drawn_models_in_training_mode_are_exact_with_dropout_off(model: Any, batch: int) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    reference = copy.deepcopy(model)
    x = model.spec.example_input(batch, dtype=torch.float64)
    expected = reference(x)
    out1, out2 = fxfuse.rdrop(model)(x)
    assert relative_error(expected, out1) <= 1e-12
    assert relative_error(expected, out2) <= 1e-12


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def _reference_loss(
    out1: Tensor, out2: Tensor, target: Tensor, alpha: float, reduction: str, ignore: int
) -> Tensor:
    """R-Drop's loss written element by element from its formula."""
    classes = out1.shape[1]
    logits1 = out1.movedim(1, -1).reshape(-1, classes)
    logits2 = out2.movedim(1, -1).reshape(-1, classes)
    losses, counted = [], 0
    for l1, l2, y in zip(logits1, logits2, target.reshape(-1).tolist(), strict=True):
        if y == ignore:
            losses.append(torch.zeros((), dtype=out1.dtype))
            continue
        counted += 1
        logp1, logp2 = torch.log_softmax(l1, 0), torch.log_softmax(l2, 0)
        p1, p2 = logp1.exp(), logp2.exp()
        nll = 0.5 * (-logp1[y] - logp2[y])
        kl12 = sum(p1[c] * (logp1[c] - logp2[c]) for c in range(classes))
        kl21 = sum(p2[c] * (logp2[c] - logp1[c]) for c in range(classes))
        losses.append(nll + alpha * 0.5 * (kl12 + kl21))
    per = torch.stack(losses).reshape(target.shape)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / counted


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.7, 4.0])
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_rdrop_loss_is_the_formula(reduction: str, alpha: float, shape: tuple[int, ...]) -> None:
    out1, out2 = inputs(shape, 1) * 3, inputs(shape, 2) * 3
    target = torch.randint(0, shape[1], shape[:1] + shape[2:])
    target.view(-1)[1] = -100  # ignored
    loss = fxfuse.rdrop_loss(out1, out2, target, alpha, reduction)
    expected = _reference_loss(out1, out2, target, alpha, reduction, -100)
    assert loss.shape == expected.shape
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-14)
    if alpha == 0.0 and reduction == "mean":
        ce = 0.5 * (F.cross_entropy(out1, target) + F.cross_entropy(out2, target))
        assert torch.allclose(loss, ce, rtol=1e-12)


def test_rdrop_loss_is_the_cross_entropy_for_equal_samples_and_grows_with_disagreement() -> None:
    out, target = inputs((6, 4)), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(
        fxfuse.rdrop_loss(out, out, target, 5.0), F.cross_entropy(out, target), rtol=1e-14
    )
    near = fxfuse.rdrop_loss(out, out + 0.1 * inputs((6, 4), 3), target, 0.0)
    far = fxfuse.rdrop_loss(out, out + 0.1 * inputs((6, 4), 3), target, 1.0)
    assert far > near


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((4, 3), (4, 2), (4,), 1.0, "mean"), "differ in shape"),
        (((4, 3), (4, 3), (3,), 1.0, "mean"), "do not match"),
        (((4, 3), (4, 3), (4,), 1.0, "avg"), "reduction must be"),
        (((4, 3), (4, 3), (4,), -1.0, "mean"), "alpha weighs"),
    ],
)
def test_rdrop_loss_refuses_bad_arguments(args: tuple[Any, ...], message: str) -> None:
    s1, s2, st_, alpha, reduction = args
    with pytest.raises(ValueError, match=message):
        fxfuse.rdrop_loss(
            torch.randn(s1), torch.randn(s2), torch.zeros(st_, dtype=torch.long), alpha, reduction
        )


# --------------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "resnet18", "convnext_atto", "mobilenetv3_small_050"]
)
def test_timm_models_are_exact_with_dropout_off(name: str) -> None:
    timm = pytest.importorskip("timm")
    kwargs: dict[str, Any] = {"img_size": 32, "patch_size": 8} if "vit" in name else {}
    model = train64(timm.create_model(name, num_classes=7, **kwargs))
    reference = copy.deepcopy(model)
    x = inputs((2, 3, 32, 32))
    out1, out2 = fxfuse.rdrop(model)(x)
    expected = reference(x)
    # float64 rounding: training-mode batch norms on 1×1 feature maps amplify it layer by layer
    assert relative_error(expected, out1) <= 1e-10
    assert relative_error(expected, out2) <= 1e-10
    counts: Counter[str] = count_ops(fxfuse.rdrop(copy.deepcopy(reference)), x)
    assert counts["conv"] == count_ops(copy.deepcopy(reference), x)["conv"]


@pytest.mark.slow
def test_the_benchmark_runs_and_records_ratios_memory_and_load(tmp_path: Any) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks", "rdrop", "--models", "mlp", "--rounds", "2"]
    command += ["--batch", "4", "--threads", "1", "--json", str(out), "--png", str(tmp_path / "p")]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "twin / two passes" in done.stdout
    section = json.loads(out.read_text())["rdrop"]
    assert section["machine"]["load_average"] and section["machine"]["load_average_after"]
    (result,) = section["models"]
    assert result["agreement"] <= 1e-6
    for variant in ("two passes", "twin", "cat by hand"):
        assert result[variant]["median_ms"] > 0
        assert result["memory"][variant]["how"] in ("RSS high-water mark", "cuda allocator")
