"""The Streamlit page: the sidebar's choices in, the tabs out. Loading and caching happen here;
each tab (viz_app/tabs/) gets values and callables in a Ctx.

The URL mirrors the view: `model` (the demo, a curated key, a path or a hub id; never an upload),
`tab`, the image (`img_kind`, `img`) and every tab's settings (their widget keys), so a copied link
reopens the same view. A link never downloads by itself: a model that is not in the local cache
waits for a button press.
"""

from __future__ import annotations

import json

import numpy as np
import streamlit as st

from model import PRETRAINED, ViTLensError, available_devices
from model.preprocess import ImageError
from model.resources import DEMO_DIR, SCENES_DIR
from model.weights.load import LoadedModel
from viz_app import cache, pipeline, results, sidebar
from viz_app.tabs import TABS, state
from viz_app.tabs.common import Ctx

MODEL_PARAM = "model"
COMPARE_PARAM = "compare"


def shareable(source: str | None) -> bool:
    return source is not None and not source.startswith("upload:") and source != cache.RANDOM_SOURCE


def init_state() -> None:
    """Every session-state key that is not a widget's, initialized in one guarded place; on a
    session's first run, the model named in the URL."""
    ss = st.session_state
    if "model_source" in ss:
        return
    linked = st.query_params.get(MODEL_PARAM)
    default = "demo" if sidebar.demo_available() else cache.RANDOM_SOURCE
    defaults = {
        "model_source": default,
        "good_source": None,
        "compare_source": st.query_params.get(COMPARE_PARAM),
        "linked_source": linked if linked and linked != default else None,  # loads when the user confirms
        "good_image": None,  # (digest, bytes, name) of the last image that decoded
        "uploads": {},  # digest -> (name, bytes) of the uploaded checkpoint
        "memory_ok": set(),  # (source, device, dtype) whose analysis passed the memory check
        "notice": None,  # a message to show once after a rerun (a failed load)
    }
    for key, value in defaults.items():
        ss.setdefault(key, value)
    state.from_url()
    if ss["linked_source"] and not sidebar.needs_download(ss["linked_source"]):
        ss["model_source"], ss["linked_source"] = ss["linked_source"], None
    sidebar.show_source("main", ss["model_source"])
    if ss["compare_source"]:
        sidebar.show_source("cmp", ss["compare_source"])


def uploaded(source: str) -> tuple[str, bytes] | None:
    """(file name, bytes) of the uploaded checkpoint an 'upload:<digest>' source names, if kept."""
    return st.session_state["uploads"].get(source.removeprefix("upload:")) if source.startswith("upload:") else None


def source_label(source: str) -> str:
    upload = uploaded(source)
    if source in PRETRAINED:
        return PRETRAINED[source].title
    if source == "demo":
        return "the embedded demo model"
    return upload[0] if upload else source


def load_model(source: str, device: str, dtype: str) -> tuple[LoadedModel | None, str]:
    """-> (model, '') or (None, why not)."""
    with st.spinner(f"Loading {source_label(source)}..."):
        try:
            return cache.get_model(source, device, dtype, uploaded(source)), ""
        except (ViTLensError, ValueError, OSError) as e:
            return None, str(e)


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
    return json.loads(path.read_text()) if path.is_file() else None


def memory_fits(lm: LoadedModel, key: tuple[str, str, str]) -> bool:
    """Warn, instead of dying, when the analysis would not fit in free memory. Checked until an
    analysis with this model has run once (its cached results then take memory themselves)."""
    ran = st.session_state["memory_ok"]
    if key in ran:
        return True
    short = pipeline.memory_shortfall(lm.config, lm.dtype, lm.device)
    if short is None:
        ran.add(key)
        return True
    st.warning(f"{short[0].upper()}{short[1:]}. Choose a smaller input size or model, or another device.")
    if st.button("Run anyway", key="mem_override"):
        ran.add(key)
        return True
    return False


def example_mad(source: str, device: str, dtype: str, key: str) -> tuple[np.ndarray, int]:
    """The mean over the example gallery of mean_attention_distance ('as_is'), its renormalized
    version ('renormalized') or the prefix share ('prefix'), (L, H), and the number of images."""
    field = {
        "as_is": "mean_attention_distance",
        "renormalized": "mean_attention_distance_renormalized",
        "prefix": "prefix_mass_share",
    }[key]
    values = []
    for path in sidebar.gallery().values():
        data = path.read_bytes()
        d = cache.digest(data)
        r = cache.get_result(source, device, dtype, d, cache.decode_image(d, data, path.name))
        values.append(r.arrays[field])
    return np.mean(values, axis=0), len(values)


def second_model(device: str, dtype: str, digest: str, image: np.ndarray):
    """The Compare tab's picker and its model: kept in the session (and the URL) across tabs."""
    ss = st.session_state
    asked = sidebar.model_picker("cmp", optional=True)
    if ss.get("cmp_kind") == sidebar.NO_MODEL:
        ss["compare_source"] = None
    elif asked is not None:
        ss["compare_source"] = asked
    source = ss["compare_source"]
    if shareable(source):
        st.query_params[COMPARE_PARAM] = source
    else:
        st.query_params.pop(COMPARE_PARAM, None)
    if source is None:
        return None
    other, why = load_model(source, device, dtype)
    if other is None:
        st.error(f"Could not load {source_label(source)}: {why}")
        return None
    if not memory_fits(other, (source, device, dtype)):
        return other, None
    return other, cache.get_result(source, device, dtype, digest, image)


def choose_model(device: str, dtype: str) -> tuple[str, LoadedModel] | None:
    """The model to show: the one asked for, or, when it fails, the last good one, named."""
    ss = st.session_state
    source = ss["model_source"]
    lm, why = load_model(source, device, dtype)
    if lm is not None:
        ss["good_source"] = source
        return source, lm
    good = ss["good_source"]
    if good is None or good == source:
        st.error(f"Could not load {source_label(source)}: {why}")
        return None
    # back to the last good model; the picker shows it again (widgets are reset before they exist),
    # except after a failed upload, where the uploader stays for the next file
    why = why.rstrip() if why.rstrip().endswith((".", "!", "?")) else why.rstrip() + "."
    ss["notice"] = f"Could not load {source_label(source)}: {why} Showing the previous model, {source_label(good)}."
    ss["model_source"] = good
    ss["revert_picker"] = not source.startswith("upload:")
    st.rerun()
    return None


# Twelve tabs in one row beside the sidebar at 1024 px: a narrower page margin (32 px instead of
# 80), tab gap (6 px instead of 16) and tab labels at 13 px instead of 14. Layout only; nothing
# else of the theme changes.
LAYOUT_CSS = """<style>
[data-testid="stMainBlockContainer"] { padding-left: 2rem; padding-right: 2rem; }
[role="tablist"] { gap: 0.375rem; }
[role="tab"] p { font-size: 0.8125rem; }
</style>"""


def main() -> None:
    st.set_page_config(page_title="ViT Lens", layout="wide", page_icon=":eyes:")
    st.html(LAYOUT_CSS)
    init_state()
    ss = st.session_state
    if ss.pop("revert_picker", False):
        sidebar.show_source("main", ss["model_source"])
    with st.sidebar:
        st.title("ViT Lens")
        asked = sidebar.model_picker("main")
        if asked is not None:
            ss["model_source"], ss["linked_source"] = asked, None
        linked = ss.get("linked_source")
        if linked:
            st.info(f"The link names {source_label(linked)}, which is not in the local cache.")
            if st.button(f"Download and load {source_label(linked)}", key="linked_load"):
                ss["model_source"], ss["linked_source"] = linked, None
        device, dtype = sidebar.device_and_precision(available_devices())
    if ss["notice"]:
        st.error(ss["notice"])
        ss["notice"] = None
    picked = choose_model(device, dtype)
    if picked is None:
        st.stop()
    source, lm = picked
    if shareable(source):
        st.query_params[MODEL_PARAM] = source
    else:
        st.query_params.pop(MODEL_PARAM, None)
    with st.sidebar:
        st.caption(f"Showing: **{lm.name}**")
        with st.expander("Model card", expanded=False):
            sidebar.model_card(lm)
        chosen = sidebar.image_picker(source)
    image, name, digest = None, "", ""
    if chosen is not None:
        digest, data, name = chosen
        try:
            image = cache.decode_image(digest, data, name)
            ss["good_image"] = chosen
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
    if result.nonfinite:  # once, above every tab: the tabs draw such values as no value, silently
        st.warning(results.nonfinite_warning(result.nonfinite, lm.name))
    ctx = Ctx(
        lm=lm,
        result=result,
        original=image,
        image_name=name,
        image_digest=digest,
        source=source,
        gradient_map=lambda target: cache.get_gradient_map(source, device, dtype, digest, target, image),
        class_map=lambda target, method="gradient": cache.get_class_map(
            source, device, dtype, digest, target, image, method
        ),
        example_mad=lambda key: example_mad(source, device, dtype, key),
        second_model=lambda: second_model(device, dtype, digest, image),
        scene_mask=scene_mask(name) if source == "demo" else None,
        demo_scores=demo_scores() if source == "demo" else None,
    )
    # Lazy tabs: only the open tab runs, so a widget change redraws one view, never the model. The
    # same labels for every model, so that changing the model keeps the open tab.
    tabs = st.tabs(list(TABS), key="tab", on_change="rerun", bind="query-params")
    for tab, module in zip(tabs, TABS.values()):
        if tab.open:
            with tab:
                module.draw(ctx)
    state.to_url()
