"""Shared fixtures. Tests run on the CPU in seconds each, on debug presets and synthetic data."""

from __future__ import annotations

import os
import socket

import pytest
import torch

REFERENCE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_manifest(name: str) -> dict[str, list[int]]:
    """Keys and shapes of an official AugVAE checkpoint (``shared/reference/``).

    The manifests sit beside the repository; in CI, a missing manifest is an error, not a skip.
    """
    path = os.path.join(REFERENCE, name)
    if not os.path.isfile(path):
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing: CI runs with shared/ beside the checkout")
        pytest.skip(f"{path} not found")
    import json
    with open(path) as f:
        return json.load(f)
