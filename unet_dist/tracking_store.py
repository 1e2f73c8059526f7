"""Which MLflow store a command talks to: the one function every command resolves it with.

Order: ``mlflow.tracking_uri`` (training's config), then ``$MLFLOW_TRACKING_URI``, then a sqlite
store in ./runs/mlflow: training writes there, and evaluate and predict read ``runs:/`` and
``models:/`` URIs from there. (MLflow's own default would be ./mlflow.db, which is why a model
trained with the defaults was not found before.) Resolving writes nothing: the store's folder is
made by :func:`prepare`, once a command has passed its checks and is about to log.
"""
from __future__ import annotations

import os
from pathlib import Path

from unet_dist.errors import UnetDistError

LOCAL_STORE = Path("runs") / "mlflow"
ENV = "MLFLOW_TRACKING_URI"


SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def uri_problem(uri: str) -> str | None:
    """What is wrong with a configured tracking URI (None: nothing): empty, a path, or a URI with a
    scheme MLflow has a store for, so ``htp://host`` fails in the config check, not deep in MLflow."""
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme.split("+")[0] in SCHEMES:
        return None
    return f"must be empty, a path, or a URI with one of the schemes {', '.join(SCHEMES)}"


def default_uri() -> str:
    """The sqlite store in ./runs/mlflow, as an absolute path (Ray workers run in other folders)."""
    return f"sqlite:///{(LOCAL_STORE / 'mlflow.db').resolve()}"


def resolve(configured: str = "") -> str:
    return configured or os.environ.get(ENV, "") or default_uri()


def sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def prepare(uri: str) -> None:
    """Make a local sqlite store's folder: only when a run is about to be logged."""
    path = sqlite_file(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def check_readable(uri: str, argument: str) -> None:
    """A command that reads models from the store (``runs:/``, ``models:/``) refuses a local store
    that does not exist, instead of letting MLflow create an empty one and report "not found"."""
    path = sqlite_file(uri)
    if path is None or path.is_file():
        return
    if os.environ.get(ENV):
        raise UnetDistError(f"{argument}: {ENV}={os.environ[ENV]}: no MLflow store at {path}")
    raise UnetDistError(f"{argument}: {ENV} is not set and there is no MLflow store at {path} (the default "
                        f"that training logs to); set {ENV} to the store the model was logged to")
