"""ViT Lens analyses, pictures and the Streamlit page."""
