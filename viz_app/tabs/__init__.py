"""The page's tabs, one module each: a tab's controls, state and drawing in one place. Each module
has `draw(ctx)`; viz_app/page.py lays them out in TABS order."""

from viz_app.tabs import (
    classes,
    compare,
    distance,
    download,
    embeddings,
    faithfulness,
    heads,
    overview,
    probes,
    rollout,
    sanity,
    tokens,
)

# tab label -> module; short labels so that every tab fits a 1024 px wide window
TABS = {
    "Overview": overview,
    "Heads": heads,
    "Rollout": rollout,
    "Classes": classes,
    "Tokens": tokens,
    "Embeddings": embeddings,
    "Distance": distance,
    "Compare": compare,
    "Download": download,
    "Sanity": sanity,
    "Faithfulness": faithfulness,
    "Probes": probes,
}
