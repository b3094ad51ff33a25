"""Assertions the tests share: fuse, compare with a normalised error, count executed ops."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

import fxfuse
from fxfuse.compare import TOLERANCES
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error


def fuse_and_check(
    model: nn.Module,
    *inputs: torch.Tensor,
    convs: int | None = None,
    batch_norms: int | None = 0,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[GraphModule, Counter[str], Counter[str]]:
    """Randomize BN statistics, fuse, and assert equivalence and what runs afterwards.

    Returns the fused module and the executed-op counts before and after.
    """
    model = randomize_batch_norms(model.eval(), seed)
    fused = fxfuse.optimize(model, **kwargs)
    dtype = inputs[0].dtype
    with torch.no_grad():
        expected, actual = model(*inputs), fused(*inputs)
    error = relative_error(expected, actual)
    assert error <= TOLERANCES[dtype], f"relative error {error:.3g}\n{fused.fxfuse_report}"
    before, after = count_ops(model, *inputs), count_ops(fused, *inputs)
    if convs is not None:
        assert after["conv"] == convs, f"{after['conv']} convs ran\n{fused.fxfuse_report}"
    if batch_norms is not None:
        assert after["batch_norm"] == batch_norms, fused.fxfuse_report
    assert after["conv"] <= before["conv"]
    return fused, before, after


def declined(fused: GraphModule, rule: str) -> list[str]:
    """The reasons ``rule`` gave for declining, from the fused module's report."""
    return [d.reason for d in fused.fxfuse_report.declines if d.rule == rule]


def identity_branches(fused: GraphModule) -> int:
    """How many identity or batch-norm branches merge-branches turned into kernels (its
    report lines name each branch it merged)."""
    merged = [
        r.detail.split(" -> ")[0]
        for r in fused.fxfuse_report.rewrites
        if r.rule == "merge-branches"
    ]
    return sum(
        part.endswith(("identity", "batch norm")) for line in merged for part in line.split(" + ")
    )


ROOT = Path(__file__).resolve().parent.parent


def fxfuse_cli(
    *args: str, cwd: Path = ROOT, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``fxfuse ARGS`` as a user runs it (``python -m fxfuse`` is the same program), in a
    subprocess with one intra-op thread, as the tests run (tests/conftest.py): two threads
    on a shared 2-core machine wait for each other, by orders of magnitude under load."""
    return subprocess.run(
        [sys.executable, "-m", "fxfuse", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
