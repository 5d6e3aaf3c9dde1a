"""The one module that owns Streamlit caching.

Models are shared objects (st.cache_resource), never mutated after load. Per-image results are
cached per (model, device, precision, image digest) and only read afterwards, so changing a
layer, head, query patch or display option never re-runs the model. Bounds (see README):
MAX_MODELS models; decoded images, image results and gradient maps by bytes (IMAGE_CACHE_BYTES,
RESULT_CACHE_BYTES, MAP_CACHE_BYTES: a count alone let 16 uploads of 50 MP photos take 3.6 GB of
a server every session shares) and by count (MAX_IMAGES, MAX_RESULTS, MAX_MAPS), each least
recently used first out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from model import load_checkpoint, prepare_image
from model.preprocess import load_image
from model.weights.load import LoadedModel
from viz_app.results import ImageResult, analyze_image, class_map

MAX_MODELS = 3
IMAGE_CACHE_BYTES = 512 * 2**20  # three 50 MP photos
RESULT_CACHE_BYTES = 1 * 2**30  # 16 ViT-B/16 results take about 0.4 GB (22 MB of maps each)
MAP_CACHE_BYTES = 64 * 2**20
MAX_IMAGES, MAX_RESULTS, MAX_MAPS = 16, 16, 64


def nbytes(value, depth: int = 0) -> int:
    """The memory an entry holds: its arrays and tensors, found through dataclasses, dicts and
    sequences (a few levels deep); anything else counts as nothing."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if depth >= 4:
        return 0
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v, depth + 1) for v in value)
    return 0


class ByteCache:
    """Least-recently-used values, at most max_entries and max_bytes in all, shared by every
    session (and thread).

    Each key is computed once even when sessions ask for it together. The newest value is always
    kept, even alone above the bound (the app's memory check let its analysis run; recomputing it
    on every rerun would be worse), so the cache holds at most max(max_bytes, the largest value).
    """

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.computing: dict[Hashable, threading.Lock] = {}
        self.lock = threading.Lock()

    @property
    def bytes(self) -> int:
        with self.lock:
            return sum(size for _, size in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable, compute: Callable[[], object]):
        while True:
            with self.lock:
                if key in self.entries:
                    self.entries.move_to_end(key)
                    return self.entries[key][0]
                busy = self.computing.get(key)
                if busy is None:
                    busy = self.computing[key] = threading.Lock()
                    busy.acquire()
                    break
            with busy:  # another session computes it: wait, then read it (or compute it if that failed)
                pass
        try:
            value = compute()
            self._put(key, value, nbytes(value))
            return value
        finally:
            with self.lock:
                self.computing.pop(key).release()

    def _put(self, key: Hashable, value, size: int) -> None:
        with self.lock:
            self.entries[key] = (value, size)
            total = sum(s for _, s in self.entries.values())
            while len(self.entries) > 1 and (total > self.max_bytes or len(self.entries) > self.max_entries):
                _, (_, dropped) = self.entries.popitem(last=False)
                total -= dropped

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


@st.cache_resource(show_spinner=False)
def _caches() -> dict[str, ByteCache]:
    """The byte-bounded caches, one set per server (st.cache_resource.clear() empties them too)."""
    return {
        "images": ByteCache(IMAGE_CACHE_BYTES, MAX_IMAGES),
        "results": ByteCache(RESULT_CACHE_BYTES, MAX_RESULTS),
        "maps": ByteCache(MAP_CACHE_BYTES, MAX_MAPS),
    }


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


RANDOM_SOURCE = "random"


def random_model(device: str, dtype: str) -> LoadedModel:
    """An untrained ViT-S/16 (seeded): the offline fallback while no demo weights are installed."""
    from model import Preprocessing, ViTConfig
    from model.device import to_precision
    from model.vit import VisionTransformer

    config = ViTConfig(embed_dim=384, num_heads=6, mlp_dim=1536, num_classes=0)
    model = VisionTransformer(config)
    model.init_weights(seed=0)
    model = to_precision(model, device, dtype).eval().requires_grad_(False)
    return LoadedModel(
        model, config, Preprocessing(), None, "ViT", RANDOM_SOURCE, "random", "untrained ViT-S/16 (random weights)"
    )


@st.cache_resource(max_entries=MAX_MODELS, show_spinner=False)
def get_model(source: str, device: str, dtype: str, _upload: tuple[str, bytes] | None = None) -> LoadedModel:
    """source: 'demo', a curated key, a path, a hub id, 'random', or 'upload:<digest>'.

    An uploaded checkpoint (_upload = (file name, bytes)) is written to a private temporary
    folder only for as long as it takes to read it, then removed.
    """
    if source == RANDOM_SOURCE:
        return random_model(device, dtype)
    if source.startswith("upload:"):
        if _upload is None:
            raise FileNotFoundError("the uploaded checkpoint is no longer in this session; upload it again")
        name, data = _upload
        safe = "".join(ch for ch in Path(name).name if ch.isalnum() or ch in "._-") or "checkpoint"
        with tempfile.TemporaryDirectory(prefix="vit-lens-upload-") as folder:  # mode 0700
            path = Path(folder) / safe
            path.write_bytes(data)
            return load_checkpoint(path, device=device, dtype=dtype)
    return load_checkpoint(source, device=device, dtype=dtype)


def decode_image(image_digest: str, data: bytes, name: str) -> np.ndarray:
    """Upload bytes -> RGB array, read-only as every session shares it (decoding is bounded;
    raises ImageError, which is not cached)."""

    def decode() -> np.ndarray:
        image = np.asarray(load_image(data, name=name))
        image.setflags(write=False)
        return image

    return _caches()["images"].get(image_digest, decode)


def get_result(source: str, device: str, dtype: str, image_digest: str, image: np.ndarray) -> ImageResult:
    from PIL import Image

    def analyze() -> ImageResult:
        lm = get_model(source, device, dtype)
        prepared = prepare_image(Image.fromarray(image), lm.preprocessing)
        return analyze_image(lm, prepared)

    return _caches()["results"].get((source, device, dtype, image_digest), analyze)


def get_class_map(
    source: str, device: str, dtype: str, image_digest: str, target: int, image: np.ndarray, method: str = "gradient"
) -> np.ndarray:
    """The class-specific map (results.CLASS_MAPS) of one class, (gh, gw), computed once."""

    def compute():
        lm = get_model(source, device, dtype)
        result = get_result(source, device, dtype, image_digest, image)
        return class_map(lm, result.prepared, target, method)

    return _caches()["maps"].get((source, device, dtype, image_digest, target, method), compute)


def get_gradient_map(source: str, device: str, dtype: str, image_digest: str, target: int, image: np.ndarray):
    return get_class_map(source, device, dtype, image_digest, target, image, "gradient")
