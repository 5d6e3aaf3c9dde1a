"""Hostile uploads through the app (AppTest): every hostile image, hostile checkpoints, uploads over
the limit, and 200 uploads in a row in one session with bounded memory."""

from __future__ import annotations

import io
import time
from pathlib import Path

import hostile_images
import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from model.resources import DEMO_DIR

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
CASES = hostile_images.cases()


def upload_image(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="img_upload").set_value((name, data, "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def png(seed: int, size=(160, 120)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def at():
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.radio(key="img_kind").set_value("Upload").run()
    assert not at.exception
    return at


@pytest.mark.slow
def test_every_hostile_image_through_the_app(at):
    good = png(0)
    for name, (data, expect) in CASES.items():
        start = time.monotonic()
        upload_image(at, name, data)
        took = time.monotonic() - start
        errors = [e.value for e in at.error]
        if expect == "ok":
            assert not errors, (name, errors)
            assert at.tabs and at.tabs[0].label == "Overview", name
            assert not any("last good image" in c.value for c in at.caption), name
        else:
            assert len(errors) == 1 and name in errors[0] and "Traceback" not in errors[0], (name, errors)
        assert took < 60, (name, took)  # a bound, with room for a loaded CI machine
        upload_image(at, "good.png", good)  # the app keeps working after each one
        assert not at.error and at.tabs[0].label == "Overview"


class _CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_checkpoint_uploads(at, tmp_path):
    import tempfile

    marker = tmp_path / "pwned.txt"
    evil = io.BytesIO()
    torch.save({"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2), "x": _CreatesFile(marker)}, evil)
    truncated = (DEMO_DIR / "model.safetensors").read_bytes()[:5000]
    before = set(Path(tempfile.gettempdir()).iterdir())
    at.radio(key="main_kind").set_value("Upload a checkpoint").run()
    for name, data, says in [
        ("evil.pth", evil.getvalue(), "refusing to unpickle"),
        ("cut.safetensors", truncated, "header length is larger than the file"),
        ("noise.npz", b"PK\x03\x04" + b"\x00" * 100, "not a readable"),
    ]:
        at.file_uploader(key="main_ckpt").set_value((name, data, "application/octet-stream")).run()
        assert not at.exception, [e.value for e in at.exception]
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and says in errors[0].lower(), (name, errors)
        assert at.tabs[0].label == "Overview"  # still showing the previous model
    assert not marker.exists()
    left = {p for p in set(Path(tempfile.gettempdir()).iterdir()) - before if p.name.startswith("vit-lens")}
    assert not left, left


def test_uploads_over_the_limit_are_refused_plainly(at):
    from streamlit import config

    old = config.get_option("server.maxUploadSize")
    config.set_option("server.maxUploadSize", 1)
    try:
        upload_image(at, "big.png", png(1, size=(1200, 1000)))
        assert [e.value for e in at.error] == [
            f"big.png is {len(png(1, size=(1200, 1000))) / 2**20:.0f} MB, over the upload limit of 1 MB "
            "(server.maxUploadSize)."
        ]
    finally:
        config.set_option("server.maxUploadSize", old)
    upload_image(at, "small.png", png(2))
    assert not at.error


@pytest.mark.slow
def test_200_uploads_in_one_session_keep_memory_bounded(at):
    for i in range(20):  # warm-up: caches fill to their bounds
        upload_image(at, f"w{i}.png", png(1000 + i))
    warm = rss_mb()
    for i in range(200):
        upload_image(at, f"u{i}.png", png(i))
        assert not at.error
    grown = rss_mb() - warm
    assert grown < 300, f"memory grew by {grown:.0f} MB over 200 uploads"
