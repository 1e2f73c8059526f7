"""The plain PyTorch script most U-Net tutorials and repositories ship, as the peer a user already
has: a ``Dataset`` over the raw photo/mask files, torchvision v2 transforms, a ``DataLoader`` with a
``DistributedSampler``, DDP (gloo on CPU) under torchrun.

    torchrun --standalone --nproc_per_node=2 benchmarks/peers/plain_torch.py [--config FILE] \
        --set data.root=RAW_DATA --set shards.dir=SHARDS [--set key=value ...]

What it shares with unet_dist, so that only the input pipeline and the loop differ: the config
(steps, batch, crop, scale, flip, lr, schedule, eval and checkpoint steps), the U-Net, loss,
optimiser and initial weights (``_recipe.py``), and the outputs of the preprocess job's one-time fit
over the train masks, read from ``shards.dir``: the KMeans colour quantizer (a colour mask maps to
exactly the classes the shards hold) and the class-pixel histogram behind the loss weights. The
script pays per sample for what preprocess does once: decoding the source file, mapping colours to
classes and the resize to ``data.resize``, which it does with the same PIL calls as preprocess.

DataLoader settings as PyTorch's docs advise: ``num_workers`` > 0 (``train.loader_workers`` per
rank, the loader processes unet_dist starts), ``persistent_workers=True``, ``pin_memory`` on a GPU,
``drop_last=True``; the sampler is re-seeded every epoch with ``set_epoch``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ours as U  # noqa: E402
import _recipe as R  # noqa: E402


class ColourClasses:
    """Colour mask -> class ids through the fitted quantizer's colour table (as preprocess maps)."""

    def __init__(self, quantizer_json: str):
        self.lut = U.Quantizer.from_json(quantizer_json).build_lut()

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        return U.lookup(self.lut, mask)


class LabelIdClasses:
    """Cityscapes labelIds -> trainIds (the official mapping)."""

    lut = U.id_to_train_id_lut()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.lut[ids]


class StreetScenes(Dataset):
    """One sample per source file: ``<split>/<n>.jpg`` with the photo and its colour mask side by
    side, or Cityscapes' ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with its
    ``gtFine/..._gtFine_labelIds.png``. Items are ``(image, label)`` after ``transform``."""

    def __init__(self, root: str | Path, split: str, to_classes, size: tuple[int, int] | None, transform=None):
        root = Path(root)
        self.cityscapes = (root / "leftImg8bit").is_dir()
        if self.cityscapes:
            self.photos = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        else:
            self.photos = sorted((root / split).glob("*.jpg"), key=lambda p: int(p.stem))
        if not self.photos:
            raise SystemExit(f"{root}: no {split} photos")
        self.to_classes, self.size, self.transform = to_classes, size, transform

    def __len__(self) -> int:
        return len(self.photos)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 photo and (H, W) uint8 class ids, resized to ``size``."""
        path = self.photos[i]
        if self.cityscapes:
            photo = np.asarray(Image.open(path).convert("RGB"))
            label = str(path).replace("leftImg8bit", "gtFine").replace("_gtFine.png", "_gtFine_labelIds.png")
            ids = self.to_classes(np.asarray(Image.open(label)))
        else:
            both = np.asarray(Image.open(path).convert("RGB"))
            h = both.shape[0]
            photo, ids = both[:, :h], self.to_classes(both[:, h:])
        if self.size:
            photo, ids = U.resize_photo(np.ascontiguousarray(photo), self.size), U.resize_label(ids, self.size)
        return photo, ids

    def __getitem__(self, i: int):
        return self.transform(*R.as_tv(*self.load(i)))


def datasets(cfg) -> tuple[StreetScenes, StreetScenes]:
    """The train and val sets of ``data.root``, with the quantizer (or the labelIds mapping) the
    shards in ``shards.dir`` were made with."""
    q = Path(cfg.shards.dir) / U.QUANTIZER
    to_classes = ColourClasses(q.read_text()) if q.is_file() else LabelIdClasses()
    size = tuple(cfg.data.resize) if cfg.data.resize else None
    train = StreetScenes(cfg.data.root, "train", to_classes, size)
    train.transform = R.train_transform(cfg, size or train.load(0)[1].shape)
    return train, StreetScenes(cfg.data.root, "val", to_classes, size, R.eval_transform())


def loader(ds: Dataset, sampler, batch_size: int, workers: int, device: torch.device, drop_last: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=drop_last)


def main() -> None:
    cfg = R.config_from_args(__doc__.split("\n\n")[0])
    t = cfg.train
    dist.init_process_group("nccl" if t.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if t.use_gpu else torch.device("cpu")
    r = R.recipe(cfg, U.load_manifest(cfg.shards.dir), device)
    net = DistributedDataParallel(r.model, device_ids=[device.index] if t.use_gpu else None)
    train_ds, val_ds = datasets(cfg)
    sampler = DistributedSampler(train_ds, shuffle=True, seed=t.seed, drop_last=True)
    batches = loader(train_ds, sampler, t.batch_size, t.loader_workers, device, drop_last=True)
    val = loader(val_ds, DistributedSampler(val_ds, shuffle=False), t.batch_size, t.loader_workers, device, False)
    ckpt_dir = Path(t.checkpoint_dir) / t.run_name
    R.say(rank, f"training {t.steps} steps from step 0: world {world}, global batch {t.batch_size * world}, "
                f"{len(train_ds)} train files, {t.loader_workers} loader workers per rank")
    step, epoch, window = 0, 0, time.perf_counter()
    while step < t.steps:
        sampler.set_epoch(epoch)
        for images, target in batches:
            step += 1
            loss = R.train_step(net, r, images.to(device, non_blocking=True), target.to(device, non_blocking=True))
            if step % t.log_every == 0:
                rate = t.log_every * t.batch_size * world / (time.perf_counter() - window)
                R.say(rank, f"step {step}/{t.steps} loss {loss.item():.4f} lr {r.scheduler.get_last_lr()[0]:.2e} "
                            f"{rate:.1f} img/s")
                window = time.perf_counter()
            evaluate, save = R.due(cfg, step)
            if evaluate:
                s = R.evaluate(r.model, val, device, r.dtype)
                R.say(rank, f"step {step}: val mIoU {s['miou']:.4f}, pixel acc {s['pixel_acc']:.4f}")
            if save and rank == 0:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                R.save(r, step, ckpt_dir / f"step-{step}.pt")
            if step == t.steps:
                break
        epoch += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
