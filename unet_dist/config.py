"""Typed configuration: dataclasses <-> YAML, ``--config FILE`` and ``--set a.b=c`` overrides.

Every entry point reads the same :class:`Config`. Unknown keys and values of the wrong type are
errors that name the key and the file they came from, so a typo never silently falls back to a
default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

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


@dataclass
class DataConfig:
    root: str = "data/synth"  # raw dataset directory
    layout: Layout = "pairs"  # raw dataset layout (docs/architecture.md, "Raw layouts")
    label_source: LabelSource = "color"  # color (KMeans on colour masks) | labelIds (cityscapes only)
    on_bad_input: OnBadInput = "fail"  # fail: stop with an error | skip: record in the manifest and go on
    resize: Optional[list[int]] = field(default_factory=lambda: [128, 128])  # [height, width] stored; null keeps the source size
    max_samples: int = 0  # per split, 0 = all (handy for smoke runs on real data)


@dataclass
class QuantizeConfig:
    k: int = 32  # KMeans clusters fitted on mask colours
    sample_pixels: int = 200_000  # pixels sampled across the train masks to fit on
    seed: int = 0  # KMeans initialisation and pixel sampling seed
    max_distance: float = 60.0  # a centroid farther than this (RGB) from every palette colour -> ignore


@dataclass
class ShardsConfig:
    dir: str = "shards/demo"  # where preprocess writes shards, manifest.json and quantizer.json; a path or s3://bucket/prefix
    samples_per_shard: int = 64  # samples per tar file
    processes: int = 0  # preprocess worker processes; 0 = one per core
    photo_encoding: PhotoEncoding = "source"  # source: source bytes (JPEG q95 when resized) | jpeg: at jpeg_quality, pixel error in the manifest | png; labels always lossless (docs/input_pipeline.md)
    jpeg_quality: int = 95  # photo_encoding jpeg only
    photo_tile: Optional[list[int]] = None  # photo_encoding jpeg only: [height, width] JPEG tiles, so the loader decodes only the tiles under its crop; null = one JPEG
    prefetch: int = 0  # training: batches in flight per loader worker (DataLoader prefetch_factor); 0 = torch's default, 2


@dataclass
class ModelConfig:
    in_channels: int = 3  # RGB photos
    num_classes: int = 19  # Cityscapes trainIds
    width: int = 16  # channels of the first level; the paper uses 64
    depth: int = 4  # levels including the bottleneck; the paper uses 5 (4 pools, 23 convs), the demo 4 (19 convs)
    padding: Padding = "same"  # same (output = input size) | valid (the paper: unpadded, cropped skips)
    batch_norm: bool = True  # BatchNorm after each conv (not in the paper)


@dataclass
class TrainConfig:
    steps: int = 400  # total optimiser steps
    batch_size: int = 2  # per worker, per micro-step
    accumulation: int = 1  # micro-steps per optimiser step
    optimizer: Optimizer = "adamw"  # adamw | sgd
    lr: float = 3e-3  # peak learning rate, after warm-up
    weight_decay: float = 1e-4  # decoupled (adamw) or L2 (sgd)
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 30  # linear warm-up from lr / warmup_steps
    schedule: Schedule = "cosine"  # cosine | poly | constant
    grad_clip: float = 1.0  # 0 disables
    class_weights: bool = True  # inverse-frequency weights from the manifest histogram (lifts rare classes, so mIoU, early)
    dice: float = 1.0  # weight of a soft Dice term added to the cross-entropy (unet_dist/losses.py); 0 = cross-entropy only
    crop: list[int] = field(default_factory=lambda: [128, 128])  # [height, width] training crop (the demo: whole 128x128 images)
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random scale range ([1, 1]: none, the demo's fastest to 0.75 mIoU)
    flip: bool = True  # random horizontal flips
    precision: Precision = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True  # NHWC memory format (faster convs on recent GPUs; ~6% on the demo CPU)
    compile: bool = False  # torch.compile the model
    loader_workers: int = 1  # data loader processes per rank
    eval_every: int = 250  # steps; 0 = only at the end
    eval_batches: int = 0  # 0 = the whole val split
    checkpoint_every: int = 250  # steps
    checkpoint_dir: str = "runs/checkpoints"  # <checkpoint_dir>/<run_name>/; on a cluster shared storage or s3://bucket/prefix
    run_name: str = "unet-demo"  # names the checkpoint folder and the Ray run; reuse it to resume
    workers: int = 2  # Ray Train workers (torchrun: --nproc_per_node decides)
    use_gpu: bool = False  # one GPU per rank, nccl; false: CPU, gloo
    cpus_per_worker: int = 1  # Ray CPUs reserved per worker, and torch threads per rank on CPU
    max_failures: int = 2  # Ray FailureConfig
    log_every: int = 10  # steps between train loss / lr / images-per-second logs
    seed: int = 0  # initial weights, data order and augmentation


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite in ./runs/mlflow
    experiment: str = "unet_dist"  # MLflow experiment name (created when missing)
    run_name: str = ""  # empty: train.run_name
    registered_model: str = "unet-cityscapes"  # empty: do not register
    log_model: bool = True  # log the final model (the serving pyfunc: weights, config, labels) to the run
    system_metrics: bool = True  # CPU/memory (and GPU when present) sampled by rank 0
    system_metrics_interval: float = 10.0  # seconds between system metric samples


@dataclass
class ServeConfig:
    max_pixels: int = 4_194_304  # largest photo (height x width) the served model accepts; $UNET_SERVE_MAX_PIXELS overrides
    max_batch: int = 32  # most photos in one request
    tile: int = 0  # largest window side sent through the network at once (bounds memory); 0 = whole photo


@dataclass
class PrometheusConfig:
    port: int = 0  # torchrun: rank 0 serves /metrics on this port (0 = off); under Ray, Ray's metrics agent exports instead
    host: str = "0.0.0.0"  # torchrun: the address the /metrics server listens on
    linger_s: float = 0.0  # after the last step, keep the final values up this long for a last scrape


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


def _check_value(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise an error naming ``key`` and ``origin``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        if value not in args:
            raise UnetDistError(f"{origin}: key '{key}' must be one of {'|'.join(args)}, got {value!r}")
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key, origin)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise UnetDistError(f"{origin}: key '{key}' expects a list, got {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]", origin) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise UnetDistError(f"{origin}: key '{key}' expects {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def _apply(obj: Any, data: dict, origin: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(prefix + f for f in hints)
            raise UnetDistError(f"{origin}: unknown key '{key}' (known: {known})")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise UnetDistError(f"{origin}: key '{key}' expects a mapping, got {value!r}")
            _apply(getattr(obj, name), value, origin, key + ".")
        else:
            setattr(obj, name, _check_value(value, hints[name], key, origin))


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each ``dotted.key=value`` override, checked at each layer."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise UnetDistError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UnetDistError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UnetDistError(f"{path}: expected a mapping of sections at the top level")
        _apply(cfg, data, str(path))
    for item in overrides:
        if "=" not in item:
            raise UnetDistError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _apply(cfg, _nest(key.strip(), value), f"--set {key.strip()}")
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
    cfg = Config()
    _apply(cfg, data, origin)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config; defaults are the demo's")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set train.steps=100 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
