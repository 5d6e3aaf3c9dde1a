"""Classes: class-specific maps for the top-k classes side by side, and a contrastive map (being built)."""

from __future__ import annotations

import streamlit as st

from viz_app.tabs.common import Ctx


def draw(ctx: Ctx) -> None:
    st.info("Per-class maps: being built.")
