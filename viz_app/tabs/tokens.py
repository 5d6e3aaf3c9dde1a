"""Tokens: per layer x head, the share of attention on each prefix token and on high-norm patches (being built)."""

from __future__ import annotations

import streamlit as st

from viz_app.tabs.common import Ctx


def draw(ctx: Ctx) -> None:
    st.info("Token budgets: being built.")
