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
def media(monkeypatch) -> dict[str, bytes]:
    """The bytes behind every media URL the page creates (download buttons, images), by file id:
    what a user would download from an AppTest run."""
    from pathlib import Path

    from streamlit.runtime import memory_media_file_storage

    seen: dict[str, bytes] = {}
    original = memory_media_file_storage.MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        seen[file_id] = path_or_data if isinstance(path_or_data, bytes) else Path(path_or_data).read_bytes()
        return file_id

    monkeypatch.setattr(memory_media_file_storage.MemoryMediaFileStorage, "load_and_get_id", record)
    return seen


@pytest.fixture(scope="module")
def ray_session():
    """A local 2-CPU Ray shared by a test module (starting one takes seconds); the engines use a
    Ray that is already running as it is and leave it running."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


# Markers that make a test slow by themselves (pyproject.toml lists every marker).
SLOW_BY_NATURE = ("browser", "parity", "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_BY_NATURE):
            item.add_marker(pytest.mark.slow)
