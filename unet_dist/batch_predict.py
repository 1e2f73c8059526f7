"""Predict every photo of a dataset on a Ray cluster and write the masks, resumably.

``python -m unet_dist.batch_predict --model M --input SRC --out DST [--format trainid|color|cityscapes]``

M is a checkpoint (or run) directory, ``runs:/RUN_ID/PATH``, ``models:/NAME/VERSION|@ALIAS`` or an
exported ``FILE.onnx`` (onnxruntime on CPU actors), as for ``predict``. SRC is a folder of photos (any depth), an official Cityscapes tree (photos under
``leftImg8bit/<split>/<city>/``; ``--split`` picks one) or a photo, on local disk or object storage
(``s3://``, ``gs://``, ``az://``); DST likewise. Formats (comma-separated for several):
``trainid`` ``<stem>_trainIds.png``, ``color`` ``<stem>_color.png`` (the same bytes as ``predict``
writes), ``cityscapes`` ``<stem>_labelIds.png``, the benchmark's submission format
(``<split>/<city>/<city>_<seq>_<frame>_labelIds.png`` for a Cityscapes tree).

Runs on ``$RAY_ADDRESS`` (``ray job submit`` sets it), else on a private local Ray: CPU tasks decode
photos, a pool of actors (one model each; one GPU each when the cluster has GPUs) predicts, CPU
tasks write. A rerun skips every input whose outputs are all written. Progress goes to the console
and to an MLflow inference run (``$MLFLOW_TRACKING_URI``, else ./runs/mlflow). A photo that cannot
be read is reported and the others are still written; the command then exits 2.

Example::

    python -m unet_dist.batch_predict --model models:/unet-cityscapes/3 \\
        --input s3://data/cityscapes --split test --out s3://preds/test --format cityscapes
"""
from __future__ import annotations

import argparse
import math
import sys

from unet_dist import cli, mask_files, model_source, tracking_store
from unet_dist.errors import UnetDistError

MAX_SHOWN = 20  # failed inputs listed on the console; all of them go to MLflow


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m unet_dist.batch_predict", __doc__)
    model_source.add_argument(p)
    p.add_argument("--input", required=True, type=cli.location, metavar="SRC",
                   help="photos: a folder, a Cityscapes tree or a file; a path or an s3://, gs://, az:// URL")
    p.add_argument("--out", required=True, type=cli.location, metavar="DST", help="output folder: a path or a URL")
    p.add_argument("--format", dest="formats", type=mask_files.parse_formats, default=("trainid",),
                   metavar="F[,F]", help=f"{'|'.join(mask_files.FORMATS)}, comma-separated (default: trainid)")
    p.add_argument("--split", default=None, metavar="NAME", help="a Cityscapes tree's split (train, val, test); default all")
    p.add_argument("--pairs", action="store_true", help="inputs are side-by-side pairs; use the left half")
    p.add_argument("--actors", type=cli.natural, default=0, metavar="N",
                   help="predicting actors; 0: one per GPU of the cluster, or without GPUs as many as leave 2 tasks' CPUs free")
    p.add_argument("--gpus-per-actor", type=positive_float, default=None, metavar="G",
                   help="default: 1 when the cluster has GPUs, else 0 (CPU)")
    p.add_argument("--cpus-per-actor", type=positive_float, default=1.0, metavar="C")
    p.add_argument("--cpus-per-task", type=positive_float, default=1.0, metavar="C", help="of each decode and write task")
    p.add_argument("--batch-size", type=cli.count, default=4, metavar="N", help="photos per batch, >= 1")
    p.add_argument("--experiment", default="unet-batch-predict", help="MLflow experiment of the inference run")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    model_source.check(args.model)
    args.tracking_uri = tracking_store.resolve()
    return args


def model_tags(spec: str) -> dict[str, str]:
    """Which model this is, for the inference run: registry name and version, run, or checkpoint step.
    Loading it here also refuses a bad model in one line before any actor starts."""
    from unet_dist import checkpoint
    from unet_dist.serving.loading import load_model

    load_model(spec, "cpu")
    if spec.startswith("models:/"):
        name, _, version = spec[len("models:/"):].partition("/")
        if "@" in name:
            from mlflow.tracking import MlflowClient

            name, alias = name.split("@", 1)
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        return {"model_name": name, "model_version": str(version)}
    if spec.startswith("runs:/"):
        return {"model_run_id": spec.split("/")[1]}
    if spec.endswith(".onnx"):
        return {"onnx_file": spec}
    directory = checkpoint.resolve(spec)
    meta = checkpoint.read_meta(directory)
    return {"checkpoint": directory.url, "checkpoint_step": str(meta.get("step")),
            "training_run_id": str(meta.get("mlflow_run_id") or "")}


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: batch_predict(parse(argv)))


def batch_predict(args: argparse.Namespace) -> None:
    from unet_dist.batch.job import run

    try:
        tally = run(args, model_tags(args.model))
    except Exception as e:
        raise _user_error(e) or e
    finally:
        _stop_ray()  # now, so that nothing Ray prints as it goes follows the report
    if tally.failures:
        for reason in tally.failures[:MAX_SHOWN]:
            print(f"failed: {cli.one_line(reason)}", file=sys.stderr)
        raise UnetDistError(f"{len(tally.failures)} of {tally.total - tally.skipped} inputs could not be predicted "
                            f"(first: {tally.failures[0]}); the others are written, and a rerun retries only these")


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _user_error(e: BaseException) -> UnetDistError | None:
    """The UnetDistError a Ray task raised (an unwritable --out, a store gone), unwrapped from Ray's
    exception types, so it ends as one line like any other."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UnetDistError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
