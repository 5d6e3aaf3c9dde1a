"""`vit-lens analyze --engine ray` against the in-process engine, on the same images, in one run.

python -m benchmarks.bench_ray [--model vit-b16|demo] [--images 48] [--batch-size 8] [--repeats 2]

The two engines run alternately in this process (the in-process CLI, then the Ray engine on a
local Ray started here with every core of the machine), each into a fresh output folder, best of
--repeats. Ray's overhead is given in three parts: starting Ray (once per process: ray.init),
starting the pipeline (from its start to its first batch of results: worker processes, actors,
the model loaded in each actor; every run), and the steady state (images after the first batch
divided by the time after it), against the in-process engine's images/s after its model load
(summary.json's wall_time_s) and its whole run. Needs requirements-ray.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_images, write_random_checkpoint
from viz_app import cli


def run(model: str, images: Path, out: Path, batch: int, engine: str) -> tuple[float, dict]:
    argv = ["analyze", "--model", model, "--device", "cpu", "--batch-size", str(batch), "--engine", engine]
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bars
        rc = cli.main([*argv, "--out", str(out), str(images)])
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"{engine} run failed with exit status {rc}")
    return wall, json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-b16", choices=["vit-b16", "demo"])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # as the CLI's own local Ray
    import ray

    print(f"machine: {machine()}")
    print(f"ray {ray.__version__}; {args.images} JPEGs (crops of the example photos), --batch-size {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_images(tmp / "images", args.images)
        model = "demo" if args.model == "demo" else str(write_random_checkpoint(tmp))
        print(f"model: {args.model} ({model if args.model == 'demo' else 'random ViT-B/16 weights, 224 px'})")
        t = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray_start = time.perf_counter() - t
        cpus = int(ray.cluster_resources().get("CPU", 0))
        try:
            local, remote = [], []
            for r in range(args.repeats):
                local.append(run(model, images, tmp / f"local{r}", args.batch_size, "local"))
                remote.append(run(model, images, tmp / f"ray{r}", args.batch_size, "ray"))
        finally:
            ray.shutdown()
    n = args.images
    lw, ls = min(local, key=lambda x: x[0])
    rw, rs = min(remote, key=lambda x: x[0])
    e = rs["engine"]
    steady = (n - e["first_batch_images"]) / (e["pipeline_s"] - e["first_result_s"])
    local_rate = n / ls["wall_time_s"]
    print(f"local Ray: {cpus} CPUs, {e['model_actors']} model actor(s)")
    print(f"{'':38s} {'images/s':>9s}  {'seconds':>8s}")
    print(f"{'in-process, whole run (model load incl.)':38s} {n / lw:9.2f}  {lw:8.2f}")
    print(f"{'in-process, after the model load':38s} {local_rate:9.2f}  {ls['wall_time_s']:8.2f}")
    print(f"{'ray, whole run (Ray already started)':38s} {n / rw:9.2f}  {rw:8.2f}")
    print(f"{'ray, steady state (after 1st batch)':38s} {steady:9.2f}  {e['pipeline_s'] - e['first_result_s']:8.2f}")
    print(
        f"overhead: Ray start {ray_start:.2f} s once per process; pipeline start (workers, actors, model load) "
        f"{e['first_result_s']:.2f} s per run"
    )
    print(f"ray / in-process: whole run {lw / rw:.2f}x, steady state against after-load {steady / local_rate:.2f}x")


if __name__ == "__main__":
    main()
