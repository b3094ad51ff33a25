"""The README's code runs as written, and its command lines are the ones CI and users run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxfuse.testing import relative_error

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_examples_run() -> None:
    namespace: dict[str, object] = {}
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    model, fused, x = namespace["model"], namespace["fused"], namespace["x"]
    assert relative_error(model(x), fused(x)) < 1e-5  # type: ignore[operator]


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = README.split("## Set up", 1)[1].split("## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    assert commands[0].endswith("fxfuse optimize")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_main_job_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "fxfuse", "optimize", "--repeats", "2"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ": ok" in result.stdout
