"""Property tests over drawn re-parameterizable blocks and models (fxfuse.testing.strategies):
fusing is exact, converges, is idempotent and never runs more convolutions."""

from __future__ import annotations

import torch
from hypothesis import given, note
from hypothesis import strategies as st

import fxfuse
from fxfuse import FusionOptions
from fxfuse.testing import count_ops, relative_error
from fxfuse.testing.strategies import (
    BlockSpec,
    DrawnModel,
    block_specs,
    build_block,
    input_for,
    model_inputs,
    models,
)


def _check(spec: BlockSpec, dtype: torch.dtype, tolerance: float) -> None:
    block = build_block(spec, dtype)
    fused = fxfuse.optimize(block)
    note(str(fused.fxfuse_report))
    for extra in (0, 1, 4):  # odd and even sizes: stride and alignment bugs show at some
        x = input_for(spec, extra, dtype=dtype)
        with torch.no_grad():
            error = relative_error(block(x), fused(x))
        assert error <= tolerance, f"error {error:.3g} at input {tuple(x.shape)}"
    before, after = count_ops(block, x), count_ops(fused, x)
    pools = sum(before[f"avg_pool{n}d"] for n in (1, 2, 3))
    assert after["conv"] <= before["conv"] + pools  # (a pool is a conv with a constant kernel)
    rules = {d.rule for d in fused.fxfuse_report.declines}
    assert after["conv"] == 1 or "merge-branches" in rules, "convs left and no reason given"
    assert after["batch_norm"] == 0 or rules, "batch norms left and no reason given"
    assert not fxfuse.optimize(fused).fxfuse_report.rewrites  # a fixpoint is a fixpoint


@given(block_specs())
def test_drawn_blocks_fuse_exactly_in_float32(spec: BlockSpec) -> None:
    _check(spec, torch.float32, 1e-5)


@given(block_specs(max_branches=3))
def test_drawn_blocks_fuse_exactly_in_float64(spec: BlockSpec) -> None:
    _check(spec, torch.float64, 1e-10)


# -- whole drawn models ------------------------------------------------------------------------


# Whole models are checked in float64: a drawn head can reduce to one number ~1000× smaller
# than the activations before it (classes=1 after a ReLU), and float32 cancellation then
# inflates the normalised error of an exact fusion past 1e-5. Blocks above cover float32.
@given(models(torch.float64, ndims=(1, 2, 3)), st.data())
def test_drawn_models_fuse_exactly_converge_and_stay_fused(
    model: DrawnModel, data: st.DataObject
) -> None:
    example = model.spec.example_input(batch=1, dtype=torch.float64)
    options = FusionOptions(validate_rewrites=True)
    fused = fxfuse.optimize(model, (example,), options=options)  # converges: no ConvergenceError
    report = fused.fxfuse_report
    note(str(report))
    # every rewrite the default rules make passes its local check on random inputs
    assert report.validation is not None
    assert report.validation["validated"] == len(report.rewrites)
    assert report.validation["rolled back"] == report.validation["not checkable"] == 0
    for _ in range(3):
        (x,) = data.draw(model_inputs(model))
        with torch.no_grad():
            error = relative_error(model(x), fused(x))
        assert error <= 1e-10, f"error {error:.3g} at input {tuple(x.shape)}"
    before, after = count_ops(model, x), count_ops(fused, x)
    pools = sum(before[f"avg_pool{n}d"] for n in (1, 2, 3))
    assert after["conv"] <= before["conv"] + pools  # (a pool is a conv with a constant kernel)
    assert after["batch_norm"] == 0 or report.declines, "batch norms left and no reason given"
    again = fxfuse.optimize(fused)  # idempotent: a second run finds nothing to do
    assert not again.fxfuse_report.rewrites
    assert count_ops(again, x) == after


@given(models(torch.float64, max_blocks=2))
def test_verify_passes_fused_drawn_models_in_float64(model: DrawnModel) -> None:
    x = model.spec.example_input(batch=1, dtype=torch.float64)
    report = fxfuse.verify(model, fxfuse.optimize(model), (x,), examples=4)
    assert report.worst_error <= 1e-10 and report.tolerances == {"output": 1e-10}
