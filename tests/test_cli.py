"""The ``fxfuse`` command line, driven as a user drives it: in a subprocess.

Every test uses a tiny model or a tiny input; the ones that compile with Inductor are slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxfuse.cli import main
from fxfuse.console import table
from fxfuse.models import SpecError, load_model
from fxfuse.testing import relative_error

ROOT = Path(__file__).resolve().parent.parent


def fxfuse_cli(
    *args: str, cwd: Path = ROOT, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fxfuse", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=cwd,
    )


FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from fxfuse.zoo import RepVGGBlock, ACBlock

    def small():
        model = nn.Sequential(RepVGGBlock(3, 8, stride=2), ACBlock(8, 8), RepVGGBlock(8, 8))
        model.example_input_shape = (2, 3, 12, 12)
        return model

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    def untraceable():
        return Untraceable()

    def not_a_model():
        return 42
    """
)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY)
    return path


def assert_clean_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit status 2, one error line and a hint, never a traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_line_and_hint(result.stderr, *phrases)


def assert_one_line_and_hint(stderr: str, *phrases: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("fxfuse: error: "), stderr
    assert lines[-1].startswith("hint: "), stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


# -- fxfuse optimize ---------------------------------------------------------------------------


def test_optimize_default_model_prints_report_and_verifies() -> None:
    result = fxfuse_cli("optimize", "--verify", "2", "--repeats", "1", "--input-shape", "1,3,32,32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "builtin:training_time_net" in out
    for phrase in ("fold-bn", "merge-branches", "convolutions", "batch norms", "FLOPs", ": ok"):
        assert phrase in out
    # the executed counts: 28 convs and 29 batch norms become 11 convs and none
    row = next(line for line in out.splitlines() if line.startswith("convolutions"))
    assert row.split()[1:] == ["28", "11"]
    row = next(line for line in out.splitlines() if line.startswith("batch norms"))
    assert row.split()[2:] == ["29", "0"]


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("fxfuse")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fxfuse"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command_name in ("optimize", "inspect", "bench"):
        assert command_name in result.stdout


def test_optimize_a_factory_in_a_file_uses_its_input_shape(factory_file: Path) -> None:
    result = fxfuse_cli("optimize", f"{factory_file}:small", "--verify", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "input 2x3x12x12" in result.stdout
    assert "its own weights" in result.stdout  # a user's model keeps its statistics
    assert ": ok" in result.stdout


def optimize_quickly(spec: str, *extra: str, shape: str = "1,3,32,32") -> str:
    """``fxfuse optimize SPEC`` on one small input, one timing repeat; asserts success and
    returns what it printed."""
    result = fxfuse_cli(
        "optimize", spec, "--input-shape", shape, "--verify", "1", "--repeats", "1", *extra
    )
    assert result.returncode == 0, result.stderr
    assert ": ok" in result.stdout
    return result.stdout


def test_optimize_torchvision_model_with_random_weights() -> None:
    out = optimize_quickly("torchvision:resnet18")
    assert "random weights" in out
    row = next(line for line in out.splitlines() if line.startswith("batch norms"))
    assert row.split()[-1] == "0"  # every batch norm of a ResNet folds


def test_optimize_timm_model() -> None:
    pytest.importorskip("timm")
    out = optimize_quickly("timm:repvgg_a0")
    assert "timm:repvgg_a0" in out
    row = next(line for line in out.splitlines() if line.startswith("convolutions"))
    assert row.split()[1:] == ["44", "22"]  # one conv per RepVGG block, as timm's converter


def save_repvgg_net(out: Path) -> Path:
    """``fxfuse optimize builtin:repvgg_net --save out`` on a 16×16 input; ``out``."""
    stdout = optimize_quickly("builtin:repvgg_net", "--save", str(out), shape="1,3,16,16")
    assert f"saved the fused model to {out}" in stdout
    return out


def test_save_pt2_loads_back_without_the_source(tmp_path: Path) -> None:
    out = save_repvgg_net(tmp_path / "fused.pt2")
    program = torch.export.load(str(out))
    model = load_model("builtin:repvgg_net").model
    from fxfuse.testing import randomize_batch_norms

    randomize_batch_norms(model, 0)  # the CLI's statistics for seed 0
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(model(x), program.module()(x)) < 1e-5
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 5  # one per RepVGG block


@pytest.mark.slow
def test_save_onnx_runs_in_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = save_repvgg_net(tmp_path / "fused.onnx")
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 5 and "BatchNormalization" not in ops
    session = ort.InferenceSession(str(out))
    x = torch.randn(1, 3, 16, 16)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert y.shape == (1, 10)


# -- errors: one line and a hint ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (("optimize", "builtin:nope"), ("no built-in model 'nope'", "training_time_net")),
        (("optimize", "torchvision:resnet1"), ("torchvision has no model", "did you mean")),
        (("optimize", "resnet50"), ("cannot read model spec",)),
        (("optimize", "missing/file.py:make"), ("no such file",)),
        (("optimize", "builtin:repvgg_net", "--input-shape", "1,5,16,16"), ("--input-shape",)),
        (("optimize", "builtin:repvgg_net", "--save", "out.txt"), (".pt2 or .onnx",)),
        (("bench", "builtin:repvgg_net", "--variants", "eager,tensorrt"), ("unknown variant",)),
    ],
)
def test_errors_are_one_line_and_a_hint(
    args: tuple[str, ...], phrases: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # in process (the same main() the console script runs): a subprocess each would cost
    # seconds of import time for nothing
    assert main(list(args)) == 2
    assert_one_line_and_hint(capsys.readouterr().err, *phrases)


def test_factory_errors(factory_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", f"{factory_file}:smal"]) == 2
    assert_one_line_and_hint(capsys.readouterr().err, "did you mean small")
    assert main(["optimize", f"{factory_file}:not_a_model"]) == 2
    assert_one_line_and_hint(capsys.readouterr().err, "not an nn.Module")


def test_untraceable_model_names_the_construct_and_debug_shows_traceback(
    factory_file: Path,
) -> None:
    spec = f"{factory_file}:untraceable"
    result = fxfuse_cli("optimize", spec, "--input-shape", "1,3,8,8")
    assert_clean_error(result, "cannot capture Untraceable", "control flow", "--debug")
    assert "leaf_modules" not in result.stderr  # a hint for Python users, not for the CLI
    debug = fxfuse_cli("--debug", "optimize", spec, "--input-shape", "1,3,8,8")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_input_shape_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--input-shape", "1,3,x"])
    assert info.value.code == 2
    assert "comma-separated ints" in capsys.readouterr().err


# -- fxfuse inspect ----------------------------------------------------------------------------


def test_inspect_lists_blocks_and_changes_nothing() -> None:
    result = fxfuse_cli("inspect", "builtin:training_time_net")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for cls in ("RepVGGBlock", "ACBlock", "MobileOneBlock", "CSLABlock", "RepViTMixer"):
        assert cls in out
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert row.split()[:6] == ["0", "RepVGGBlock", "2", "2", "1", "0"]
    assert "convs 28 → 11" in out and "not changed" in out


def test_inspect_reports_declines(factory_file: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared.py"
    shared.write_text(
        textwrap.dedent(
            """
            from torch import nn

            class TwoUsers(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a = nn.Conv2d(4, 4, 3, padding=1)
                    self.b = nn.Conv2d(4, 4, 1)

                def forward(self, x):
                    y = self.a(x)
                    return y + self.b(x), y

            def make():
                return nn.Sequential(TwoUsers())
            """
        )
    )
    result = fxfuse_cli("inspect", f"{shared}:make")
    assert result.returncode == 0, result.stderr
    assert "declined" in result.stdout and "merge-branches" in result.stdout


# -- fxfuse bench ------------------------------------------------------------------------------


def test_bench_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = fxfuse_cli(
        "bench",
        "builtin:repvgg_net",
        "--input-shape",
        "1,3,16,16",
        "--variants",
        "fxfuse,timm,fx.fuse",
        "--rounds",
        "3",
        "--warmup",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 6]}
    assert set(rows) == {"eager", "fxfuse", "timm", "fx.fuse"}
    assert rows["timm"][1] == "unavailable"
    assert rows["fxfuse"][3] == "5"  # convs run: one per block
    assert "timm: not a timm model" in result.stdout
    data = json.loads(out.read_text())
    assert [m["variant"] for m in data["measurements"]] == ["eager", "fxfuse", "timm", "fx.fuse"]
    fx = data["measurements"][1]
    assert fx["status"] == "ok" and fx["error"] < 1e-5 and fx["rounds"] == 3
    assert set(fx["phases"]) >= {"capture", "rules", "emit", "verify"}


@pytest.mark.slow
def test_bench_every_variant() -> None:
    result = fxfuse_cli(
        "bench",
        "builtin:repvgg_net",
        "--input-shape",
        "1,3,16,16",
        "--rounds",
        "3",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    for variant in ("eager", "fxfuse", "fx.fuse", "jit.freeze", "inductor", "fxfuse+inductor"):
        assert variant in result.stdout


# -- pieces, in process ------------------------------------------------------------------------


def test_table_aligns_columns() -> None:
    text = table([["name", "n"], ["a", "1"], ["longer", "100"]], align="lr")
    lines = text.splitlines()
    assert lines == ["name      n", "------  ---", "a         1", "longer  100"]


def test_load_model_specs() -> None:
    loaded = load_model("builtin:repvgg_net")
    assert loaded.random_weights and not loaded.model.training
    assert loaded.input_shape == (1, 3, 64, 64)
    with pytest.raises(SpecError) as info:
        load_model("timm")
    assert "cannot read model spec" in str(info.value)
