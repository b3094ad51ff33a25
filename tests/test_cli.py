"""The ``fxfuse`` command line, driven as a user drives it: in a subprocess.

Every test uses a tiny model or a tiny input; the ones that compile with Inductor are slow.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxfuse
from fxfuse.bench import VARIANTS
from fxfuse.cli import build_parser, main
from fxfuse.console import table
from fxfuse.models import SpecError, load_model
from fxfuse.testing import relative_error
from tests.helpers import fxfuse_cli

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


def save_repvgg_net(out: Path, *extra: str) -> Path:
    """``fxfuse optimize builtin:repvgg_net --save out`` on a 1×3×16×16 input; ``out``."""
    stdout = optimize_quickly("builtin:repvgg_net", "--save", str(out), *extra, shape="1,3,16,16")
    assert f"saved the fused model to {out}" in stdout
    if not extra:
        assert "batch, height, width dynamic; fixed: channels 3" in stdout
    return out


def repvgg_net_as_the_cli_builds_it() -> torch.nn.Module:
    from fxfuse.testing import randomize_batch_norms

    return randomize_batch_norms(load_model("builtin:repvgg_net").model, 0)  # seed 0's stats


# the example was 1x3x16x16: other batch sizes, and other odd and even spatial sizes
OTHER_SHAPES = [(2, 3, 16, 16), (3, 3, 21, 18)]


def test_save_pt2_loads_back_without_the_source_and_takes_other_sizes(tmp_path: Path) -> None:
    out = save_repvgg_net(tmp_path / "fused.pt2")
    program = torch.export.load(str(out))
    model = repvgg_net_as_the_cli_builds_it()
    for shape in [(1, 3, 16, 16), *OTHER_SHAPES]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert relative_error(model(x), program.module()(x)) < 1e-5
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 5  # one per RepVGG block


def test_static_shapes_fix_the_example_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "static.pt2"
    args = ["optimize", "builtin:repvgg_net", "--input-shape", "1,3,16,16", "--verify", "1"]
    assert main([*args, "--repeats", "1", "--save", str(out), "--static-shapes"]) == 0
    assert "input fixed at 1x3x16x16 (--static-shapes)" in capsys.readouterr().out
    module = torch.export.load(str(out)).module()
    assert module(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with pytest.raises(Exception, match="size"):
        module(torch.randn(2, 3, 16, 16))


def test_saved_model_says_what_the_model_fixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flatten before a linear layer ties height and width to the layer's width."""
    path = tmp_path / "flat.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn
            from fxfuse.zoo import RepVGGBlock

            def make():
                model = nn.Sequential(RepVGGBlock(3, 4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
                model.example_input_shape = (1, 3, 8, 8)
                return model
            """
        )
    )
    out = tmp_path / "flat.pt2"
    assert (
        main(["optimize", f"{path}:make", "--verify", "1", "--repeats", "1", "--save", str(out)])
        == 0
    )
    assert "the model requires 4*H*W == 256" in capsys.readouterr().out
    module = torch.export.load(str(out)).module()
    assert module(torch.randn(3, 3, 8, 8)).shape == (3, 5)  # any batch


@pytest.mark.slow
def test_save_onnx_runs_in_onnxruntime_at_other_sizes(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = save_repvgg_net(tmp_path / "fused.onnx")
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 5 and "BatchNormalization" not in ops
    session = ort.InferenceSession(str(out))
    model = repvgg_net_as_the_cli_builds_it()
    for shape in [(1, 3, 16, 16), *OTHER_SHAPES]:
        x = torch.randn(shape)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert relative_error(model(x), torch.from_numpy(y)) < 1e-5


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
        (("bench", "builtin:repvgg_net", "--device", "tpu9"), ("unknown device 'tpu9'",)),
        (
            (
                "convert",
                "missing.pt",
                "--model",
                "builtin:repvgg_net",
                "--into",
                "builtin:repvgg_net",
            ),
            ("no such file",),
        ),
    ],
)
def test_errors_are_one_line_and_a_hint(
    args: tuple[str, ...], phrases: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # in process (the same main() the console script runs): a subprocess each would cost
    # seconds of import time for nothing
    assert main(list(args)) == 2
    assert_one_line_and_hint(capsys.readouterr().err, *phrases)


@pytest.mark.parametrize(
    ("layer", "form", "example"),
    [
        ("nn.Conv1d(3, 4, 3)", "N,C,L", "1,3,32"),
        ("nn.Conv2d(5, 4, 3)", "N,C,H,W", "1,5,32,32"),
        ("nn.Linear(10, 4)", "N,F", "1,10"),
    ],
)
def test_a_rejected_input_shape_hints_the_form_the_first_layer_takes(
    layer: str, form: str, example: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shaped.py"
    path.write_text(
        f"from torch import nn\ndef make():\n    return nn.Sequential({layer}).eval()\n"
    )
    assert main(["optimize", f"{path}:make"]) == 2  # the default input, 1x3x224x224
    stderr = capsys.readouterr().err
    assert_one_line_and_hint(
        stderr, "(1, 3, 224, 224)", f"--input-shape {form}, e.g. --input-shape {example}"
    )
    assert "1,3,224,224" not in stderr.splitlines()[-1]


def test_the_hint_never_repeats_the_rejected_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "picky.py"
    path.write_text(
        "from torch import nn\n"
        "class Picky(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = nn.Conv1d(3, 4, 3)\n"
        "    def forward(self, x):\n"
        "        assert x.shape[-1] == 7, 'length 7 only'\n"
        "        return self.conv(x)\n"
        "def make():\n"
        "    return Picky().eval()\n"
    )
    assert main(["optimize", f"{path}:make", "--input-shape", "1,3,32"]) == 2
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--input-shape N,C,L (its first conv ('conv')" in hint and "1,3,32" not in hint


def test_factory_errors(factory_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optimize", f"{factory_file}:smal"]) == 2
    assert_one_line_and_hint(capsys.readouterr().err, "did you mean small")
    assert main(["optimize", f"{factory_file}:not_a_model"]) == 2
    assert_one_line_and_hint(capsys.readouterr().err, "returned an int, not an nn.Module")
    # no close match: the hint lists what the file defines, not what it imports (nn, torch)
    assert main(["optimize", f"{factory_file}:resnet"]) == 2
    err = capsys.readouterr().err
    assert_one_line_and_hint(err, "defines small, Untraceable, untraceable, not_a_model")
    assert "RepVGGBlock" not in err and "--debug" not in err
    assert main(["optimize", f"{factory_file}:small(width=)"]) == 2
    assert_one_line_and_hint(capsys.readouterr().err, "cannot read the arguments")


def test_a_factory_takes_literal_arguments(tmp_path: Path) -> None:
    path = tmp_path / "widths.py"
    path.write_text(
        "from torch import nn\n"
        "def make(width, deploy=False):\n"
        "    return nn.Conv2d(3, width, 3) if deploy else nn.Conv2d(3, 2 * width, 1)\n"
    )
    assert load_model(f"{path}:make(4, deploy=True)").model.out_channels == 4
    assert load_model(f"{path}:make(width=4)").model.out_channels == 8


# -- what a newcomer types first ----------------------------------------------------------------


def test_bare_fxfuse_is_the_console_script_printing_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = Path(sys.executable).with_name("fxfuse")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fxfuse"]
    bare = subprocess.run(command, capture_output=True, text=True, check=False)
    assert bare.returncode == 0 and bare.stderr == ""
    assert bare.stdout.startswith("usage: fxfuse")
    for command_name in ("optimize", "inspect", "bench", "convert"):
        assert command_name in bare.stdout
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    expected = f"fxfuse {fxfuse.__version__} (torch {torch.__version__})"
    assert capsys.readouterr().out.startswith(expected)


def test_debug_is_accepted_after_the_command() -> None:
    result = fxfuse_cli("optimize", "builtin:nope", "--debug")
    assert result.returncode != 0
    assert "unrecognized arguments" not in result.stderr
    assert "Traceback" in result.stderr and "no built-in model 'nope'" in result.stderr


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (("optimize", "--verify", "0"), "argument --verify: must be at least 1, got 0"),
        (("optimize", "--verify", "-3"), "argument --verify: must be at least 1, got -3"),
        (("optimize", "--repeats", "0"), "argument --repeats: must be at least 1"),
        (("bench", "builtin:repvgg_net", "--rounds", "0"), "argument --rounds: must be at least 1"),
        (("bench", "builtin:repvgg_net", "--warmup", "-1"), "--warmup: must be at least 0"),
        (("inspect", "builtin:repvgg_net", "--max-declines", "x"), "expected a whole number"),
    ],
)
def test_counts_must_make_sense(
    args: tuple[str, ...], phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    assert phrase in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_one_line_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["bench", "builtin:repvgg_net", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was built or run
    assert_one_line_and_hint(captured.err, "--device cuda", "sees no CUDA GPU", "--device cpu")


def test_save_path_is_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "folder" / "fused.pt2"
    assert main(["optimize", "--save", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the model was never built, let alone fused
    assert_one_line_and_hint(captured.err, "the folder", "does not exist")


def test_onnx_without_its_packages_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails
    assert main(["optimize", "--save", str(tmp_path / "fused.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_and_hint(captured.err, "needs onnxscript", "pip install 'fxfuse[onnx]'")


def test_training_mode_model_from_a_file_gets_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.py"
    path.write_text(
        "from torch import nn\n"
        "from fxfuse.zoo import RepVGGBlock\n"
        "def training():\n"
        "    return nn.Sequential(RepVGGBlock(3, 4), nn.Dropout(0.5))\n"
        "def evaluating():\n"
        "    return training().eval()\n"
    )
    out = optimize_quickly(f"{path}:training", shape="1,3,8,8")
    assert "note: " in out and "returned the model in training mode" in out
    assert "switched it to eval mode" in out
    quick = ["--input-shape", "1,3,8,8", "--verify", "1", "--repeats", "1"]
    assert main(["optimize", f"{path}:evaluating", *quick]) == 0
    assert "training mode" not in capsys.readouterr().out


def test_help_shows_defaults_and_keeps_words_whole() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, words in {
        "bench": ["(default 20)", "(default 3)", *VARIANTS],
        "inspect": ["(default 20)"],
        "optimize": ["(default 4)", "(default 10)", "--static-shapes"],
        "convert": ["--into", "(default 2)"],
    }.items():
        text = commands.choices[name].format_help()
        tokens = set(re.split(r"[\s,()]+", text))
        for word in words:
            assert word in text and (word.startswith("(") or word in tokens), (name, word, text)


def test_print_fused_lists_modules_in_graph_order() -> None:
    from fxfuse.zoo import training_time_net

    fused = fxfuse.optimize(training_time_net().eval())
    lines = str(fused).splitlines()
    top = [line.split(")")[0].strip(" (") for line in lines if line.startswith("  (")]
    assert top == [str(i) for i in (*range(13), 14)]  # (13), the dropout, is gone
    assert "(0): FusedRepVGGBlock(" in str(fused) and "): Module(" not in str(fused)


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
    rows = {line.split()[0]: line.split("  ") for line in lines[header + 2 : header + 6]}
    rows = {name: [c.strip() for c in cells if c.strip()] for name, cells in rows.items()}
    assert set(rows) == {"eager", "fxfuse", "timm", "fx.fuse"}
    assert rows["timm"][1] == "unavailable"
    assert rows["fxfuse"][2].endswith(("× faster", "× slower", "as fast"))  # not a bare ratio
    assert rows["fxfuse"][3] == "5"  # convs run: one per block
    assert "timm: not a timm model" in result.stdout
    # the summary: verification on its own line, not inside the conversion time
    conversion = next(line for line in lines if line.startswith("fxfuse conversion:"))
    assert "verify" not in conversion
    assert any(line.startswith("fxfuse.verify, after the conversion") for line in lines)
    speeds = next(line for line in lines if line.startswith("fxfuse ("))
    assert " than eager" in speeds and " than fx.fuse" in speeds
    # stderr is not a terminal here: a line per step, and none of the profiler's own noise
    steps = result.stderr.splitlines()
    for variant in ("eager", "fxfuse", "timm", "fx.fuse"):
        assert any(
            line.startswith("converting ") and line.endswith(f": {variant}") for line in steps
        )
    assert any(line.startswith("timing round 3/3") for line in steps), result.stderr
    assert "USDT" not in result.stderr and "gpuGetDeviceCount" not in result.stderr
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


def test_speed_says_faster_or_slower_in_words() -> None:
    from fxfuse.bench import speed

    assert speed(5.0, 10.0) == "2.00× faster"
    assert speed(10.0, 8.0) == "1.25× slower"
    assert speed(10.0, 10.05) == "as fast"
    assert speed(None, 10.0) == speed(1.0, None) == "-"


def test_progress_writes_a_line_per_step_when_piped() -> None:
    import io

    from fxfuse.console import progress

    stream = io.StringIO()  # not a terminal
    assert list(progress(["a", "b"], "converting", stream=stream, lines=True, label=str)) == [
        "a",
        "b",
    ]
    assert stream.getvalue() == "converting 1/2: a\nconverting 2/2: b\n"
    quiet = io.StringIO()
    assert list(progress(range(3), "verifying", stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""  # short runs stay silent when piped


def test_load_model_specs() -> None:
    loaded = load_model("builtin:repvgg_net")
    assert loaded.random_weights and not loaded.model.training
    assert loaded.input_shape == (1, 3, 64, 64)
    with pytest.raises(SpecError) as info:
        load_model("timm")
    assert "cannot read model spec" in str(info.value)
