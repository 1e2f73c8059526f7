"""Run a batch prediction: plan (inputs, what is done), the Ray Data pipeline, progress, the report."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

from unet_dist import storage
from unet_dist.batch import inputs, stages
from unet_dist.batch.run_log import InferenceRun
from unet_dist.errors import UnetDistError

PROGRESS_S = 10.0  # seconds between progress lines (and MLflow points)
BATCHES_PER_BLOCK = 4
# A decode task's memory request: the worker itself (Python, numpy, PIL, pyarrow for the stores:
# ~110 MiB measured) and, per photo of its batch, the file and its pixels (2048x1024 RGB: 6 MiB).
DECODE_TASK_BYTES, DECODED_BYTES = 192 << 20, 32 << 20


@dataclass
class Tally:
    total: int
    skipped: int
    done: int = 0
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        todo = self.total - self.skipped
        return (f"batch_predict: {self.done + len(self.failures)}/{todo} predicted ({self.rate():.2f} images/s), "
                f"{len(self.failures)} failed, {self.skipped} already done")

    def values(self) -> dict[str, float]:
        return {"inputs": self.total, "skipped_done": self.skipped, "predicted": self.done,
                "failed": len(self.failures), "images_per_s": self.rate(),
                "wall_s": time.monotonic() - self.started}


def pipeline(todo: list[inputs.Item], args: argparse.Namespace, actors: int, gpus: float):
    """The Ray Dataset of written rows: decode (tasks) -> predict (actor pool) -> write (tasks)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one progress line of ours, not three bars per stage
    # Blocks of a few batches: decode tasks stream photos to the actors from the start, and a task
    # that is lost redoes little.
    blocks = max(1, min(math.ceil(len(todo) / (BATCHES_PER_BLOCK * args.batch_size)), 20_000))
    ds = ray.data.from_items([{"source": it.source, "stem": it.stem} for it in todo], override_num_blocks=blocks)
    # A decode task declares the memory it takes. Its remote args then differ
    # from the actors', and Ray Data (which fuses operators with equal ones) keeps decoding in CPU
    # tasks ahead of the actors instead of inside them.
    ds = ds.map_batches(stages.decode, batch_size=args.batch_size, fn_kwargs={"pairs": args.pairs},
                        num_cpus=args.cpus_per_task, memory=DECODE_TASK_BYTES + args.batch_size * DECODED_BYTES)
    ds = ds.map_batches(stages.Predictor, batch_size=args.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=args.cpus_per_actor, num_gpus=gpus,
                        fn_constructor_kwargs={"model": args.model, "device": "cuda" if gpus else "cpu",
                                               "tracking_uri": args.tracking_uri})
    return ds.map_batches(stages.write, batch_size=args.batch_size, num_cpus=args.cpus_per_task,
                          fn_kwargs={"out": args.out, "formats": args.formats})


def resources(args: argparse.Namespace) -> tuple[int, float]:
    """Actors and GPUs per actor: one actor per GPU of the cluster; else ``--actors``, or as many as
    leave CPUs for a decode and a write task. Counted from what is free now (this driver's own
    reservation and other jobs taken out): a pool that would leave no CPU for the decode and write
    tasks would wait for ever, so it is refused."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    cpus, cluster_gpus = free.get("CPU", 0.0), int(total.get("GPU", 0))
    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if cluster_gpus else 0.0)
    if gpus and not cluster_gpus:
        raise UnetDistError(f"--gpus-per-actor {gpus:g}: the Ray cluster has no GPUs")
    if gpus and args.model.endswith(".onnx"):
        raise UnetDistError(f"--model {args.model}: an ONNX model runs on onnxruntime's CPU provider; "
                            "give --gpus-per-actor 0 (or a checkpoint or MLflow model for GPU actors)")
    if args.actors:
        actors = args.actors
    elif gpus:
        actors = max(1, int(cluster_gpus / gpus))
    elif args.cpus_per_actor:
        actors = max(1, int((cpus - 2 * args.cpus_per_task) // args.cpus_per_actor))
    else:
        actors = 2
    if actors * args.cpus_per_actor + args.cpus_per_task > cpus + 1e-9:
        raise UnetDistError(f"--actors {actors} x --cpus-per-actor {args.cpus_per_actor:g} leave no CPU for the decode "
                            f"and write tasks (--cpus-per-task {args.cpus_per_task:g}): the Ray cluster has "
                            f"{cpus:g} of {total.get('CPU', 0):g} CPUs free; use fewer actors or fewer CPUs each")
    return actors, gpus


def run(args: argparse.Namespace, model_tags: dict[str, str]) -> Tally:
    from unet_dist.train.launch import init_ray

    src, out = storage.location(args.input), storage.location(args.out)
    items = inputs.list_items(src, args.split)
    if not src.exists():
        inputs.check_apart(src, out)
    todo = inputs.pending(items, out, args.formats)
    tally = Tally(total=len(items), skipped=len(items) - len(todo))
    print(f"batch_predict: {len(items)} inputs in {src.url}, {tally.skipped} already done in {out.url}, "
          f"{len(todo)} to predict ({', '.join(args.formats)})", flush=True)
    if not todo:
        return tally
    init_ray()
    actors, gpus = resources(args)
    mlrun = InferenceRun(args.tracking_uri, args.experiment, {
        "model": args.model, "input": src.url, "out": out.url, "formats": ",".join(args.formats),
        "inputs": len(items), "to_predict": len(todo), "actors": actors, "gpus_per_actor": gpus,
        "batch_size": args.batch_size}, model_tags)
    last = time.monotonic()
    for batch in pipeline(todo, args, actors, gpus).iter_batches(batch_size=None, batch_format="numpy"):
        errors = [str(e) for e in batch["error"]]
        tally.failures += [e for e in errors if e]
        tally.done += sum(1 for e in errors if not e)
        if time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            print(tally.line(), flush=True)
            mlrun.metrics({"predicted": tally.done, "images_per_s": tally.rate()}, tally.done)
    print(tally.line(), flush=True)
    mlrun.finish(tally.values(), tally.done, tally.failures)
    return tally
