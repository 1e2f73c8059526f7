"""Typed configuration: dataclasses <-> YAML, ``--config FILE`` and ``--set a.b=c`` overrides.

Every entry point reads the same :class:`Config`. Unknown keys and values of the wrong type are
errors that name the key and the file they came from, so a typo never silently falls back to a
default. Each field declares what it accepts next to its type (``Annotated[int, Ge(1)]``, see
:mod:`unet_dist.constraints`) and :data:`RULES` ties keys together; :func:`validate` checks both in
one pass, for every entry point and sweep file, and docs/configuration.md shows them (generated).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from unet_dist import strict_yaml
from unet_dist import unet_geometry as geometry
from unet_dist.constraints import (Equals, Ge, Gt, Name, NotEmpty, Pair, Rule, TrackingUri, Within, field_constraints,
                                   field_problems, value_text)
from unet_dist.errors import UnetDistError


# Each choice list is defined once, here; readers, the synthetic generator and the model derive
# theirs with typing.get_args, and the config loader checks values against them.
Layout = Literal["pairs", "cityscapes"]
LabelSource = Literal["color", "labelIds"]
OnBadInput = Literal["fail", "skip"]
Padding = Literal["same", "valid"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "poly", "constant"]
Precision = Literal["auto", "bf16", "fp32"]
PhotoEncoding = Literal["source", "jpeg", "png"]
WhenBusy = Literal["wait", "skip"]
SEED = Within(0, 2**32 - 1)  # numpy and scikit-learn take seeds below 2^32


@dataclass
class DataConfig:
    root: Annotated[str, NotEmpty()] = "data/synth"  # raw dataset directory
    layout: Layout = "pairs"  # raw dataset layout (docs/architecture.md, "Raw layouts")
    label_source: LabelSource = "color"  # color (KMeans on colour masks) | labelIds (cityscapes only)
    on_bad_input: OnBadInput = "fail"  # fail: stop with an error | skip: record in the manifest and go on
    resize: Annotated[Optional[list[int]], Pair(Ge(1))] = field(default_factory=lambda: [128, 128])  # [height, width] stored; null keeps the source size
    max_samples: Annotated[int, Ge(0)] = 0  # per split, 0 = all (handy for smoke runs on real data)


@dataclass
class QuantizeConfig:
    k: Annotated[int, Within(1, 254)] = 32  # KMeans clusters fitted on mask colours
    sample_pixels: Annotated[int, Ge(1)] = 200_000  # pixels sampled across the train masks to fit on
    seed: Annotated[int, SEED] = 0  # KMeans initialisation and pixel sampling seed
    max_distance: Annotated[float, Ge(0)] = 60.0  # a centroid farther than this (RGB) from every palette colour -> ignore


@dataclass
class ShardsConfig:
    dir: Annotated[str, NotEmpty()] = "shards/demo"  # where preprocess writes shards, manifest.json and quantizer.json; a path or s3://, gs://, az:// URL
    samples_per_shard: Annotated[int, Ge(1)] = 64  # samples per tar file
    processes: Annotated[int, Ge(0)] = 0  # preprocess worker processes; 0 = one per core
    photo_encoding: PhotoEncoding = "source"  # source: source bytes (JPEG q95 when resized) | jpeg: at jpeg_quality, pixel error in the manifest | png; labels always lossless (docs/input_pipeline.md)
    jpeg_quality: Annotated[int, Within(1, 100)] = 95  # photo_encoding jpeg only
    photo_tile: Annotated[Optional[list[int]], Pair(Ge(16))] = None  # photo_encoding jpeg only: [height, width] JPEG tiles, so the loader decodes only the tiles under its crop; null = one JPEG
    prefetch: Annotated[int, Ge(0)] = 0  # training: batches in flight per loader worker (DataLoader prefetch_factor); 0 = torch's default, 2


@dataclass
class ModelConfig:
    in_channels: Annotated[int, Equals(3, "the loader decodes RGB")] = 3  # RGB photos
    num_classes: Annotated[int, Equals(19, "the shards hold Cityscapes trainIds")] = 19  # Cityscapes trainIds
    width: Annotated[int, Ge(1)] = 16  # channels of the first level; the paper uses 64
    depth: Annotated[int, Within(1, 8)] = 4  # levels including the bottleneck; the paper uses 5 (4 pools, 23 convs), the demo 4 (19 convs)
    padding: Padding = "same"  # same (output = input size) | valid (the paper: unpadded, cropped skips)
    batch_norm: bool = True  # BatchNorm after each conv (not in the paper)


@dataclass
class TrainConfig:
    steps: Annotated[int, Ge(1)] = 400  # total optimiser steps
    batch_size: Annotated[int, Ge(1)] = 2  # per worker, per micro-step
    accumulation: Annotated[int, Ge(1)] = 1  # micro-steps per optimiser step (at the world size the run starts with)
    global_batch: Annotated[int, Ge(0)] = 0  # images per optimiser step over all ranks, kept when the world size changes (docs/reliability.md); 0 = batch_size x accumulation x the first world size (Ray: train.workers), kept by the run's checkpoints
    optimizer: Optimizer = "adamw"  # adamw | sgd
    lr: Annotated[float, Gt(0)] = 3e-3  # peak learning rate, after warm-up
    weight_decay: Annotated[float, Ge(0)] = 1e-4  # decoupled (adamw) or L2 (sgd)
    momentum: Annotated[float, Within(0, 1)] = 0.9  # sgd only
    warmup_steps: Annotated[int, Ge(0)] = 30  # linear warm-up from lr / warmup_steps
    schedule: Schedule = "cosine"  # cosine | poly | constant
    grad_clip: Annotated[float, Ge(0)] = 1.0  # 0 disables
    class_weights: bool = True  # inverse-frequency weights from the manifest histogram (lifts rare classes, so mIoU, early)
    dice: Annotated[float, Ge(0)] = 1.0  # weight of a soft Dice term added to the cross-entropy (unet_dist/losses.py); 0 = cross-entropy only
    crop: Annotated[list[int], Pair(Ge(1))] = field(default_factory=lambda: [128, 128])  # [height, width] training crop (the demo: whole 128x128 images)
    scale: Annotated[list[float], Pair(Gt(0), ordered=True, names=("low", "high"))] = field(default_factory=lambda: [1.0, 1.0])  # random scale range ([1, 1]: none, the demo's fastest to 0.75 mIoU)
    flip: bool = True  # random horizontal flips
    precision: Precision = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # NHWC memory format (faster convs on recent GPUs; ~6% on the demo CPU)
    compile: bool = False  # torch.compile the model
    loader_workers: Annotated[int, Ge(0)] = 1  # data loader processes per rank
    eval_every: Annotated[int, Ge(0)] = 250  # steps; 0 = only at the end
    eval_batches: Annotated[int, Ge(0)] = 0  # 0 = the whole val split
    checkpoint_every: Annotated[int, Ge(1)] = 250  # steps
    checkpoint_async: bool = True  # rank 0 snapshots the state to host memory and writes and uploads it in the background (docs/reliability.md)
    checkpoint_when_busy: WhenBusy = "wait"  # a checkpoint due while the last one is still being written: wait for it (every scheduled checkpoint is kept) | skip it (the loop never waits; the last step, a preemption and a drain still wait)
    checkpoint_dir: Annotated[str, NotEmpty()] = "runs/checkpoints"  # <checkpoint_dir>/<run_name>/; on a cluster shared storage or an s3://, gs://, az:// URL
    run_name: Annotated[str, Name()] = "unet-demo"  # names the checkpoint folder and the Ray run; reuse it to resume
    workers: Annotated[int, Ge(1)] = 2  # Ray Train workers, the most with min_workers (torchrun: --nnodes x --nproc_per_node decides)
    min_workers: Annotated[int, Ge(0)] = 0  # Ray: elastic training between min_workers and workers, same global batch and sample order at any size; 0 = a fixed group of workers
    elastic_check_s: Annotated[float, Gt(0)] = 30.0  # Ray: seconds between Ray's checks for room to grow an elastic group, and the least time between two checkpoints taken while the group is about to change (a node drain, room to grow)
    sample_log: str = ""  # a local folder where every rank appends the sample keys of each step it trains (JSON lines): an audit of the data order; empty = off
    use_gpu: bool = False  # one GPU per rank, nccl; false: CPU, gloo
    cpus_per_worker: Annotated[int, Ge(1)] = 1  # Ray CPUs reserved per worker, and torch threads per rank on CPU
    max_failures: Annotated[int, Ge(-1)] = 2  # Ray FailureConfig: worker-group restarts after a failure; -1 = no limit
    log_every: Annotated[int, Ge(1)] = 10  # steps between train loss / lr / images-per-second logs
    seed: Annotated[int, SEED] = 0  # initial weights, data order and augmentation


@dataclass
class MlflowConfig:
    tracking_uri: Annotated[str, TrackingUri()] = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite in ./runs/mlflow
    experiment: Annotated[str, NotEmpty()] = "unet_dist"  # MLflow experiment name (created when missing)
    run_name: str = ""  # empty: train.run_name
    registered_model: Annotated[str, Name(optional=True)] = "unet-cityscapes"  # empty: do not register
    log_model: bool = True  # log the final model (the serving pyfunc: weights, config, labels) to the run
    system_metrics: bool = True  # CPU/memory (and GPU when present) sampled by rank 0
    system_metrics_interval: Annotated[float, Gt(0)] = 10.0  # seconds between system metric samples
    flush_timeout_s: Annotated[float, Ge(0)] = 60.0  # at the end of training, the longest wait for records still on their way to MLflow; the rest stays in <run_dir>/tracking_spool


@dataclass
class ServeConfig:
    max_pixels: Annotated[int, Ge(1)] = 4_194_304  # largest photo (height x width) the served model accepts; $UNET_SERVE_MAX_PIXELS overrides
    max_batch: Annotated[int, Ge(1)] = 32  # most photos in one request
    tile: Annotated[int, Ge(0)] = 0  # largest window side sent through the network at once (bounds memory); 0 = whole photo


@dataclass
class PrometheusConfig:
    port: Annotated[int, Within(0, 65535)] = 0  # torchrun: rank 0 serves /metrics on this port (0 = off); under Ray, Ray's metrics agent exports instead
    host: Annotated[str, NotEmpty()] = "0.0.0.0"  # torchrun: the address the /metrics server listens on
    linger_s: Annotated[float, Ge(0)] = 0.0  # after the last step, keep the final values up this long for a last scrape


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)


# Rules that tie keys together; each names the key it is about first. The docs table lists each
# under that key (scripts/gen_config_doc.py), and validate() checks them after the field constraints.
RULES = (
    Rule(("train.log_every", "train.steps"), "<= train.steps", lambda c: c.train.log_every <= c.train.steps),
    Rule(("train.warmup_steps", "train.steps"), "< train.steps",
         lambda c: c.train.warmup_steps == 0 or c.train.warmup_steps < c.train.steps),
    Rule(("train.global_batch", "train.batch_size"), "a multiple of train.batch_size (0: batch_size x accumulation x world)",
         lambda c: c.train.global_batch % c.train.batch_size == 0),
    Rule(("train.min_workers", "train.workers"), "<= train.workers (0: a fixed group)",
         lambda c: c.train.min_workers <= c.train.workers),
    Rule(("data.label_source", "data.layout"), "color unless data.layout is cityscapes",
         lambda c: c.data.label_source == "color" or c.data.layout == "cityscapes"),
    Rule(("quantize.k", "quantize.sample_pixels"), "<= quantize.sample_pixels",
         lambda c: c.quantize.k <= c.quantize.sample_pixels),
    Rule(("shards.photo_tile", "shards.photo_encoding"), "null unless shards.photo_encoding is jpeg",
         lambda c: c.shards.photo_tile is None or c.shards.photo_encoding == "jpeg"),
    Rule(("train.crop", "model.padding", "model.depth"),
         "at least the smallest output of a valid U-Net of model.depth when model.padding is valid",
         lambda c: c.model.padding == "same" or all(geometry.valid_crop(s, c.model.depth) for s in c.train.crop),
         lambda c: f"{geometry.smallest_output(c.model.depth)} at depth {c.model.depth}"),
    Rule(("model.batch_norm", "train.batch_size", "train.crop", "model.depth"),
         "false when train.batch_size x the deepest map's pixels is 1 (BatchNorm needs two values per channel)",
         lambda c: not c.model.batch_norm or _deepest_values(c) != 1),
    Rule(("serve.tile", "model.padding", "model.depth"), "0 or at least the smallest tile for model.depth and model.padding",
         lambda c: c.serve.tile == 0 or c.serve.tile >= geometry.smallest_tile(c.model.depth, c.model.padding),
         lambda c: f"{geometry.smallest_tile(c.model.depth, c.model.padding)} here"),
)


def _deepest_values(cfg: Config) -> int:
    """Values per channel the deepest BatchNorm sees in a training batch (0: the crop does not fit)."""
    m = cfg.model
    sides = [geometry.valid_crop(s, m.depth) if m.padding == "valid" else s for s in cfg.train.crop]
    if not all(sides):
        return 0
    h, w = (geometry.bottleneck_side(s, m.depth, m.padding) for s in sides)
    return cfg.train.batch_size * h * w


def validate(cfg: Any, origins: dict[str, str] | None = None, rules: tuple[Rule, ...] = RULES,
             default_origin: str = "config") -> None:
    """The one check every entry point runs after reading a config (or a sweep file): each field's
    declared constraint, then the rules between fields. ``origins``: key -> the file or ``--set``
    it came from, in the order given, so an error names the place to edit."""
    origins = origins or {}
    for key, message in field_problems(cfg):
        raise UnetDistError(f"{origins.get(key, default_origin)}: {message}")
    order = list(origins)
    for rule in rules:
        if not rule.holds(cfg):
            given = [k for k in rule.keys if k in origins]
            where = origins[max(given, key=order.index)] if given else default_origin
            raise UnetDistError(f"{where}: {rule.message(cfg)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_value(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise an error naming ``key`` and ``origin``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        if value not in args:
            raise UnetDistError(f"{origin}: key '{key}' must be one of {'|'.join(args)}, got {_short(value)}")
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key, origin)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise UnetDistError(f"{origin}: key '{key}' expects a list, got {_short(value)}")
        return [_check_value(v, args[0], f"{key}[{i}]", origin) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        expected = "a finite float" if tp is float else tp.__name__
        raise UnetDistError(f"{origin}: key '{key}' expects {expected}, got {_short(value)}")
    return float(value) if tp is float else value


def _unknown(key: str, known: list[str]) -> str:
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, [k.rpartition(".")[2] for k in known], n=1)
    hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else f"known: {', '.join(known)};"
    return f"unknown key '{key}' ({hint} docs/configuration.md lists every key)"


def _apply(obj: Any, data: dict, origin: str, prefix: str = "", origins: dict[str, str] | None = None) -> None:
    """Set the values in ``data`` on the dataclass ``obj``, type-checked; ``origins`` records where
    each key came from (the last setting moves it to the end)."""
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise UnetDistError(f"{origin}: {_unknown(key, [prefix + f for f in hints])}")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise UnetDistError(f"{origin}: key '{key}' expects a mapping, got {_short(value)}")
            _apply(getattr(obj, name), value, origin, key + ".", origins)
        else:
            setattr(obj, name, _check_value(value, hints[name], key, origin))
            if origins is not None:
                origins.pop(key, None)
                origins[key] = origin


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _field(key: str) -> tuple[type, str] | None:
    """(the dataclass holding a dotted key of :class:`Config`, the field's name), or None when there
    is no such key (or it names a section)."""
    node: Any = Config
    *sections, name = key.split(".")
    for part in sections:
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    if not dataclasses.is_dataclass(node) or name not in typing.get_type_hints(node):
        return None
    return None if dataclasses.is_dataclass(typing.get_type_hints(node)[name]) else (node, name)


def key_type(key: str) -> Any:
    """The type of a dotted key of :class:`Config`, or None when there is no such key."""
    found = _field(key)
    return typing.get_type_hints(found[0])[found[1]] if found else None


def check_key(key: str, value: Any, origin: str) -> Any:
    """One value for one dotted key of :class:`Config`: its type, then its declared constraint (a
    sweep's candidate values, before there is a whole config to :func:`validate`)."""
    value = _check_value(value, key_type(key), key, origin)
    owner, name = _field(key)
    for c in field_constraints(owner)[name] if value is not None else ():
        reason = c.problem(value)
        if reason:
            raise UnetDistError(f"{origin}: key '{key}' {reason}, got {value_text(value)}")
    return value


def override_value(key: str, raw: str) -> Any:
    """The value of ``--set key=raw``: YAML, except that a text key takes the text as typed
    (``--set train.run_name=2024`` is the name "2024", not a number)."""
    text = raw.strip()
    if key_type(key) is str and not text.startswith(("'", '"')):
        return text
    if not text:
        return ""
    try:
        return strict_yaml.parse(raw, f"--set {key}")
    except strict_yaml.DuplicateKey:
        raise
    except UnetDistError:  # not YAML: the text itself (its type check says the rest)
        return raw


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's document; a missing, unreadable or malformed file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise UnetDistError(f"{path}: {what} not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UnetDistError(f"{path}: cannot read the {what} ({e.__class__.__name__}: {e})") from None
    return strict_yaml.parse(text, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each ``dotted.key=value`` override; types are checked as
    each layer is read, constraints and rules once at the end (:func:`validate`)."""
    cfg, origins = Config(), {}
    if path:
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise UnetDistError(f"{path}: expected a mapping of sections at the top level")
        _apply(cfg, data, str(path), origins=origins)
    for item in overrides:
        if "=" not in item:
            raise UnetDistError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _apply(cfg, _nest(key, override_value(key, raw)), f"--set {key}", origins=origins)
    validate(cfg, origins)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"train.lr": 0.003, ...}``: the form MLflow params take."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out


def from_dict(data: dict, origin: str = "config") -> Config:
    """A config from its dict form (a checkpoint's, a logged model's), types checked. Constraints are
    not: a model trained under older rules must still load."""
    cfg = Config()
    _apply(cfg, data, origin)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML config (sections and keys: docs/configuration.md); defaults are the demo's")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set train.steps=100 (repeatable; applied after --config)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# The config's own reading rules, for other files read the same way (the sweep file, a sweep's values).
def apply_mapping(obj: Any, data: dict, origin: str, origins: dict[str, str] | None = None) -> None:
    """Set a nested mapping on a config dataclass, or another dataclass read like one: unknown keys and
    values of the wrong type are errors naming the key and ``origin`` (recorded per key in ``origins``)."""
    _apply(obj, data, origin, origins=origins)


def set_key(cfg: Config, dotted: str, value: Any, origin: str, origins: dict[str, str] | None = None) -> None:
    """Set one dotted key (``train.lr``) with the same checks, as ``--set`` does."""
    _apply(cfg, _nest(dotted, value), origin, origins=origins)
