"""Placeholder while the tab is being built (replaced in the next commits)."""

import streamlit as st


def draw(ctx) -> None:
    st.info("Being built.")
