"""Shared test configuration: hypothesis profiles, the slow marker, deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "dev" is the quick default; "ci" (more examples, derandomized) when CI is set, or choose one
# with HYPOTHESIS_PROFILE.
settings.register_profile(
    "dev",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    print_blob=True,
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    print_blob=True,
    derandomize=True,
)
# "many" is for bug hunting by hand: HYPOTHESIS_PROFILE=many HYPOTHESIS_EXAMPLES=2000 pytest ...
settings.register_profile(
    "many",
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine two OpenMP
# threads wait for each other (a 4-channel 3x3 conv took 16 ms with 2 threads, 0.03 ms with 1).
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("FXFUSE_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or FXFUSE_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
