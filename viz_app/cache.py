"""The one module that owns Streamlit caching.

Models are shared objects (st.cache_resource), never mutated after load. Per-image results are
cached per (model, device, precision, image digest) and only read afterwards, so changing a
layer, head, query patch or display option never re-runs the model. Bounds (see README):
MAX_MODELS models, MAX_RESULTS image results, MAX_MAPS gradient maps, each least recently used
first out.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import streamlit as st

from model import load_checkpoint, prepare_image
from model.preprocess import load_image
from model.weights.load import LoadedModel
from viz_app.results import ImageResult, analyze_image, gradient_map

MAX_MODELS = 3
MAX_RESULTS = 16
MAX_MAPS = 64


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


RANDOM_SOURCE = "random"


def random_model(device: str, dtype: str) -> LoadedModel:
    """An untrained ViT-S/16 (seeded): the offline fallback while no demo weights are installed."""
    from model import Preprocessing, ViTConfig, resolve_device, resolve_dtype
    from model.vit import VisionTransformer

    config = ViTConfig(embed_dim=384, num_heads=6, mlp_dim=1536, num_classes=0)
    model = VisionTransformer(config)
    model.init_weights(seed=0)
    dev = resolve_device(device)
    model = model.to(dev, resolve_dtype(dtype, dev)).eval().requires_grad_(False)
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


@st.cache_data(max_entries=MAX_RESULTS, show_spinner=False)
def decode_image(image_digest: str, _data: bytes, name: str) -> np.ndarray:
    """Upload bytes -> RGB array (decoding is bounded; raises ImageError)."""
    return np.asarray(load_image(_data, name=name))


@st.cache_resource(max_entries=MAX_RESULTS, show_spinner=False)
def get_result(source: str, device: str, dtype: str, image_digest: str, _image: np.ndarray) -> ImageResult:
    from PIL import Image

    lm = get_model(source, device, dtype)
    prepared = prepare_image(Image.fromarray(_image), lm.preprocessing)
    return analyze_image(lm, prepared)


@st.cache_resource(max_entries=MAX_MAPS, show_spinner=False)
def get_gradient_map(source: str, device: str, dtype: str, image_digest: str, target: int, _image: np.ndarray):
    lm = get_model(source, device, dtype)
    result = get_result(source, device, dtype, image_digest, _image)
    return gradient_map(lm, result.prepared, target)
