"""The sweep file of ``python -m unet_dist.tune``: which config keys to search, how, and on what.

A sweep file is YAML, checked like a config file (the same loader, constraints and rules): an unknown
key, a search space that does not fit the key's type or range, a trial config the space can make
that the config's rules refuse, or a resource request no trial could get is one error naming the
file and the key.

    name: demo-sweep            # Tune experiment name; rerun with the same name to resume
    metric: val/miou
    mode: max
    num_samples: 3              # samples of the random spaces (times the grid's size)
    max_concurrent_trials: 1
    seed: 0
    space:
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.width: {choice: [8, 16]}
      train.crop: {grid: [[64, 64], [64, 128]]}
    asha: {enabled: true, grace_period: 20, reduction_factor: 2}   # in optimiser steps
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, driver_cpus: 0}
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from unet_dist.config import (SEED, Config, apply_mapping, check_key, from_dict, key_type, read_yaml_file, set_key,
                              to_dict, validate)
from unet_dist.constraints import Ge, Gt, Name, Within
from unet_dist.errors import UnetDistError

SPACES = ("choice", "grid", "uniform", "loguniform")
Metric = Literal["val/miou"]  # what a trial reports to Tune at each evaluation
METRICS = typing.get_args(Metric)
# Keys a sweep decides for every trial (placement, names, tracking): searching them makes no sense.
RESERVED = ("train.workers", "train.cpus_per_worker", "train.use_gpu", "train.run_name",
            "train.checkpoint_dir", "train.checkpoint_every", "shards.dir")


@dataclass
class Asha:
    enabled: bool = True  # false: every trial runs all its steps (FIFO)
    grace_period: Annotated[int, Ge(1)] = 50  # steps a trial runs before it can be stopped
    reduction_factor: Annotated[float, Gt(1)] = 2.0  # keep the best 1/reduction_factor at each rung


@dataclass
class Resources:
    workers: Annotated[int, Ge(1)] = 1  # Ray Train workers per trial
    cpus_per_worker: Annotated[int, Ge(1)] = 1
    gpus_per_worker: Annotated[float, Within(0, 1)] = 0.0  # >0: the trial trains on GPUs (fractions share one; one worker drives one GPU)
    driver_cpus: Annotated[float, Ge(0)] = 0.0  # the Tune trial that drives each Train run only waits


@dataclass
class Sweep:
    name: Annotated[str, Name()] = "unet-sweep"
    metric: Metric = "val/miou"
    mode: Literal["max", "min"] = "max"
    num_samples: Annotated[int, Ge(1)] = 1
    max_concurrent_trials: Annotated[int, Ge(1)] = 1
    seed: Annotated[int, SEED] = 0
    space: dict[str, dict] = field(default_factory=dict)
    asha: Asha = field(default_factory=Asha)
    resources: Resources = field(default_factory=Resources)
    source: str = ""  # the file it came from (for messages)
    digest: str = ""  # sha256 of the file's text: a resumed sweep must be the same sweep


def _check_space(key: str, spec: Any, origin: str) -> None:
    where = f"{origin}: space '{key}'"
    if key in RESERVED or key.startswith("mlflow."):
        raise UnetDistError(f"{where}: set by the sweep for every trial, it cannot be searched")
    tp = key_type(key)
    if tp is None:
        raise UnetDistError(f"{where}: not a config key (see `python -m unet_dist.train --help` and docs)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACES:
        raise UnetDistError(f"{where}: expected one of {{{'|'.join(SPACES)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise UnetDistError(f"{where}: {kind} expects a non-empty list of values, got {values!r}")
        for v in values:
            check_key(key, v, where)
        return
    if tp not in (int, float):
        raise UnetDistError(f"{where}: {kind} needs a numeric key, '{key}' is {getattr(tp, '__name__', tp)}")
    ok = (isinstance(values, list) and len(values) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))
    if not ok or not values[0] < values[1]:
        raise UnetDistError(f"{where}: {kind} expects [low, high] with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise UnetDistError(f"{where}: loguniform expects low > 0, got {values!r}")
    if tp is int and not all(float(v).is_integer() for v in values):
        raise UnetDistError(f"{where}: '{key}' is an int, its bounds must be whole numbers, got {values!r}")
    for v in values:
        check_key(key, int(v) if tp is int else float(v), where)


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file, checked as a config file is: types, each field's constraint, each space."""
    path = Path(path)
    data = read_yaml_file(path, "sweep file") or {}
    if not isinstance(data, dict):
        raise UnetDistError(f"{path}: expected a mapping at the top level")
    for meta in ("source", "digest"):
        if meta in data:
            raise UnetDistError(f"{path}: unknown key '{meta}'")
    space = data.pop("space", None)
    if not isinstance(space, dict):
        raise UnetDistError(f"{path}: key 'space' expects a mapping of config keys to spaces, got {space!r}")
    sweep = Sweep(space=space)
    apply_mapping(sweep, data, str(path))  # unknown keys and wrong types: the config's own messages
    validate(sweep, default_origin=str(path), rules=())
    sweep.source, sweep.digest = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    if not space:
        raise UnetDistError(f"{path}: key 'space' must name at least one config key to search")
    for key, spec in sweep.space.items():
        _check_space(key, spec, str(path))
    return sweep


def check_against_base(sweep: Sweep, cfg: Config) -> None:
    """What only the base config can tell: ASHA's grace period fits in the trials' steps, and every
    trial config the space can make passes the config's own checks (each value of a choice or grid,
    both ends of a range, in every combination)."""
    steps = max_steps(sweep, cfg)
    if sweep.asha.enabled and sweep.asha.grace_period > steps:
        raise UnetDistError(f"{sweep.source}: key 'asha.grace_period' ({sweep.asha.grace_period}) is more "
                            f"than the trials' train.steps ({steps})")
    every = cfg.train.eval_every
    if every <= 0:
        raise UnetDistError(f"{sweep.source}: a sweep needs train.eval_every > 0 in the base config "
                            "(trials report to Tune at each evaluation)")
    keys = list(sweep.space)
    corners = [_corners(key, sweep.space[key]) for key in keys]
    if math.prod(len(c) for c in corners) > MAX_COMBINATIONS:  # check each key on its own instead
        combos = [{k: v} for k, values in zip(keys, corners) for v in values]
    else:
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*corners)]
    for values in combos:
        trial_config(cfg, values, sweep, "trial_00000", "trials")


MAX_COMBINATIONS = 4096


def _corners(key: str, spec: dict) -> list:
    """The values of one space that bound every sample: a choice's or grid's values, a range's ends."""
    kind, values = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(values)
    return [int(v) for v in values] if key_type(key) is int else [float(v) for v in values]


def check_cluster(sweep: Sweep, total: dict[str, float]) -> None:
    """Refuse a trial the cluster could never place (``total``: ``ray.cluster_resources()``)."""
    r = sweep.resources
    cpus = r.workers * r.cpus_per_worker + r.driver_cpus
    if cpus > total.get("CPU", 0):
        raise UnetDistError(f"{sweep.source}: key 'resources.workers' x 'resources.cpus_per_worker' (+ driver_cpus) "
                            f"asks {cpus:g} CPUs per trial; the Ray cluster has {total.get('CPU', 0):g}")
    gpus = r.workers * r.gpus_per_worker
    if gpus > total.get("GPU", 0):
        raise UnetDistError(f"{sweep.source}: key 'resources.gpus_per_worker' asks {gpus:g} GPUs per trial; "
                            f"the Ray cluster has {total.get('GPU', 0):g}")


def max_steps(sweep: Sweep, cfg: Config) -> int:
    spec = sweep.space.get("train.steps")
    if not spec:
        return cfg.train.steps
    values = next(iter(spec.values()))
    return int(max(values))


def param_space(sweep: Sweep) -> dict:
    """Tune's search space, keyed by the dotted config keys."""
    from ray import tune

    out = {}
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        integer = key_type(key) is int
        if kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "grid":
            out[key] = tune.grid_search(values)
        elif kind == "uniform":
            out[key] = tune.randint(int(values[0]), int(values[1]) + 1) if integer else tune.uniform(*values)
        else:
            out[key] = tune.lograndint(int(values[0]), int(values[1]) + 1) if integer else tune.loguniform(*values)
    return out


def trial_config(base: Config, values: dict[str, Any], sweep: Sweep, trial_id: str, trials_dir: str) -> Config:
    """The config one trial trains with: the base, the sampled values, the sweep's placement; checked
    as a config file is, an error naming the space and value that broke a rule."""
    cfg = from_dict(to_dict(base), "base config")
    origins: dict[str, str] = {}
    for key, value in values.items():
        set_key(cfg, key, value, f"{sweep.source}: space '{key}' value {value!r}", origins=origins)
    r = sweep.resources
    cfg.train = dataclasses.replace(
        cfg.train, workers=r.workers, cpus_per_worker=r.cpus_per_worker, use_gpu=r.gpus_per_worker > 0,
        checkpoint_dir=trials_dir, run_name=trial_id,
        # A trial reports to Tune with each checkpoint: make that every evaluation, so ASHA judges
        # fresh scores and a stopped trial keeps the checkpoint it was judged on.
        checkpoint_every=cfg.train.eval_every)
    cfg.mlflow = dataclasses.replace(cfg.mlflow, run_name=f"{sweep.name}/{trial_id}",
                                     registered_model="")  # only the best trial's model, by the driver
    validate(cfg, origins, default_origin=f"{sweep.source} (with the base config)")
    return cfg
