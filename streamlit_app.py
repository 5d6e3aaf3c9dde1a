"""ViT Lens: `streamlit run streamlit_app.py` (or `make run`)."""

from viz_app.page import main

main()
