"""Ray's recommended ingest for Ray Train, as the peer a Ray user would write: the same shards
through ``ray.data.read_webdataset``, decoded and augmented in ``map_batches``, fed to the training
loop with ``iter_torch_batches`` under a ``TorchTrainer`` (Ray Train's ``prepare_model`` for DDP,
``get_dataset_shard`` for each worker's split, ``ray.train.report`` with a checkpoint).

    python benchmarks/peers/ray_data.py [--config FILE] --set shards.dir=SHARDS [--set key=value ...]

Same recipe as unet_dist (``_recipe.py``: model, loss, optimiser, schedule, the torchvision
augmentation the plain peer uses). Settings from Ray's docs on data loading for Ray Train: file
order shuffled each epoch (``shuffle=FileShuffleConfig``) plus a local shuffle buffer in
``iter_torch_batches``; Ray Data gets the CPUs the training workers leave, as Ray Train's
``DataConfig`` arranges. A private local Ray is started with ``train.workers x
(train.cpus_per_worker + train.loader_workers)`` logical CPUs, so the data side has as many CPUs as
unet_dist's loader processes (one per rank in the demo). Members are decoded as Ray's own default
webdataset decoder does (Pillow to numpy); unet_dist's tiled JPEG photos (``image.tiles``, the
Cityscapes config) are decoded whole by unet_dist's reader, then augmented like any other photo.
"""
from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ours as U  # noqa: E402
import _recipe as R  # noqa: E402

SHUFFLE_BUFFER = 32  # samples per worker in iter_torch_batches' local shuffle buffer
MAP_BATCH = 8  # samples per map_batches call


def decode(batch: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo (H, W, 3) and label (H, W) uint8 of row ``i`` of a batch of raw webdataset members."""
    label = np.asarray(Image.open(io.BytesIO(batch["label.png"][i])))
    if "image.tiles" in batch:
        return U.decode_photo({"image.tiles": batch["image.tiles"][i]}), label
    data = batch["image.jpg"][i] if "image.jpg" in batch else batch["image.png"][i]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), label


def to_tensors(batch: dict, transform) -> dict:
    """``map_batches`` function: decode and transform every row; float32 images, int64 labels."""
    images, labels = [], []
    for i in range(len(batch["label.png"])):
        image, label = transform(*R.as_tv(*decode(batch, i)))
        images.append(image.numpy())
        labels.append(label.numpy())
    return {"image": np.stack(images), "label": np.stack(labels)}


def dataset(urls: list[str], transform, seed: int | None, map_batch: int = MAP_BATCH):
    """The Ray Data pipeline over ``urls``: read (file order shuffled when ``seed`` is given),
    decode and transform in ``map_batches``."""
    import ray.data
    from ray.data.datasource import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=seed) if seed is not None else None
    ds = ray.data.read_webdataset(urls, decoder=None, shuffle=shuffle,
                                  suffixes=["image.jpg", "image.png", "image.tiles", "label.png"])
    return ds.map_batches(to_tensors, fn_kwargs={"transform": transform}, batch_size=map_batch, batch_format="numpy")


def train_func(config: dict) -> None:
    """Ray Train's worker function (one per rank)."""
    import ray.train
    import ray.train.torch

    cfg = U.from_dict(config["config"], "ray_data peer")
    t = cfg.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    r = R.recipe(cfg, config["manifest"], device)
    net = ray.train.torch.prepare_model(r.model)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    R.say(rank, f"training {t.steps} steps from step 0: world {world}, global batch {t.batch_size * world}, "
                f"Ray Data ingest, torch threads {torch.get_num_threads()}")
    step, epoch = 0, 0
    while step < t.steps:
        for batch in train_shard.iter_torch_batches(batch_size=t.batch_size, drop_last=True,
                                                    local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                                    local_shuffle_seed=t.seed + epoch, pin_memory=device.type == "cuda"):
            step += 1
            loss = R.train_step(net, r, batch["image"], batch["label"])
            if step % t.log_every == 0:
                R.say(rank, f"step {step}/{t.steps} loss {loss.item():.4f} lr {r.scheduler.get_last_lr()[0]:.2e}")
            evaluate, save = R.due(cfg, step)
            if evaluate:
                val = ((b["image"], b["label"]) for b in val_shard.iter_torch_batches(batch_size=t.batch_size))
                s = R.evaluate(r.model, val, device, r.dtype)
                R.say(rank, f"step {step}: val mIoU {s['miou']:.4f}, pixel acc {s['pixel_acc']:.4f}")
            if save:
                _report(r, step, rank)
            if step == t.steps:
                break
        epoch += 1


def _report(r: R.Recipe, step: int, rank: int) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 hands Ray a checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report({"step": step}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        R.save(r, step, Path(tmp) / "checkpoint.pt")
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main() -> None:
    cfg = R.config_from_args(__doc__.split("\n\n")[0])
    t = cfg.train

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=t.workers * (t.cpus_per_worker + t.loader_workers))
    manifest = U.load_manifest(cfg.shards.dir)
    urls = {split: U.shard_paths(cfg.shards.dir, manifest, split) for split in ("train", "val")}
    size = tuple(manifest["image_size"])  # what the shards hold (the scale range applies to its shorter side)
    trainer = TorchTrainer(
        train_func, train_loop_config={"config": U.to_dict(cfg), "manifest": manifest},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=t.run_name, storage_path=str(Path(t.checkpoint_dir).resolve())),
        datasets={"train": dataset(urls["train"], R.train_transform(cfg, size), t.seed),
                  "val": dataset(urls["val"], R.eval_transform(), None)})
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    main()
