"""Device and precision choice: cuda, then mps, then cpu; fp32, tf32, bf16, fp16.

Precisions (docs/PRECISION.md has the error model and the tolerances the tests derive from it):
    fp32  float32 weights and activations, every product and convolution in IEEE float32 on every
          device. On CUDA, torch runs float32 convolutions in TF32 by default (cudnn) and float32
          matmuls in TF32 once anyone in the process set torch.set_float32_matmul_precision("high");
          an fp32 model turns both off while its kernels are launched (TF32_GATE below).
    tf32  float32 weights and activations, products and convolutions allowed in TF32 (10-bit
          mantissa inputs, float32 accumulation) on CUDA GPUs that have it (Ampere and later).
          CUDA only: CPUs and Apple GPUs have no TF32.
    bf16  bfloat16 weights and activations (CPU and GPU).
    fp16  float16 weights and activations (GPU only).

The TF32 flags are process-global (torch.backends), and the kernels read them when they are
launched. Setting them per call is racy in a server where sessions share the process: while one
thread has them on for its tf32 forward, another thread's fp32 forward would launch TF32 kernels.
TF32_GATE is a mode lock: any number of forwards that want the same flags run at once; a forward
that wants the other setting waits until those have launched their kernels (CUDA launches are
asynchronous: the wait is the host-side launch time, not the GPU time), then the flags are flipped.
A forward that waits for the other mode holds back new arrivals of the current one, so neither
mode starves. When no forward holds the gate, the flags are back to what the process had.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

# Every precision a model can be loaded in, and the dtype its weights and activations are stored in.
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
DTYPES = PRECISIONS  # the name earlier code used
TF32 = "tf32"  # the precision that allows TF32 products (the CLI's --dtype tf32, the sidebar's choice)
# Unit roundoff u = 2^-p of each format (p significant bits, the implicit one included): the
# relative error of one rounding to nearest. TF32's is that of its 11-bit significand.
UNIT_ROUNDOFF: dict[str, float] = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}
# Device types whose float32 kernels read the TF32 flags (the gate is a no-op elsewhere).
TF32_DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})


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


def precisions_for(device: str | torch.device) -> list[str]:
    """The precisions offered on a device type, the default first: the CLI's and sidebar's choices."""
    kind = torch.device(device).type
    return ["fp32"] + (["tf32"] if kind == "cuda" else []) + ["bf16"] + (["fp16"] if kind != "cpu" else [])


def resolve_precision(name: str | torch.dtype, device: str | torch.device) -> str:
    """A precision's name, checked against the device: "fp32", "tf32", "bf16" or "fp16". A
    torch.dtype is taken as its plain precision (torch.float32 -> "fp32")."""
    device = torch.device(device)
    if isinstance(name, torch.dtype):
        found = next((k for k, v in PRECISIONS.items() if v == name and k != TF32), None)
        if found is None:
            raise ValueError(f"unsupported dtype {name}; choose one of {', '.join(PRECISIONS)}")
        name = found
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is only offered on a GPU; use bf16 or fp32 on the CPU")
    if name == TF32 and device.type not in TF32_DEVICE_TYPES:
        raise ValueError(f"tf32 is a CUDA GPU format (Ampere and later); {device.type} has none: use fp32")
    return name


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a precision stores weights and activations in ("tf32" -> torch.float32)."""
    return PRECISIONS[resolve_precision(name, device)]


def allows_tf32(name: str | torch.dtype) -> bool:
    """Whether a precision lets float32 products and convolutions run in TF32: only "tf32"."""
    return name == TF32


def precision_name(dtype: torch.dtype, tf32: bool = False) -> str:
    """The precision of a model stored in dtype, TF32 allowed or not: "fp32", "tf32", "bf16", "fp16"
    (other dtypes by torch's name, e.g. "float64")."""
    if dtype == torch.float32:
        return TF32 if tf32 else "fp32"
    return next((k for k, v in PRECISIONS.items() if v == dtype), str(dtype).removeprefix("torch."))


def to_precision(model: torch.nn.Module, device: str | torch.device, precision: str | torch.dtype):
    """model (a VisionTransformer) on device in the precision's dtype, TF32 allowed for "tf32" only
    (its .precision then reports the name). What load_checkpoint does with its device and dtype."""
    dev = resolve_device(device)
    name = resolve_precision(precision, dev)
    model = model.to(device=dev, dtype=PRECISIONS[name])
    model.allow_tf32 = allows_tf32(name)
    return model


# ---------------------------------------------------------------------------------------------
# The TF32 flags. torch >= 2.9 has one precision per backend and operation ("ieee", "tf32", or
# "none": inherit from the backend's, then the generic setting); older torch has two booleans.
# Mixing the two APIs makes torch refuse to read the cudnn boolean, so where the new one exists
# only it is used, at the level of the operations themselves (which no inherited setting overrides).

_NEW_API = hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(torch._C, "_set_fp32_precision_setter")
_OPS = (("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"))  # cublas products, cudnn conv and rnn


def _get(backend: str, op: str) -> str:
    return torch._C._get_fp32_precision_getter(backend, op)


def read_tf32_flags() -> tuple:
    """The process's TF32 settings, in a form write_tf32_flags puts back."""
    if _NEW_API:
        return tuple(_get(b, o) for b, o in _OPS)
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def write_tf32_flags(flags: tuple) -> None:
    if _NEW_API:
        for (b, o), value in zip(_OPS, flags):
            torch._C._set_fp32_precision_setter(b, o, value)
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _flags_for(tf32: bool) -> tuple:
    if _NEW_API:
        return ("tf32" if tf32 else "ieee",) * len(_OPS)
    return (tf32, tf32)


def tf32_enabled() -> dict[str, bool]:
    """Whether a float32 matmul (cuBLAS) and a float32 convolution (cuDNN) launched now may use
    TF32, resolving "none" through the backend's and the generic setting as torch does."""
    if not _NEW_API:
        return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "conv": bool(torch.backends.cudnn.allow_tf32)}

    def effective(op: str) -> bool:
        for b, o in (("cuda", op), ("cuda", "all"), ("generic", "all")):
            p = _get(b, o)
            if p != "none":
                return p == "tf32"
        return False

    return {"matmul": effective("matmul"), "conv": effective("conv")}


class TF32Gate:
    """The mode lock of the module doc: hold(tf32) while launching the float32 kernels of a forward
    (and backward) pass; re-entrant within a thread for the same mode."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._mode: bool | None = None  # the setting the holders run with; None while nobody holds
        self._turn: bool | None = None  # the mode whose waiters enter next when nobody holds
        self._holders = 0
        self._waiting = {False: 0, True: 0}
        self._saved: tuple | None = None  # the process's flags before the first holder
        self._local = threading.local()

    @contextmanager
    def hold(self, tf32: bool) -> Iterator[None]:
        tf32 = bool(tf32)
        local = self._local
        if getattr(local, "depth", 0):  # this thread holds the gate already
            if local.mode != tf32:
                raise RuntimeError(
                    "a forward pass that allows TF32 cannot run inside one that does not (or the reverse): "
                    "run the two models one after the other"
                )
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        with self._cond:
            self._waiting[tf32] += 1
            try:
                while not self._may_enter(tf32):
                    self._cond.wait()
            finally:
                self._waiting[tf32] -= 1
            if not self._holders:
                self._saved = read_tf32_flags()
                write_tf32_flags(_flags_for(tf32))
                self._mode, self._turn = tf32, None
            self._holders += 1
        local.depth, local.mode = 1, tf32
        try:
            yield
        finally:
            local.depth = 0
            with self._cond:
                self._holders -= 1
                if not self._holders:
                    if self._saved is not None:
                        write_tf32_flags(self._saved)
                    # the other mode's waiters go next, before new arrivals of this one
                    self._turn = (not self._mode) if self._waiting[not self._mode] else None
                    self._saved, self._mode = None, None
                    self._cond.notify_all()

    def _may_enter(self, tf32: bool) -> bool:
        if self._holders:  # join the holders of the same mode, unless the other mode is waiting
            return self._mode == tf32 and not self._waiting[not tf32]
        return self._turn is None or self._turn == tf32


TF32_GATE = TF32Gate()


def kernel_precision(device: torch.device, dtype: torch.dtype, tf32: bool):
    """The context to launch a model's kernels in: the gate in the model's mode for float32 on a
    device whose kernels read the TF32 flags, nothing otherwise."""
    if dtype != torch.float32 or device.type not in TF32_DEVICE_TYPES:
        return nullcontext()
    return TF32_GATE.hold(tf32)
