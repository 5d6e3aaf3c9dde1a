"""Every private torch internal that the packed linear layers (model/linear.py) use, in one place.

torch has no public call that multiplies by a weight oneDNN has reordered once (benchmarks/bench_linear.py
measures the public routes), so the fast CPU path needs these, none of which is a public API:

    torch.ops.mkldnn._reorder_linear_weight    reorder a weight once into oneDNN's blocked layout
    torch.ops.mkldnn._linear_pointwise         multiply by it, optionally with GELU fused in
    Tensor._version                            counts in-place edits, so a stale copy is never used
    torch.autograd.forward_ad._current_level   >= 0 while forward-mode AD is on
    torch._C._functorch.peek_interpreter_stack not None inside a functorch transform (vmap, jvp, ...)

At import, probe() checks that each exists and behaves as expected: the version counter moves on an
in-place edit, the forward-AD level and the functorch stack change inside dual_level() and vmap,
and the packed op reproduces F.linear (plain and with each fused GELU) on a tiny product. If
anything is missing or differs, one line is logged and BACKEND is None: nothing gets packed and
every layer runs on F.linear, which gives the same numbers, only slower.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

log = logging.getLogger(__name__)

# The names probe() looks up (module attributes, so that a test can point one at nothing).
REORDER_OP = "_reorder_linear_weight"
LINEAR_OP = "_linear_pointwise"
VERSION_ATTR = "_version"
FORWARD_AD_LEVEL_ATTR = "_current_level"
FUNCTORCH_PEEK = "peek_interpreter_stack"

# What probe() catches: a missing op or attribute, an op with another signature, a failing kernel.
_PROBE_ERRORS = (AttributeError, RuntimeError, TypeError, ValueError, IndexError)


class OneDNN:
    """Handles on the private ops and probes, made only by probe() once they passed its checks."""

    def __init__(self) -> None:
        self._reorder = getattr(torch.ops.mkldnn, REORDER_OP)
        self._linear = getattr(torch.ops.mkldnn, LINEAR_OP)
        self.version = operator.attrgetter(VERSION_ATTR)  # Tensor -> its in-place edit counter
        self._peek = getattr(torch._C._functorch, FUNCTORCH_PEEK)
        self._level_attr = FORWARD_AD_LEVEL_ATTR  # a module global that changes: read on every call

    def reorder(self, weight: Tensor) -> Tensor:
        """An opaque copy of a (out, in) weight in oneDNN's layout, for linear()."""
        return self._reorder(weight)

    def linear(self, x: Tensor, packed: Tensor, bias: Tensor | None, attr: str = "none", algorithm: str = "") -> Tensor:
        """x (M, in) @ packed^T + bias, then the post-op: attr "none", or "gelu" with algorithm
        "none" (erf) or "tanh"."""
        return self._linear(x, packed, bias, attr, [], algorithm)

    def plain_inference(self) -> bool:
        """No reverse- or forward-mode autograd, functorch transform or CPU autocast is active."""
        return (
            not torch.is_grad_enabled()
            and getattr(forward_ad, self._level_attr) < 0
            and self._peek() is None
            and not torch.is_autocast_enabled("cpu")
        )


def _check(b: OneDNN) -> str | None:
    """Why b cannot be trusted, or None."""
    t = torch.zeros(2)
    before = b.version(t)
    t.add_(1)
    if not isinstance(before, int) or not b.version(t) > before or b.version(t.detach()) != b.version(t):
        return f"Tensor.{VERSION_ATTR} does not count in-place edits"
    outside = getattr(forward_ad, b._level_attr)
    with forward_ad.dual_level():
        inside = getattr(forward_ad, b._level_attr)
    if not (isinstance(outside, int) and outside < 0 <= inside):
        return f"forward_ad.{FORWARD_AD_LEVEL_ATTR} does not tell when forward-mode AD is on"
    seen = []
    torch.func.vmap(lambda v: (seen.append(b._peek()), v)[1])(torch.zeros(2, 1))
    if b._peek() is not None or len(seen) != 1 or seen[0] is None:
        return f"torch._C._functorch.{FUNCTORCH_PEEK} does not tell when a transform is on"
    g = torch.Generator().manual_seed(0)
    w, bias, x = torch.randn(8, 16, generator=g), torch.randn(8, generator=g), torch.randn(3, 16, generator=g)
    packed = b.reorder(w)
    want = F.linear(x, w, bias)
    for attr, algorithm, ref in (
        ("none", "", want),
        ("gelu", "none", F.gelu(want)),
        ("gelu", "tanh", F.gelu(want, approximate="tanh")),
    ):
        got = b.linear(x, packed, bias, attr, algorithm)
        if got.shape != ref.shape or got.dtype != ref.dtype or not torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
            return f"mkldnn.{LINEAR_OP} ({attr}, {algorithm or 'none'}) disagrees with F.linear"
    return None


def probe() -> OneDNN | None:
    """Resolve and check the private internals; None (after one log line) where they cannot be used."""
    if not torch.backends.mkldnn.is_available():
        log.info("torch %s is built without oneDNN: linear layers run on F.linear", torch.__version__)
        return None
    try:
        b = OneDNN()
        reason = _check(b)
    except _PROBE_ERRORS as e:
        first = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {first[0] if first else ''}"
    if reason is not None:
        log.warning("oneDNN packed linear layers off on torch %s (%s); using F.linear", torch.__version__, reason)
        return None
    return b


def refresh() -> OneDNN | None:
    """Probe again (after torch has been patched, as the tests do) and return the new BACKEND."""
    global BACKEND
    BACKEND = probe()
    return BACKEND


BACKEND: OneDNN | None = probe()
