"""Shared fixtures. Tests run on the CPU, on debug presets and synthetic data.

Two sets: the unit tests (``make test-fast``, a few minutes: no SLURM, sshd, Ray, browser or
multi-process training) and the ``slow`` ones, which start real services or train for more than
a few seconds. ``make test`` runs both.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

DATA = os.path.join(os.path.dirname(__file__), "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; the only tests allowed to skip in CI")
    config.addinivalue_line("markers", "slow: starts SLURM, sshd, Ray, a browser or several processes, or trains "
                            "for more than a few seconds; `make test-fast` leaves it out")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set) a skipped test is a failure: a missing service must not pass silently."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail") \
            and item.get_closest_marker("gpu") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_ray_left():
    """A test that started Ray in this process (``--executor ray`` without an address) shuts it
    down: the next test starts its own, and none is left running when pytest exits (Ray's threads
    still running at interpreter exit can crash it)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_manifest(name: str) -> dict[str, list[int]]:
    """Keys and shapes of an official AugVAE checkpoint's modules (``tests/data/``): every key of the
    released Lightning ``state_dict`` that the model holds, with its shape."""
    import json
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)
