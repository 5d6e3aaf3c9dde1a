"""Hub downloads go only to a local server here; no test reaches the internet."""

import socket
import time

import pytest
import torch

from model import DownloadError, load_checkpoint
from model.weights import cached_repos, hub

import fake_hub
import hf_models


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_repo")
    hf_models.save(hf_models.build("vit", patch_size=16, image_size=64), folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_download_then_offline_from_cache(tmp_path, repo_files, online, monkeypatch):
    with fake_hub.serve({"acme/tiny-vit": repo_files}) as (url, state):
        loaded = load_checkpoint("acme/tiny-vit", endpoint=url, cache_dir=tmp_path)
        assert any("model.safetensors" in r for r in state.requests)
    assert loaded.config.grid == (4, 4) and loaded.family == "ViT"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_checkpoint("hf-hub:acme/tiny-vit", cache_dir=tmp_path)  # no server now
    for a, b in zip(loaded.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert cached_repos(tmp_path) == ["acme/tiny-vit"]


def test_unknown_repo_is_a_clear_error(tmp_path, repo_files, online):
    with fake_hub.serve({"acme/tiny-vit": repo_files}) as (url, _):
        with pytest.raises(DownloadError, match="not found"):
            load_checkpoint("acme/missing", endpoint=url, cache_dir=tmp_path)


def test_connection_refused_fails_fast(tmp_path, online):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DownloadError):
        load_checkpoint("acme/tiny-vit", endpoint=f"http://127.0.0.1:{port}", cache_dir=tmp_path)
    assert time.monotonic() - start < 5


def test_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        load_checkpoint("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", cache_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["500", "404", "cut", "slow"])
def test_server_failures_are_clear_fast_and_leave_no_partial_file(tmp_path, repo_files, online, mode, monkeypatch):
    monkeypatch.setattr(hub, "TIMEOUT_S", 1.0)
    with fake_hub.serve({"acme/tiny-vit": repo_files}) as (url, state):
        state.mode, state.delay = mode, 3.0
        start = time.monotonic()
        with pytest.raises(DownloadError) as err:
            load_checkpoint("acme/tiny-vit", endpoint=url, cache_dir=tmp_path)
        took = time.monotonic() - start
    msg = str(err.value)
    assert "acme/tiny-vit" in msg and "Traceback" not in msg and len(msg.splitlines()) == 1
    expected = {"500": "answered 500", "404": "not found", "slow": "did not answer within 1 s", "cut": "failed"}[mode]
    assert expected in msg
    # a cut body is resumed by huggingface_hub a few times (1 s apart); the others fail at once
    assert took < (15 if mode == "cut" else 10), took
    leftovers = [
        p for p in tmp_path.rglob("*") if p.is_file() and (p.suffix == ".incomplete" or p.name == "model.safetensors")
    ]
    assert not leftovers, "no partial or failed weights may stay in the cache"
    # and the same repository downloads fine once the server behaves
    with fake_hub.serve({"acme/tiny-vit": repo_files}) as (url, _):
        assert load_checkpoint("acme/tiny-vit", endpoint=url, cache_dir=tmp_path).config.grid == (4, 4)


def test_cached_repo_loads_while_the_hub_is_down(tmp_path, repo_files, online):
    with fake_hub.serve({"acme/tiny-vit": repo_files}) as (url, _):
        load_checkpoint("acme/tiny-vit", endpoint=url, cache_dir=tmp_path)
    with socket.socket() as s:  # nobody listens here any more
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    assert load_checkpoint("acme/tiny-vit", endpoint=dead, cache_dir=tmp_path).config.grid == (4, 4)
    assert time.monotonic() - start < 5
