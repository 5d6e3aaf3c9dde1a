"""Batch CLI throughput vs a bare forward pass of the same model at the same batch size.

python -m benchmarks.bench_cli [--images 128] [--batch-size 8] [--repeats 2] [--profile | --analyses]

Each repeat runs the bare forward, the forward returning maps and the CLI once each; the best of
each is reported, and the CLI/bare ratio of each repeat's own pair (median and range), which
drifts less with the shared machine's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import best_of, machine, write_images, write_random_checkpoint
from model import load_checkpoint
from viz_app.cli import main as cli_main


def cli_args(checkpoint: Path, folder: Path, out: Path, batch_size: int) -> list[str]:
    return ["analyze", "--model", str(checkpoint), "--batch-size", str(batch_size), "--out", str(out), str(folder)]


def run(images: int, batch_size: int, repeats: int = 2) -> dict:
    """Bare forward passes over as many batches as the CLI runs, and the CLI end to end (model
    loading, decoding, forward, analyses, writing), interleaved `repeats` times; best of each."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ckpt = write_random_checkpoint(d)
        folder = write_images(d / "images", images)
        lm = load_checkpoint(ckpt)
        x = torch.randn(batch_size, 3, 224, 224)
        n_batches = -(-images // batch_size)

        def bare(attn: bool):
            with torch.inference_mode():
                for _ in range(n_batches):
                    lm.model(x, output_attentions=attn)

        def cli():
            with contextlib.redirect_stderr(io.StringIO()):
                rc = cli_main(cli_args(ckpt, folder, d / "out", batch_size))
            assert rc == 0, rc

        bare(False)  # warm-up
        t_bare, t_attn, t_cli = [], [], []
        for _ in range(repeats):
            t_bare.append(best_of(lambda: bare(False), repeats=1, warmup=0))
            t_attn.append(best_of(lambda: bare(True), repeats=1, warmup=0))
            t_cli.append(best_of(cli, repeats=1, warmup=0))
    n = n_batches * batch_size
    # the ratio of each repeat from its own pair of runs (the machine's speed drifts between
    # repeats by more than the CLI's overhead changes): their median, and the range
    paired = sorted((images / c) / (n / b) for b, c in zip(t_bare, t_cli))
    return {
        "images": images,
        "batch_size": batch_size,
        "bare_forward_img_s": n / min(t_bare),
        "forward_with_attentions_img_s": n / min(t_attn),
        "cli_img_s": images / min(t_cli),
        "cli_vs_bare": (images / min(t_cli)) / (n / min(t_bare)),
        "cli_vs_bare_paired_median": float(statistics.median(paired)),
        "cli_vs_bare_paired_range": f"{paired[0]:.3f} .. {paired[-1]:.3f}",
    }


def profile(images: int, batch_size: int, top: int = 30) -> None:
    """One CLI run under cProfile (main thread): where its time goes besides the forward."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ckpt = write_random_checkpoint(d)
        folder = write_images(d / "images", images)
        prof = cProfile.Profile()
        with contextlib.redirect_stderr(io.StringIO()):
            prof.runcall(cli_main, cli_args(ckpt, folder, d / "out", batch_size))
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def analyses(batch_size: int, repeats: int = 5) -> dict[str, float]:
    """Milliseconds (best of `repeats`) of report.analyze_batch and of its heaviest parts, on the
    maps of one batch of random ViT-B/16 weights (what each CLI batch spends beside the forward)."""
    from viz_app import analysis as A
    from viz_app import report
    from viz_app.pipeline import run_forward

    with tempfile.TemporaryDirectory() as d:
        lm = load_checkpoint(write_random_checkpoint(Path(d)))
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    settings = report.Settings()
    c = lm.config
    with torch.inference_mode():
        fwd = run_forward(lm.model, x, attention_out=lm.model.new_attention_block(batch_size))
        attn, P = fwd.attentions, c.num_prefix_tokens
        parts = {
            "analyze_batch (all of it)": lambda: report.analyze_batch(lm, fwd, settings),
            "distances (both conventions, prefix share)": lambda: report._distances(attn, lm),
            "attention_entropy": lambda: A.attention_entropy(attn),
            "token_budgets": lambda: A.token_budgets(attn, fwd.token_norms, num_prefix=P),
            "rollout_per_layer": lambda: A.rollout_per_layer(attn, **report.per_layer_options(c, settings)),
        }
        return {name: 1e3 * best_of(fn, repeats=repeats) for name, fn in parts.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="one CLI run under cProfile instead")
    p.add_argument("--analyses", action="store_true", help="the analyses of one batch, timed part by part, instead")
    a = p.parse_args()
    print(machine())
    if a.profile:
        profile(a.images, a.batch_size)
    elif a.analyses:
        for name, ms in analyses(a.batch_size).items():
            print(f"{name:44s} {ms:7.1f} ms")
    else:
        r = run(a.images, a.batch_size, a.repeats)
        for k, v in r.items():
            print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
