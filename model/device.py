"""Device and precision choice: cuda, then mps, then cpu; fp32, bf16, fp16 (fp16 on cuda/mps only)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def available_devices() -> list[str]:
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device(available_devices()[0])
    if name.split(":")[0] not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {name!r}; choose auto, cuda, mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "mps" and "mps" not in available_devices():
        raise ValueError("device 'mps' was asked for but Apple MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        dtype = name
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 is only offered on a GPU; use bf16 or fp32 on the CPU")
    return dtype
