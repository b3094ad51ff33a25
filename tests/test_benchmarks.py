"""The benchmark harness runs end to end on tiny sizes (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import blocks
from benchmarks.scaling import fit_exponent, synthetic_net
from fxfuse import weights
from tests.helpers import fuse_and_check

ROOT = Path(__file__).resolve().parent.parent


def test_growth_exponent_fit() -> None:
    nodes = [100, 1000, 10000]
    assert fit_exponent(nodes, [n * 1e-4 for n in nodes]) == pytest.approx(1.0)
    assert fit_exponent(nodes, [n**2 * 1e-8 for n in nodes]) == pytest.approx(2.0)
    assert fit_exponent([100], [1.0]) is None


def test_synthetic_network_fuses_to_one_conv_per_block() -> None:
    blocks = 9  # every kind once, two of them twice
    fuse_and_check(synthetic_net(blocks).eval(), torch.randn(1, 8, 8, 8), convs=blocks)


def test_scaling_command_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "scaling",
            "--blocks",
            "3",
            "7",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--png",
            str(png),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "growth exponent" in result.stdout
    data = json.loads(out.read_text())["scaling"]
    assert [p["blocks"] for p in data["points"]] == [3, 7]
    assert all(p["error"] < 1e-10 for p in data["points"])
    assert data["machine"]["command"].startswith("python -m benchmarks scaling")
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_blocks_benchmark_runs_both_variants_and_restores_the_block_size() -> None:
    before = weights.BLOCK_BYTES
    result = blocks.measure("builtin:repvgg_net", rounds=1)
    assert before == weights.BLOCK_BYTES
    assert set(result) == {
        f"{phase}_{variant}_s" for phase in ("emit", "optimize") for variant in ("blocked", "whole")
    }
    assert all(seconds > 0 for seconds in result.values())
    assert "builtin:repvgg_net" in blocks.render({"builtin:repvgg_net": result})
