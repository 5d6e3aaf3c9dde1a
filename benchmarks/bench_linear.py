"""Public routes to a fast CPU linear layer against the private oneDNN-packed one (model/linear.py).

python -m benchmarks.bench_linear [--repeats 3] [--batches 1 8] [--routes ROUTE ...] [--autotune] [--skip-layers]

All routes at batch 1 and 8 take about 6 minutes on 2 cores, half of it compiling; --routes runs
some (none: only the tables before the routes).

Random ViT-B/16 weights, 224 x 224, fp32, the forward pass returning all attention maps, under
torch.no_grad (where the packed path runs). Each route runs in a fresh process (torch.compile and
TorchScript leave global state and caches behind; each gets an empty inductor cache, so its
compile time is a cold one) next to the private packed forward of the same weights, the two timed
in alternation, best of --repeats each: on a noisy shared machine compare the ratio route/packed
of one process, not times from different ones. Each route's first call (compilation, tracing) is
timed on its own, and its outputs are compared with the packed forward's.

Routes (the private packed forward is the reference in every process):
  f_linear          plain F.linear: the model with nothing packed. Public.
  mkldnn_flags      F.linear inside torch.backends.mkldnn.flags(enabled=True). Public.
  onednn_bf16       torch.backends.mkldnn.matmul.fp32_precision = "bf16": fp32 F.linear goes to
                    oneDNN's matmul (weight not packed), allowed to compute in bf16. Public, but a
                    process-wide switch whose accuracy depends on the CPU (where oneDNN takes up
                    the offer, as with AMX, the maps are bf16-accurate; see the attention column).
  compile           torch.compile, inductor on the CPU, dynamic=False. Public.
  compile_freezing  the same with inductor freezing (TORCHINDUCTOR_FREEZING=1, the documented
                    switch; options={"freezing": True} is not enough, dynamo reads the global):
                    weights folded in as constants, fp32 ones prepacked for MKL (oneDNN's packing
                    is used only for bf16 or with fp32_precision "bf16"/"tf32"). Public.
  compile_autotune  freezing and mode="max-autotune" (inductor's C++ GEMM template against MKL);
                    only with --autotune: its compilation benchmarks every GEMM shape.
  jit_freeze        torch.jit.trace, torch.jit.freeze, torch.jit.optimize_for_inference.
                    Deprecated since torch 2.5 (TorchScript).
  to_mkldnn         torch.utils.mkldnn.to_mkldnn: swaps every nn.Linear for a TorchScript
                    MkldnnLinear (no fused activation: our MLP cannot call it); its speed per
                    layer is in the first table.
Before them: the four linear layers of a ViT-B/16 block on their own (F.linear, packed,
MkldnnLinear), and how many oneDNN primitives one fp32 F.linear runs under each switch
(torch.backends.mkldnn.verbose): none means it does not go through oneDNN at all.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ("f_linear", "mkldnn_flags", "onednn_bf16", "compile", "compile_freezing", "jit_freeze", "to_mkldnn")
# what a route that does not work raises (dynamo's and TorchScript's errors are RuntimeErrors)
ROUTE_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, AssertionError)
ENV = {"compile_freezing": {"TORCHINDUCTOR_FREEZING": "1"}, "compile_autotune": {"TORCHINDUCTOR_FREEZING": "1"}}
# (name, in, out, activation) of the linear layers of one ViT-B/16 block
BLOCK_LINEARS = (
    ("qkv", 768, 2304, None),
    ("proj", 768, 768, None),
    ("fc1", 768, 3072, "gelu"),
    ("fc2", 3072, 768, None),
)


def cpu_details() -> str:
    """CPU family, model and clock from /proc/cpuinfo: machines that print the same model name
    (a KVM guest's "AMD EPYC") can be different generations."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU details"
    f = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}
    return f"cpu family {f.get('cpu family', '?')}, model {f.get('model', '?')}, {f.get('cpu MHz', '?')} MHz"


def library_versions() -> str:
    cfg = torch.__config__.show()
    found = [
        line.strip(" -") for line in cfg.splitlines() if "Math Kernel Library Version" in line or "MKL-DNN v" in line
    ]
    return "; ".join(found) or "no MKL or oneDNN listed"


def interleaved_best(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function, calling them in turn (load on a shared machine then hits
    them alike); one untimed call each first."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def onednn_primitives(fn) -> int:
    """How many oneDNN primitives fn() executes (oneDNN's verbose log, which it prints to fd 1)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return sum(",primitive,exec," in line for line in f.read().decode(errors="replace").splitlines())


@contextlib.contextmanager
def mkldnn_fp32_precision(value: str):
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


@contextlib.contextmanager
def mkldnn_enabled():
    with warnings.catch_warnings():  # flags() also sets allow_tf32, which warns that it is for Intel GPUs
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=True):
            yield


def gemm_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n^3 fp32 GEMM: torch.mm (MKL here) and the packed oneDNN product."""
    from model import _onednn

    a, b = torch.randn(n, n), torch.randn(n, n)
    fns = {"torch.mm": lambda: torch.mm(a, b)}
    if _onednn.BACKEND is not None:
        packed = _onednn.BACKEND.reorder(b.t().contiguous())
        fns["packed oneDNN"] = lambda: _onednn.BACKEND.linear(a, packed, None)
    return {k: 2 * n**3 / t / 1e9 for k, t in interleaved_best(fns, repeats).items()}


def routing_section() -> dict[str, int]:
    x, w, b = torch.randn(197, 768), torch.randn(3072, 768), torch.randn(3072)
    with torch.no_grad():
        out = {"default flags": onednn_primitives(lambda: F.linear(x, w, b))}
        with mkldnn_enabled():
            out["mkldnn.flags(enabled=True)"] = onednn_primitives(lambda: F.linear(x, w, b))
        with mkldnn_fp32_precision("bf16"):
            out['mkldnn.matmul.fp32_precision = "bf16"'] = onednn_primitives(lambda: F.linear(x, w, b))
        from model import _onednn

        if _onednn.BACKEND is not None:
            packed = _onednn.BACKEND.reorder(w)
            out["packed (private)"] = onednn_primitives(lambda: _onednn.BACKEND.linear(x, packed, b))
    return out


def layers_section(batches: list[int], repeats: int) -> dict:
    """Each linear layer of a ViT-B/16 block on its own: F.linear, the packed layer, MkldnnLinear."""
    from torch.utils.mkldnn import to_mkldnn

    from model.linear import ACTIVATIONS, Linear

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, n_in, n_out, act in BLOCK_LINEARS:
        lin = Linear(n_in, n_out).requires_grad_(False)
        packed = Linear(n_in, n_out).requires_grad_(False)
        packed.load_state_dict(lin.state_dict())
        packed.pack()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript deprecation
            plain = torch.nn.Linear(n_in, n_out).requires_grad_(False)
            plain.load_state_dict(lin.state_dict())
            mk = to_mkldnn(torch.nn.Sequential(plain))[0]
        f_act = ACTIVATIONS[act] if act else (lambda y: y)
        for batch in batches:
            x = torch.randn(batch * 197, n_in, generator=gen)
            with torch.no_grad():
                t = interleaved_best(
                    {
                        "f_linear": lambda x=x, m=lin, a=act: m(x, activation=a),
                        "packed": lambda x=x, m=packed, a=act: m(x, activation=a),
                        "to_mkldnn": lambda x=x, m=mk, f=f_act: f(m(x)),
                    },
                    repeats,
                )
            flops = 2 * batch * 197 * n_in * n_out
            out[f"{name} {n_in}->{n_out}{' +gelu' if act else ''}, M={batch * 197}"] = {
                k: {"ms": v * 1000, "gflop_s": flops / v / 1e9} for k, v in t.items()
            }
    return out


# --- one route, in its own process --------------------------------------------------------------


def _wrap_outputs(model):
    """For TorchScript, which traces tensors and tuples only: (logits, attentions)."""

    class Outputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            o = self.model(x)
            return o.logits, o.attentions

    return Outputs().eval()


def _as_pair(out) -> tuple:
    return (out.logits, out.attentions) if hasattr(out, "logits") else out


def build_route(route: str, model, x):
    """-> the forward to time for this route (model has nothing packed)."""
    if route == "f_linear":
        return model
    if route == "mkldnn_flags":

        def fwd(x):
            with mkldnn_enabled():
                return model(x)

        return fwd
    if route == "onednn_bf16":

        def fwd(x):
            with mkldnn_fp32_precision("bf16"):
                return model(x)

        return fwd
    if route in ("compile", "compile_freezing", "compile_autotune"):
        return torch.compile(model, dynamic=False, mode="max-autotune" if route == "compile_autotune" else None)
    if route == "jit_freeze":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_wrap_outputs(model), x, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    if route == "to_mkldnn":
        from torch.utils.mkldnn import to_mkldnn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return to_mkldnn(model)
    raise ValueError(f"unknown route {route!r}")


def worker(route: str, checkpoint: str, batches: list[int], repeats: int) -> list[dict]:
    from model import load_checkpoint
    from model.linear import Linear, unpack_linears

    ref = load_checkpoint(checkpoint, dtype="fp32").model
    model = load_checkpoint(checkpoint, dtype="fp32").model
    unpack_linears(model)
    packed_layers = sum(m.packed is not None for m in ref.modules() if isinstance(m, Linear))
    results = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        row = {"route": route, "batch": batch, "packed_layers": packed_layers}
        with torch.no_grad():
            want = ref(x)
            try:
                t0 = time.perf_counter()
                fwd = build_route(route, model, x)
                logits, attentions = _as_pair(fwd(x))
                row["first_call_s"] = time.perf_counter() - t0
            except ROUTE_ERRORS as e:  # a route that does not work is a result
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                results.append(row)
                continue
            row["attention_maps"] = len(attentions)
            row["max_logit_diff"] = float((logits - want.logits).abs().max())
            row["max_attn_diff"] = max(float((a - b).abs().max()) for a, b in zip(attentions, want.attentions))
            t = interleaved_best({"route": lambda f=fwd, x=x: f(x), "packed": lambda x=x: ref(x)}, repeats)
        row["route_s"], row["packed_s"] = t["route"], t["packed"]
        row["route_vs_packed"] = t["route"] / t["packed"]
        results.append(row)
    return results


def run_route(route: str, checkpoint: Path, batches: list[int], repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, **ENV.get(route, {})}
        cmd = [sys.executable, "-m", "benchmarks.bench_linear", "--worker", route, "--checkpoint", str(checkpoint)]
        cmd += ["--repeats", str(repeats), "--batches", *map(str, batches)]
        t, load = time.perf_counter(), os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return [{"route": route, "batch": b, "error": f"worker failed: {tail[0]}"} for b in batches]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in rows:  # 1-minute load average before and after: our two threads make about 2; more is someone else
        r["process_s"], r["load"] = time.perf_counter() - t, (load, os.getloadavg()[0])
    return rows


def print_routes(routes: list[str], batches: list[int], repeats: int) -> None:
    from benchmarks.common import write_random_checkpoint

    print(
        f"ViT-B/16 224 fp32 forward with all attention maps, no_grad, best of {repeats}, each route in its own "
        "process next to the packed forward:"
    )
    with tempfile.TemporaryDirectory() as d:
        ckpt = write_random_checkpoint(Path(d))
        for route in routes:
            for r in run_route(route, ckpt, batches, repeats):
                if "error" in r:
                    print(f"  {route} batch {r['batch']}: does not run: {r['error']}")
                    continue
                print(
                    f"  {route} batch {r['batch']}: {r['route_s'] * 1000:.0f} ms vs packed {r['packed_s'] * 1000:.0f} ms "
                    f"= {r['route_vs_packed']:.2f}x | first call {r['first_call_s']:.1f} s | "
                    f"{r['attention_maps']} attention maps, max |diff| vs packed: attention {r['max_attn_diff']:.1e}, "
                    f"logits {r['max_logit_diff']:.1e} | process {r['process_s']:.0f} s, load {r['load'][0]:.1f} -> "
                    f"{r['load'][1]:.1f}",
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--routes", nargs="*", default=None, help=f"default: {' '.join(ROUTES)}; none: only the layers")
    ap.add_argument("--autotune", action="store_true", help="also compile with mode='max-autotune' (slow)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.checkpoint, a.batches, a.repeats)))
        return
    routes = [*ROUTES, *(["compile_autotune"] if a.autotune else [])] if a.routes is None else a.routes
    started = time.time()
    from model.linear import packing_available

    print(machine())
    print(f"1-minute load average at the start: {os.getloadavg()[0]:.2f} (2 cores)")
    print(f"{cpu_details()}; {library_versions()}")
    print(f"packed path available (private oneDNN ops passed their check): {packing_available()}")
    rates = gemm_rates(repeats=a.repeats)
    print("fp32 GEMM 2048^3: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    print("oneDNN primitives run by one fp32 F.linear 197x768 -> 3072:")
    for k, v in routing_section().items():
        print(f"  {k}: {v}")
    if not a.skip_layers:
        print(f"linear layers of a ViT-B/16 block alone, fp32, best of {a.repeats * 4} (ms, GFLOP/s):")
        for shape, r in layers_section(a.batches, a.repeats * 4).items():
            print(f"  {shape}: " + " | ".join(f"{k} {v['ms']:.2f} ms {v['gflop_s']:.0f}" for k, v in r.items()))
    if routes:
        print_routes(routes, a.batches, a.repeats)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
