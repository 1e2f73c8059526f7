"""Training input from S3 against local disk: the same shards, the same loader, in the same run.

    .venv/bin/python benchmarks/bench_storage.py [--quick] [--repeats N] [--cache DIR]

Starts a real S3 server process (moto standalone, as in the tests) on 127.0.0.1, uploads the cached
shards to a bucket and reads them through ``train_stream`` with ``s3://`` URLs: each shard is copied
once into the machine's cache (``Location.cached_copy``, pyarrow.fs underneath), then read with
seeks like a local one. "cold" times the stream from its creation (the copies included) over the
same number of batches, with an empty cache each time; "warm" is a later epoch or another rank on
the same machine. The server runs on this machine: no network latency, but its HTTP handling is
Python and shares the 2 cores with the loader.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import _common as C
from bench_loader import rate

LOADER_WORKERS = 1  # the demo's train.loader_workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return proc, endpoint
        except urllib.error.HTTPError:
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0]).parse_args()
    t_start = C.header("Training input: shards on S3 (moto server on 127.0.0.1) vs local disk", args)
    cache = C.cache_dir(args.cache)
    n_train, n_val, spp, batches = (16, 8, 8, 8) if args.quick else (184, 16, 25, 100)
    shards_dir = C.shards(cache, C.dataset(cache, n_train, n_val), spp)
    proc, endpoint = start_s3(cache / "moto_server.log")
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        import boto3
        import torch

        from unet_dist import storage
        from unet_dist.config import TrainConfig
        from unet_dist.data import augment as A
        from unet_dist.data import shards as sh
        from unet_dist.data.stream import train_stream

        torch.set_num_threads(1)
        storage.reset()
        boto3.client("s3").create_bucket(Bucket="bench")
        remote = "s3://bench/shards"
        for name in storage.location(shards_dir).listdir():
            if not name.startswith("."):
                (storage.location(remote) / name).write_bytes((Path(shards_dir) / name).read_bytes())
        tc = TrainConfig()
        aug = A.Augment(crop=tuple(tc.crop), scale=tuple(tc.scale), flip=tc.flip)
        urls = {"local": sh.shard_paths(shards_dir, sh.load_manifest(shards_dir), "train"),
                "s3": sh.shard_paths(remote, sh.load_manifest(remote), "train")}

        def loader(where: str):
            return lambda: train_stream(urls[where], aug, tc.batch_size, rank=0, world=1, seed=0, start=0,
                                        workers=LOADER_WORKERS, pin_memory=False)

        def cold() -> float:
            """samples/s from creating the stream (every shard copied from S3) through ``batches``."""
            with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
                os.environ["UNET_DIST_CACHE"] = cache
                t0 = time.perf_counter()
                it = iter(loader("s3")())
                n = sum(len(next(it)[0]) for _ in range(batches))
                del it
                return n / (time.perf_counter() - t0)

        res: dict[str, list[float]] = {"local": [], "s3 warm": [], "s3 cold": []}
        before = storage.retry_count()
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as warm_cache:
            for _ in range(args.repeats):  # rounds: each case once per round
                res["s3 cold"].append(cold())
                os.environ["UNET_DIST_CACHE"] = warm_cache
                for where in ("local", "s3"):
                    res["s3 warm" if where == "s3" else where].append(rate(loader(where), 5, batches)[0])
        t = C.Table(f"train_stream, {LOADER_WORKERS} loader worker, {len(urls['local'])} train shards of {spp} "
                    f"samples, batch {tc.batch_size}, crop {aug.crop}", "samples/s", baseline="local disk")
        t.add("local disk", res["local"], "seek + read per sample; after 5 warm-up batches")
        t.add("S3, warm cache", res["s3 warm"], "shards already copied to this machine; after 5 warm-up batches")
        t.add("S3, cold cache", res["s3 cold"], f"from the stream's creation: {len(urls['s3'])} shards copied, "
                                                f"then {batches} batches")
        t.print()
        print("Ratios (medians of this run):", flush=True)
        print(f"- S3 warm / local disk: {t.ratio('S3, warm cache'):.2f}")
        print(f"- S3 cold / local disk: {t.ratio('S3, cold cache'):.2f} (the first epoch's start on a new machine)")
        print(f"- S3 retries in this process: {storage.retry_count() - before}\n", flush=True)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    C.footer(t_start)


if __name__ == "__main__":
    main()
