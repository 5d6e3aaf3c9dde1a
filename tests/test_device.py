"""Issue 15, without a GPU: every tensor the project allocates follows the model's device and dtype
(checked on the meta device and by auditing every tensor factory call), "fp32" is IEEE float32
(TF32 only for the "tf32" precision, across threads), the attention sequences agree, and
benchmarks/bench_gpu.py runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import test_model
import torch
import torch.utils._device as torch_device
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from model import VisionTransformer, load_checkpoint, prepare_image
from model import device as D
from model import vit as V
from model.config import Preprocessing
from model.preprocess import load_image
from model.resources import EXAMPLES_DIR
from model.weights.load import LoadedModel
from viz_app import probes, report
from viz_app.pipeline import run_forward
from viz_app.results import analyze_image, gradient_map

ROOT = Path(__file__).resolve().parents[1]
# 17 tokens (odd: the "padded" attention sequence pads to 24); a conv stem so that convolutions run
TINY = dict(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96, num_classes=7)
STEM = dict(TINY, conv_stem=(8, 16))


def _model(seed=0, **kw) -> VisionTransformer:
    """test_model's small model (random prefix tokens and position embeddings), frozen."""
    return test_model._model(seed, **kw).requires_grad_(False)


def _x(batch=2, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _loaded(m: VisionTransformer) -> LoadedModel:
    c = m.config
    pre = Preprocessing(input_size=c.image_size)
    return LoadedModel(
        model=m, config=c, preprocessing=pre, labels=None, family="ViT", source="t", format="t", name="t"
    )


# --- the meta device: a model moved there runs without a single tensor on the CPU ----------------


def _old_new_attention_block(self, batch, *, device=None, dtype=None, tokens=None):
    """new_attention_block as it was before it followed the model (commit 8fe751c)."""
    return torch.empty(self._attention_block_shape(batch, tokens), device=device, dtype=dtype or self.pos_embed.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [TINY, STEM, dict(TINY, num_registers=2, pos_embed_prefix=1, layer_scale=True)])
def test_a_model_on_the_meta_device_runs_with_its_own_attention_block(kw, dtype):
    m = _model(**kw).to("meta", dtype)
    c = m.config
    block = m.new_attention_block(3)
    assert block.device.type == "meta" and block.dtype == dtype
    x = torch.empty(3, 3, 32, 32, device="meta", dtype=dtype)
    with torch.inference_mode():
        out = m(x, attention_out=block, output_token_norms=True, output_tokens=True)
        masked = m(x, head_mask=torch.ones(c.depth, c.num_heads), head_fill="mean")  # a mask made on the host
        fwd = run_forward(m, x, attention_out=block)
    for t in (out.logits, out.features, out.token_norms, out.tokens, out.attention_stack, masked.attention_stack):
        assert t.device.type == "meta" and t.dtype == dtype
    assert out.attention_stack.shape == (3, c.depth, c.num_heads, c.num_tokens, c.num_tokens)
    for t in (fwd.logits, fwd.attentions, fwd.token_norms, fwd.features):
        assert t.device.type == "meta" and t.dtype == torch.float32
    with torch.enable_grad():  # the autograd path allocates nothing on the host either
        g = m(x.requires_grad_(True), output_attentions=True)
        assert all(a.device.type == "meta" and a.requires_grad for a in g.attentions)


def test_the_meta_check_fails_on_a_block_allocated_on_the_default_device(monkeypatch):
    """The issue's failing API, on the meta device: the old new_attention_block put the block on
    the CPU whatever the model's device, and the forward refuses it."""
    monkeypatch.setattr(VisionTransformer, "new_attention_block", _old_new_attention_block)
    m = _model().to("meta")
    with torch.inference_mode(), pytest.raises(ValueError, match="attention_out must be"):
        m(torch.empty(2, 3, 32, 32, device="meta"), attention_out=m.new_attention_block(2))


# --- every factory call names its device ---------------------------------------------------------

CONSTRUCTORS = torch_device._device_constructors()  # torch.empty, zeros, ones, full, eye, arange, tensor, ...
# Factory calls that are known to make a host tensor on purpose without saying so (none now: a
# host tensor made on purpose says device="cpu").
KNOWN_HOST_TABLES: set[tuple[str, str]] = set()


class FactoryAudit(TorchFunctionMode):
    """Records every tensor factory call (torch.empty, zeros, arange, tensor, eye, ...) made from
    the given source folders without a device: on a model's GPU run such a tensor lands on the
    CPU. Tensor.new_* and *_like calls follow their tensor and are not factories here."""

    def __init__(self, folders=("model", "viz_app")) -> None:
        super().__init__()
        self.roots = [ROOT / f for f in folders]
        self.missing: list[tuple[str, str, int, str]] = []
        self.calls = 0  # factory calls seen, with a device or without

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += func in CONSTRUCTORS
        if func in CONSTRUCTORS and kwargs.get("device") is None:
            for frame in reversed(traceback.extract_stack()[:-1]):
                path = Path(frame.filename).resolve()
                if any(path.is_relative_to(r) for r in self.roots):
                    rel = path.relative_to(ROOT).as_posix()
                    self.missing.append((rel, frame.name, frame.lineno, func.__name__))
                    break
        return func(*args, **kwargs)

    def unexpected(self) -> list[str]:
        return sorted(
            {
                f"{f}:{line} ({name}): torch.{fn} without device="
                for f, name, line, fn in self.missing
                if (f, name) not in KNOWN_HOST_TABLES
            }
        )


def test_every_tensor_the_analyses_allocate_names_its_device():
    """The model's forward (block, keep indices, head masks), both run_forward paths, the page's
    analysis and gradient map, attribution maps, faithfulness curves in both removal modes,
    randomization (randomized_model) and head effects: no factory call without a device."""
    m = _model()
    lm = _loaded(m)
    c = m.config
    x = _x()
    prepared = prepare_image(load_image(EXAMPLES_DIR / "chelsea.jpg"), lm.preprocessing)
    options = report.rollout_options(c, report.Settings())
    audit = FactoryAudit()
    with audit:
        with torch.inference_mode():
            m(x, attention_out=m.new_attention_block(2), output_token_norms=True)
            keep = torch.tensor([0, 3, 5], device=x.device)
            m(x, keep=keep, attention_out=m.new_attention_block(2, tokens=c.num_prefix_tokens + 3))
            m(x, head_mask=probes.head_mask_for(c, [(1, 2)], device=x.device), head_fill="mean")
        fwd = run_forward(m, x, gradients=True)
        analyze_image(lm, prepared)
        gradient_map(lm, prepared, target=1)
        maps = probes.attribution_maps(lm, fwd, options)
        probes.faithfulness_curves(m, x, maps, steps=3)
        probes.faithfulness_curves(m, x, maps, steps=3, mode="pixels", head_mask=torch.ones(c.depth, c.num_heads))
        probes.randomization(m, x, lambda f: probes.attribution_maps(lm, f, options))
        probes.head_effects(m, x[:1], 1)
        probes.head_effects(m, x[:1], 1, base_mask=probes.head_mask_for(c, [(1, 1)]))
    assert audit.calls > 10, "the audit saw no factory call at all: it is not looking"
    assert audit.unexpected() == []


def test_the_audit_catches_a_missing_device(monkeypatch):
    monkeypatch.setattr(VisionTransformer, "new_attention_block", _old_new_attention_block)
    audit = FactoryAudit(folders=("model", "viz_app", "tests"))
    with audit:
        _model().new_attention_block(2)
    assert any(name == "_old_new_attention_block" and fn == "empty" for _, name, _, fn in audit.missing)


# --- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_every_output_follows_the_model_dtype(dtype):
    m = _model().to(dtype)
    c = m.config
    x = _x(dtype=dtype)
    assert m.new_attention_block(2).dtype == dtype
    with torch.inference_mode():
        outs = [
            m(x, attention_out=m.new_attention_block(2), output_token_norms=True, output_tokens=True),
            m(x, keep=torch.tensor([1, 2, 9]), head_mask=torch.ones(2, c.depth, c.num_heads), head_fill="mean"),
        ]
    with torch.enable_grad():
        outs.append(m(x.requires_grad_(True)))
    for out in outs:
        for t in (out.logits, out.features, out.token_norms, out.tokens, out.attention_stack, *out.attentions):
            assert t is None or t.dtype == dtype


def test_a_float64_default_dtype_changes_nothing_in_a_float32_model():
    """A float factory call without dtype= would make float64 temporaries here and promote the
    computation: the outputs would differ from a run under the usual default."""
    m = _model(**STEM)
    x = _x()
    c = m.config
    mask = torch.ones(c.depth, c.num_heads)
    maps = {"r": torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)).numpy()}

    def run():
        fwd = run_forward(m, x, gradients=True, head_mask=mask)
        curves = probes.faithfulness_curves(m, x, maps, steps=2, baselines=False)
        return fwd, curves, probes.head_effects(m, x[:1], 1)

    want = run()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run()
    finally:
        torch.set_default_dtype(before)
    for a, b in ((want[0].attentions, got[0].attentions), (want[0].grads, got[0].grads)):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    for k in want[1].scores:
        assert (want[1].scores[k] == got[1].scores[k]).all()
    assert (want[2] == got[2]).all()


# --- precisions ------------------------------------------------------------------------------------


def test_precision_names_and_dtypes():
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert D.resolve_dtype("tf32", cuda) == torch.float32 and D.resolve_precision("tf32", cuda) == "tf32"
    assert D.resolve_dtype("fp32", cpu) == torch.float32 and D.resolve_precision(torch.float32, cpu) == "fp32"
    assert D.resolve_dtype("bf16", cpu) == torch.bfloat16 and D.resolve_dtype("fp16", mps) == torch.float16
    assert D.precisions_for("cuda") == ["fp32", "tf32", "bf16", "fp16"]
    assert D.precisions_for("mps") == ["fp32", "bf16", "fp16"] and D.precisions_for("cpu") == ["fp32", "bf16"]
    for dev in (cpu, mps):
        with pytest.raises(ValueError, match="tf32 is a CUDA GPU format"):
            D.resolve_precision("tf32", dev)
    with pytest.raises(ValueError, match="only offered on a GPU"):
        D.resolve_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        D.resolve_dtype("fp8", cuda)
    assert [D.allows_tf32(p) for p in D.PRECISIONS] == [False, True, False, False]
    assert D.precision_name(torch.float32, tf32=True) == "tf32" and D.precision_name(torch.float64) == "float64"
    assert D.UNIT_ROUNDOFF == {"fp32": 2**-24, "tf32": 2**-11, "bf16": 2**-8, "fp16": 2**-11}


def test_a_model_reports_its_precision_and_keeps_it_through_randomization(monkeypatch):
    m = D.to_precision(_model(), "cpu", "fp32")
    assert m.precision == "fp32" and not m.allow_tf32
    assert D.to_precision(_model(), "cpu", "bf16").precision == "bf16"
    with pytest.raises(ValueError, match="tf32"):  # no TF32 on a CPU
        D.to_precision(_model(), "cpu", "tf32")
    with pytest.raises(ValueError, match="tf32"):
        load_checkpoint("demo", device="cpu", dtype="tf32")
    monkeypatch.setattr(D, "TF32_DEVICE_TYPES", frozenset({"cuda", "cpu"}))  # the CPU plays a CUDA GPU
    t = D.to_precision(_model(), "cpu", "tf32")
    assert t.precision == "tf32" and t.allow_tf32 and next(t.parameters()).dtype == torch.float32
    assert probes.randomized_model(t, ["head"]).precision == "tf32"
    assert probes.randomized_model(m, ["head"]).precision == "fp32"
    m.set_attention_sequence("padded")
    assert {b.attn.sequence for b in probes.randomized_model(m, ["block 0"]).blocks} == {"padded"}


def test_a_checkpoint_loaded_as_tf32_reports_it(monkeypatch):
    monkeypatch.setattr(D, "TF32_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    lm = load_checkpoint("demo", device="cpu", dtype="tf32")
    assert lm.model.precision == lm.precision == "tf32" and lm.dtype == torch.float32
    assert load_checkpoint("demo", device="cpu", dtype="fp32").model.precision == "fp32"


# products and convolutions as the dispatcher shows them (composite ones too, as in inference mode)
KERNELS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "conv2d", "convolution", "convolution_backward")


class FlagSpy(TorchDispatchMode):
    """Records, at every matrix product and convolution (forward and backward), whether a CUDA
    kernel launched at that moment could use TF32 (model.device.tf32_enabled)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, bool]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in KERNELS:
            self.seen.append((func.overloadpacket.__name__, D.tf32_enabled()))
        return func(*args, **(kwargs or {}))

    def kinds(self) -> set[str]:
        return {k for k, _ in self.seen}

    def all_flags(self, value: bool) -> bool:
        return bool(self.seen) and all(f == {"matmul": value, "conv": value} for _, f in self.seen)


@pytest.fixture
def tf32_process(monkeypatch):
    """A process where TF32 is on (cuDNN's default for convolutions, plus a library that called
    torch.set_float32_matmul_precision("high")), with the CPU treated as a CUDA device, so that the
    gate engages for CPU models and the flags their kernels would see can be checked."""
    monkeypatch.setattr(D, "TF32_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    saved = D.read_tf32_flags()
    D.write_tf32_flags(D._flags_for(True))
    assert D.tf32_enabled() == {"matmul": True, "conv": True}
    yield
    D.write_tf32_flags(saved)


def test_fp32_kernels_never_run_with_tf32_and_tf32_kernels_do(tf32_process):
    fp32 = _model(**STEM)
    tf32 = _model(**STEM)
    tf32.allow_tf32 = True
    x = _x()
    for model, want in ((fp32, False), (tf32, True)):
        spies = [FlagSpy() for _ in range(3)]
        with spies[0], torch.inference_mode():
            model(x, attention_out=model.new_attention_block(2))
        with spies[1]:
            run_forward(model, x, gradients=True)  # forward and backward kernels
        with spies[2]:
            probes.head_effects(model, x[:1], 1)  # blocks run one by one, not through forward
        assert {"conv2d", "linear", "bmm", "baddbmm"} <= spies[0].kinds()
        assert len(spies[1].seen) > len(spies[0].seen)  # the backward's products were seen too
        for spy in spies:
            assert spy.all_flags(want), [s for s in spy.seen if s[1] != {"matmul": want, "conv": want}][:3]
        assert D.tf32_enabled() == {"matmul": True, "conv": True}  # the process's flags are back


def test_bf16_and_cpu_models_leave_the_flags_alone(monkeypatch):
    saved = D.read_tf32_flags()
    calls = []
    monkeypatch.setattr(D, "write_tf32_flags", lambda f: calls.append(f))
    m = _model()
    with torch.inference_mode():
        m(_x())  # a CPU model: no kernel of the CPU reads the CUDA flags
        monkeypatch.setattr(D, "TF32_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
        m.to(torch.bfloat16)(_x(dtype=torch.bfloat16))  # TF32 flags concern float32 kernels only
    assert calls == [] and D.read_tf32_flags() == saved


def test_fp32_and_tf32_sessions_in_threads_each_get_their_own_flags(tf32_process):
    """Two sessions of a shared server, one fp32 and one tf32, running at once: every kernel of
    each sees its own setting (flags set per call without the gate would leak between them)."""
    fp32, tf32 = _model(**STEM), _model(**STEM)
    tf32.allow_tf32 = True
    x = _x()
    start = threading.Barrier(3)
    spies: dict[str, FlagSpy] = {}
    errors: list[BaseException] = []

    def session(name, model, gradients):
        spy = spies[name] = FlagSpy()
        try:
            start.wait(timeout=30)
            with spy:
                for _ in range(12):
                    run_forward(model, x, gradients=gradients)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=session, args=("fp32", fp32, False)),
        threading.Thread(target=session, args=("tf32", tf32, True)),
        threading.Thread(target=session, args=("fp32 grad", fp32, True)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert spies["fp32"].all_flags(False) and spies["fp32 grad"].all_flags(False)
    assert spies["tf32"].all_flags(True)
    assert D.tf32_enabled() == {"matmul": True, "conv": True}


def test_the_gate_is_reentrant_fair_and_restores_the_flags():
    gate = D.TF32Gate()
    saved = D.read_tf32_flags()
    with gate.hold(False):
        assert D.tf32_enabled() == {"matmul": False, "conv": False}
        with gate.hold(False):  # a forward inside run_forward's scope
            pass
        with pytest.raises(RuntimeError, match="cannot run inside"), gate.hold(True):
            pass
    assert D.read_tf32_flags() == saved
    with pytest.raises(KeyError), gate.hold(True):
        {}["a forward that fails"]
    assert D.read_tf32_flags() == saved

    order: list[str] = []
    release = threading.Event()
    held = threading.Event()

    def run(name, mode, wait=None):
        with gate.hold(mode):
            order.append(name)
            held.set()
            if wait is not None:
                wait.wait(timeout=30)

    first = threading.Thread(target=run, args=("fp32 first", False, release))
    first.start()
    assert held.wait(timeout=30)
    other = threading.Thread(target=run, args=("tf32", True))
    other.start()
    deadline = time.monotonic() + 30
    while gate._waiting[True] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    late = threading.Thread(target=run, args=("fp32 late", False))  # must not overtake the tf32 waiter
    late.start()
    time.sleep(0.2)
    assert order == ["fp32 first"]
    release.set()
    for t in (first, other, late):
        t.join(timeout=30)
    assert order == ["fp32 first", "tf32", "fp32 late"]
    assert D.read_tf32_flags() == saved


# --- attention sequences ---------------------------------------------------------------------------


def test_every_attention_path_gives_the_same_maps(monkeypatch):
    """In place into the block, out of place with a copy (MPS), and with autograd: bit for bit."""
    m = _model(**STEM)
    x = _x()
    plain = run_forward(m, x, attention_out=m.new_attention_block(2))
    grad = run_forward(m, x, gradients=True)
    monkeypatch.setattr(V, "INPLACE_SOFTMAX_DEVICES", frozenset())
    copied = run_forward(m, x, attention_out=m.new_attention_block(2))
    for f in (grad, copied):
        assert torch.equal(f.attentions, plain.attentions) and torch.equal(f.logits, plain.logits)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("image_size", [32, 40])  # 17 tokens (padded to 24) and 26
def test_the_padded_sequence_gives_the_direct_maps(dtype, tol, image_size):
    m = _model(image_size=image_size).to(dtype)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    direct = run_forward(m, x, attention_out=m.new_attention_block(2))
    m.set_attention_sequence("padded")
    padded = run_forward(m, x, attention_out=m.new_attention_block(2))
    assert padded.attentions.shape == direct.attentions.shape
    # the same products and softmax, the rows summed over 8 more zeros: rounding apart
    torch.testing.assert_close(padded.attentions, direct.attentions, atol=tol, rtol=0)
    torch.testing.assert_close(padded.logits, direct.logits, atol=4 * tol * float(direct.logits.abs().max()), rtol=0)
    assert torch.allclose(padded.attentions.sum(-1), torch.ones(()), atol=4 * tol)
    with pytest.raises(ValueError, match="attention sequence"):
        m.set_attention_sequence("flash")


# --- the GPU benchmark, run on the CPU -------------------------------------------------------------

BENCH_SECTIONS = (
    "== machine",
    "== ViT-B/16 224 fp32",
    "== ViT-B/16 224 bf16",
    "== ViT-L/14 518",
    "== batch CLI",
    "== tests/test_gpu.py",
    "== summary",
)


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--device", "cpu", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in BENCH_SECTIONS:
        assert section in proc.stdout, section
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["quick"] is True
    assert {"vit_b16_fp32", "vit_b16_bf16", "vit_l14_518", "cli", "test_gpu"} <= set(record)
