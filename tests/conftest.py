"""Shared test set-up: offline Hugging Face, the tiny-model fixtures, the registered markers.

Tests that need the real reference model (smollm2-135m-instruct from the cache) or the built-in
corpora are marked ``@pytest.mark.integration``; they run by default (``-m "not integration"``
skips them). pyproject's addopts has ``--strict-markers``, so a misspelt marker is an error.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import FAMILIES, tiny_model  # noqa: E402

#: markers the test suite uses; each must be declared in pyproject's [tool.pytest.ini_options] markers
REQUIRED_MARKERS = ("integration", "slow")


def pytest_configure(config: pytest.Config) -> None:
    declared = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    missing = [m for m in REQUIRED_MARKERS if m not in declared]
    if missing:
        raise pytest.UsageError(f"markers used by the tests are not registered in pyproject.toml: {missing}")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Every supported model family (one tiny config each in tiny_models.FAMILY_CONFIGS)."""
    return request.param


@pytest.fixture
def tiny_llama():
    """``tiny_model("llama")``: the default tiny Llama (seed 0), fresh for each test."""
    return tiny_model("llama")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread avoids OpenMP spin-waiting on shared cores (many times slower there)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
