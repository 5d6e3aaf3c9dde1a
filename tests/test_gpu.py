"""The GPU paths (CUDA, and Apple MPS where torch has it) against a float64 reference computed on
the CPU. Skipped where no GPU is present (GPU_TEST_DEVICES=cpu runs them with the CPU playing the
device, to check the tests themselves).

Tolerances (docs/PRECISION.md has the derivation). For each precision p with unit roundoff u_p
(fp32 2^-24; tf32, fp16 2^-11; bf16 2^-8), the device's error against float64 must stay within a
stated multiple of the error the CPU itself makes in the same format on the same input:

    max |A_dev - A_64|  <=  K_MAX * max(max |A_cpu,p - A_64|, u_p * max |A_64|)
    rms (A_dev - A_64)  <=  K_RMS * max(rms (A_cpu,p - A_64), u_p * rms A_64)

for the attention probabilities A of every layer and head, and the same for the logits, with
K_MAX = 4 and K_RMS = 2 (the second term, one rounding of every value, only guards against a CPU
error that happens to be tiny). Both errors are those of one algorithm in
one format; their size is (condition of the model at this input) x (roundings per value) x u_p.
The condition is shared; a GPU kernel may round up to twice as often as the CPU's (partial sums
stored in the format: split-K, reduced-precision reductions), hence K_RMS = 2; the maximum over
~10^5 values is one extreme sample of each error distribution and varies by up to 2x from one
input to another on the CPU itself (docs/PRECISION.md, table), hence K_MAX = 2 x 2. TF32 has no
CPU format: the CPU reference rounds the operands of every product and convolution to TF32 by
truncation (the larger error of the two roundings hardware may use), accumulating in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import available_devices, load_checkpoint, load_image, prepare_image
from model import device as D
from model.linear import unpack_linears
from model.resources import EXAMPLES_DIR
from viz_app import probes
from viz_app.pipeline import run_forward
from viz_app.results import analyze_image, gradient_map

DEVICES = [d for d in os.environ.get("GPU_TEST_DEVICES", "cuda,mps").split(",") if d in available_devices()]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not DEVICES, reason="no CUDA or MPS GPU on this machine")]

K_MAX = 4.0
K_RMS = 2.0
IMAGES = ("chelsea.jpg", "coffee.jpg")
PARAMS = [(d, p) for d in DEVICES for p in D.precisions_for(d)]


def tf32_truncate(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the TF32 value its top 19 bits hold (10 explicit mantissa bits), by truncation."""
    if t.dtype != torch.float32:
        return t
    return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


class EmulateTF32(TorchDispatchMode):
    """The CPU reference for tf32: the operands of every product and convolution rounded to TF32,
    sums in float32 (run it under no_grad, not inference_mode, so that linear and conv2d reach
    the dispatcher as mm/addmm/convolution)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            args = (tf32_truncate(args[0]), tf32_truncate(args[1]), *args[2:])
        elif name in ("addmm", "baddbmm"):
            args = (args[0], tf32_truncate(args[1]), tf32_truncate(args[2]), *args[3:])
        elif name == "convolution":
            args = (tf32_truncate(args[0]), tf32_truncate(args[1]), *args[2:])
        return func(*args, **(kwargs or {}))


@functools.cache
def _cpu():
    """The demo model on the CPU in float32, every linear on F.linear (packed weights would bypass
    the TF32 emulation), and a batch of two photos."""
    lm = load_checkpoint("demo", device="cpu", dtype="fp32")
    unpack_linears(lm.model)
    prepared = [prepare_image(load_image(EXAMPLES_DIR / name), lm.preprocessing) for name in IMAGES]
    return lm, prepared, torch.stack([p.pixels for p in prepared])


@functools.cache
def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attentions (B, L, H, T, T) and logits of the batch."""
    lm, _, x = _cpu()
    with torch.no_grad():
        out = copy.deepcopy(lm.model).double()(x.double(), output_attentions=True)
    return torch.stack(out.attentions, 1), out.logits


def _errors(attentions: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    a64, l64 = _reference()
    ea = (attentions.detach().cpu().double() - a64).abs()
    el = (logits.detach().cpu().double() - l64).abs()
    return {
        "attn_max": float(ea.max()),
        "attn_rms": float(ea.pow(2).mean().sqrt()),
        "logit_max": float(el.max()),
        "logit_rms": float(el.pow(2).mean().sqrt()),
    }


@functools.cache
def cpu_errors(precision: str) -> dict[str, float]:
    """The CPU's own error against float64 at a precision (tf32 emulated)."""
    lm, _, x = _cpu()
    model = copy.deepcopy(lm.model).to(D.PRECISIONS[precision])
    with torch.no_grad():
        if precision == "tf32":
            with EmulateTF32():
                out = model(x, output_attentions=True)
        else:
            out = model(x.to(D.PRECISIONS[precision]), output_attentions=True)
    return _errors(torch.stack(out.attentions, 1), out.logits)


def bounds(precision: str) -> dict[str, float]:
    """K times the CPU's own error, or K times one rounding of every value where that is larger
    (u_p times the reference's largest value for a maximum, times its RMS for an RMS)."""
    u = D.UNIT_ROUNDOFF[precision]
    a64, l64 = _reference()
    cpu = cpu_errors(precision)
    return {
        "attn_max": K_MAX * max(cpu["attn_max"], u * float(a64.abs().max())),
        "attn_rms": K_RMS * max(cpu["attn_rms"], u * float(a64.pow(2).mean().sqrt())),
        "logit_max": K_MAX * max(cpu["logit_max"], u * float(l64.abs().max())),
        "logit_rms": K_RMS * max(cpu["logit_rms"], u * float(l64.pow(2).mean().sqrt())),
    }


def _on(device: str, precision: str):
    """The demo model moved to the device in the precision (model.device.to_precision)."""
    lm, prepared, x = _cpu()
    model = D.to_precision(copy.deepcopy(lm.model), device, precision).eval().requires_grad_(False)
    return dataclasses.replace(lm, model=model), prepared, x.to(device, model.pos_embed.dtype)


def _skip_unsupported(device: str, precision: str) -> None:
    if device == "cuda" and precision == "tf32" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs an Ampere or newer GPU")
    if device == "mps" and precision == "bf16":
        try:
            torch.ones(1, device="mps", dtype=torch.bfloat16) + 1
        except (RuntimeError, TypeError) as e:
            pytest.skip(f"bf16 on this MPS: {e}")


@pytest.fixture
def process_allows_tf32():
    """The worst case for fp32: TF32 on for products and convolutions process-wide (cuDNN's
    default for convolutions, plus a library that called set_float32_matmul_precision("high"))."""
    saved = D.read_tf32_flags()
    D.write_tf32_flags(D._flags_for(True))
    yield
    D.write_tf32_flags(saved)


def _check(name: str, got: dict[str, float], bound: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(f"{k} {got[k]:.2e} (bound {bound[k]:.2e})" for k in got))
    over = {k: (got[k], bound[k]) for k in got if not got[k] <= bound[k]}
    assert not over, f"{name} over its bound: {over}"


@pytest.mark.parametrize("device,precision", PARAMS)
def test_maps_within_a_stated_multiple_of_the_cpus_own_error(device, precision, process_allows_tf32):
    _skip_unsupported(device, precision)
    lm, _, x = _on(device, precision)
    assert lm.model.precision == precision
    block = lm.model.new_attention_block(x.shape[0])  # the failing API: on the model's device
    assert block.device.type == device and block.dtype == lm.dtype
    fwd = run_forward(lm.model, x, attention_out=block)
    assert fwd.attentions.device.type == device and fwd.token_norms.device.type == device  # no trip to the host
    got = _errors(fwd.attentions, fwd.logits)
    _check(f"{device} {precision}", got, bounds(precision))
    if precision == "tf32":  # for the record: how far TF32 is from IEEE float32 here
        print(f"tf32 / fp32 CPU error (max): {got['attn_max'] / max(cpu_errors('fp32')['attn_max'], 1e-30):.0f}x")


@pytest.mark.parametrize("device,precision", PARAMS)
def test_the_padded_attention_sequence_is_within_the_same_bounds(device, precision):
    _skip_unsupported(device, precision)
    lm, _, x = _on(device, precision)
    lm.model.set_attention_sequence("padded")
    fwd = run_forward(lm.model, x, attention_out=lm.model.new_attention_block(x.shape[0]))
    _check(f"{device} {precision} padded", _errors(fwd.attentions, fwd.logits), bounds(precision))


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_loaded_in_each_precision_reports_it(device):
    for precision in D.precisions_for(device):
        _skip_unsupported(device, precision)
        lm = load_checkpoint("demo", device=device, dtype=precision)
        assert lm.device.type == device and lm.model.precision == precision


@pytest.mark.parametrize("device", DEVICES)
def test_every_analysis_runs_on_the_device(device):
    lm, prepared, x = _on(device, "fp32")
    c = lm.config
    result = analyze_image(lm, prepared[0])  # results come to the host only for display
    assert result.rollout.shape == c.grid
    assert gradient_map(lm, prepared[0], target=0).shape == c.grid
    grads = run_forward(lm.model, x, gradients=True)
    assert grads.grads.device.type == device and grads.grads.shape == grads.attentions.shape
    keep = torch.tensor([0, 5, 9, 30], device=device)
    tokens = c.num_prefix_tokens + len(keep)
    with torch.inference_mode():
        dropped = lm.model(x, keep=keep, attention_out=lm.model.new_attention_block(2, tokens=tokens))
    assert dropped.attention_stack.shape[-1] == tokens and dropped.attention_stack.device.type == device
    mask = probes.head_mask_for(c, [(1, 1), (2, 3)], device=device)
    drops = probes.head_effects(lm.model, x[:1], 0, heads=[(1, 2), (3, 1)], base_mask=mask)
    assert drops.shape == (2,) and torch.isfinite(torch.as_tensor(drops)).all()
    maps = {"r": torch.rand(2, *c.grid, generator=torch.Generator().manual_seed(0)).numpy()}
    curves = probes.faithfulness_curves(lm.model, x, maps, steps=3)
    assert curves.scores[("r", "deletion")].shape == (2, 4)
    rand = probes.randomized_model(lm.model, ["head", "block 0"])
    assert rand.precision == "fp32" and rand.pos_embed.device.type == device


@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA only (TF32)")
def test_fp32_and_tf32_sessions_at_once_each_keep_their_precision(process_allows_tf32):
    """Two sessions of a shared server in threads, one fp32 and one tf32: each within its own
    bound on every run (the TF32 flags are process-global; model/device.py, TF32_GATE)."""
    _skip_unsupported("cuda", "tf32")
    runs = {p: _on("cuda", p) for p in ("fp32", "tf32")}
    found: dict[str, list[dict[str, float]]] = {"fp32": [], "tf32": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def session(precision: str) -> None:
        lm, _, x = runs[precision]
        try:
            start.wait(timeout=60)
            for i in range(20):
                fwd = run_forward(lm.model, x, gradients=i % 4 == 0)
                found[precision].append(_errors(fwd.attentions, fwd.logits))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=session, args=(p,)) for p in found]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for precision, runs_found in found.items():
        assert len(runs_found) == 20
        worst = {k: max(r[k] for r in runs_found) for k in runs_found[0]}
        _check(f"cuda {precision} in a thread beside the other", worst, bounds(precision))
