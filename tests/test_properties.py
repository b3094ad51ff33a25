"""Property tests over drawn re-parameterizable blocks (fxfuse.testing.strategies)."""

from __future__ import annotations

import torch
from hypothesis import given, note

import fxfuse
from fxfuse.testing import count_ops, relative_error
from fxfuse.testing.strategies import BlockSpec, block_specs, build_block, input_for


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
    assert after["conv"] <= before["conv"]
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
