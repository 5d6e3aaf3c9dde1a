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


# --- device timing (benchmarks/bench_gpu.py) -------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for every kernel queued on the device (CUDA and MPS launch asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median time of fn() in ms over `repeats` runs after `warmup` runs. On CUDA each run is
    timed by events around it and waited for (the GPU's time, launches included); elsewhere by
    the wall clock after a synchronize."""
    import statistics

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device: torch.device) -> int | None:
    """The most memory torch had allocated on a CUDA device while fn() ran (resident weights
    included); None on other devices."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def versions() -> dict[str, str]:
    """torch (with its CUDA and cuDNN), transformers and timm versions; "not installed" where absent."""
    import importlib

    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}
    for name in ("transformers", "timm"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    """The accelerator in words: name, compute capability and memory for CUDA."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (
            f"{p.name} (compute {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
        )
    if device.type == "mps":
        return "Apple MPS"
    return "CPU (no accelerator)"
