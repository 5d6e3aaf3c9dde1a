"""Cost of perturbation (faithfulness) curves against plain forward passes, on the CPU.

python -m benchmarks.bench_faithfulness [--models demo,b16] [--steps 10] [--repeats 3]

For each model: a forward pass of batch 10 without maps (the issue's unit: one curve of 10 steps
must cost at most about 2 of them), one deletion curve of one map in each removal mode, and the
whole set the Faithfulness tab computes (rollout, gradient rollout, last layer, one head, the
centre prior and 3 random orders; deletion and insertion) in each mode. Best of `repeats`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import best_of, machine, write_random_checkpoint
from model import load_checkpoint
from viz_app import probes, report
from viz_app.pipeline import run_forward


def load(name: str, folder: Path):
    return load_checkpoint("demo" if name == "demo" else write_random_checkpoint(folder), device="cpu")


def run(name: str, steps: int, repeats: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as d:
        lm = load(name, Path(d))
    c = lm.config
    x = torch.randn(1, 3, *c.image_size, generator=torch.Generator().manual_seed(0)).to(lm.dtype)
    x10 = x.expand(10, -1, -1, -1).contiguous()
    heat = np.random.default_rng(0).random(c.grid)

    def bare10():
        with torch.inference_mode():
            lm.model(x10, output_attentions=False)

    rows = [("forward, batch 10, no maps", best_of(bare10, repeats))]
    for mode in ("drop", "pixels"):

        def one_curve(mode=mode):
            probes.faithfulness_curves(
                lm.model, x, {"map": heat}, mode=mode, steps=steps, directions=("deletion",), baselines=False
            )

        rows.append((f"one deletion curve, {steps} steps, {mode}", best_of(one_curve, repeats)))

    def tab(mode):
        fwd = run_forward(lm.model, x, gradients=True)
        maps = probes.attribution_maps(lm, fwd, report.rollout_options(c, report.Settings()), head=(c.depth, 1))
        return probes.faithfulness_curves(lm.model, x, maps, mode=mode, steps=steps)

    for mode in ("drop", "pixels"):
        cv = tab(mode)
        rows.append(
            (
                f"every map of the tab ({len(cv.scores)} curves, {cv.forwards} inputs), {mode}",
                best_of(lambda m=mode: tab(m), repeats),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,b16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    print(machine())
    for name in a.models.split(","):
        rows = run(name, a.steps, a.repeats)
        unit = rows[0][1]
        print(f"\n{name}")
        print(f"{'what':<62} {'seconds':>9} {'x forward b10':>14}")
        for what, t in rows:
            print(f"{what:<62} {t:>9.3f} {t / unit:>14.2f}")


if __name__ == "__main__":
    main()
