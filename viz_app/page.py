"""The Streamlit page. Widgets return plain values; views take values and draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st
import torch

from model import ViTConfig, ViTLensError, load_checkpoint, load_image, prepare_image
from model.preprocess import ImageError
from model.vit import VisionTransformer
from model.weights.load import DEMO_DIR, LoadedModel

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
RANDOM_MODEL = "random ViT-S/16 (untrained)"


@st.cache_resource(max_entries=4, show_spinner=False)
def get_model(source: str) -> LoadedModel:
    if source == RANDOM_MODEL:
        from model.config import Preprocessing
        from model.weights.load import _labels_for

        config = ViTConfig(embed_dim=384, num_heads=6, mlp_dim=1536, num_classes=1000)
        model = VisionTransformer(config)
        model.init_weights(seed=0)
        return LoadedModel(
            model=model.eval().requires_grad_(False),
            config=config,
            preprocessing=Preprocessing(),
            labels=_labels_for(config, None),
            family="ViT",
            source=source,
            format="random",
            name=source,
        )
    return load_checkpoint(source)


def overlay(view: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    import cv2

    h = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
    h = cv2.resize(h.astype(np.float32), (view.shape[1], view.shape[0]), interpolation=cv2.INTER_NEAREST)
    color = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    return (view * (1 - alpha) + color * alpha).astype(np.uint8)


def grid_lines(view: np.ndarray, patch: int) -> np.ndarray:
    out = view.copy()
    out[::patch, :] = 255
    out[:, ::patch] = 255
    return out


def main() -> None:
    st.set_page_config(page_title="ViT Lens", layout="wide")
    st.title("ViT Lens")
    default = "demo" if (DEMO_DIR / "config.json").is_file() else RANDOM_MODEL
    source = st.sidebar.text_input("Model (path, hub id or 'demo')", value=default, key="model_source")
    try:
        lm = get_model(source)
    except ViTLensError as e:
        st.error(str(e))
        st.stop()
    c = lm.config
    st.sidebar.write(
        f"**{lm.name}** - {lm.family}, patch {c.patch_size}, grid {c.grid[0]}x{c.grid[1]}, "
        f"{c.depth} layers x {c.num_heads} heads, prefix tokens: {', '.join(c.prefix_names) or 'none'}"
    )
    examples = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    upload = st.sidebar.file_uploader("Image", type=["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"])
    choice = st.sidebar.selectbox("or an example", examples, key="example")
    try:
        img = load_image(upload.getvalue(), name=upload.name) if upload else load_image(EXAMPLES / choice)
    except ImageError as e:
        st.error(str(e))
        st.stop()
    prepared = prepare_image(img, lm.preprocessing)
    with torch.inference_mode():
        out = lm.model(prepared.pixels[None].to(lm.device, lm.dtype))
    layer = st.slider("Layer", 1, c.depth, c.depth, key="layer")
    attn = out.attentions[layer - 1][0].float().mean(0)  # (T, T), mean over heads
    P = c.num_prefix_tokens
    cls_map = (
        attn[0, P:].reshape(c.grid).cpu().numpy()
        if c.class_token
        else attn[P:, P:].mean(0).reshape(c.grid).cpu().numpy()
    )
    left, right = st.columns(2)
    left.image(grid_lines(prepared.view, c.patch_size), caption="What the model sees, with its patch grid")
    right.image(overlay(prepared.view, cls_map), caption=f"Class-token attention, layer {layer}, mean of heads")
    if out.logits is not None:
        probs = out.logits[0].float().softmax(-1)
        top = probs.topk(min(5, probs.numel()))
        names = lm.labels or [str(i) for i in range(probs.numel())]
        st.table(
            {
                "class": [names[i] for i in top.indices.tolist()],
                "probability": [f"{p:.3f}" for p in top.values.tolist()],
            }
        )
