"""The script `vit-lens app` hands to `streamlit run` (see viz_app/app.py)."""

from viz_app.page import main

main()
