"""Packed linear layers: the same numbers as F.linear, and never a stale or graph-less result;
where torch's private oneDNN internals are missing or differ, a logged fallback to F.linear."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from model import VisionTransformer, ViTConfig, _onednn, load_checkpoint
from model.linear import ACTIVATIONS, Linear, pack_linears, packed_bytes, packing_available, unpack_linears

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no usable oneDNN linear")


def _small_config(**kw) -> ViTConfig:
    return ViTConfig(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96, num_classes=5, **kw)


def _linear(dtype=torch.float32, seed=0, n_in=48, n_out=80):
    torch.manual_seed(seed)
    return Linear(n_in, n_out).to(dtype).requires_grad_(False)


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
def test_packed_matches_f_linear(dtype, tol, activation):
    lin = _linear(dtype)
    x = torch.randn(2, 7, 48).to(dtype)
    want = F.linear(x, lin.weight, lin.bias)
    want = want if activation is None else ACTIVATIONS[activation](want)
    assert lin.pack()
    with torch.inference_mode():
        got = lin(x, activation=activation)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@needs_onednn
def test_an_edited_weight_is_never_served_from_the_stale_copy():
    lin = _linear()
    assert lin.pack()
    x = torch.randn(5, 48)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: same storage, new version
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
    lin.weight = torch.nn.Parameter(torch.randn(80, 48), requires_grad=False)  # a new tensor
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)


@needs_onednn
def test_autograd_goes_through_f_linear():
    lin = _linear()
    assert lin.pack()
    x = torch.randn(4, 48, requires_grad=True)
    y = lin(x, activation="gelu")
    assert y.grad_fn is not None
    (g,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().requires_grad_(True)
    (want,) = torch.autograd.grad(F.gelu(F.linear(x2, lin.weight, lin.bias)).sum(), x2)
    torch.testing.assert_close(g, want)


@needs_onednn
def test_other_dtypes_are_not_packed_and_a_converted_layer_falls_back():
    assert not _linear(torch.float16).pack()
    lin = _linear()
    assert lin.pack()
    lin = lin.to(torch.bfloat16)  # the packed fp32 copy no longer describes the weight
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)


@needs_onednn
def test_loading_packs_on_the_cpu_within_the_memory_limit(tmp_path):
    from safetensors.torch import save_file

    m = VisionTransformer(_small_config())
    m.init_weights(seed=0)
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    lm = load_checkpoint(tmp_path / "m.safetensors", overrides={"num_heads": 3})
    linears = [mod for mod in lm.model.modules() if isinstance(mod, Linear)]
    assert linears and all(mod.packed is not None for mod in linears)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        packed = lm.model(x)
    with torch.enable_grad():  # the unpacked path, same weights
        plain = lm.model(x)
    torch.testing.assert_close(packed.logits, plain.logits.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(packed.attentions, plain.attentions):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)

    fresh = VisionTransformer(lm.config)
    assert pack_linears(fresh, max_bytes=packed_bytes(fresh) - 1) == 0
    assert all(mod.packed is None for mod in fresh.modules() if isinstance(mod, Linear))


@needs_onednn
def test_copies_and_pickles_leave_the_packed_copy_behind():
    import copy
    import io

    lin = _linear()
    assert lin.pack()
    x = torch.randn(3, 48)
    twin = copy.deepcopy(lin)
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert lin.packed is not None and twin.packed is None and loaded.packed is None
    with torch.no_grad():
        for other in (twin, loaded):
            torch.testing.assert_close(other(x), lin(x), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_replaced_or_restrided_or_converted_weight_is_never_served_from_the_copy():
    x = torch.randn(3, 48)
    lin = _linear(n_out=48)
    assert lin.pack()
    del lin.weight  # the old storage stays held by the copy: the new one cannot take its address
    lin.weight = torch.nn.Parameter(torch.randn(48, 48), requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
    assert lin.pack()
    lin.weight.data = lin.weight.data.t()  # same storage and address, other strides
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
    lin.weight.data = lin.weight.data.contiguous()
    assert lin.pack()
    lin.double().float()  # conversions drop the copy
    assert lin.packed is None


@needs_onednn
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func imports torch.jit.script
def test_forward_ad_functorch_and_autocast_bypass_the_copy():
    import torch.autograd.forward_ad as fwAD

    lin = _linear()
    assert lin.pack()
    x, t = torch.randn(2, 48), torch.randn(2, 48)
    with torch.no_grad():
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(lin(fwAD.make_dual(x, t))).tangent
        torch.testing.assert_close(tangent, t @ lin.weight.T)
        _, jvp_tangent = torch.func.jvp(lin, (x,), (t,))
        torch.testing.assert_close(jvp_tangent, t @ lin.weight.T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(x).dtype == F.linear(x, lin.weight, lin.bias).dtype == torch.bfloat16


# Fallback: torch's private oneDNN internals missing or behaving differently -----------------------


def _fake_linear_without_post_ops(x, w, b, attr, scalars, algorithm):
    """A _linear_pointwise whose fused GELU does nothing (an op that changed its behaviour)."""
    return _REAL_LINEAR(x, w, b, "none", [], "")


_REAL_LINEAR = getattr(torch.ops.mkldnn, _onednn.LINEAR_OP, None)

BREAKAGES = {
    "linear op missing": lambda mp: mp.setattr(_onednn, "LINEAR_OP", "_linear_pointwise_removed"),
    "reorder op missing": lambda mp: mp.setattr(_onednn, "REORDER_OP", "_reorder_linear_weight_removed"),
    "linear op ignores its post-op": lambda mp: mp.setattr(
        torch.ops.mkldnn, "_linear_pointwise", _fake_linear_without_post_ops
    ),
    "linear op raises": lambda mp: mp.setattr(torch.ops.mkldnn, "_linear_pointwise", _raise),
    "version attribute missing": lambda mp: mp.setattr(_onednn, "VERSION_ATTR", "_version_removed"),
    "version does not count edits": lambda mp: mp.setattr(_onednn, "VERSION_ATTR", "ndim"),
    "forward-AD level missing": lambda mp: mp.delattr(forward_ad, "_current_level"),
    "functorch probe missing": lambda mp: mp.delattr(torch._C._functorch, "peek_interpreter_stack"),
    "functorch probe always None": lambda mp: mp.setattr(torch._C._functorch, "peek_interpreter_stack", lambda: None),
}


def _raise(*args, **kwargs):
    raise RuntimeError("Fusion behavior undefined.\nsecond line of a long torch message")


@pytest.fixture
def reprobe(monkeypatch):
    """The adapter's probe, to run again under a test's patches; after the test the patches go and
    the adapter is probed once more, so that later tests see the real torch."""
    yield _onednn.refresh
    monkeypatch.undo()
    _onednn.refresh()


def _fallback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == _onednn.__name__]


def test_the_real_torch_passes_the_check_silently(reprobe, caplog):
    with caplog.at_level(logging.INFO, logger=_onednn.__name__):
        backend = reprobe()
    assert not _fallback_records(caplog)
    assert (backend is not None) == packing_available() == torch.backends.mkldnn.is_available()


@needs_onednn
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_internals_fall_back_to_f_linear_with_one_log_line(breakage, tmp_path, monkeypatch, reprobe, caplog):
    m = VisionTransformer(_small_config(act="gelu_tanh"))  # a fused GELU in every MLP
    m.init_weights(seed=1)
    from safetensors.torch import save_file

    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    normal = load_checkpoint(tmp_path / "m.safetensors", overrides={"num_heads": 3}).model
    assert all(mod.packed is not None for mod in normal.modules() if isinstance(mod, Linear))
    with torch.inference_mode():
        packed = normal(x)
        unpack_linears(normal)
        plain = normal(x)  # the same weights on F.linear

    BREAKAGES[breakage](monkeypatch)  # stays in place while the fallback runs
    with caplog.at_level(logging.INFO, logger=_onednn.__name__):
        assert reprobe() is None
    records = _fallback_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING and "\n" not in message and message.endswith("using F.linear")
    assert not packing_available()

    fallback = load_checkpoint(tmp_path / "m.safetensors", overrides={"num_heads": 3}).model
    built = VisionTransformer(fallback.config)
    linears = [mod for model in (fallback, built) for mod in model.modules() if isinstance(mod, Linear)]
    assert pack_linears(built) == 0 and not any(mod.pack() for mod in linears)
    assert all(mod.packed is None for mod in linears)
    with torch.inference_mode():
        got = fallback(x)
    torch.testing.assert_close(got.logits, plain.logits, atol=0, rtol=0)
    torch.testing.assert_close(got.logits, packed.logits, atol=1e-5, rtol=1e-5)
    for a, b, c in zip(got.attentions, plain.attentions, packed.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    with torch.enable_grad():  # autograd works with the private internals broken, too
        y = fallback.blocks[0].mlp.fc1(torch.randn(3, 48, requires_grad=True), activation="gelu")
    assert y.grad_fn is not None


def test_a_torch_without_onednn_logs_one_info_line(monkeypatch, reprobe, caplog):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger=_onednn.__name__):
        assert reprobe() is None
    records = _fallback_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.INFO and "\n" not in records[0].getMessage()
    lin = _linear()
    assert not lin.pack() and lin.packed is None
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            lin(x, activation="quick_gelu"),
            ACTIVATIONS["quick_gelu"](F.linear(x, lin.weight, lin.bias)),
            atol=0,
            rtol=0,
        )


def test_config_accepts_exactly_the_activations_linear_implements():
    for name in ACTIVATIONS:
        assert ViTConfig(act=name).act == name
    with pytest.raises(ValueError, match="act must be one of"):
        ViTConfig(act="relu")
