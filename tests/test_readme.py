"""The README's code runs as written, its output is what fxfuse prints, and its command lines
are the ones CI and users run."""

from __future__ import annotations

import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxfuse.testing import count_ops, randomize_batch_norms, relative_error
from tests.helpers import fxfuse_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str, text: str = README) -> list[str]:
    """The code blocks fenced with ``language`` ("" for a bare fence), in order."""
    found, current, inside = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == language:
                    found.append("\n".join(current) + "\n")
                inside = None
        elif inside is not None:
            current.append(line)
    return found


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_python_examples_run() -> None:
    """Every python block, in order, in one namespace (as a reader pastes them into one
    session); a block that defines a test is a test, so it is run too."""
    namespace: dict[str, object] = {}
    python = blocks("python")
    assert len(python) >= 5
    for block in python:
        exec(compile(block, "README.md", "exec"), namespace)
    model, fused, x = namespace["model"], namespace["fused"], namespace["x"]
    assert relative_error(model(x), fused(x)) < 1e-5  # type: ignore[operator]
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert [t.__name__ for t in tests] == ["test_my_pass"]  # type: ignore[attr-defined]
    for test in tests:
        test()
    # the deploy example: the RepVGG layout's deploy class now holds the fused weights
    train, deploy = namespace["train"], namespace["deploy"]
    assert isinstance(train, torch.nn.Module) and isinstance(deploy, torch.nn.Module)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert relative_error(train(x), deploy.eval()(x)) < 1e-5
    assert count_ops(deploy, x)["conv"] == 22 and count_ops(deploy, x)["batch_norm"] == 0


def test_the_report_shown_is_the_one_printed() -> None:
    import fxfuse
    from fxfuse.zoo import training_time_net

    shown = blocks("", section("Use"))
    assert len(shown) == 1
    printed = str(fxfuse.optimize(training_time_net().eval()).fxfuse_report)
    printed = "\n".join(line for line in printed.splitlines() if not line.startswith("time:"))
    assert shown[0].strip() == printed.strip()


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", section("Set up"), flags=re.S)
    assert len(commands) == 2
    assert commands[0].endswith("fxfuse optimize")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_package_says_its_license_and_the_tested_torch_range() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT")
    assert "Programming Language :: Python :: 3.10" in project["classifiers"]
    (torch_requirement,) = project["dependencies"]  # torch only, as the charter says
    lower = torch_requirement.removeprefix("torch>=")
    assert f"`torch>={lower}`" in README
    job = (ROOT / ".ci" / "torch-range").read_text()
    assert f'version="${{1:-{lower}.0}}"' in job  # the job tests the stated lower bound
    installed = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert tuple(map(int, installed.split("."))) >= tuple(map(int, lower.split(".")))
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])


def command_lines() -> list[list[str]]:
    """Every command of the README's sh blocks outside "Set up", comments dropped."""
    setup = section("Set up")
    lines = []
    for block in blocks("sh"):
        if block in setup:
            continue
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


MODELS_PY = textwrap.dedent(
    """
    from torch import nn
    from fxfuse.zoo import RepVGGBlock

    def make_model():
        model = nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))
        model.example_input_shape = (1, 3, 32, 32)
        return model
    """
)


@pytest.fixture
def readme_folder(tmp_path: Path) -> Path:
    """A folder holding the files the README's command lines name."""
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "models.py").write_text(MODELS_PY)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    sys.path.insert(0, str(ROOT))
    try:
        from examples.repvgg import create_RepVGG_A0
    finally:
        sys.path.remove(str(ROOT))
    torch.save(randomize_batch_norms(create_RepVGG_A0()).state_dict(), tmp_path / "train.pth")
    return tmp_path


def test_every_command_line_is_a_command() -> None:
    lines = command_lines()
    assert len(lines) >= 7
    assert all(words[0] == "fxfuse" for words in lines)
    assert {words[1] for words in lines} == {"optimize", "inspect", "bench", "convert"}


@pytest.mark.slow
def test_command_lines_run_as_written(readme_folder: Path) -> None:
    """Each command line, verbatim, in a folder with the files it names (``python -m fxfuse``
    is the ``fxfuse`` program)."""
    for words in command_lines():
        result = fxfuse_cli(*words[1:], cwd=readme_folder, timeout=600)
        assert result.returncode == 0, f"{shlex.join(words)}\n{result.stdout}\n{result.stderr}"
        if words[1] in ("optimize", "convert"):
            assert ": ok" in result.stdout, result.stdout
    assert (readme_folder / "resnet18.pt2").is_file()
    assert (readme_folder / "train_deploy.pt").is_file()
