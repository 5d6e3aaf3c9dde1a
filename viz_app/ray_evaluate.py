"""`vit-lens evaluate --engine ray`: the dataset evaluation on Ray Data, on this machine or a cluster.

The in-process engine (viz_app/evaluate.py, LocalEngine) stays the default and never imports Ray;
this module is imported only for `--engine ray`. The stream is the analyze engine's
(viz_app/ray_engine.py), with the model stage of evaluate:

  driver   lists the inputs (local folders, or any URI pyarrow or fsspec opens: ray_engine.gather_inputs),
           loads the model on its CPU to check the arguments, names each image (cli.free_stems), and
           cuts the inputs (or scenes) into batches as the local engine does: one Ray Data row each;
  read     Ray tasks, one batch at a time: its images decoded and prepared (ray_engine._decode_batch, no
           original kept), or its scenes cut from the SCENE_CHUNK-scene chunks the local engine
           generates (the same seeds);
  model    an actor pool (one actor per GPU, or per ray_engine.CPUS_PER_CPU_ACTOR CPUs), the model
           loaded once per actor: evaluate.evaluate_batch per batch, the same function the local
           engine calls, returning the batch's table rows and per-image numbers (evaluate.Part). An
           actor whose process dies is restarted and its batch retried (ray_engine.ACTOR_RESTARTS);
  driver   takes the parts in input order (Ray Data's preserve_order), writes the rows into the
           tables and adds the numbers to the run's tally; the intervals, plots and summary.json are
           then made exactly as the local engine makes them.

A row is a whole batch and every stage takes one row at a time, so Ray Data's bundling of blocks
never regroups images: each forward pass runs over the local engine's batch, and with the same
--batch-size the tables are byte for byte the local engine's. Every image's random orders and
baselines are seeded by its position among the inputs in both engines. The outputs are whole-run
statistics written at the end under temporary names: a run that stops leaves no table, and a
rerun starts over (unlike analyze, whose per-image files let a rerun resume).
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Iterator

import numpy as np
import torch

from model import load_checkpoint
from viz_app import cli, evaluate, ray_engine
from viz_app.cli import UsageError
from viz_app.demo.scenes import make_batch


def run(args: argparse.Namespace, argv: list[str]) -> int:
    ray = ray_engine.import_ray()
    if ray_engine.as_uri(args.out) is not None:
        raise UsageError(f"--out must be a local folder (on a cluster, one the driver can write): {args.out}")
    settings = cli.settings_from_args(args)
    engine = RayEngine(ray, args.address)
    sources, unreadable = None, []
    if args.scenes is None:
        remote, files, unreadable = ray_engine.gather_inputs(args.inputs, engine.filesystems)
        local, bad = ray_engine.local_sources(files)
        sources, unreadable = local + remote, list(unreadable) + bad
        if not sources:
            raise UsageError("no images found in the given inputs")
    with cli.OutputFolder(args.out) as folder:  # created, locked and checked writable before the model loads
        try:
            return evaluate._run(args, argv, settings, sources, unreadable, folder, engine)
        finally:
            engine.close()


def _scene_batch(row: dict, *, n: int, seed: int, size: int) -> dict:
    """Ray task: the scenes first .. first + count - 1 (one batch) -> one row holding them, pickled.
    They are cut from the SCENE_CHUNK-scene chunks the local engine's scene_batches makes
    (SeedSequence([seed, chunk start])), so they are the same scenes."""
    first, count = int(row["first"][0]), int(row["count"][0])
    images, labels, masks = [], [], []
    for start in range(first - first % evaluate.SCENE_CHUNK, first + count, evaluate.SCENE_CHUNK):
        im, lab, mk = make_batch(np.random.SeedSequence([seed, start]), min(evaluate.SCENE_CHUNK, n - start), size=size)
        lo, hi = max(first, start) - start, min(first + count, start + len(im)) - start
        images.append(im[lo:hi])
        labels.append(lab[lo:hi])
        masks.append(mk[lo:hi])
    payload = {
        "i": list(range(first, first + count)),
        "image": np.concatenate(images),
        "label": np.concatenate(labels),
        "mask": np.concatenate(masks),
    }
    return {"payload": np.array([pickle.dumps(payload, protocol=5)], dtype=object)}


class _Evaluator:
    """Ray actor: the model, loaded once, and evaluate.evaluate_batch on each batch of the stream.
    Returns one row per batch: the pickled evaluate.Part, and the (input index, why) of each image
    the read stage could not decode. Test hooks as ray_engine._Model's."""

    def __init__(self, source, device, dtype, image_size, options: dict, rollout_kw: dict, threads, hooks):
        if threads:
            torch.set_num_threads(threads)
        self.lm = load_checkpoint(source, device=device, dtype=dtype, image_size=image_size)
        self.args = argparse.Namespace(**options)
        self.rollout_kw = rollout_kw
        self.hooks = hooks or {}
        self.calls = 0

    def __call__(self, row: dict) -> dict:
        self.calls += 1
        ray_engine.run_test_hooks(self.hooks, self.calls)
        batch = pickle.loads(row["payload"][0])
        ids = batch["i"]
        bad: list[tuple[int, str]] = []
        if "image" in batch:  # scenes
            one = evaluate.Batch(
                names=[f"scene_{i:05d}" for i in ids],
                pixels=evaluate.scene_pixels(batch["image"], self.lm.preprocessing),
                labels=batch["label"],
                masks=batch["mask"],
                ids=ids,
            )
        else:
            ok = [k for k, e in enumerate(batch["error"]) if not e]
            bad = [(ids[k], str(e)) for k, e in enumerate(batch["error"]) if e]
            items = [pickle.loads(batch["item"][k]) for k in ok]
            pixels = torch.stack([torch.from_numpy(it.prepared.pixels) for it in items]) if items else None
            one = evaluate.Batch(names=[it.stem for it in items], pixels=pixels, ids=[ids[k] for k in ok])
        part = evaluate.evaluate_batch(self.lm, one, self.args, self.rollout_kw, _NoProgress())
        part.size = len(ids)
        return {
            "device": np.array([str(self.lm.device)], dtype=object),
            "part": np.array([pickle.dumps(part, protocol=5)], dtype=object),
            "bad": np.array([pickle.dumps(bad, protocol=5)], dtype=object),
        }


class _NoProgress:
    """evaluate_batch's within-batch progress, where no one sees it (the driver counts batches)."""

    def within(self, *_args) -> None:
        pass


class RayEngine:
    """evaluate._run's engine on Ray Data (see the module docstring)."""

    name = "ray"

    def __init__(self, ray, address: str | None) -> None:
        self.ray, self.address = ray, address
        self.filesystems: list = []
        self.ours = False
        self.plan: dict | None = None
        self.timing: dict = {}
        self.preserve_order: bool | None = None
        self.devices: set[str] = set()  # where the actors' models ran
        self.precision = "fp32"

    def model_place(self, args: argparse.Namespace) -> tuple[str, str]:
        """The command's own model (argument checks, labels) loads on the driver's CPU; the actors
        load theirs on the run's device, in the run's precision."""
        self.precision = args.dtype
        return "cpu", ray_engine.driver_precision(args.dtype)

    def model_meta(self) -> dict:
        """The device(s) the actors ran on, and the run's precision."""
        devices = ",".join(sorted(self.devices)) or (self.plan or {}).get("device", "cpu")
        return {"device": devices, **ray_engine.run_precision(self.precision)}

    def start(self, args: argparse.Namespace, lm, batch: int) -> None:
        """A local Ray started (or the cluster joined), the actors planned and the run's precision
        checked against their device, before any file is written. (No memory check here: the
        actors load their own model, maybe on other machines.)"""
        ray = self.ray
        t0 = time.monotonic()
        self.ours = ray_engine.start_ray(ray, self.address)
        self.timing["ray_start_s"] = round(time.monotonic() - t0, 3)
        ray_engine._quiet_data(ray)
        self.plan = ray_engine._plan_actors(ray, args.device)
        ray_engine.check_precision(self.plan, args.dtype)

    def parts(self, lm, args, sources: list | None, rollout_kw: dict, progress) -> Iterator[evaluate.Part]:
        ray = self.ray
        options = ray.data.DataContext.get_current().execution_options
        self.preserve_order = options.preserve_order  # put back by close(): the context is the process's
        options.preserve_order = True  # the parts in input order, so the tables are
        stream = self._pipeline(lm, args, sources, rollout_kw)
        t0 = time.monotonic()
        try:
            for row in stream.iter_rows():
                if "first_result_s" not in self.timing:
                    self.timing["first_result_s"] = round(time.monotonic() - t0, 3)
                part = pickle.loads(row["part"])
                self.devices.add(str(row["device"]))
                part.skipped = [(sources[i].file, why) for i, why in pickle.loads(row["bad"])]
                yield part
        except Exception as e:  # noqa: BLE001 - Ray's errors (a task or actor that failed for good) have no common base
            if not ray_engine._is_ray_error(ray, e):
                raise
            raise cli.OutputError(
                f"the Ray pipeline stopped: {ray_engine.ray_cause(e)} (a rerun starts over)"
            ) from None
        self.timing["pipeline_s"] = round(time.monotonic() - t0, 3)

    def _pipeline(self, lm, args, sources: list | None, rollout_kw: dict):
        bs = args.batch_size
        if sources is None:
            rows = [{"first": f, "count": min(bs, args.scenes - f)} for f in range(0, args.scenes, bs)]
            stage, kwargs = _scene_batch, {"n": args.scenes, "seed": args.seed, "size": lm.config.image_size[0]}
        else:
            stems = cli.free_stems([s.stem for s in sources], ("",), set())
            specs = [
                {"i": i, "fs": s.fs, "fs_path": s.fs_path, "size": s.size, "stem": stem}
                for i, (s, stem) in enumerate(zip(sources, stems))
            ]
            rows = ray_engine.batch_rows(specs, bs)
            stage = ray_engine._decode_batch
            kwargs = {"filesystems": self.filesystems, "preprocessing": lm.preprocessing, "keep_original": False}
        # one row per batch, cut as the local engine cuts them (ray_engine.batch_rows)
        ds = ray_engine.batch_dataset(self.ray, rows, self.plan)
        ds = ray_engine.read_stage(ds, stage, self.plan, kwargs)
        options = {
            k: getattr(args, k) for k in ("modes", "steps", "randomization", "target_class", "seed", "head", "scenes")
        }
        extra = {"options": options, "rollout_kw": rollout_kw}
        return ray_engine.model_stage(ds, _Evaluator, args, self.plan, extra)

    def summary(self) -> dict:
        plan = self.plan or {}
        return {
            "name": self.name,
            "ray_version": self.ray.__version__,
            "address": self.address,
            "model_actors": plan.get("actors"),
            "actor_device": plan.get("device"),
            **self.timing,
        }

    def close(self) -> None:
        if self.preserve_order is not None:  # the process's context, with or without a running Ray
            self.ray.data.DataContext.get_current().execution_options.preserve_order = self.preserve_order
            self.preserve_order = None
        if self.ours:
            self.ray.shutdown()
            self.ours = False
