"""The app's caches are bounded by bytes, not by count (issue 14): a count let 16 uploads of 50 MP
photos hold 3.6 GB of a server that every session shares."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from viz_app.cache import ByteCache, nbytes


def test_nbytes_counts_arrays_and_tensors_inside_containers():
    from dataclasses import dataclass

    @dataclass
    class Box:
        a: np.ndarray
        b: dict

    box = Box(
        np.zeros((10, 10), np.float32), {"t": torch.zeros(5, dtype=torch.float64), "s": "text", "l": [np.zeros(3)]}
    )
    assert nbytes(box) == 400 + 40 + 24


def test_least_recently_used_values_leave_first_once_over_the_byte_bound():
    cache = ByteCache(max_bytes=1000, max_entries=100)
    make = lambda n: lambda: np.zeros(n, np.uint8)  # noqa: E731
    cache.get("a", make(400))
    cache.get("b", make(400))
    cache.get("a", make(400))  # read: a is now the most recent
    cache.get("c", make(400))  # 1200 > 1000: b, the least recently used, leaves
    assert list(cache.entries) == ["a", "c"] and cache.bytes == 800


def test_a_value_above_the_bound_is_kept_alone():
    cache = ByteCache(max_bytes=1000, max_entries=100)
    cache.get("small", lambda: np.zeros(10, np.uint8))
    big = cache.get("big", lambda: np.zeros(5000, np.uint8))
    assert list(cache.entries) == ["big"] and cache.get("big", lambda: pytest.fail("recomputed")) is big


def test_the_entry_count_is_bounded_too():
    cache = ByteCache(max_bytes=10**9, max_entries=3)
    for k in range(10):
        cache.get(k, lambda: np.zeros(1))
    assert list(cache.entries) == [7, 8, 9]


def test_a_failure_is_not_cached_and_releases_waiters():
    cache = ByteCache(max_bytes=1000, max_entries=100)
    with pytest.raises(ValueError):
        cache.get("x", lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert len(cache) == 0 and cache.computing == {}
    assert cache.get("x", lambda: 7) == 7


def test_sessions_asking_together_compute_once():
    cache = ByteCache(max_bytes=10**6, max_entries=100)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return np.arange(4)

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(g is got[0] for g in got)


def test_decoded_uploads_stay_within_the_image_budget_in_a_child_process(tmp_path):
    """Sixteen distinct 12 MP uploads (36 MB each decoded, 576 MB in all) with a 100 MB budget:
    the process's peak stays far below what holding them all would take."""
    code = textwrap.dedent("""
        import io, json, logging
        logging.disable(logging.WARNING)  # no Streamlit runtime here: its warnings are noise
        import numpy as np
        from PIL import Image
        from viz_app import cache
        cache.IMAGE_CACHE_BYTES = 100 * 2**20
        images = cache._caches()["images"]
        images.max_bytes = cache.IMAGE_CACHE_BYTES
        for k in range(16):
            buf = io.BytesIO()
            Image.new("RGB", (4000, 3000), (k, 2 * k, 3 * k)).save(buf, "PNG")
            data = buf.getvalue()
            image = cache.decode_image(cache.digest(data), data, f"{k}.png")
            assert image.shape == (3000, 4000, 3) and not image.flags.writeable
        out = dict(held=images.bytes, entries=len(images))
        out["peak_mb"] = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["held"] <= 100 * 2**20 and out["entries"] == 2, out
    # importing torch, streamlit and PIL peaks near 290 MB; the 100 MB budget plus one decode in flight
    # stays near 470 MB; holding all 16 images took 917 MB
    assert out["peak_mb"] < 650, out
