"""The Streamlit page: sidebar choices in, tabs out. Widgets return plain values; views draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from model import PRETRAINED, ViTLensError, available_devices
from model.preprocess import ImageError
from model.resources import DEMO_DIR, EXAMPLES_DIR, SCENES_DIR
from model.weights import parse_hub_id
from model.weights.hub import offline
from model.weights.load import LoadedModel
from viz_app import cache, pipeline, views

# Shown as hints, not enforced by the uploader: a file of any other kind reaches our own checks and
# gets a message that says what is wrong with it (the uploader's filter would reject it unexplained).
IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"]
CHECKPOINT_TYPES = ["npz", "pth", "pt", "bin", "safetensors"]
MODEL_KINDS = ("Embedded demo", "Pretrained (download)", "Upload a checkpoint", "Path or hub id")
FALLBACK_KIND = "Untrained ViT-S/16 (offline fallback)"


def gallery() -> dict[str, Path]:
    items = {f"photo: {p.stem}": p for p in sorted(EXAMPLES_DIR.glob("*.jpg"))}
    items.update({f"scene: {p.stem}": p for p in sorted(SCENES_DIR.glob("*.png")) if not p.stem.endswith("_mask")})
    return items


def demo_available() -> bool:
    return (DEMO_DIR / "config.json").is_file()


def init_state() -> None:
    """Every session-state key, initialized in one guarded place."""
    defaults = {
        "model_source": "demo" if demo_available() else cache.RANDOM_SOURCE,
        "good_source": None,
        "compare_source": None,
        "good_image": None,  # (digest, bytes, name) of the last image that decoded
        "uploads": {},  # digest -> (name, bytes) of the uploaded checkpoint
        "memory_ok": set(),  # (source, device, dtype) whose analysis passed the memory check
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


# ---- sidebar -----------------------------------------------------------------------------------


NO_MODEL = "None"


@st.cache_data(ttl=30, show_spinner=False)
def cached_repos() -> list[str]:
    """Hub repositories in the local cache (a scan of the cache folder, refreshed every 30 s)."""
    from model.weights import cached_repos as scan

    return scan()


def within_upload_limit(name: str, size: int) -> bool:
    """The server refuses bigger uploads already; this says so plainly wherever a file arrives."""
    limit_mb = int(st.get_option("server.maxUploadSize"))
    if size > limit_mb * 2**20:
        st.error(f"{name} is {size / 2**20:.0f} MB, over the upload limit of {limit_mb} MB (server.maxUploadSize).")
        return False
    return True


def model_picker(prefix: str, *, optional: bool = False) -> str | None:
    """Model-choosing widgets; returns a source only when the user has asked for one.
    optional: offer 'None' first (nothing is loaded until the user picks a model)."""
    first = MODEL_KINDS[0] if demo_available() else FALLBACK_KIND
    kinds = ((NO_MODEL,) if optional else ()) + (first, *MODEL_KINDS[1:])
    kind = st.radio("Model", kinds, key=f"{prefix}_kind")
    if kind == NO_MODEL:
        return None
    if kind == MODEL_KINDS[0]:
        return "demo"
    if kind == FALLBACK_KIND:
        return cache.RANDOM_SOURCE
    if kind == "Pretrained (download)":
        cached = set(cached_repos())
        in_cache = {k for k, v in PRETRAINED.items() if parse_hub_id(v.source) in cached}
        key = st.selectbox(
            "Pretrained model",
            list(PRETRAINED),
            format_func=lambda k: (
                f"{PRETRAINED[k].title} ({'cached' if k in in_cache else f'{PRETRAINED[k].size_mb} MB'})"
            ),
            key=f"{prefix}_pretrained",
        )
        src = PRETRAINED[key]
        if offline():
            listed = ", ".join(sorted(cached)) or "none"
            st.caption(f"Offline (HF_HUB_OFFLINE is set): only cached models load. In the cache: {listed}.")
        else:
            st.caption(f"{src.source}. Downloaded once into the Hugging Face cache, only when you press the button.")
        verb = "Load from cache" if key in in_cache else f"Download and load ({src.size_mb} MB)"
        if st.button(verb, key=f"{prefix}_download"):
            return key
        return None
    if kind == "Upload a checkpoint":
        up = st.file_uploader(
            "Checkpoint file",
            key=f"{prefix}_ckpt",
            help=f"{', '.join(CHECKPOINT_TYPES)}; pickles load without running code",
        )
        if up is None or not within_upload_limit(up.name, up.size):
            return None
        data = up.getvalue()
        d = cache.digest(data)
        # only the latest upload is kept (in memory, for this session)
        st.session_state["uploads"] = {d: (up.name, data)}
        return f"upload:{d}"
    text = st.text_input(
        "Checkpoint path or hub id", key=f"{prefix}_path", placeholder="hf-hub:timm/... or /path/model.pth"
    )
    if offline():
        st.caption(f"Offline (HF_HUB_OFFLINE is set). Hub models in the cache: {', '.join(cached_repos()) or 'none'}.")
    if st.button("Load", key=f"{prefix}_load") and text.strip():
        return text.strip()
    return None


def image_picker() -> tuple[str, bytes, str] | None:
    """-> (digest, bytes, name) of the chosen image, or None."""
    how = st.radio("Image", ["Example", "Upload", "Camera"], horizontal=True, key="img_kind")
    if how == "Example":
        items = gallery()
        name = st.selectbox("Example", list(items), key="img_example")
        data = items[name].read_bytes()
    elif how == "Upload":
        up = st.file_uploader("Image file", key="img_upload", help=f"{', '.join(IMAGE_TYPES)} (first frame)")
        if up is None or not within_upload_limit(up.name, up.size):
            return None
        name, data = up.name, up.getvalue()
    else:
        shot = st.camera_input("Camera", key="img_camera")
        if shot is None:
            return None
        name, data = "camera.jpg", shot.getvalue()
    return cache.digest(data), data, name


def load_model(source: str, device: str, dtype: str) -> LoadedModel | None:
    upload = st.session_state["uploads"].get(source.removeprefix("upload:")) if source.startswith("upload:") else None
    label = PRETRAINED[source].title if source in PRETRAINED else upload[0] if upload else source
    with st.spinner(f"Loading {label}..."):
        try:
            return cache.get_model(source, device, dtype, upload)
        except (ViTLensError, ValueError, OSError) as e:
            st.error(f"Could not load the model: {e}")
            return None


def model_card(lm: LoadedModel) -> None:
    c, p = lm.config, lm.preprocessing
    named = [n for n in c.prefix_names if not n.startswith("reg")]
    prefix = ", ".join(named) + (f" + {c.num_registers} registers" if c.num_registers else "")
    stem = (
        "linear (as in the paper)"
        if c.linear_patch_embed
        else f"conv stem {'-'.join(map(str, c.conv_stem))}, then linear"
    )
    st.markdown(
        f"**{lm.name}**  \n"
        f"family: {lm.family} ({lm.format})  \n"
        f"patch {c.patch_size} px, input {c.image_size[1]}x{c.image_size[0]}, grid {c.grid[0]}x{c.grid[1]}  \n"
        f"patch embedding: {stem}  \n"
        f"prefix tokens: {prefix or 'none'}  \n"
        f"{c.depth} layers x {c.num_heads} heads, width {c.embed_dim}, {lm.model.num_params() / 1e6:.1f} M parameters  \n"
        f"classes: {c.num_classes or 'none (features)'}  \n"
        f"preprocessing: {p.mode} {p.interpolation}, crop {p.crop_pct:.3g}, mean {tuple(round(v, 3) for v in p.mean)}, "
        f"std {tuple(round(v, 3) for v in p.std)}"
    )


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="ViT Lens", layout="wide", page_icon=":eyes:")
    init_state()
    ss = st.session_state
    with st.sidebar:
        st.title("ViT Lens")
        asked = model_picker("main")
        if asked is not None:
            ss["model_source"] = asked
        devices = available_devices()
        device = st.selectbox("Device", devices, key="device")
        dtypes = ["fp32", "bf16"] + (["fp16"] if device != "cpu" else [])
        dtype = st.selectbox("Precision", dtypes, key="dtype", help="bf16 is fast on CPUs with AMX and on GPUs")
    source = ss["model_source"]
    if source is None:
        st.info(
            "Choose a model in the sidebar: a pretrained one (downloaded when you ask), a checkpoint file, or a path."
        )
        st.stop()
    lm = load_model(source, device, dtype)
    if lm is None and ss["good_source"] not in (None, source):
        st.warning("Showing the previous model.")
        source = ss["good_source"]
        ss["model_source"] = source
        lm = load_model(source, device, dtype)
    if lm is None:
        st.stop()
    ss["good_source"] = source
    with st.sidebar:
        with st.expander("Model card", expanded=False):
            model_card(lm)
        picked = image_picker()
    image = None
    if picked is not None:
        digest, data, name = picked
        try:
            image = cache.decode_image(digest, data, name)
            ss["good_image"] = picked
        except ImageError as e:
            st.error(str(e))
    if image is None and ss["good_image"] is not None:
        digest, data, name = ss["good_image"]
        st.caption(f"Showing the last good image ({name}).")
        image = cache.decode_image(digest, data, name)
    if image is None:
        st.info("Choose or upload an image in the sidebar.")
        st.stop()
    if not memory_fits(lm, (source, device, dtype)):
        st.stop()
    result = cache.get_result(source, device, dtype, digest, image)
    ctx = views.Ctx(lm=lm, result=result, original=image, source=source, device=device, dtype=dtype, digest=digest)
    names = ["Overview", "Heads", "Rollout", "Embeddings", "Attention distance", "Compare", "Download"]
    if source == "demo":
        names.append("Sanity check")
    # Lazy tabs: only the open tab runs, so a widget change redraws one view, never the model.
    tabs = st.tabs(names, key="main_tabs", on_change="rerun")
    draw = {
        "Overview": lambda: views.overview(ctx),
        "Heads": lambda: views.heads(ctx),
        "Rollout": lambda: views.rollout(ctx),
        "Embeddings": lambda: views.embeddings(ctx),
        "Attention distance": lambda: views.distance(ctx, lambda conv: example_mad(source, device, dtype, conv)),
        "Compare": lambda: compare_tab(ctx, device, dtype),
        "Download": lambda: views.download(ctx, settings=view_settings()),
        "Sanity check": lambda: views.sanity(ctx, scene_mask(name), demo_scores()),
    }
    for tab, label in zip(tabs, names):
        if tab.open:
            with tab:
                draw[label]()


def scene_mask(name: str) -> np.ndarray | None:
    """The target mask of a gallery scene ('scene: <stem>'), else None."""
    if not name.startswith("scene: "):
        return None
    path = SCENES_DIR / f"{name.removeprefix('scene: ')}_mask.png"
    if not path.is_file():
        return None
    from PIL import Image

    return np.asarray(Image.open(path).convert("L")) > 127


def demo_scores() -> dict | None:
    path = DEMO_DIR / "scores.json"
    if not path.is_file():
        return None
    import json

    return json.loads(path.read_text())


SETTING_PREFIXES = ("ov_", "hd_", "ro_", "pe_", "md_", "cmp_")


def memory_fits(lm: LoadedModel, key: tuple[str, str, str]) -> bool:
    """Warn, instead of dying, when the analysis would not fit in free memory. Checked until an
    analysis with this model has run once (its cached results then take memory themselves)."""
    ran = st.session_state["memory_ok"]
    if key in ran:
        return True
    need = pipeline.analysis_memory_bytes(lm.config, lm.dtype)
    free = pipeline.available_memory_bytes(lm.device)
    if free is None or need <= 0.8 * free:
        ran.add(key)
        return True
    c = lm.config
    st.warning(
        f"The analysis of one image with this model needs about {need / 2**30:.1f} GB "
        f"({c.depth} layers x {c.num_heads} heads x {c.num_tokens}^2 attention values), but only "
        f"{free / 2**30:.1f} GB is free on {lm.device}. Choose a smaller input size or model, or another device."
    )
    if st.button("Run anyway", key="mem_override"):
        ran.add(key)
        return True
    return False


def view_settings() -> dict:
    """The view settings of this session, JSON-ready (for the analysis download)."""
    out = {}
    for key, value in st.session_state.items():
        if not str(key).startswith(SETTING_PREFIXES):
            continue
        if isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            out[str(key)] = list(value)
    return dict(sorted(out.items()))


def example_mad(source: str, device: str, dtype: str, conv: str) -> tuple[np.ndarray, int]:
    mads = []
    for path in gallery().values():
        data = path.read_bytes()
        d = cache.digest(data)
        r = cache.get_result(source, device, dtype, d, cache.decode_image(d, data, path.name))
        mads.append(r.mad if conv == "as_is" else r.mad_renorm)
    return np.mean(mads, axis=0), len(mads)


def compare_tab(ctx: views.Ctx, device: str, dtype: str) -> None:
    ss = st.session_state
    with st.expander("Second model", expanded=ss["compare_source"] is None):
        asked = model_picker("cmp", optional=True)
        if st.session_state.get("cmp_kind") == NO_MODEL:
            ss["compare_source"] = None
        elif asked is not None:
            ss["compare_source"] = asked
    other = other_result = None
    name = ""
    if ss["compare_source"] is not None:
        other = load_model(ss["compare_source"], device, dtype)
        if other is not None:
            name = other.name
            other_result = cache.get_result(ss["compare_source"], device, dtype, ctx.digest, ctx.original)
    views.compare(ctx, other, other_result, name)
