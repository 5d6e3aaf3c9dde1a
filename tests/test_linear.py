"""Packed linear layers: the same numbers as F.linear, and never a stale or graph-less result."""

import pytest
import torch
import torch.nn.functional as F

from model import VisionTransformer, ViTConfig, load_checkpoint
from model.linear import ACTIVATIONS, Linear, pack_linears, packed_bytes, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear")


def _linear(dtype=torch.float32, seed=0, n_in=48, n_out=80):
    torch.manual_seed(seed)
    return Linear(n_in, n_out).to(dtype).requires_grad_(False)


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


def test_other_dtypes_are_not_packed_and_a_converted_layer_falls_back():
    assert not _linear(torch.float16).pack()
    lin = _linear()
    assert lin.pack()
    lin = lin.to(torch.bfloat16)  # the packed fp32 copy no longer describes the weight
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)


def test_loading_packs_on_the_cpu_within_the_memory_limit(tmp_path):
    from safetensors.torch import save_file

    m = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96,
                                    num_classes=5))  # fmt: skip
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
