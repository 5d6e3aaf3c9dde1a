"""The `vit-lens` command (also `python -m viz_app`).

`vit-lens analyze --model SOURCE --out DIR IMAGE_OR_DIR ...` is the batch analysis. Exit codes:
0 all images analysed; 1 some were skipped (each reported); 2 bad arguments or a model that cannot
be loaded (one line on stderr). The other subcommands hand their arguments to their own modules:
`app` (viz_app/app.py), `evaluate` (viz_app/evaluate.py), `demo-train`, `demo-evaluate` and
`demo-gallery` (viz_app/demo/).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import ViTLensError, load_checkpoint
from model.errors import first_line
from model.preprocess import ImageError, PreparedImage, load_image, prepare_image
from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app import render, report
from viz_app.pipeline import run_forward

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
log = logging.getLogger("viz_app")


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(message)


PROG = "vit-lens"
# subcommand -> (module with a main(argv) -> int, help); their arguments are parsed there
DELEGATED = {
    "app": ("viz_app.app", "start the web app on 127.0.0.1 (arguments go to `streamlit run`)"),
    "evaluate": ("viz_app.evaluate", "faithfulness curves and randomization checks of every map over a dataset"),
    "demo-train": ("viz_app.demo.train", "train the embedded demo model from scratch"),
    "demo-evaluate": ("viz_app.demo.evaluate", "score a model on generated shape scenes"),
    "demo-gallery": ("viz_app.demo.gallery", "write the demo model's test scenes and masks"),
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="ViT Lens: look inside Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    a = sub.add_parser("analyze", help="analyse images with a ViT and write arrays, overlays and a summary")
    a.add_argument("--model", required=True, help="demo, a curated key, a checkpoint path or a hub id")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    a.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--save-attentions", action="store_true", help="also store attentions (L, H, T, T) float32")
    a.add_argument(
        "--grad-rollout",
        action="store_true",
        help="also the gradient rollout for the top-1 class (one backward pass per batch: about 2x the time)",
    )
    a.add_argument("--grad-class", type=int, default=None, help="the gradient rollout's class (default: each top-1)")
    a.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="a JSON file of report settings, or a report's report_json (e.g. from the app's Download tab); "
        "the flags below override it",
    )
    a.add_argument("--rollout-fusion", choices=report.FUSIONS, default=None)
    a.add_argument("--rollout-discard", type=float, default=None, help="share in [0, 1) zeroed per layer")
    a.add_argument("--rollout-readout", choices=report.READOUTS, default=None)
    a.add_argument("--rollout-layers", default=None, metavar="FIRST-LAST", help="1-based, inclusive (e.g. 4-12)")
    a.add_argument("--query-patch", default=None, metavar="ROW,COL", help="also each head's map for this patch query")
    a.add_argument("--drop-prefix", action="store_true", default=None, help="per-head maps renormalized over patches")
    a.add_argument("--image-size", type=int, default=None, help="run at another resolution (resamples positions)")
    a.add_argument("--out", required=True, type=Path, help="output folder")
    a.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    for name, (_, text) in DELEGATED.items():  # parsed by their own modules (see main)
        sub.add_parser(name, help=text, add_help=False)
    return p


@dataclass
class Item:
    path: Path
    stem: str
    prepared: PreparedImage
    original: np.ndarray


def collect_inputs(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"no such file or folder: {p}")
    if not files:
        raise UsageError("no images found in the given inputs")
    return files


def unique_stems(files: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for f in files:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        out.append(f.stem if n == 0 else f"{f.stem}_{n}")
    return out


def overlap_stages(device: torch.device) -> bool:
    """Whether reading, the model and writing should overlap: where there are cores to spare (a
    GPU runs the model, or torch uses fewer threads than there are cores), the next batch is
    decoded and the last one's files are written while the model runs (PIL, zlib and OpenCV
    release the GIL). On a CPU that torch already fills, worker threads only stall its GEMMs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return device.type != "cpu" or cores > torch.get_num_threads()


class InlineExecutor(Executor):
    """An executor that runs each task at once in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised by result(), as a thread pool would
            future.set_exception(e)
        return future


def read_batch(paths: list[Path], stems: list[str], preprocessing) -> tuple[list[Item], list[tuple[Path, str]]]:
    """Decode and prepare one batch -> (items, [(path, why it was skipped)])."""
    items, bad = [], []
    for path, stem in zip(paths, stems):
        try:
            img = load_image(path)
        except ImageError as e:
            bad.append((path, str(e)))
            continue
        items.append(Item(path, stem, prepare_image(img, preprocessing), np.asarray(img)))
    return items, bad


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, then rename: a file under its final name
    is always complete."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(out: Path, items: list[Item], reports: list[report.Report], patch_size: int) -> None:
    """Per image: its report (.npz) and the rollout overlay on the original (_rollout.png)."""
    for it, rep in zip(items, reports, strict=True):
        write_atomic(out / f"{it.stem}.npz", rep.npz_bytes())
        png = render.overlay_on_original(it.original, it.prepared, rep.arrays["rollout"], patch_size=patch_size)
        write_atomic(out / f"{it.stem}_rollout.png", render.to_png(png))


def settings_from_args(args: argparse.Namespace) -> report.Settings:
    """Report settings: the --settings file, then the flags."""
    d: dict = {}
    if args.settings is not None:
        try:
            loaded = json.loads(args.settings.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read settings {args.settings}: {first_line(e)}") from None
        d = loaded.get("settings", loaded) if isinstance(loaded, dict) else None
        if not isinstance(d, dict):
            raise UsageError(f"{args.settings}: expected a JSON object of settings")
    flags = {
        "rollout_fusion": args.rollout_fusion,
        "rollout_discard": args.rollout_discard,
        "rollout_readout": args.rollout_readout,
        "drop_prefix": args.drop_prefix,
        "grad_class": args.grad_class,
    }
    d |= {k: v for k, v in flags.items() if v is not None}
    if args.grad_rollout or args.grad_class is not None:
        d["grad_rollout"] = True
    if args.save_attentions:
        d["save_attentions"] = True
    try:
        if args.rollout_layers is not None:
            first, _, last = args.rollout_layers.partition("-")
            d["rollout_first_layer"], d["rollout_last_layer"] = int(first), int(last)
        if args.query_patch is not None:
            row, _, col = args.query_patch.partition(",")
            d["query_patch"] = (int(row), int(col))
        return report.Settings.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad settings: {first_line(e)}") from None


def model_arrays(lm: LoadedModel) -> dict[str, np.ndarray]:
    c = lm.config
    pos = lm.model.pos_embed.detach().float().cpu()[0, c.pos_embed_prefix :]
    arrays = {
        "position_similarity": A.position_similarity(pos).numpy(),
        "grid": np.array(c.grid),
        "pixel_mean": np.array(lm.preprocessing.mean),
        "pixel_std": np.array(lm.preprocessing.std),
    }
    if c.linear_patch_embed:  # a conv stem has no per-patch linear filters to decompose
        pca = A.filter_pca(lm.model.patch_embed.proj.weight.detach().float().cpu())
        arrays |= {
            "filter_components": pca.components.numpy(),
            "filter_explained_variance": pca.explained_variance_ratio.numpy(),
            "filter_mean": pca.mean.numpy(),
        }
    return arrays


class Progress:
    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.stream = stream or sys.stderr

    def step(self, n: int) -> None:
        self.done += n
        rate = self.done / max(1e-9, time.monotonic() - self.start)
        width = 30
        fill = int(width * self.done / self.total)
        self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} images, {rate:.1f} img/s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def run_analyze(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    settings = settings_from_args(args)
    files = collect_inputs(args.inputs)
    try:
        lm = load_checkpoint(args.model, device=args.device, dtype=args.dtype, image_size=args.image_size)
    except (ViTLensError, ValueError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from None
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror}") from None
    start = time.monotonic()
    c = lm.config
    try:
        settings.layer_range(c.depth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if settings.query_patch is not None and not all(0 <= v < n for v, n in zip(settings.query_patch, c.grid)):
        raise UsageError(f"--query-patch {settings.query_patch} is outside the {c.grid[0]}x{c.grid[1]} patch grid")
    if settings.grad_class is not None and c.num_classes and not 0 <= settings.grad_class < c.num_classes:
        raise UsageError(f"--grad-class {settings.grad_class} is outside the model's classes 0-{c.num_classes - 1}")
    # a model without a classifier has no class to explain: its reports say so by leaving grad_rollout out
    gradients = settings.grad_rollout and c.num_classes > 0
    if not gradients:
        settings = dataclasses.replace(settings, grad_rollout=False, grad_class=None)
    model_meta = report.model_meta(lm, str(args.model))
    skipped: list[dict] = []
    results: dict[str, dict] = {}
    mad_all: list[np.ndarray] = []
    progress = Progress(len(files))
    stems = unique_stems(files)
    batches = [
        (files[i : i + args.batch_size], stems[i : i + args.batch_size]) for i in range(0, len(files), args.batch_size)
    ]
    block = None
    pool = (lambda: ThreadPoolExecutor(1)) if overlap_stages(lm.device) else InlineExecutor
    with pool() as reader, pool() as writer:
        next_read = reader.submit(read_batch, *batches[0], lm.preprocessing)
        last_write = None
        for k in range(len(batches)):
            items, bad = next_read.result()
            if k + 1 < len(batches):
                next_read = reader.submit(read_batch, *batches[k + 1], lm.preprocessing)
            for path, reason in bad:
                print(f"skipped {path}: {reason}", file=sys.stderr)
                skipped.append({"file": str(path), "reason": reason})
            if items:
                pixels = torch.stack([it.prepared.pixels for it in items]).to(lm.device, lm.dtype)
                if block is None and not gradients:  # one block for every batch's maps
                    size = min(args.batch_size, len(files))
                    block = lm.model.new_attention_block(size, device=lm.device, dtype=lm.dtype)
                maps = None if block is None else block[:, : len(items)]
                target = None
                if gradients and settings.grad_class is not None:
                    target = torch.full((len(items),), settings.grad_class, dtype=torch.long)
                fwd = run_forward(lm.model, pixels, gradients=gradients, target=target, attention_out=maps)
                arrays = report.analyze_batch(lm, fwd, settings)
                reports = []
                for b, it in enumerate(items):
                    # copies: an analysis may return a view of the block, which the next batch overwrites
                    one = report.split(arrays, b)
                    one["model_view"] = it.prepared.view
                    image = {"name": it.path.name, "original_size": list(it.prepared.original_size)}
                    reports.append(report.Report(one, settings, model_meta, image))
                    mad_all.append(one["mean_attention_distance"])
                    entry = {"file": str(it.path), "npz": f"{it.stem}.npz"}
                    if "top5_classes" in one:
                        entry["top5"] = [
                            {
                                "class": int(k),
                                "label": lm.labels[k] if lm.labels else str(int(k)),
                                "probability": float(p),
                            }
                            for k, p in zip(one["top5_classes"], one["top5_probabilities"])
                        ]
                    results[it.stem] = entry
                if last_write is not None:
                    last_write.result()
                last_write = writer.submit(write_outputs, out, items, reports, c.patch_size)
            progress.step(len(batches[k][0]))
        if last_write is not None:
            last_write.result()
    np.savez_compressed(out / "model.npz", **model_arrays(lm))
    mad_mean = np.mean(mad_all, axis=0) if mad_all else None
    if mad_mean is not None:
        png = render.mad_scatter_png(mad_mean, title=f"{len(mad_all)} images")
        (out / "mad.png").write_bytes(render.to_png(png))
    summary = {
        "model": {
            "source": str(args.model),
            "name": lm.name,
            "family": lm.family,
            "format": lm.format,
            "patch_size": c.patch_size,
            "grid": list(c.grid),
            "prefix_tokens": list(c.prefix_names),
            "num_prefix_tokens": c.num_prefix_tokens,
            "layers": c.depth,
            "heads": c.num_heads,
            "config": c.to_dict(),
        },
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "preprocessing": lm.preprocessing.to_dict(),
        "settings": settings.to_dict(),
        "schema_version": report.SCHEMA_VERSION,
        "mean_attention_distance_convention": "as_is (prefix mass counts as distance 0), pixels",
        "images": results,
        "skipped": skipped,
        "mean_attention_distance": None if mad_mean is None else mad_mean.tolist(),
        "wall_time_s": round(time.monotonic() - start, 3),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 1 if skipped else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "analyze":
            return run_analyze(args)
        raise UsageError(f"unknown command {args.command!r}")
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
