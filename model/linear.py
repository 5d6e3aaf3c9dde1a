"""Linear layers that can run on a oneDNN-packed copy of their weight.

On the CPU, F.linear goes through a generic GEMM that re-lays-out the weight on every call, and on
some CPUs (MKL on AMD) through a slow path. oneDNN can reorder the weight once into its own blocked
layout and then multiply with it directly, optionally with GELU fused into the output. That is
what pack_linears does, once, when a model is loaded; the forward pass only reads the packed copy.

A packed copy is used only in plain inference (no autograd, forward-mode AD, functorch transform
or autocast), for an input on the CPU in the packed dtype, and while the weight is the tensor it
was made from: same storage, shape, strides and version counter. The storage is held, so its
address cannot pass to another tensor. In-place edits through the parameter and
load_state_dict bump its version; .to(), .float(), .cuda() drop the copy. The loaded model is
otherwise treated as frozen: writes that bypass the version counter (through .data or a numpy
view) are not seen, so call pack_linears again after them. Parameters and state dict are those
of nn.Linear.

The private torch calls this takes (the packing ops, the version counter, the forward-AD and
functorch probes) all go through model/_onednn.py, which checks them once at import; where they
are missing or behave differently it logs one line, nothing is packed and every layer runs on
F.linear. torch has no public route as fast (benchmarks/bench_linear.py, BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _onednn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# The activations a model may use, by the name ViTConfig.act gives (the one list of them: config.py
# validates against these keys).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": gelu_tanh,  # JAX's default
    "quick_gelu": quick_gelu,  # CLIP
}
# activation -> oneDNN post-op (attr, algorithm); others are applied after the packed product
FUSED = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


@dataclass(frozen=True)
class PackedWeight:
    """A weight reordered for oneDNN, the weight it was made from (an alias that keeps its
    storage alive: an equal address is then the same storage), and the backend that made it."""

    tensor: Tensor
    source: Tensor
    version: int
    backend: _onednn.OneDNN

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def matches(self, weight: Tensor) -> bool:
        s = self.source
        return (
            weight.data_ptr() == s.data_ptr()
            and self.backend.version(weight) == self.version
            and weight.dtype == s.dtype
            and weight.shape == s.shape
            and weight.stride() == s.stride()
        )


def packing_available() -> bool:
    """The private oneDNN ops and probes passed their check at import (model/_onednn.py)."""
    return _onednn.BACKEND is not None


class Linear(nn.Linear):
    """nn.Linear with an optional fused activation and an optional packed weight (see module doc)."""

    packed: PackedWeight | None = None  # set by pack(), never during forward

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        p = self.packed
        if (
            p is not None
            and x.device.type == "cpu"
            and x.dtype == p.dtype
            and p.matches(self.weight)
            and p.backend.plain_inference()
        ):
            return self._packed_forward(p, x, activation)
        y = F.linear(x, self.weight, self.bias)
        return y if activation is None else ACTIVATIONS[activation](y)

    def _packed_forward(self, p: PackedWeight, x: Tensor, activation: str | None) -> Tensor:
        attr, algorithm = FUSED.get(activation, ("none", ""))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = p.backend.linear(x2, p.tensor, self.bias, attr, algorithm)
        y = y.view(*lead, y.shape[-1])
        if activation is not None and activation not in FUSED:
            y = ACTIVATIONS[activation](y)
        return y

    @torch.no_grad()
    def pack(self) -> bool:
        """Make the packed copy and check it against F.linear on a small input; False where the
        weight is not on the CPU, not float32/bfloat16, the oneDNN ops failed their check at import,
        or the check here fails (nothing is packed)."""
        self.packed = None
        w = self.weight
        backend = _onednn.BACKEND
        if w.device.type != "cpu" or w.dtype not in PACKABLE_DTYPES or not w.is_contiguous() or backend is None:
            return False
        try:
            candidate = PackedWeight(backend.reorder(w), w.detach(), backend.version(w), backend)
            x = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0), device="cpu").to(w.dtype)
            got = self._packed_forward(candidate, x, None).float()
        except RuntimeError as e:  # an op this build or CPU lacks
            log.info("linear weight not packed: %s", e)
            return False
        want = F.linear(x, w, self.bias).float()
        tol = (1e-4 if w.dtype == torch.float32 else 3e-2) * (1.0 + float(want.abs().max()))
        if not bool((got - want).abs().max() <= tol):
            log.warning("packed linear weight disagrees with F.linear; using F.linear")
            return False
        self.packed = candidate
        return True

    def unpack(self) -> None:
        self.packed = None

    def _apply(self, fn, recurse=True):
        self.packed = None  # .to(), .float(), .cuda(), ...: the weight becomes another tensor
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed copy behind (an opaque oneDNN tensor, and a cache
        of this object's own weight): they run on F.linear until packed themselves."""
        state = dict(super().__getstate__())
        state.pop("packed", None)
        return state


def packed_bytes(model: nn.Module) -> int:
    """Bytes the packed copies would take (they are a second copy of every linear weight)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))


def pack_linears(model: nn.Module, *, max_bytes: int = 512 * 2**20) -> int:
    """Pack every Linear of a CPU model for inference, unless the copies would take more than
    max_bytes (they double the linear weights' memory). Call it once after loading, before the
    model is shared; returns how many layers were packed."""
    if packed_bytes(model) > max_bytes:
        return 0
    return sum(m.pack() for m in model.modules() if isinstance(m, Linear))


def unpack_linears(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Linear):
            m.unpack()
