"""`vit-lens analyze --engine ray` (or `evaluate`) against the in-process engine, on the same images, in one run.

python -m benchmarks.bench_ray [--command analyze|evaluate] [--model vit-b16|demo] [--images 48]
    [--batch-size 8] [--repeats 2]

`evaluate` runs with its default modes, steps and randomization.

The two engines run alternately in this process (the in-process CLI, then the Ray engine on a
local Ray started here with every core of the machine), each into a fresh output folder, on N
and on 2N images, best of --repeats. Ray's overhead is given in parts: starting Ray (once per
process: ray.init, not in the runs), starting the pipeline (from its start to its first batch of
results: worker processes, actors, the model loaded in each actor, the first batch; every run),
and the steady state of each engine: N images over the time the 2N run takes more than the N run
(a rate taken inside one run would count the images the pipeline holds in flight). Needs
requirements-ray.txt.
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


def run(command: str, model: str, images: Path, out: Path, batch: int, engine: str) -> tuple[float, dict]:
    argv = [command, "--model", model, "--device", "cpu", "--batch-size", str(batch), "--engine", engine]
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bars
        rc = cli.main([*argv, "--out", str(out), str(images)])
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"{engine} run failed with exit status {rc}")
    return wall, json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--command", default="analyze", choices=["analyze", "evaluate"])
    p.add_argument("--model", default="vit-b16", choices=["vit-b16", "demo"])
    p.add_argument("--images", type=int, default=48, help="N: the runs take N and 2N images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # as the CLI's own local Ray
    import ray

    n = args.images
    print(f"machine: {machine()}")
    print(
        f"vit-lens {args.command}; ray {ray.__version__}; N = {n} JPEGs (crops of the example photos), --batch-size {args.batch_size}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "all", 2 * n)
        folders = {}
        for count in (n, 2 * n):  # the first N images, and all 2N
            folders[count] = tmp / f"images{count}"
            folders[count].mkdir()
            for f in sorted((tmp / "all").glob("*.jpg"))[:count]:
                os.link(f, folders[count] / f.name)
        model = "demo" if args.model == "demo" else str(write_random_checkpoint(tmp))
        print(f"model: {args.model} ({model if args.model == 'demo' else 'random ViT-B/16 weights, 224 px'})")
        t = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        ray_start = time.perf_counter() - t
        cpus = int(ray.cluster_resources().get("CPU", 0))
        best: dict[tuple[str, int], tuple[float, dict]] = {}
        try:
            for r in range(args.repeats):
                for count in (n, 2 * n):
                    for engine in ("local", "ray"):
                        out = tmp / f"{engine}{count}-{r}"
                        got = run(args.command, model, folders[count], out, args.batch_size, engine)
                        if (engine, count) not in best or got[0] < best[engine, count][0]:
                            best[engine, count] = got
        finally:
            ray.shutdown()
    lw1, lw2 = best["local", n][0], best["local", 2 * n][0]
    rw1, rw2 = best["ray", n][0], best["ray", 2 * n][0]
    e1, e2 = best["ray", n][1]["engine"], best["ray", 2 * n][1]["engine"]
    if lw2 <= lw1 or rw2 <= rw1:
        raise SystemExit("the 2N runs were not slower than the N runs (startup noise): take a larger --images")
    local_steady, ray_steady = n / (lw2 - lw1), n / (rw2 - rw1)
    print(f"local Ray: {cpus} CPUs, {e2['model_actors']} model actor(s)")
    print(f"{'':44s} {'images/s':>9s}  {'seconds':>8s}")
    rows = [("in-process", n, lw1), ("in-process", 2 * n, lw2), ("ray", n, rw1), ("ray", 2 * n, rw2)]
    for label, count, wall in rows:
        print(f"{label + f', whole run of {count} images':44s} {count / wall:9.2f}  {wall:8.2f}")
    print(f"{'in-process, steady state (2N run - N run)':44s} {local_steady:9.2f}  {lw2 - lw1:8.2f}")
    print(f"{'ray, steady state (2N run - N run)':44s} {ray_steady:9.2f}  {rw2 - rw1:8.2f}")
    print(
        f"overhead: Ray start {ray_start:.2f} s once per process (not in the runs above); pipeline start "
        f"(workers, actors, model load, first batch) {e1['first_result_s']:.2f} s / {e2['first_result_s']:.2f} s "
        "in the N / 2N runs"
    )
    print(
        f"ray / in-process: steady state {ray_steady / local_steady:.2f}x; whole run of {n} images "
        f"{lw1 / rw1:.2f}x, of {2 * n} images {lw2 / rw2:.2f}x"
    )


if __name__ == "__main__":
    main()
