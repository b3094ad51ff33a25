"""fxfuse.optimize as a user meets it: never mutates, owns its weights, explains itself."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from fxfuse.passes import default_rules
from torch import Tensor, nn
from torch.fx import Node

import fxfuse
from fxfuse import CaptureError, ConvergenceError, Match, RewriteContext, Rule, TrainingModeError
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from fxfuse.zoo import RepVGGBlock, repvgg_net
from tests.helpers import fuse_and_check


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def test_caller_model_is_never_modified() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = repvgg_net()
            self.alias = self.net[1]  # one module reachable under two names

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    model = randomize_batch_norms(Aliased().eval())
    model.net[2].dense[1].train()  # a submodule in another mode must keep it
    state = _snapshot(model)
    modules = dict(model.named_modules())
    modes = {name: m.training for name, m in modules.items()}
    params = {name: p for name, p in model.named_parameters()}
    fused = fxfuse.optimize(model)
    after = model.state_dict(keep_vars=True)
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(value, after[key]), key
    assert dict(model.named_modules()) == modules
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p is params[n] for n, p in model.named_parameters())
    assert fused.training is False


def test_fused_model_owns_every_tensor() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    fused = fxfuse.optimize(model)
    theirs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    ours = {t.untyped_storage().data_ptr() for t in fused.state_dict().values()}
    assert not theirs & ours
    x = torch.randn(1, 3, 16, 16)
    expected = fused(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(fused(x), expected)


def test_weight_tying_is_preserved_in_unfused_layers() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.relu(self.a(x)))

    fused = fxfuse.optimize(Tied().eval())
    assert fused.a.weight is fused.b.weight


def test_training_mode_is_a_clear_error() -> None:
    with pytest.raises(TrainingModeError, match=r"model\.eval\(\)"):
        fxfuse.optimize(RepVGGBlock(4, 4))


def test_training_mode_names_what_in_the_model_behaves_differently() -> None:
    with pytest.raises(TrainingModeError) as info:
        fxfuse.optimize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.1)))
    message = str(info.value)
    assert "BatchNorm2d ('1') uses batch statistics" in message
    assert "Dropout ('2') is random" in message and "\n" not in message
    with pytest.raises(TrainingModeError) as info:
        fxfuse.optimize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)))
    message = str(info.value)
    assert "batch" not in message.lower() and "dropout" not in message.lower()
    assert "Sequential is in training mode" in message and "model.eval()" in message


def conv_bn() -> nn.Module:
    return randomize_batch_norms(
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    )


def test_options_may_be_a_dict_of_fusion_options_fields() -> None:
    model = RepVGGBlock(4, 4).eval()
    fused = fxfuse.optimize(model, options={"max_flops_ratio": 1.0})
    assert fused.fxfuse_report.counts["merge-branches"] == 1
    with pytest.raises(ValueError, match=r"options has no 'max_flops'.*max_flops_ratio"):
        fxfuse.optimize(model, options={"max_flops": 2.0})
    with pytest.raises(TypeError, match=r"options= takes a FusionOptions or a dict"):
        fxfuse.optimize(model, options=[("max_flops_ratio", 2.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "error", "named"),
    [
        ({"max_flops_ratio": "x"}, TypeError, "max_flops_ratio must be a number"),
        ({"max_flops_ratio": -1}, ValueError, "max_flops_ratio must be > 0"),
        ({"max_rounds": 0}, ValueError, "max_rounds must be ≥ 1"),
        ({"max_rounds": 2.0}, TypeError, "max_rounds must be an int"),
        ({"validate_rewrites": "yes"}, TypeError, "validate_rewrites must be a bool"),
    ],
)
def test_fusion_options_refuse_bad_values_when_built(
    fields: dict[str, object], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        fxfuse.FusionOptions(**fields)  # type: ignore[arg-type]


def test_rules_may_name_default_rules() -> None:
    model = randomize_batch_norms(RepVGGBlock(4, 4).eval())
    x = torch.randn(2, 4, 7, 6)
    for rules in ("fold-bn", ["fold-bn"]):
        fused = fxfuse.optimize(model, rules=rules)
        assert dict(fused.fxfuse_report.counts) == {"fold-bn": 2}
        assert relative_error(model(x), fused(x)) < 1e-5
    with pytest.raises(ValueError, match=r"no default rule named 'fold_bn'; .*fold-bn"):
        fxfuse.optimize(model, rules=["fold_bn"])
    with pytest.raises(TypeError, match=r"rules= takes a RuleSet, a list of Rule objects"):
        fxfuse.optimize(model, rules=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rules= takes"):
        fxfuse.optimize(model, rules=[default_rules().rules[0], "fold-bn"])  # type: ignore[list-item]


def test_example_inputs_the_model_rejects_are_one_line_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError) as info:
        fxfuse.optimize(conv_bn(), (torch.randn(2, 3, 5, 5),))
    message = str(info.value)
    assert message.startswith("Sequential rejects example_inputs (2x3x5x5): RuntimeError: ")
    assert "to have 4 channels" in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err


def test_scripted_compiled_and_lazy_modules_are_one_line_errors() -> None:
    model = conv_bn()
    with pytest.raises(CaptureError, match=r"TorchScript module") as info:
        fxfuse.optimize(torch.jit.script(model))
    assert "pass the nn.Module" in info.value.hint
    with pytest.raises(CaptureError, match=r"torch\.compile'd module") as info:
        fxfuse.optimize(torch.compile(model))
    assert 'backend="fxfuse"' in info.value.hint and "example inputs" not in info.value.hint
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match=r"LazyConv2d \('0'\) is a lazy module .* forward"):
        fxfuse.optimize(lazy)


def test_not_a_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fxfuse.optimize(lambda x: x)  # type: ignore[arg-type]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.bn(self.conv(x)))


def test_an_untraceable_submodule_is_kept_as_python_and_the_rest_fuses() -> None:
    model = randomize_batch_norms(Outer().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(1, 3, 8, 8)
    assert relative_error(model(x), fused(x)) < 1e-6
    assert count_ops(fused, x)["batch_norm"] == 0
    report = fused.fxfuse_report
    (kept,) = [p for p in report.parts if p.kind == "python"]
    assert kept.path == "inner" and kept.module == "DataDependent"
    assert "control flow" in kept.reason and "test_api.py" in kept.where
    assert "if x.sum() > 0" in kept.where and "DataDependent (inner)" in str(report)
    assert isinstance(fused.inner, DataDependent) and fused.inner is not model.inner


def test_what_nothing_can_capture_is_one_line_and_a_hint() -> None:
    class Dynamic(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CaptureError) as info:
        fxfuse.optimize(Dynamic().eval())
    message, hint = str(info.value).splitlines()
    assert "cannot capture Dynamic" in message and "control flow" in message
    assert "test_api.py" in message and "x.sum() > 0" in message
    assert hint == "  hint: " + info.value.hint and "example inputs" in hint
    assert "leaf_modules" not in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_leaf_modules_fuse_around_what_cannot_be_traced() -> None:
    model = randomize_batch_norms(Outer().eval())
    fused = fxfuse.optimize(model, leaf_modules=[DataDependent])
    x = torch.randn(1, 3, 8, 8)
    assert relative_error(model(x), fused(x)) < 1e-6
    assert count_ops(fused, x)["batch_norm"] == 0


def test_quantized_modules_are_left_alone_and_reported() -> None:
    qconv = torch.ao.nn.quantized.Conv2d(3, 3, 1)

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = qconv
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
            return self.bn(self.conv(x)), self.q(qx)

    fused = fxfuse.optimize(Mixed().eval())
    report = fused.fxfuse_report
    assert any("quantized" in note and "q" in note for note in report.notes)
    assert report.counts["fold-bn"] == 1


def test_report_reads_well_and_serializes() -> None:
    fused, _, _ = fuse_and_check(repvgg_net(), torch.randn(1, 3, 16, 16), convs=5)
    report = fused.fxfuse_report
    text = str(report)
    assert "convs" in text and "fold-bn" in text and "merge-branches" in text
    assert report.before.convs == 10 and report.after.convs == 5
    assert report.before.batch_norms == 13 and report.after.batch_norms == 0
    assert report.after.parameters < report.before.parameters
    data = report.to_dict()
    assert data["counts"]["fold-bn"] == report.counts["fold-bn"]
    assert {"capture", "rules", "emit"} <= set(report.timings)


def test_fused_modules_are_named_after_their_sources() -> None:
    fused, _, _ = fuse_and_check(repvgg_net(), torch.randn(1, 3, 16, 16), convs=5)
    names = [n for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == [f"{i}.reparam_conv" for i in range(5)]


def test_logging_not_print(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="fxfuse"):
        fxfuse.optimize(randomize_batch_norms(repvgg_net().eval()))
    assert capsys.readouterr().out == ""
    assert any("fold-bn" in r.getMessage() for r in caplog.records)


# -- user rules -----------------------------------------------------------------------------------


@dataclass
class ReluOfRelu(Match):
    inner: Node


class DropDoubleRelu(Rule[ReluOfRelu]):
    """relu(relu(x)) -> relu(x): a rule a user can write in a few lines."""

    name = "drop-double-relu"
    formula = "relu(relu(x)) -> relu(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[ReluOfRelu]:
        if node.op == "call_function" and node.target is torch.relu:
            inner = node.args[0]
            if (
                isinstance(inner, Node)
                and inner.op == "call_function"
                and (inner.target is torch.relu)
            ):
                yield ReluOfRelu(node, inner=inner)

    def rewrite(self, match: ReluOfRelu, ctx: RewriteContext) -> Node:
        return match.inner


class DoubleRelu(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.relu(torch.relu(x)))


def test_user_rules_run_alongside_the_defaults() -> None:
    rules = default_rules().with_rules(DropDoubleRelu())
    fused = fxfuse.optimize(DoubleRelu().eval(), rules=rules)
    assert fused.fxfuse_report.counts["drop-double-relu"] == 2
    assert count_ops(fused, torch.randn(3))["relu"] == 1


class PingPong(Rule[Match]):
    """A broken rule: rewrites relu into relu forever."""

    name = "ping-pong"
    formula = "relu(x) -> relu(x)"

    def matches(self, node: Node, ctx: RewriteContext) -> Iterator[Match]:
        if node.op == "call_function" and node.target is torch.relu:
            yield Match(node)

    def rewrite(self, match: Match, ctx: RewriteContext) -> Node:
        return ctx.call(torch.relu, match.root.args[0])


def test_a_rule_set_that_never_settles_raises() -> None:
    with pytest.raises(ConvergenceError, match="ping-pong"):
        fxfuse.optimize(DoubleRelu().eval(), rules=[PingPong()])


def test_optimizing_a_deep_copy_gives_the_same_weights() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    a = fxfuse.optimize(model)
    b = fxfuse.optimize(copy.deepcopy(model))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_example_inputs_record_shapes_and_the_result_still_builds() -> None:
    # regression: the GraphModule built to record shapes stayed the graph's owner, and emission
    # then failed to add the fused convs (AttributeError: Module has no attribute ...)
    x = torch.randn(1, 3, 16, 16)
    fused, _, _ = fuse_and_check(repvgg_net(), x, convs=5, example_inputs=(x,))
    assert fused.graph.owning_module is fused


def test_recording_shapes_never_modifies_the_caller_model() -> None:
    # regression: ShapeProp ran the caller's modules, and a batch norm left in training mode
    # updated its running statistics
    model = randomize_batch_norms(repvgg_net().eval())
    model[2].dense[1].train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxfuse.optimize(model, (torch.randn(2, 3, 16, 16),))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_layer_left_in_training_mode_stays_in_training_mode() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    model[2].dense[1].train()  # fold-bn declines it; the result must not quietly switch it
    fused = fxfuse.optimize(model)
    x = torch.randn(2, 3, 16, 16)
    assert any(m.training for m in fused.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        assert relative_error(model(x), fused(x)) < 1e-5
