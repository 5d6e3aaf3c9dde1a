"""The GPU figures of issue 15, side by side, in one command.

python -m benchmarks.bench_gpu [--device cuda] [--quick] [--json PATH] [--images 512]
                               [--batch-size 32] [--budget 420] [--skip-tests]

On a machine with one CUDA GPU it ends within 8 minutes (a section that would start after
--budget seconds is skipped and says so) and needs only torch, transformers, pillow, opencv,
safetensors and pytest; timm is measured where installed. Random weights, nothing downloaded.
Every time is the median of 10 runs after 3 warm-up runs, each run timed by CUDA events and
waited for (on the CPU: the wall clock). `--device cpu --quick` runs every section with tiny
models in well under a minute; the test suite runs it so (tests/test_device.py).

Sections, each printing the references next to ours:
  machine       the device, torch/CUDA/cuDNN/transformers/timm versions, the CPU
  ViT-B/16 224  fp32 batch 1 and 64, bf16 batch 64: ours with every attention map (written into
                a reused block from new_attention_block, the "direct" and the "padded" attention
                sequences; tf32 at fp32 batch 64), transformers eager with maps
                (attn_implementation="eager", output_attentions=True), transformers sdpa without
                maps, timm (fused attention, no maps) where installed; ours / sdpa (the issue's
                target at bf16 batch 64: <= 1.3x) and ours / eager; peak memory; the largest map
                difference between ours and eager (the same weights)
  ViT-L/14 518  1370 tokens, batch 4, fp32 and bf16: ours with every map, time and peak memory;
                transformers sdpa without maps beside it
  batch CLI     `python -m viz_app analyze` (in-process engine) on N generated JPEGs, images/s end
                to end and at the margin (N/4 and N images: loading and warm-up cancel out),
                against a bare forward (no maps) of the same batch size (target on a GPU:
                >= 0.6x); and whether the CLI imports streamlit or plotly (it must not), from where
  tests         tests/test_gpu.py through pytest
  summary       the issue's table, measured

Every fp32 row runs with TF32 off (the process's flags are set to IEEE float32 for the
transformers and timm rows; ours sets them itself, model/device.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import (
    device_name,
    machine,
    median_ms,
    peak_bytes,
    synchronize,
    versions,
    write_images,
    write_random_checkpoint,
)
from model import VisionTransformer, ViTConfig, load_checkpoint
from model import device as D

ROOT = Path(__file__).resolve().parents[1]

# (image size, patch, width, depth, heads, MLP); quick: tiny stand-ins with the same roles
SIZES = {
    "B16": (224, 16, 768, 12, 12, 3072),
    "L14": (518, 14, 1024, 24, 16, 4096),
}
QUICK_SIZES = {
    "B16": (64, 16, 64, 2, 4, 128),
    "L14": (98, 14, 64, 2, 4, 128),
}
SECTIONS = {  # name: (header, seconds of budget it needs to start, on a GPU)
    "B16": ("ViT-B/16 224", 30),
    "L14": ("ViT-L/14 518", 60),
    "CLI": ("batch CLI", 60),
    "tests": ("tests/test_gpu.py", 45),
}


class Run:
    """What the sections share: arguments, the clock, printed lines, the JSON record."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.started = time.monotonic()
        self.record: dict = {"device": args.device, "quick": args.quick}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def may_start(self, section: str) -> bool:
        header, need = SECTIONS[section]
        if self.elapsed() + (0 if self.args.quick else need) > self.args.budget:
            print(f"== {header}: skipped, {self.elapsed():.0f} s of the {self.args.budget:.0f} s budget spent")
            self.record.setdefault("skipped", []).append(section)
            return False
        return True

    def sizes(self) -> dict:
        return QUICK_SIZES if self.args.quick else SIZES

    def config(self, name: str) -> ViTConfig:
        image, patch, width, depth, heads, mlp = self.sizes()[name]
        return ViTConfig(
            image_size=image,
            patch_size=patch,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_dim=mlp,
            num_classes=1000,
        )


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_model(config: ViTConfig, attn: str):
    """A transformers ViTForImageClassification of the same size, random weights."""
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    h, w = config.image_size
    cfg = HFConfig(
        image_size=h,
        patch_size=config.patch_size,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        num_labels=config.num_classes,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return ViTForImageClassification(cfg).eval().requires_grad_(False)


def timm_model(config: ViTConfig):
    """timm's ViT of the same size (fused attention), or None where timm is not installed."""
    try:
        import timm
    except ImportError:
        return None
    h, _ = config.image_size
    try:
        return _timm_vit(timm, config, h)
    except Exception as e:  # noqa: BLE001 - the row is left out, the run goes on
        print(f"   timm: could not build its ViT ({type(e).__name__}: {e})")
        return None


def _timm_vit(timm, config: ViTConfig, h: int):
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=h,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.embed_dim,
        num_classes=config.num_classes,
    ).eval()


@contextlib.contextmanager
def ieee_fp32():
    """TF32 off process-wide (for the reference implementations' fp32 rows)."""
    saved = D.read_tf32_flags()
    D.write_tf32_flags(D._flags_for(False))
    try:
        yield
    finally:
        D.write_tf32_flags(saved)


def measure(fn, device: torch.device) -> dict:
    return {"ms": median_ms(fn, device), "peak_bytes": peak_bytes(fn, device)}


def vit_b16(run: Run) -> None:
    """ViT-B/16 at 224: fp32 batch 1 and 64, bf16 batch 64."""
    dev = run.device
    config = run.config("B16")
    batches = (1, 4) if run.args.quick else (1, 64)
    big = batches[-1]
    eager, sdpa = hf_model(config, "eager"), hf_model(config, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    with tempfile.TemporaryDirectory() as d:
        eager.save_pretrained(d)  # ours loads the same weights through its transformers converter
        ours = load_checkpoint(d, device=dev, dtype="fp32").model
    tm = timm_model(config)
    eager, sdpa = eager.to(dev), sdpa.to(dev)
    tm = tm.to(dev) if tm is not None else None
    h, w = config.image_size
    for dtype, batch_list in (("fp32", batches), ("bf16", (big,))):
        if dtype == "bf16":
            for m in (ours, eager, sdpa, tm):
                if m is not None:
                    m.to(torch.bfloat16)
        key = f"vit_b16_{dtype}"
        print(f"== ViT-B/16 224 {dtype} ({config.num_tokens} tokens, {config.depth} layers x {config.num_heads} heads)")
        run.record[key] = {}
        for batch in batch_list:
            torch.manual_seed(batch)
            x = torch.randn(batch, 3, h, w, device=dev, dtype=D.PRECISIONS[dtype])
            block = ours.new_attention_block(batch)  # the failing API: on the model's device
            rows: dict[str, dict] = {}
            with torch.inference_mode():
                ref = eager(pixel_values=x, output_attentions=True)
                mine = ours(x, attention_out=block)
                diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(mine.attentions, ref.attentions))
                rows["ours, every map (direct)"] = measure(lambda x=x, b=block: ours(x, attention_out=b), dev)
                ours.set_attention_sequence("padded")
                rows["ours, every map (padded)"] = measure(lambda x=x, b=block: ours(x, attention_out=b), dev)
                ours.set_attention_sequence("direct")
                if dtype == "fp32" and batch == big and dev.type == "cuda":
                    ours.allow_tf32 = True
                    rows["ours tf32, every map"] = measure(lambda x=x, b=block: ours(x, attention_out=b), dev)
                    ours.allow_tf32 = False
                with ieee_fp32() if dtype == "fp32" else contextlib.nullcontext():
                    rows["transformers eager, every map"] = measure(
                        lambda x=x: eager(pixel_values=x, output_attentions=True), dev
                    )
                    rows["transformers sdpa, no maps"] = measure(lambda x=x: sdpa(pixel_values=x), dev)
                    if tm is not None:
                        rows["timm fused, no maps"] = measure(lambda x=x: tm(x), dev)
            block = mine = ref = None  # the next batch allocates its own
            sd, eg = rows["transformers sdpa, no maps"]["ms"], rows["transformers eager, every map"]["ms"]
            for name, r in rows.items():
                print(
                    f"   batch {batch:3d}  {name:32s} {r['ms']:9.2f} ms  {batch / r['ms'] * 1e3:9.0f} img/s  "
                    f"x{r['ms'] / sd:5.2f} sdpa  x{r['ms'] / eg:5.2f} eager  peak {gib(r['peak_bytes'])}"
                )
            if tm is None:
                print("   timm: not measured (not installed, or its ViT could not be built)")
            ratio = rows["ours, every map (direct)"]["ms"] / sd
            best = min(rows["ours, every map (direct)"]["ms"], rows["ours, every map (padded)"]["ms"]) / sd
            target = " (issue target <= 1.3x: " + ("met)" if best <= 1.3 else "not met)") if dtype == "bf16" else ""
            print(
                f"   batch {batch:3d}  ours with every map / sdpa without: {ratio:.2f}x direct, {best:.2f}x the faster "
                f"sequence{target}; max |maps ours - eager| {diff:.1e}"
            )
            run.record[key][str(batch)] = {"rows": rows, "max_map_diff_vs_eager": diff, "ours_vs_sdpa": ratio}
            free_memory()


def vit_l14(run: Run) -> None:
    dev = run.device
    config = run.config("L14")
    batch = 2 if run.args.quick else 4
    print(
        f"== ViT-L/14 518 ({config.num_tokens} tokens, {config.depth} layers x {config.num_heads} heads), batch {batch}"
    )
    ours = VisionTransformer(config)
    ours.init_weights(seed=0)
    ours = D.to_precision(ours.eval().requires_grad_(False), dev, "fp32")
    sdpa = hf_model(config, "sdpa").to(dev)
    h, w = config.image_size
    run.record["vit_l14_518"] = {}
    for dtype in ("fp32", "bf16"):
        if dtype == "bf16":
            ours.to(torch.bfloat16)
            sdpa.to(torch.bfloat16)
        x = torch.randn(batch, 3, h, w, device=dev, dtype=D.PRECISIONS[dtype])
        block = ours.new_attention_block(batch)
        with torch.inference_mode():
            mine = measure(lambda x=x, b=block: ours(x, attention_out=b), dev)
            with ieee_fp32() if dtype == "fp32" else contextlib.nullcontext():
                ref = measure(lambda x=x: sdpa(pixel_values=x), dev)
        print(
            f"   {dtype}: ours, every map {mine['ms']:9.2f} ms, peak {gib(mine['peak_bytes'])} "
            f"(maps {block.numel() * block.element_size() / 2**30:.2f} GiB) | transformers sdpa, no maps "
            f"{ref['ms']:9.2f} ms, peak {gib(ref['peak_bytes'])} | x{mine['ms'] / ref['ms']:.2f}"
        )
        run.record["vit_l14_518"][dtype] = {"ours": mine, "transformers_sdpa": ref, "maps_bytes": block.numel() * 2}
        block = None
        free_memory()


IMPORT_CHECK = r"""
import importlib.abc, json, sys, traceback
seen = {}
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("streamlit", "plotly") and top not in seen:
            seen[top] = [f"{f.filename}:{f.lineno} ({f.line})" for f in traceback.extract_stack()[:-1]
                         if "importlib" not in f.filename and "<frozen" not in f.filename][-6:]
        return None
sys.meta_path.insert(0, Hook())
from viz_app.cli import main
rc = main(sys.argv[1:])
print("IMPORTS " + json.dumps({"rc": rc, "seen": seen}))
"""


def cli(run: Run) -> None:
    """The batch CLI against a bare forward of the same batch size."""
    from viz_app.cli import main as cli_main

    dev = run.device
    config = run.config("B16")
    n = 8 if run.args.quick else run.args.images
    batch = 4 if run.args.quick else run.args.batch_size
    print(f"== batch CLI: `python -m viz_app analyze --device {dev.type} --batch-size {batch}`, {n} JPEGs")
    rec: dict = {"images": n, "batch_size": batch}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ckpt = write_random_checkpoint(d, config)
        t = time.perf_counter()
        folder = write_images(d / "images", n)
        small = write_images(d / "small", max(batch, n // 4))
        print(f"   {n + max(batch, n // 4)} JPEGs written in {time.perf_counter() - t:.1f} s")

        def analyze(images: Path, out: str) -> float:
            argv = ["analyze", "--model", str(ckpt), "--device", dev.type, "--batch-size", str(batch)]
            t = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()) as err:
                rc = cli_main([*argv, "--out", str(d / out), str(images)])
            if rc != 0:
                raise RuntimeError(f"the CLI exited {rc}: {err.getvalue()[-2000:]}")
            return time.perf_counter() - t

        analyze(small, "warm")  # CUDA context, cuBLAS/cuDNN handles and page cache warm
        t_small = analyze(small, "out_small")
        t_full = analyze(folder, "out_full")
        n_small = max(batch, n // 4)
        rec["cli_img_s"] = n / t_full
        # None where the larger run was not slower (tiny --quick sizes, noise)
        rec["cli_marginal_img_s"] = (n - n_small) / (t_full - t_small) if t_full > t_small else None
        lm = load_checkpoint(ckpt, device=dev, dtype="fp32")
        h, w = config.image_size
        x = torch.randn(batch, 3, h, w, device=dev)
        block = lm.model.new_attention_block(batch)
        with torch.inference_mode():
            rec["bare_img_s"] = batch / median_ms(lambda: lm.model(x, output_attentions=False), dev) * 1e3
            rec["maps_img_s"] = batch / median_ms(lambda: lm.model(x, attention_out=block), dev) * 1e3
        lm = x = block = None
        free_memory()
        proc = subprocess.run(
            [sys.executable, "-c", IMPORT_CHECK, "analyze", "--model", str(ckpt), "--device", dev.type]
            + ["--batch-size", "2", "--out", str(d / "out_imports"), str(write_images(d / "tiny", 2))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    found = [line for line in proc.stdout.splitlines() if line.startswith("IMPORTS ")]
    imports = json.loads(found[-1][len("IMPORTS ") :]) if found else {"rc": proc.returncode, "seen": None}
    rec["imports"] = imports
    ratio = rec["cli_img_s"] / rec["bare_img_s"]
    margin = rec["cli_marginal_img_s"]
    marginal = None if margin is None else margin / rec["bare_img_s"]
    rec["cli_vs_bare"], rec["cli_marginal_vs_bare"] = ratio, marginal
    target = 0.6 if dev.type != "cpu" else 0.85
    print(f"   CLI end to end (model loading included): {rec['cli_img_s']:8.1f} img/s = {ratio:.2f}x the bare forward")
    at_margin = "not measurable (the larger run was not slower)" if margin is None else f"{margin:8.1f} img/s"
    print(
        f"   CLI at the margin ({n_small} vs {n} images): {at_margin} = {fmt(marginal)}x "
        f"(target >= {target}x on {'a GPU' if dev.type != 'cpu' else 'the 2-core CPU'}"
        + ("; tiny sizes, not comparable)" if run.args.quick else ")")
    )
    print(f"   bare forward, no maps: {rec['bare_img_s']:8.1f} img/s; with every map: {rec['maps_img_s']:8.1f} img/s")
    if imports["seen"] is None:
        print(f"   import check failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    elif imports["seen"]:
        for mod, stack in imports["seen"].items():
            print(f"   the CLI imports {mod}: " + " <- ".join(reversed(stack)))
    else:
        print("   the CLI path imports neither streamlit nor plotly")
    run.record["cli"] = rec


def tests(run: Run) -> None:
    print("== tests/test_gpu.py (pytest)")
    left = max(60.0, run.args.budget - run.elapsed())
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_gpu.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=min(300.0, left),
        )
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    keep = [line for line in out.splitlines() if "bound" in line or "tf32 / fp32" in line or "FAILED" in line]
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|skipped)", line)), "")
    for line in keep:
        print("   " + line.lstrip(". "))
    print(f"   {summary.strip('= ') or out[-1500:]}")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    run.record["test_gpu"] = {"exit": rc, "summary": summary.strip("= "), **counts}


def summary(run: Run) -> None:
    print("== summary (the issue's table, measured here)")
    r = run.record
    rows = []
    if "test_gpu" in r:
        rows.append(("tests/test_gpu.py", r["test_gpu"]["summary"]))
    if "vit_b16_fp32" in r:
        rows.append(("`model(x, attention_out=model.new_attention_block(b))` on the device", "runs"))
        b = r["vit_b16_fp32"]
        cells = []
        for batch, v in b.items():
            o, e = v["rows"]["ours, every map (direct)"]["ms"], v["rows"]["transformers eager, every map"]["ms"]
            cells.append(f"batch {batch}: ours {o:.1f} ms, eager with maps {e:.1f} ms")
        rows.append(("ViT-B/16, all maps, fp32", "; ".join(cells)))
    if "vit_b16_bf16" in r:
        for batch, v in r["vit_b16_bf16"].items():
            rr = v["rows"]
            t = rr.get("timm fused, no maps")
            rows.append(
                (
                    f"ViT-B/16 bf16 batch {batch}",
                    f"ours {rr['ours, every map (direct)']['ms']:.1f} ms (padded {rr['ours, every map (padded)']['ms']:.1f}); "
                    f"eager with maps {rr['transformers eager, every map']['ms']:.1f} ms; sdpa without maps "
                    f"{rr['transformers sdpa, no maps']['ms']:.1f} ms; timm "
                    + (f"{t['ms']:.1f} ms" if t else "not installed")
                    + f"; ours/sdpa {v['ours_vs_sdpa']:.2f}x",
                )
            )
    if "vit_l14_518" in r:
        cells = [
            f"{k} {v['ours']['ms']:.1f} ms, {gib(v['ours']['peak_bytes'])} peak" for k, v in r["vit_l14_518"].items()
        ]
        rows.append(("ViT-L/14 518 all maps", "; ".join(cells)))
    if "cli" in r:
        c = r["cli"]
        rows.append(
            (
                f"CLI, batch {c['batch_size']}, {c['images']} JPEGs",
                f"{c['cli_img_s']:.0f} img/s end to end ({c['cli_vs_bare']:.2f}x), {fmt(c['cli_marginal_img_s'], '.0f')} "
                f"img/s at the margin ({fmt(c['cli_marginal_vs_bare'])}x), bare forward {c['bare_img_s']:.0f} img/s",
            )
        )
    print("| what | measured |\n|---|---|")
    for what, got in rows:
        print(f"| {what} | {got} |")
    print(f"total {run.elapsed():.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "mps", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny models and batches (checks the script, measures nothing)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--images", type=int, default=512, help="JPEGs for the CLI section")
    p.add_argument("--batch-size", type=int, default=32, help="the CLI section's batch size")
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which no section starts")
    p.add_argument("--skip-tests", action="store_true", help="leave out tests/test_gpu.py")
    args = p.parse_args(argv)
    if args.device not in D.available_devices():
        print(f"device {args.device!r} is not available here (available: {', '.join(D.available_devices())})")
        return 2
    run = Run(args)
    with contextlib.suppress(ImportError):  # save_pretrained's progress bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    print("== machine")
    v = versions()
    print(f"   device: {args.device}, {device_name(run.device)}")
    print("   " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"   CPU: {machine()}")
    run.record.update(device_name=device_name(run.device), versions=v, machine=machine())
    torch.manual_seed(0)
    sections = [("B16", vit_b16), ("L14", vit_l14), ("CLI", cli)] + ([] if args.skip_tests else [("tests", tests)])
    for name, section in sections:
        if run.may_start(name):
            try:
                section(run)
                synchronize(run.device)
            except Exception as e:  # noqa: BLE001 - one failing section must not cost the others on a lent GPU
                lines = traceback.format_exception(e)
                print("   FAILED: " + "".join(lines[-3:]).strip().replace("\n", "\n   "))
                run.record.setdefault("errors", {})[name] = "".join(lines[-6:])
            free_memory()  # the section's models are gone with its frame
    summary(run)
    run.record["elapsed_s"] = run.elapsed()
    if args.json is not None:
        args.json.write_text(json.dumps(run.record, indent=1, default=str, allow_nan=False))
    failed = run.record.get("test_gpu", {}).get("failed", 0)
    return 1 if failed or run.record.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
