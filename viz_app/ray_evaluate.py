"""`vit-lens evaluate --engine ray`: the dataset evaluation on Ray Data, on this machine or a cluster.

The in-process engine (viz_app/evaluate.py, LocalEngine) stays the default and never imports Ray;
this module is imported only for `--engine ray`. The stream is the analyze engine's
(viz_app/ray_engine.py), with the model stage of evaluate:

  driver   lists the inputs (local folders, or any URI pyarrow or fsspec opens: ray_engine.gather_inputs),
           loads the model on its CPU to check the arguments, names each image (cli.free_stems);
  read     Ray tasks: the images decoded and prepared (ray_engine._decode, no original kept), or the
           demo scenes generated SCENE_CHUNK at a time from the same seeds as the local engine;
  model    an actor pool (one actor per GPU, or per ray_engine.CPUS_PER_CPU_ACTOR CPUs), the model
           loaded once per actor: evaluate.evaluate_batch per batch, the same function the local
           engine calls, returning the batch's table rows and per-image numbers (evaluate.Part). An
           actor whose process dies is restarted and its batch retried (ray_engine.ACTOR_RESTARTS);
  driver   takes the parts in input order (Ray Data's preserve_order), writes the rows into the
           tables and adds the numbers to the run's tally; the intervals, plots and summary.json are
           then made exactly as the local engine makes them.

Every image's random orders and baselines are seeded by its position among the inputs, so the
numbers do not depend on how Ray batches the stream: they equal the local engine's (up to the
float rounding of a forward pass over a differently composed batch). The outputs are whole-run
statistics written at the end under temporary names: a run that stops leaves no table, and a rerun
starts over (unlike analyze, whose per-image files let a rerun resume).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
import warnings
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


def _scenes(batch: dict, *, n: int, seed: int, size: int) -> dict:
    """Ray task: the scenes of the chunks starting at batch["start"] -> one row per scene (the
    local engine's scene_batches makes the same ones: SeedSequence([seed, start]))."""
    ids, images, labels, masks = [], [], [], []
    for start in batch["start"]:
        start = int(start)
        im, lab, mk = make_batch(np.random.SeedSequence([seed, start]), min(evaluate.SCENE_CHUNK, n - start), size=size)
        ids += range(start, start + len(im))
        images.append(im)
        labels.append(lab)
        masks.append(mk)
    return {
        "i": np.array(ids, dtype=np.int64),
        "image": np.concatenate(images),
        "label": np.concatenate(labels),
        "mask": np.concatenate(masks),
    }


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

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        ray_engine.run_test_hooks(self.hooks, self.calls)
        ids = [int(i) for i in batch["i"]]
        bad: list[tuple[int, str]] = []
        if "image" in batch:  # scenes
            one = evaluate.Batch(
                names=[f"scene_{i:05d}" for i in ids],
                pixels=evaluate.scene_pixels(np.asarray(batch["image"]), self.lm.preprocessing),
                labels=np.asarray(batch["label"]),
                masks=np.asarray(batch["mask"]),
                ids=ids,
            )
        else:
            ok = [k for k, e in enumerate(batch["error"]) if not e]
            bad = [(ids[k], str(e)) for k, e in enumerate(batch["error"]) if e]
            items = [pickle.loads(batch["item"][k]) for k in ok]
            pixels = torch.stack([torch.from_numpy(it.prepared.pixels) for it in items]) if items else None
            one = evaluate.Batch(names=[it.stem for it in items], pixels=pixels, ids=[ids[k] for k in ok])
        if one.names:
            part = evaluate.evaluate_batch(self.lm, one, self.args, self.rollout_kw, _NoProgress())
        else:
            part = evaluate.Part({}, evaluate.Tally())
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

    def parts(self, lm, args, sources: list | None, rollout_kw: dict, progress) -> Iterator[evaluate.Part]:
        ray = self.ray
        t0 = time.monotonic()
        self.ours = ray_engine.start_ray(ray, self.address)
        self.timing["ray_start_s"] = round(time.monotonic() - t0, 3)
        ray_engine._quiet_data(ray)
        options = ray.data.DataContext.get_current().execution_options
        self.preserve_order = options.preserve_order  # put back by close(): the context is the process's
        options.preserve_order = True  # the parts in input order, so the tables are
        self.plan = ray_engine._plan_actors(ray, args.device)
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
        from ray.data import ActorPoolStrategy

        ray, plan, bs = self.ray, self.plan, args.batch_size
        warnings.filterwarnings("ignore", message=ray_engine._REMOTE_ARGS_FN_WARNING)
        if sources is None:
            starts = [{"start": s} for s in range(0, args.scenes, evaluate.SCENE_CHUNK)]
            ds = ray.data.from_items(starts, override_num_blocks=len(starts))
            ds = ds.map_batches(
                _scenes,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={"n": args.scenes, "seed": args.seed, "size": lm.config.image_size[0]},
                num_cpus=plan["tasks"],
                ray_remote_args_fn=ray_engine._task_retries,
            )
        else:
            stems = cli.free_stems([s.stem for s in sources], ("",), set())
            rows = [
                {"i": i, "fs": s.fs, "fs_path": s.fs_path, "size": s.size, "stem": stem}
                for i, (s, stem) in enumerate(zip(sources, stems))
            ]
            blocks = min(-(-len(rows) // bs), max(4 * plan["cpus"], -(-len(rows) // (16 * bs))))
            ds = ray.data.from_items(rows, override_num_blocks=max(1, blocks))
            ds = ds.map_batches(
                ray_engine._decode,
                batch_size=bs,
                batch_format="numpy",
                fn_kwargs={
                    "filesystems": self.filesystems,
                    "preprocessing": lm.preprocessing,
                    "keep_original": False,
                },
                num_cpus=plan["tasks"],
                ray_remote_args_fn=ray_engine._task_retries,
            )
        options = {
            k: getattr(args, k) for k in ("modes", "steps", "randomization", "target_class", "seed", "head", "scenes")
        }
        hooks = json.loads(os.environ.get(ray_engine.TEST_HOOKS, "{}") or "{}")
        return ds.map_batches(
            _Evaluator,
            batch_size=bs,
            batch_format="numpy",
            fn_constructor_kwargs={
                "source": str(args.model),
                "device": plan["device"],
                "dtype": args.dtype,
                "image_size": args.image_size,
                "options": options,
                "rollout_kw": rollout_kw,
                "threads": plan["threads"],
                "hooks": hooks,
            },
            compute=ActorPoolStrategy(size=plan["actors"]),
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"] or None,
            ray_remote_args_fn=ray_engine._actor_restarts,
        )

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
        if self.preserve_order is not None and self.ray.is_initialized():
            self.ray.data.DataContext.get_current().execution_options.preserve_order = self.preserve_order
            self.preserve_order = None
        if self.ours:
            self.ray.shutdown()
            self.ours = False
