"""Shared fixtures: tiny diffusers-format repos built on demand (cached across runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def flux_dev_repo() -> Path:
    from diffserve.testing.fixtures import fixture_path

    return fixture_path("flux-dev")


@pytest.fixture(scope="session")
def flux_schnell_repo() -> Path:
    from diffserve.testing.fixtures import fixture_path

    return fixture_path("flux-schnell")


@pytest.fixture(scope="session")
def wan_t2v_repo() -> Path:
    from diffserve.testing.fixtures import fixture_path

    return fixture_path("wan-t2v")


@pytest.fixture(scope="session")
def wan_i2v_repo() -> Path:
    from diffserve.testing.fixtures import fixture_path

    return fixture_path("wan-i2v")
