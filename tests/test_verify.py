"""fxfuse.verify: it catches deliberately wrong candidates, passes right ones, and explains."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fxfuse
from fxfuse import NondeterministicError, VerificationError
from fxfuse.testing import randomize_batch_norms
from fxfuse.testing.strategies import models
from fxfuse.zoo import RepVGGBlock

# -- a reference and ways to get it wrong ----------------------------------------------------


def reference() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 6, stride=2))
    return randomize_batch_norms(net.eval())


EXAMPLE = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)),)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def nudged_weight(fused: nn.Module) -> nn.Module:
    wrong = copy.deepcopy(fused)
    with torch.no_grad():
        _first_conv(wrong).weight[0, 0, 1, 1] += 1e-3
    return wrong


def swapped_padding_mode(fused: nn.Module) -> nn.Module:
    wrong = copy.deepcopy(fused)
    _first_conv(wrong).padding_mode = "reflect"
    return wrong


class Wrapped(nn.Module):
    """The right model, made wrong by ``wrong`` on some inputs only."""

    def __init__(self, model: nn.Module, wrong: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.model, self.wrong = model, wrong

    def forward(self, x: Tensor) -> Tensor:
        return self.wrong(x, self.model(x))


def wrong_for_odd_sizes(fused: nn.Module) -> nn.Module:
    return Wrapped(fused, lambda x, y: y * (1 + 1e-3) if x.shape[-1] % 2 else y)


def wrong_for_batch_over_1(fused: nn.Module) -> nn.Module:
    # what a kernel that mixes up batch elements does: nothing at batch 1
    return Wrapped(fused, lambda x, y: y + 1e-2 * (y - y.mean(0, keepdim=True)))


class ContiguousOnly(nn.Module):
    """A kernel that reads its input's storage as if it were contiguous (a layout bug)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.as_strided(x.shape, torch.empty(x.shape).stride()))


def wrong_for_channels_last(fused: nn.Module) -> nn.Module:
    return ContiguousOnly(fused)


WRONG = {
    "weight nudged by 1e-3": nudged_weight,
    "padding mode swapped": swapped_padding_mode,
    "wrong for odd sizes": wrong_for_odd_sizes,
    "wrong for batch > 1": wrong_for_batch_over_1,
    "wrong for channels_last": wrong_for_channels_last,
}


@pytest.mark.parametrize("name", list(WRONG))
def test_catches_every_wrong_candidate(name: str) -> None:
    model = reference()
    candidate = WRONG[name](fxfuse.optimize(model))
    with pytest.raises(VerificationError) as info:
        fxfuse.verify(model, candidate, EXAMPLE, examples=20)
    error = info.value
    assert error.kind == "mismatch" and error.output == "output"
    assert error.error is not None and error.error > error.tolerance == 1e-5
    assert "counterexample" in str(error) and error.seed == 0
    with torch.no_grad():  # the counterexample it carries really shows the bug
        assert (model(*error.inputs) - candidate(*error.inputs)).abs().max() > 0
    ((batch, _, _, width),) = error.input_shapes
    if name == "wrong for odd sizes":
        assert width % 2 == 1
    if name == "wrong for batch > 1":
        assert batch > 1
    if name == "wrong for channels_last":
        assert error.channels_last and error.inputs[0].is_contiguous(
            memory_format=torch.channels_last
        )


@pytest.mark.parametrize("name", ["wrong for odd sizes", "wrong for batch > 1"])
def test_input_only_bugs_are_invisible_on_the_example(name: str) -> None:
    # so the verifier found them by drawing, and shrank them to one step from the example
    model = reference()
    fused = fxfuse.optimize(model)
    candidate = WRONG[name](fused)
    with torch.no_grad():
        assert torch.equal(fused(*EXAMPLE), candidate(*EXAMPLE))
    with pytest.raises(VerificationError, match=r"\(shrunk\)") as info:
        fxfuse.verify(model, candidate, EXAMPLE, examples=20)
    ((batch, channels, height, width),) = info.value.input_shapes
    assert (batch, channels, height) == (1 if name != "wrong for batch > 1" else 2, 4, 8)
    assert info.value.distribution == "normal" and not info.value.channels_last
    assert width == (9 if name == "wrong for odd sizes" else 8)


def test_an_alignment_bug_shows_as_a_shape_error_at_odd_sizes() -> None:
    # a stride-2 conv whose padding (1, 1) became (1, 0): right at even sizes only
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).eval()

    def candidate(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 0, 1, 0)), conv.weight, conv.bias, stride=2)

    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(conv(x), candidate(x), atol=1e-6)
    with pytest.raises(VerificationError, match="another shape") as info:
        fxfuse.verify(conv, candidate, (x,), examples=20)
    assert info.value.kind == "shape"
    assert any(size % 2 for size in info.value.input_shapes[0][2:])


def test_nan_where_the_reference_is_finite_fails_whatever_the_error() -> None:
    conv = nn.Conv2d(3, 3, 1).eval()

    def candidate(x: Tensor) -> Tensor:  # overflows on large inputs
        y = conv(x)
        return torch.where(x.abs().amax() > 100, torch.full_like(y, float("nan")), y)

    with pytest.raises(VerificationError, match="NaN or inf") as info:
        fxfuse.verify(conv, candidate, torch.randn(1, 3, 4, 4), examples=30)
    assert info.value.kind == "non-finite" and info.value.distribution == "large"


def test_the_candidate_raising_is_a_failure() -> None:
    model = nn.Conv2d(2, 2, 3, padding=1).eval()

    def candidate(x: Tensor) -> Tensor:
        if x.shape[0] > 2:
            raise RuntimeError("batch too large for my kernel")
        return model(x)

    with pytest.raises(VerificationError, match="batch too large") as info:
        fxfuse.verify(model, candidate, torch.randn(1, 2, 5, 5))
    assert info.value.kind == "raised" and info.value.input_shapes[0][0] == 3


# -- right candidates pass, with a report that says what was covered -------------------------


def test_passes_the_fused_model_and_reports_coverage() -> None:
    model = reference()
    report = fxfuse.verify(model, fxfuse.optimize(model), EXAMPLE, examples=20)
    assert report.examples >= 15 and report.worst_error <= 1e-5
    assert report.tolerances == {"output": 1e-5}
    batches = {int(s.split("x")[0]) for s in report.shapes}
    widths = {int(s.split("x")[3]) for s in report.shapes}
    assert batches >= {1, 2} and any(w % 2 for w in widths) and any(w % 2 == 0 for w in widths)
    assert report.channels_last > 0 and len(report.distributions) >= 3
    assert len(report.varied) == 3 and not report.fixed
    text = str(report)
    assert "inputs agree" in text and "worst normalised error" in text and "seed 0" in text


def test_same_seed_same_inputs_other_seed_other_inputs() -> None:
    model = reference()
    fused = fxfuse.optimize(model)
    a = fxfuse.verify(model, fused, EXAMPLE, examples=8, seed=3)
    b = fxfuse.verify(model, fused, EXAMPLE, examples=8, seed=3)
    c = fxfuse.verify(model, fused, EXAMPLE, examples=8, seed=4)
    assert a.shapes == b.shapes and a.worst_error == b.worst_error
    assert a.shapes != c.shapes


def test_float64_is_held_to_1e_10() -> None:
    model = reference().double()
    x = EXAMPLE[0].double()
    report = fxfuse.verify(model, fxfuse.optimize(model), (x,), examples=5)
    assert report.tolerances == {"output": 1e-10} and report.worst_error < 1e-10
    with pytest.raises(VerificationError, match="1e-10"):
        fxfuse.verify(model, nudged_weight(fxfuse.optimize(model)), (x,), examples=5)


def test_tolerance_and_deadline_knobs() -> None:
    model = reference()
    wrong = nudged_weight(fxfuse.optimize(model))
    assert fxfuse.verify(model, wrong, EXAMPLE, examples=3, tolerance=1e-2).worst_error < 1e-2
    report = fxfuse.verify(model, fxfuse.optimize(model), EXAMPLE, examples=50, deadline=0)
    assert report.examples == 1  # the example only: no time to draw more


def test_examples_zero_checks_the_example_alone() -> None:
    model = reference()
    report = fxfuse.verify(model, fxfuse.optimize(model), EXAMPLE, examples=0)
    assert report.examples == 1
    with pytest.raises(VerificationError):
        fxfuse.verify(model, nudged_weight(fxfuse.optimize(model)), EXAMPLE, examples=0)


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        ({"batch_sizes": []}, "batch_sizes must be a pair"),
        ({"batch_sizes": [0]}, "batch_sizes must be a pair"),
        ({"batch_sizes": (0, 3)}, "batch_sizes must be a pair"),
        ({"batch_sizes": (4, 2)}, "batch_sizes must be a pair"),
        ({"examples": -1}, "examples must be ≥ 0"),
        ({"examples": 2.5}, "examples must be an int"),
        ({"tolerance": -1}, "tolerance must be ≥ 0"),
        ({"tolerance": float("nan")}, "tolerance must be ≥ 0"),  # (every comparison passed)
        ({"tolerance": "1e-3"}, "tolerance must be a number"),
        ({"tolerance": {torch.float32: -1.0}}, "tolerance must be ≥ 0"),
    ],
)
def test_bad_knobs_are_one_line_errors_at_the_call(knobs: dict[str, object], named: str) -> None:
    model = reference()
    with pytest.raises((ValueError, TypeError), match=named) as caught:
        fxfuse.verify(model, model, EXAMPLE, **knobs)  # type: ignore[arg-type]
    wrong_type = "must be a number" in named or "must be an int" in named
    assert type(caught.value) is (TypeError if wrong_type else ValueError)
    assert "\n" not in str(caught.value)


def test_leaves_nothing_in_the_working_directory(tmp_path: Path) -> None:
    # a fresh process: hypothesis fixes its storage directory (./.hypothesis) at import, and
    # even without a database caches the constants of local source files there
    script = """
import torch, fxfuse
from torch import nn
model = nn.Conv2d(2, 2, 3, padding=1).eval()
fxfuse.verify(model, model, torch.randn(1, 2, 6, 6), examples=5)
wrong = lambda x: model(x) * (1 + (x.shape[-1] % 2) * 1e-3)
try:
    fxfuse.verify(model, wrong, torch.randn(1, 2, 6, 6))
except fxfuse.VerificationError:
    print("caught")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "caught"
    assert list(tmp_path.iterdir()) == []


def test_never_changes_either_model() -> None:
    model = reference()
    model[1].dense[1].train()  # a batch norm in training mode updates its statistics in place
    candidate = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    fxfuse.verify(model, candidate, EXAMPLE, examples=5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for key, value in candidate.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes


# -- bad input: clear errors -----------------------------------------------------------------


def test_a_nondeterministic_reference_is_a_clear_error_not_a_flaky_failure() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5)).train()
    with pytest.raises(NondeterministicError, match=r"training mode.*\.eval\(\)"):
        fxfuse.verify(model, copy.deepcopy(model), torch.randn(1, 3, 4, 4))


class Heads(nn.Module):
    def __init__(self, wrong: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.wrong = wrong

    def forward(self, x: Tensor) -> dict[str, object]:
        y = self.conv(x)
        out: dict[str, object] = {"features": [y, y.mean((2, 3))], "logits": y.sum(1)}
        if self.wrong == "value":
            out["features"] = [y, y.mean((2, 3)) * 1.01]
        elif self.wrong == "shape":
            out["logits"] = y.sum(1, keepdim=True)
        elif self.wrong == "key":
            del out["logits"]
        elif self.wrong == "tuple":
            return out["features"]  # type: ignore[return-value]
        return out


@pytest.mark.parametrize(
    ("wrong", "kind", "output", "says"),
    [
        ("value", "mismatch", "output['features'][1]", "normalised error"),
        ("shape", "shape", "output['logits']", r"shape \(1, 5, 5\), the candidate \(1, 1, 5, 5\)"),
        ("key", "structure", "output", "the candidate lacks 'logits'"),
        ("tuple", "structure", "output", "a dict with keys"),
    ],
)
def test_nested_outputs_are_walked_and_the_failing_one_named(
    wrong: str, kind: str, output: str, says: str
) -> None:
    model, candidate = Heads(), Heads(wrong)
    candidate.load_state_dict(model.state_dict())
    with pytest.raises(VerificationError, match=says) as info:
        fxfuse.verify(model, candidate, torch.randn(1, 3, 5, 5))
    assert info.value.kind == kind and info.value.output == output
    assert f"at {output}" in str(info.value)


def test_sizes_the_reference_rejects_are_kept_not_failed() -> None:
    # a classifier whose linear layer fixes the spatial size: only the batch may vary
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.eval()
    report = fxfuse.verify(model, fxfuse.optimize(model), torch.randn(2, 3, 6, 6), examples=10)
    assert [v.split(":")[0] for v in report.varied] == ["batch (input 0 dim 0)"]
    assert len(report.fixed) == 2 and all("rejects 7" in f for f in report.fixed)
    assert {s.split("x", 1)[1] for s in report.shapes} == {"3x6x6"}


def test_two_inputs_of_one_size_vary_together() -> None:
    class Sum(nn.Module):
        def forward(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
            return (a + b) * scale

    report = fxfuse.verify(
        Sum(), Sum(), (torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5), 2.0), examples=10
    )
    assert not report.fixed and len(report.varied) == 3
    assert all(s.split(", ")[0] == s.split(", ")[1] for s in report.shapes)


def test_the_reference_must_accept_the_example() -> None:
    with pytest.raises(ValueError, match="reference raises on example_inputs"):
        fxfuse.verify(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), torch.randn(1, 4, 5, 5))


def test_without_hypothesis_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fxfuse.testing.strategies", None)
    with pytest.raises(ImportError, match=r"pip install 'fxfuse\[verify\]'"):
        fxfuse.verify(nn.Identity(), nn.Identity(), torch.randn(1, 1, 2, 2))


# -- inside a user's own hypothesis test ------------------------------------------------------


@settings(max_examples=5)
@given(models(max_blocks=2))
def test_inside_a_hypothesis_test_it_draws_from_that_test(model: nn.Module) -> None:
    x = model.spec.example_input(batch=1)
    report = fxfuse.verify(model, fxfuse.optimize(model), (x,), examples=3)
    assert report.drawn_by == "drawn by the enclosing hypothesis test"
    assert 1 <= report.examples <= 4


def test_inside_a_hypothesis_test_a_failure_fails_that_test() -> None:
    model = reference()
    wrong = wrong_for_batch_over_1(fxfuse.optimize(model))

    # (hypothesis' "explain" phase would replay the failure ~200 times: not needed here)
    @settings(max_examples=5, database=None, phases=(Phase.generate, Phase.shrink))
    @given(st.integers(0, 3))
    def users_test(seed: int) -> None:
        fxfuse.verify(model, wrong, EXAMPLE, examples=4, seed=seed)

    with pytest.raises(VerificationError, match="from the enclosing test"):
        users_test()
