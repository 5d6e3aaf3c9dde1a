"""Write the example scenes for the app's gallery: python -m viz_app.demo.gallery [--out DIR].

One scene per class from the same generator and seed family as the test set (a seed never used
in training), saved as PNG with its target mask beside it (<name>_mask.png, white = target).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from model.resources import SCENES_DIR
from viz_app.demo.scenes import CLASSES, make_scene

GALLERY_SEED = 424_242


def write_gallery(out: Path, size: int = 96, upscale: int = 1) -> list[Path]:
    """Scenes are stored at the model's input size (upscale=1), so the model sees exactly the
    pixels the generator drew."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, name in enumerate(CLASSES):
        rng = np.random.default_rng([GALLERY_SEED, label])
        s = make_scene(rng, size=size, difficulty=1.0, label=label)
        img = Image.fromarray(s.image).resize((size * upscale,) * 2, Image.Resampling.NEAREST)
        mask = Image.fromarray(s.mask.astype(np.uint8) * 255).resize((size * upscale,) * 2, Image.Resampling.NEAREST)
        path = out / f"{label}_{name}.png"
        img.save(path)
        mask.save(out / f"{label}_{name}_mask.png")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-lens demo-gallery")
    p.add_argument("--out", type=Path, default=SCENES_DIR)
    a = p.parse_args(argv)
    for path in write_gallery(a.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
