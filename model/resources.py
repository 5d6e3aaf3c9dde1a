"""Where ViT Lens finds its data files: the one place that knows the location of `assets/`.

`assets/` (the embedded demo model, its test scenes, the ImageNet class names and the example
photos) sits at the top of the repository. It is found, in this order:

1. the folder named by the environment variable `VIT_LENS_ASSETS`, when set;
2. the installed package data `vit_lens_assets` (pyproject.toml maps `assets/` to that name, so
   a wheel carries it and an editable install points at the repository's folder);
3. `assets/` beside the `model/` package (a source checkout run without installing).

Code elsewhere never computes a path to `assets/` itself; it uses the names below.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE = "vit_lens_assets"
ENV_VAR = "VIT_LENS_ASSETS"


def _package_folder() -> Path | None:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    return None


def assets_dir() -> Path:
    """The assets folder (see the module doc for the search order). It may lack parts (a trimmed
    install without the demo model); callers check the files they need."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    source = Path(__file__).resolve().parent.parent / "assets"
    return _package_folder() or source


ASSETS = assets_dir()
DEMO_DIR = ASSETS / "demo"  # the embedded demo model: config.json, model.safetensors, MODEL_CARD.md
SCENES_DIR = DEMO_DIR / "scenes"  # generated test scenes and their ground-truth masks (*_mask.png)
EXAMPLES_DIR = ASSETS / "examples"  # example photos (licences in assets/README.md)
IMAGENET_CLASSES = ASSETS / "imagenet1k_classes.txt"  # one class name per line, index order
