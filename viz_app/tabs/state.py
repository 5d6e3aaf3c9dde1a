"""Settings that survive: every control of the page keeps its value across tab changes, reruns and
model changes (where the value is still valid), and is mirrored in the URL's query string, so a
copied link reopens the same view.

Streamlit forgets a widget's value when the widget is not drawn (a closed tab); each widget here is
created with `persist_state="session"` (kept while not drawn). The URL is written by this module,
not by Streamlit's widget binding, which drops a parameter while its widget is not drawn:
`from_url` copies the URL's values into the session on a session's first run (before any widget
exists), `to_url` writes every kept value back at the end of each run. Values read by views that are
not open (the Download tab writes the Rollout tab's settings) come from `read`: the session, then
the default. Before a widget is drawn, a kept value that no longer fits (layer 12 of a 6-layer
model) is clamped, or replaced by the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from viz_app import colormaps

KEEP = dict(persist_state="session")

# Every kept control: widget key (= URL parameter) -> the type of its value.
KEPT: dict[str, type] = {
    "device": str,
    "dtype": str,
    "img_kind": str,
    "img": str,
    "ov_original": bool,
    "hd_query": str,
    "hd_row": int,
    "hd_col": int,
    "hd_layer": int,
    "hd_head": int,
    "hd_drop": bool,
    "hd_scale": str,
    "ro_fusion": str,
    "ro_discard": float,
    "ro_readout": str,
    "ro_layers": tuple,
    "ro_class": int,
    "ro_up": str,
    "ro_cmap": str,
    "ro_alpha": float,
    "pe_row": int,
    "pe_col": int,
    "cmp_method": str,
    "cmp_grid": str,
    "dl_attentions": bool,
    "fa_mode": str,  # Faithfulness: removal mode, drop | pixels
    "fa_steps": int,  # Faithfulness: steps of each curve
    "pr_ablate": tuple,  # Probes: removed heads, flat (layer, head) pairs counted from 1
    "pr_fill": str,  # Probes: what a removed head leaves, zero | mean
    "pr_drop": tuple,  # Probes: dropped patches, row-major indices
    "pr_keep_top": float,  # Probes: share of patches kept from the top of the map (1 = all)
    "pr_keep_map": str,  # Probes: the map whose top share is kept
    "pr_drop_map": str,  # Probes: the map shown for the kept tokens
    "sn_kind": str,  # Sanity: cascade | independent randomization
    "mk_show": bool,  # Heads and Rollout: outline the mass-threshold mask
    "mk_tau": float,  # Heads and Rollout: share of the attention mass the mask keeps
    "ro_method": str,  # class-specific maps: gradient (ICCV 2021) | lrp (CVPR 2021)
    "mo_what": str,  # Rollout, layers in motion: rollout | head
    "mo_fps": int,  # Rollout, layers in motion: frames per second of the animation and its export
    "cl_k": int,  # Classes: how many top classes side by side
    "cl_a": int,  # Classes: contrastive map, class A
    "cl_b": int,  # Classes: contrastive map, class B
    "tk_factor": float,  # Tokens: high-norm patch = norm above this x the layer's median patch norm
    "tk_queries": str,  # Tokens: whose attention is averaged, patches | readout | all
    "tk_layer": int,  # Tokens: the layer whose high-norm patches are drawn on the image
    # Compare (per-head maps, rollouts and distances of both models)
    "cmp_layer": int,  # the first model's layer; the second model's is at the same relative depth
    "cmp_head": int,  # the first model's head, shown large
    "cmp_head_b": int,  # the second model's head, shown large
    "cmp_scale": str,  # colour scale of both models' maps: per map | shared
    "cmp_conv": str,  # mean attention distance convention: as_is | renormalized
}

# Defaults of the values that more than one tab reads (and of the widgets that set them, which
# take them from here); model-dependent ones (the last layer, all layers) are None.
DEFAULTS: dict[str, Any] = {
    "ro_fusion": "mean",
    "ro_discard": 0.0,
    "ro_readout": "auto",
    "ro_layers": None,  # (first, last), 1-based; None = all layers
    "ro_class": None,  # class of the gradient rollout; None = top-1
    "ro_up": "nearest",
    "ro_cmap": colormaps.DEFAULT_SEQUENTIAL,
    "ro_alpha": 0.55,
    "hd_query": "read-out token",
    "hd_row": 0,
    "hd_col": 0,
    "hd_layer": None,  # 1-based; None = the last layer
    "hd_head": 1,  # 1-based
    "hd_drop": False,
    "md_conv": "as_is",
    "fa_mode": "drop",
    "fa_steps": 10,
    "pr_ablate": (),
    "pr_fill": "zero",
    "pr_drop": (),
    "pr_keep_top": 1.0,
    "sn_kind": "cascade",
    "mk_show": True,
    "mk_tau": 0.6,  # DINO's choice
    "ro_method": "gradient",
    "mo_what": "rollout",
    "mo_fps": 2,
    "cl_k": 3,
    "cl_a": None,  # None = the top-1 class
    "cl_b": None,  # None = the top-2 class
    "tk_factor": 2.0,
    "tk_queries": "patches",
    # Compare
    "cmp_layer": None,  # 1-based; None = each model's last layer
    "cmp_head": 1,
    "cmp_head_b": 1,
    "cmp_scale": "per map",
    "cmp_conv": "as_is",
}


def _parse(values: list[str], kind: type) -> Any:
    if kind is bool:
        return values[0].lower() in ("true", "1")
    if kind is tuple:
        return tuple(int(v) for v in values)
    return kind(values[0])


def _serialize(value: Any) -> str | list[str]:
    if isinstance(value, tuple | list):
        return [str(v) for v in value]
    return str(value).lower() if isinstance(value, bool) else str(value)


def from_url() -> None:
    """On a session's first run: the URL's kept values into the session (unparsable ones are
    skipped; values that do not fit the model are fixed when their widget is drawn)."""
    ss, qp = st.session_state, st.query_params
    for key, kind in KEPT.items():
        if key in qp and key not in ss:
            try:
                ss[key] = _parse(qp.get_all(key), kind)
            except (TypeError, ValueError):
                pass


def to_url() -> None:
    """Every kept value of the session into the URL (the address a user copies)."""
    ss, qp = st.session_state, st.query_params
    for key in KEPT:
        if key in ss and ss[key] is not None:
            value = _serialize(ss[key])
            if qp.get_all(key) != (value if isinstance(value, list) else [value]):
                qp[key] = value
        elif key in qp:
            del qp[key]


def read(key: str, default: Any = None) -> Any:
    """A control's value wherever the page is: the session, then the default."""
    ss = st.session_state
    if key in ss:
        return ss[key]
    return DEFAULTS.get(key) if default is None else default


def clamped(key: str, lo: float, hi: float) -> float:
    """A kept number wherever the page is (read), inside [lo, hi]: a value that is not a finite
    number (NaN from a link) takes the default, one outside the range is clamped, as the
    control's own widget would do when drawn."""
    try:
        v = float(read(key))
    except (TypeError, ValueError):
        v = float("nan")
    if v != v or v in (float("inf"), float("-inf")):
        v = float(DEFAULTS[key])
    return min(max(v, lo), hi)


def _fit(key: str, ok: Callable[[Any], bool], fix: Callable[[Any], Any]) -> bool:
    """True when the session holds a value for key (made to fit first)."""
    ss = st.session_state
    if key not in ss:
        return False
    if not ok(ss[key]):
        ss[key] = fix(ss[key])
    return True


def _clamp(v, lo, hi):
    return min(max(v, lo), hi)


def _only_value(label: str, value, key: str, container=None):
    """A slider with one possible value (a one-layer model's layer): Streamlit refuses min == max,
    so the value is written as text and kept."""
    st.session_state[key] = value
    (container or st).caption(f"{label}: {value[0]}-{value[1]}" if isinstance(value, tuple) else f"{label}: {value}")
    return value


def slider(label: str, lo, hi, default, *, key: str, **kw):
    if lo == hi:
        return _only_value(label, lo, key)

    def ok(v):
        return isinstance(v, int | float) and lo <= v <= hi

    def fix(v):  # a number outside the range is clamped; NaN (from a link) takes the default
        return _clamp(v, lo, hi) if isinstance(v, int | float) and v == v else default

    if _fit(key, ok, fix):
        return st.slider(label, lo, hi, key=key, **KEEP, **kw)
    return st.slider(label, lo, hi, default, key=key, **KEEP, **kw)


def range_slider(label: str, lo: int, hi: int, default: tuple[int, int], *, key: str, **kw) -> tuple[int, int]:
    if lo == hi:
        return _only_value(label, (lo, hi), key)

    def ok(v):
        return isinstance(v, tuple | list) and len(v) == 2 and lo <= v[0] <= v[1] <= hi

    def fix(v):
        try:
            a, b = sorted(_clamp(int(x), lo, hi) for x in v)
            return (a, b)
        except (TypeError, ValueError):
            return default

    if _fit(key, ok, fix):
        return tuple(st.slider(label, lo, hi, key=key, **KEEP, **kw))
    return tuple(st.slider(label, lo, hi, default, key=key, **KEEP, **kw))


def number(label: str, lo: int, hi: int, default: int, *, key: str, container=None, **kw) -> int:
    box = container or st
    if _fit(key, lambda v: isinstance(v, int) and lo <= v <= hi, lambda v: _clamp(int(v), lo, hi)):
        return box.number_input(label, lo, hi, key=key, **KEEP, **kw)
    return box.number_input(label, lo, hi, _clamp(default, lo, hi), key=key, **KEEP, **kw)


def _nearest(v, options: list, default):
    """A kept number that is no longer an option becomes the nearest option (head 3 of a 2-head
    model becomes head 2); anything else the default."""
    numbers = [o for o in options if isinstance(o, int | float) and not isinstance(o, bool)]
    if isinstance(v, int | float) and not isinstance(v, bool) and numbers:
        return min(numbers, key=lambda o: abs(o - v))
    return default


def _choice(widget, label: str, options: Sequence, default, key: str, **kw):
    options = list(options)
    default = default if default in options else options[0]
    if _fit(key, lambda v: v in options, lambda v: _nearest(v, options, default)):
        return widget(label, options, key=key, **KEEP, **kw)
    return widget(label, options, index=options.index(default), key=key, **KEEP, **kw)


def select(label: str, options: Sequence, default, *, key: str, container=None, **kw):
    return _choice((container or st).selectbox, label, options, default, key, **kw)


def radio(label: str, options: Sequence, default, *, key: str, container=None, **kw):
    return _choice((container or st).radio, label, options, default, key, **kw)


def toggle(label: str, default: bool, *, key: str, container=None, **kw) -> bool:
    box = container or st
    if _fit(key, lambda v: isinstance(v, bool), lambda v: default):
        return box.toggle(label, key=key, **KEEP, **kw)
    return box.toggle(label, default, key=key, **KEEP, **kw)
