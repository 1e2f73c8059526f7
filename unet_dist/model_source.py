"""``--model`` of evaluate and predict: a checkpoint (or run) directory, ``runs:/RUN_ID/PATH`` or
``models:/NAME/VERSION``, checked before the model is loaded.

Why: a misspelt URI otherwise reaches MLflow, which answers with a REST traceback; and with no
``MLFLOW_TRACKING_URI`` MLflow would create ./mlflow.db and look there, while training logs to
./runs/mlflow/mlflow.db by default. Both commands resolve the store as training does
(:mod:`unet_dist.tracking_store`), refuse one that does not exist, and pin it for MLflow.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from unet_dist import cli, storage, tracking_store

FORMS = ("a checkpoint or run directory, runs:/RUN_ID/PATH, models:/NAME/VERSION, models:/NAME@ALIAS "
         "or an exported FILE.onnx")
_MLFLOW_RE = re.compile(r"runs:/[0-9a-f]{32}/\S+|models:/[^/@\s]+/[^/\s]+|models:/[^/@\s]+@[^/\s]+|models:/m-[0-9a-f]+")


def is_mlflow(spec: str) -> bool:
    return spec.startswith(("runs:/", "models:/"))


def model_spec(text: str) -> str:
    """An argparse type: the spelling of ``--model`` (a local directory must exist)."""
    text = text.strip()
    if is_mlflow(text):
        if not _MLFLOW_RE.fullmatch(text):
            raise argparse.ArgumentTypeError(f"expected {FORMS}, got {text!r}")
        return text
    if re.match(r"(runs|models|run|model)s?:", text):
        raise argparse.ArgumentTypeError(f"expected {FORMS}, got {text!r}")
    where = cli.location(text)
    local = storage.location(where).local_path
    if text.endswith(".onnx"):
        if local is None or not Path(local).is_file():
            raise argparse.ArgumentTypeError(f"no such file: {text} (an ONNX model is a local file)")
        return where
    if local is not None and not Path(local).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text} (expected {FORMS})")
    return where


def run_id(text: str) -> str:
    """An argparse type: an MLflow run id (32 hex digits)."""
    if not re.fullmatch(r"[0-9a-f]{32}", text.strip()):
        raise argparse.ArgumentTypeError(f"expected an MLflow run id (32 hex digits), got {text!r}")
    return text.strip()


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_spec, metavar="MODEL", help=FORMS)


def check(spec: str) -> None:
    """For an MLflow model: the store exists, and MLflow is pinned to it (nothing is created)."""
    if not is_mlflow(spec):
        return
    uri = tracking_store.resolve()
    tracking_store.check_readable(uri, f"--model {spec}")
    os.environ[tracking_store.ENV] = uri
