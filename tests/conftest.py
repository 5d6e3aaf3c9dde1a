"""Shared test set-up. The code under test is the installed (editable) package: `make test`
installs it; `python -m pytest` from the repository root also finds it."""

import os

import pytest
import torch

# No test reaches the internet: the default hub endpoint is a closed local port, so a call that
# forgets to name the test server fails at once. Tests that want offline mode set HF_HUB_OFFLINE.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


# Markers that make a test slow by themselves (pyproject.toml lists every marker).
SLOW_BY_NATURE = ("browser", "parity", "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_BY_NATURE):
            item.add_marker(pytest.mark.slow)
