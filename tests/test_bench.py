"""fxfuse.bench (the side-by-side comparison) and the profiler-based op count it relies on.

Nothing here asserts a time: only what was measured, in what shape, and the counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.bench import VARIANTS, compare
from fxfuse.testing import count_ops, count_ops_profiled, randomize_batch_norms
from fxfuse.zoo import RepVGGBlock, repvgg_net


def test_profiled_count_matches_dispatch_count_on_eager_and_fused() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(1, 3, 16, 16)
    for module in (model, fused):
        by_dispatch, by_profiler = count_ops(module, x), count_ops_profiled(module, x)
        assert by_profiler is not None
        assert by_profiler["conv"] == by_dispatch["conv"]
        assert by_profiler["batch_norm"] == by_dispatch["batch_norm"]


def test_profiled_count_sees_inside_compiled_code() -> None:
    model = randomize_batch_norms(nn.Sequential(RepVGGBlock(4, 4)).eval())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        compiled(x)
    counts = count_ops_profiled(compiled, x)
    assert counts is not None and counts["conv"] == 2 and counts["batch_norm"] == 3


def test_profiled_count_of_a_frozen_script_module_reads_its_graph() -> None:
    model = randomize_batch_norms(nn.Sequential(RepVGGBlock(4, 4)).eval())
    x = torch.randn(1, 4, 8, 8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.trace(model, (x,)).eval())
    counts = count_ops_profiled(frozen, x)
    assert counts is not None
    assert counts["conv"] == 2  # freezing folds the conv-bn pairs, merges nothing
    assert counts["batch_norm"] == 1  # the identity branch's batch norm stays


class DataDependent(nn.Module):
    """fx cannot trace this, nor any part of it alone (its layers are torch.nn's, called from
    its own code): every tracing-based variant must fail on it, alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return y if x.sum() > 0 else -y


def test_compare_measures_each_variant_and_reports_what_does_not_apply() -> None:
    model = randomize_batch_norms(repvgg_net().eval())
    x = torch.randn(1, 3, 16, 16)
    result = compare(
        model,
        (x,),
        spec="repvgg_net",
        variants=["fxfuse", "timm", "fx.fuse"],
        rounds=3,
        warmup=1,
        convert_repeats=2,
        show_progress=False,
    )
    assert [m.variant for m in result.measurements] == ["eager", "fxfuse", "timm", "fx.fuse"]
    eager, fx, timm, fx_fuse = result.measurements
    assert timm.status == "unavailable" and "not a timm model" in timm.reason
    for m in (eager, fx, fx_fuse):
        assert m.status == "ok" and m.rounds == 3 and m.latency_ms is not None
        assert m.error is not None and m.error < 1e-5
    assert (eager.convs, fx.convs, fx_fuse.convs) == (10, 5, 10)
    assert (eager.batch_norms, fx.batch_norms, fx_fuse.batch_norms) == (13, 0, 3)  # identity BNs
    assert set(fx.phases) == {"capture", "rules", "emit", "verify"}
    assert result.latency_ratio("eager", "eager") == 1.0
    assert result.latency_ratio("fxfuse", "timm") is None
    text = result.table()
    assert "timm: not a timm model" in text and "repvgg_net on 1x3x16x16" in text
    assert result.to_dict()["measurements"][1]["variant"] == "fxfuse"


def test_compare_reports_a_failing_variant_and_goes_on() -> None:
    model = randomize_batch_norms(DataDependent().eval())
    x = torch.rand(1, 4, 8, 8)
    result = compare(
        model, (x,), variants=["fxfuse", "fx.fuse"], rounds=2, warmup=0, show_progress=False
    )
    statuses = {m.variant: m.status for m in result.measurements}
    assert statuses == {"eager": "ok", "fxfuse": "failed", "fx.fuse": "failed"}
    assert "CaptureError" in result.get("fxfuse").reason  # type: ignore[union-attr]


def test_compare_rejects_unknown_variants_and_training_mode() -> None:
    model = repvgg_net()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(fxfuse.TrainingModeError):
        compare(model, (x,), show_progress=False)
    with pytest.raises(ValueError, match="unknown variants"):
        compare(model.eval(), (x,), variants=["tensorrt"], show_progress=False)


def test_the_fxfuse_backend_row_says_why_it_is_missing() -> None:
    why = VARIANTS["fxfuse+inductor"].unavailable(repvgg_net())
    if "fxfuse" in torch._dynamo.list_backends():
        assert why is None
    else:
        assert why is not None and "not registered" in why
