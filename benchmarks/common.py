"""Shared set-up for benchmarks: a random ViT-B/16-sized checkpoint and a folder of test images."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from model import VisionTransformer, ViTConfig
from model.resources import EXAMPLES_DIR

EXAMPLES = EXAMPLES_DIR
VIT_B16 = ViTConfig(num_classes=1000)


def write_random_checkpoint(folder: Path, config: ViTConfig = VIT_B16, seed: int = 0) -> Path:
    model = VisionTransformer(config)
    model.init_weights(seed=seed)
    path = folder / "vit_b16_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n images: random crops and flips of the example photos, saved as JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.jpg"))]
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"img_{i:04d}.jpg", quality=90)
    return folder


def best_of(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of fn() in seconds (noise on a shared 2-core machine only adds time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_model() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", set()) where it cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def machine() -> str:
    import os
    import platform

    name, flags = cpu_model()
    isa = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX-512"
    return (
        f"{name or platform.processor() or platform.machine()} ({isa}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
