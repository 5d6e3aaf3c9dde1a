"""The sidebar's choices: model (and the second model of Compare), device, precision, image.
Widgets return plain values; loading happens in viz_app/page.py."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from model import PRETRAINED
from model.device import precisions_for
from model.resources import DEMO_DIR, EXAMPLES_DIR, SCENES_DIR
from model.weights import parse_hub_id
from model.weights.hub import offline
from model.weights.load import LoadedModel
from viz_app import cache
from viz_app.tabs import state

# Shown as hints, not enforced by the uploader: a file of any other kind reaches our own checks and
# gets a message that says what is wrong with it (the uploader's filter would reject it unexplained).
IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"]
CHECKPOINT_TYPES = ["npz", "pth", "pt", "bin", "safetensors"]
DEMO = "Embedded demo"
PRETRAINED_KIND = "Pretrained (download)"
UPLOAD = "Upload a checkpoint"
PATH = "Path or hub id"
MODEL_KINDS = (DEMO, PRETRAINED_KIND, UPLOAD, PATH)
FALLBACK_KIND = "Untrained ViT-S/16 (offline fallback)"
NO_MODEL = "None"


def gallery() -> dict[str, Path]:
    items = {f"scene: {p.stem}": p for p in sorted(SCENES_DIR.glob("*.png")) if not p.stem.endswith("_mask")}
    items.update({f"photo: {p.stem}": p for p in sorted(EXAMPLES_DIR.glob("*.jpg"))})
    return items


def default_example(source: str | None) -> str:
    """A scene the demo model knows; a photo for any other model."""
    names = list(gallery())
    want = "scene: " if source == "demo" else "photo: "
    return next((n for n in names if n.startswith(want)), names[0] if names else "")


def demo_available() -> bool:
    return (DEMO_DIR / "config.json").is_file()


@st.cache_data(ttl=30, show_spinner=False)
def cached_repos() -> list[str]:
    """Hub repositories in the local cache (a scan of the cache folder, refreshed every 30 s)."""
    from model.weights import cached_repos as scan

    return scan()


def needs_download(source: str) -> bool:
    """Whether loading source would download (a curated key or hub id not in the local cache)."""
    if source not in PRETRAINED and Path(source).expanduser().exists():
        return False  # a local path that happens to look like org/name
    hub = PRETRAINED[source].source if source in PRETRAINED else source
    repo = parse_hub_id(hub)
    return repo is not None and repo not in set(cached_repos())


def within_upload_limit(name: str, size: int) -> bool:
    """The server refuses bigger uploads already; this says so plainly wherever a file arrives."""
    limit_mb = int(st.get_option("server.maxUploadSize"))
    if size > limit_mb * 2**20:
        st.error(f"{name} is {size / 2**20:.0f} MB, over the upload limit of {limit_mb} MB (server.maxUploadSize).")
        return False
    return True


def kind_of(source: str | None) -> str:
    """The picker entry that names a source (to show the model that is really loaded)."""
    if source is None:
        return NO_MODEL
    if source == "demo":
        return DEMO
    if source == cache.RANDOM_SOURCE:
        return FALLBACK_KIND
    if source in PRETRAINED:
        return PRETRAINED_KIND
    if source.startswith("upload:"):
        return UPLOAD
    return PATH


def show_source(prefix: str, source: str | None) -> None:
    """Set the picker's widgets to a source before they are drawn (a link, a failed load)."""
    ss = st.session_state
    kind = kind_of(source)
    if kind == DEMO and not demo_available():
        kind = FALLBACK_KIND
    ss[f"{prefix}_kind"] = kind
    if kind == PRETRAINED_KIND:
        ss[f"{prefix}_pretrained"] = source
    elif kind == PATH:
        ss[f"{prefix}_path"] = source


def model_picker(prefix: str, *, optional: bool = False) -> str | None:
    """Model-choosing widgets; returns a source only when the user has asked for one.
    optional: offer 'None' first (nothing is loaded until the user picks a model)."""
    first = DEMO if demo_available() else FALLBACK_KIND
    kinds = ((NO_MODEL,) if optional else ()) + (first, *MODEL_KINDS[1:])
    keep = dict(persist_state="session")
    if st.session_state.get(f"{prefix}_kind") not in kinds:
        st.session_state.pop(f"{prefix}_kind", None)
    kind = st.radio("Model", kinds, key=f"{prefix}_kind", **keep)
    if kind != UPLOAD:  # coming back to the uploader asks for the file in it again
        st.session_state.pop(f"{prefix}_asked_upload", None)
    if kind == NO_MODEL:
        return None
    if kind == DEMO:
        return "demo"
    if kind == FALLBACK_KIND:
        return cache.RANDOM_SOURCE
    if kind == PRETRAINED_KIND:
        cached = set(cached_repos())
        in_cache = {k for k, v in PRETRAINED.items() if parse_hub_id(v.source) in cached}
        key = st.selectbox(
            "Pretrained model",
            list(PRETRAINED),
            format_func=lambda k: (
                f"{PRETRAINED[k].title} ({'cached' if k in in_cache else f'{PRETRAINED[k].size_mb} MB'})"
            ),
            key=f"{prefix}_pretrained",
            **keep,
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
    if kind == UPLOAD:
        up = st.file_uploader(
            "Checkpoint file",
            key=f"{prefix}_ckpt",
            help=f"{', '.join(CHECKPOINT_TYPES)}; pickles load without running code",
        )
        if up is None or not within_upload_limit(up.name, up.size):
            return None
        data = up.getvalue()
        d = cache.digest(data)
        # only the latest upload is kept (in memory, for this session); a file is asked for once,
        # when it arrives, not on every rerun while it sits in the uploader
        if st.session_state.get(f"{prefix}_asked_upload") == d:
            return None
        st.session_state[f"{prefix}_asked_upload"] = d
        st.session_state["uploads"] = {d: (up.name, data)}
        return f"upload:{d}"
    text = st.text_input(
        "Checkpoint path or hub id",
        key=f"{prefix}_path",
        placeholder="hf-hub:timm/... or /path/model.pth",
        **keep,
    )
    if offline():
        st.caption(f"Offline (HF_HUB_OFFLINE is set). Hub models in the cache: {', '.join(cached_repos()) or 'none'}.")
    if st.button("Load", key=f"{prefix}_load") and text.strip():
        return text.strip()
    return None


def device_and_precision(devices: list[str]) -> tuple[str, str]:
    device = state.select("Device", devices, devices[0], key="device")
    dtypes = precisions_for(device)
    dtype = state.select(
        "Precision",
        dtypes,
        "fp32",
        key="dtype",
        help="fp32 is IEEE float32 on every device; tf32 (CUDA) allows TF32 products; bf16 is fast on CPUs "
        "with AMX and on GPUs (docs/PRECISION.md)",
    )
    return device, dtype


def image_picker(source: str | None) -> tuple[str, bytes, str] | None:
    """-> (digest, bytes, name) of the chosen image, or None."""
    how = state.radio("Image", ["Example", "Upload", "Camera"], "Example", key="img_kind", horizontal=True)
    if how == "Example":
        items = gallery()
        if not items:
            st.caption("No example images are installed.")
            return None
        name = state.select("Example", list(items), default_example(source), key="img")
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
