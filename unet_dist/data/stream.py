"""The two streams of shard samples: training batches (:func:`train_stream`) and evaluation batches
(:func:`eval_batches`).

The training stream is a pure function of its position, so a resumed run sees exactly the
samples (and the augmentation) an uninterrupted run would have seen.

Position fixes everything. An optimiser step ``k`` (from 0) takes the ``M`` micro-batches
``g = k * M ... k * M + M - 1`` (``M``: the global batch over the micro-batch size); micro-batch
``g`` holds the global sample positions ``p = g * B + j``, and the ranks deal the step's micro-batches
round-robin (rank ``r`` of ``W`` takes ``g = k * M + r, k * M + r + W, ...``). Position ``p`` is sample
``perm_e[p % N]`` of epoch ``e = p // N``, where ``perm_e`` is a permutation of all ``N`` train samples
seeded by ``(seed, e)``. The augmentation of a sample draws from a generator seeded by
``(seed, e, crc32(key))``. So the samples of a step, and how each is augmented, depend on neither the
world size (an elastic group that shrinks or grows trains on the same global batches) nor the number
of loader workers, nor on what came before: resuming at step ``k`` starts the stream there without
reading, let alone decoding, the samples it skips.

Samples are read by random access: the tar shards are uncompressed, so an index of each member's
offset and size is enough to read one sample's bytes. A local shard is indexed from its tar headers
alone and read with seeks. A shard in an object store is first copied into this machine's cache
(:meth:`unet_dist.storage.Location.cached_copy`: once per machine, shared by its ranks), because
reading a sample at a time from a store costs a request per sample (a quarter of local speed in
``benchmarks/bench_storage.py``); an epoch visits every shard anyway.

Evaluation streams the val shards in order (WebDataset) and reads every val sample exactly once
across the ranks (sample ``i`` goes to rank ``i % world``), so summed confusion matrices are exact
for any world size.
"""
from __future__ import annotations

import itertools
import os
import signal
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from unet_dist import storage
from unet_dist.data.augment import Augment, train_collate, train_sample
from unet_dist.data.decode import decode_sample, normalize
from unet_dist.errors import UnetDistError

storage.register_gopen()  # s3:// val shard URLs stream through unet_dist.storage

# Where one sample of a shard is: (shard path, key, {member suffix: (offset, size)}).
ShardEntry = tuple[str, str, dict[str, tuple[int, int]]]


def index_shards(urls: list[str], local: dict[str, Path] | None = None) -> list[ShardEntry]:
    """Every sample of ``urls`` in shard order: (shard, key, {suffix: (offset, size)}), read from the
    tar headers of ``local[url]`` (default: :meth:`unet_dist.storage.Location.cached_copy`)."""
    local = local if local is not None else {url: storage.location(url).cached_copy() for url in urls}
    samples: list[ShardEntry] = []
    for url in urls:
        by_key: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(local[url], "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        continue
                    folder = member.name[: len(member.name) - len(name)]
                    stem, suffix = name.split(".", 1)  # webdataset's rule: the key ends at the first dot
                    by_key.setdefault(folder + stem, {})[suffix] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as e:
            raise UnetDistError(f"{url}: cannot index shard ({e})") from None
        samples.extend((url, key, members) for key, members in by_key.items())
    if not samples:
        raise UnetDistError("no train samples to stream")
    return samples


@dataclass(frozen=True)
class StreamSpec:
    seed: int
    batch_size: int


def positions(spec: StreamSpec, g: int, n: int) -> list[tuple[int, int]]:
    """(epoch, sample index) of each sample in micro-batch ``g``."""
    out = []
    for p in range(g * spec.batch_size, (g + 1) * spec.batch_size):
        epoch, i = divmod(p, n)
        out.append((epoch, int(epoch_order(spec.seed, epoch, n)[i])))
    return out


def micro_batches(step: int, per_step: int, rank: int, world: int) -> Iterator[int]:
    """Rank ``rank``'s micro-batches from optimiser step ``step`` (counted from 0) on: each step's
    ``per_step`` micro-batches dealt round-robin to the ``world`` ranks."""
    for k in itertools.count(step):
        yield from range(k * per_step + rank, (k + 1) * per_step, world)


def share(per_step: int, rank: int, world: int) -> int:
    """How many of a step's ``per_step`` micro-batches rank ``rank`` of ``world`` takes."""
    return len(range(rank, per_step, world))


_orders: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _orders:
        if len(_orders) > 4:
            _orders.clear()
        _orders[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _orders[key]


def augment_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class TrainBatches(torch.utils.data.Dataset):
    """Map-style: item ``g`` is micro-batch ``g`` (:func:`positions`). Read with an in-order DataLoader
    over a rank's :func:`micro_batches`, any number of workers yields the same sequence."""

    def __init__(self, samples: list[ShardEntry], aug: Augment, spec: StreamSpec, local: dict[str, Path] | None = None):
        self.samples, self.aug, self.spec = samples, aug, spec
        self.local = local or {}  # shard URL -> the file read (a cached copy of a stored object)
        self._files: dict[str, object] = {}

    def read(self, sample: ShardEntry) -> dict:
        url, key, members = sample
        raw = {"__key__": key, "__url__": url}
        f = self._files.get(url)
        if f is None:
            if len(self._files) >= 8:  # a few open shards per worker
                for old in self._files.values():
                    old.close()
                self._files.clear()
            f = self._files[url] = open(self.local.get(url, url), "rb")
        for suffix, (offset, size) in members.items():
            f.seek(offset)
            raw[suffix] = f.read(size)
        return raw

    def keys(self, g: int) -> list[str]:
        """The sample keys of micro-batch ``g``, without reading them."""
        return [self.samples[i][1] for _, i in positions(self.spec, g, len(self.samples))]

    def __getitem__(self, g: int):
        items = []
        for epoch, i in positions(self.spec, g, len(self.samples)):
            raw = self.read(self.samples[i])
            items.append(train_sample(self.aug, raw, augment_rng(self.spec.seed, epoch, raw["__key__"])))
        return train_collate(items)

    def __getstate__(self):  # open files stay with the process that opened them
        return {**self.__dict__, "_files": {}}


def train_stream(urls: list[str], aug: Augment, batch_size: int, *, rank: int, world: int, seed: int,
                 start: int = 0, per_step: int | None = None, workers: int, pin_memory: bool,
                 prefetch: int = 0) -> torch.utils.data.DataLoader:
    """An endless iterator of rank ``rank``'s micro-batches from optimiser step ``start`` on: uint8
    source regions, labels and augmentation plans, as :func:`unet_dist.data.augment.to_device` takes
    them. ``per_step``: micro-batches per optimiser step across the ranks (default: one per rank);
    the loader's ``dataset`` tells the keys of any micro-batch. ``prefetch``: batches each loader
    worker keeps in flight (0: torch's default, 2). Shards in an object store are copied to this
    machine first (:meth:`unet_dist.storage.Location.cached_copy`)."""
    spec = StreamSpec(seed=seed, batch_size=batch_size)
    local = {url: storage.location(url).cached_copy() for url in urls}
    dataset = TrainBatches(index_shards(urls, local), aug, spec, local)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=micro_batches(start, per_step or world, rank, world),
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        worker_init_fn=_own_process_group, prefetch_factor=(prefetch or None) if workers > 0 else None,
        # Its own generator: creating the loader must not draw from the global torch RNG, whose
        # state the checkpoint restores.
        generator=torch.Generator().manual_seed(seed))


def _own_process_group(worker_id: int) -> None:
    """Loader workers leave a signal to their rank's process group to the rank: torchrun stops a rank
    with SIGTERM to its group, and the rank checkpoints at the next step boundary, needing its batches
    until then. A SIGTERM to the worker itself ends it: multiprocessing sends one when a rank exits
    with its loader still open (after an error) and then waits for the worker, so a worker that
    ignored it would hold its rank for ever. Workers also end with their rank (the DataLoader's
    watchdog notices within 5 s)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the rank's preemption handler, inherited by fork


# ----------------------------------------------------------------------------------- evaluation
def _eval_sample(sample: dict):
    image, label, _ = decode_sample(sample)
    return normalize(image), torch.from_numpy(label.astype(np.int64)), image


def _collate(batch):
    return tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else list(x) for x in zip(*batch))


def eval_batches(urls: list[str], batch_size: int, *, rank: int, world: int, limit: int = 0):
    """This rank's share of the val samples, in order: (images, labels, raw photos) batches."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.slice(rank, None, world),
        wds.map(_eval_sample),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    for i, batch in enumerate(pipeline):
        if limit and i >= limit:
            return
        yield batch
