"""unet_dist.storage against a real S3 server process (moto standalone) and the local disk."""
from __future__ import annotations

import logging
import socket
import threading

import pytest

from unet_dist import storage
from unet_dist.errors import UnetDistError


def test_urls_are_parsed_in_one_place(tmp_path):
    assert storage.is_remote("s3://b/p") and not storage.is_remote(tmp_path)
    assert storage.split("s3://bkt/a/b/") == ("bkt", "a/b")
    assert storage.absolute("s3://bkt/a/") == "s3://bkt/a"
    assert storage.join("s3://bkt/a", "run", "x.json") == "s3://bkt/a/run/x.json"
    assert storage.join(tmp_path, "x") == str(tmp_path / "x")
    assert storage.name("s3://bkt/a/x.tar") == "x.tar"


@pytest.mark.parametrize("bad", ["s3:/bucket/shards", "s3:bucket", "gs://bucket/x", "s3://"])
def test_mangled_or_unknown_urls_are_refused_not_made_into_local_folders(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnetDistError, match="expected"):
        storage.absolute(bad)
    assert not any(tmp_path.iterdir())


def test_local_publish_is_atomic_and_listable(tmp_path):
    target = tmp_path / "d" / "x.bin"
    tmp = storage.staging_path(target)
    tmp.write_bytes(b"abc")
    assert storage.listdir(tmp_path / "d") == [".x.bin.tmp"] and not storage.exists(target)
    storage.publish_file(tmp, target)
    assert storage.read_bytes(target) == b"abc" and storage.listdir(tmp_path / "d") == ["x.bin"]
    assert storage.sha256(target) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.slow
def test_objects_round_trip_through_the_s3_server(s3_env, tmp_path):
    url = f"s3://{s3_env.bucket()}/pre/fix"
    assert storage.listdir(url) == [] and not storage.is_dir(url)
    storage.write_json(storage.join(url, "a.json"), {"b": 1, "a": 2})
    assert storage.read_text(storage.join(url, "a.json")) == '{\n "a": 2,\n "b": 1\n}\n'
    tmp = storage.staging_path(storage.join(url, "sub", "big.bin"))
    data = bytes(range(256)) * 20000  # 5 MB: streamed in several reads
    tmp.write_bytes(data)
    storage.publish_file(tmp, storage.join(url, "sub", "big.bin"))
    assert not tmp.exists()
    assert storage.listdir(url) == ["a.json", "sub"] and storage.is_dir(url)
    assert storage.size(storage.join(url, "sub", "big.bin")) == len(data)
    with storage.open_read(storage.join(url, "sub", "big.bin")) as f:
        assert f.read() == data
    with storage.local_copy(url) as d:
        assert (d / "sub" / "big.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(url, "missing.json"))
    storage.remove_tree(storage.join(url, "sub"))
    assert storage.listdir(url) == ["a.json"]


@pytest.mark.slow
def test_upload_tree_writes_the_marker_file_last(s3_env, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    for n in ("meta.json", "a.pt", "z.pt"):
        (src / n).write_bytes(n.encode())
    url = f"s3://{s3_env.bucket()}/runs/r/checkpoint_step-00000001"
    order = []
    real = storage._call
    storage._call = lambda op, u, fn: (order.append(u) if op == "put" else None, real(op, u, fn))[1]
    try:
        storage.upload_tree(src, url, last="meta.json")
    finally:
        storage._call = real
    assert [storage.name(u) for u in order] == ["a.pt", "z.pt", "meta.json"]
    assert s3_env.objects(storage.split(url)[0]).keys() == {
        f"runs/r/checkpoint_step-00000001/{n}" for n in ("a.pt", "z.pt", "meta.json")}


@pytest.mark.slow
def test_missing_bucket_is_one_line_naming_it(s3_env):
    with pytest.raises(UnetDistError, match="bucket 'no-such-bucket' does not exist"):
        storage.listdir("s3://no-such-bucket/shards")


@pytest.mark.slow
def test_missing_credentials_are_one_line(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.reset()
    with pytest.raises(UnetDistError, match="no AWS credentials found"):
        storage.check("s3://any-bucket/x")


@pytest.mark.slow
def test_unreachable_endpoint_is_retried_then_one_line(s3_env, monkeypatch, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage.reset()
    before = storage.retry_count()
    with caplog.at_level(logging.WARNING, logger="unet_dist.storage"):
        with pytest.raises(UnetDistError, match=rf"cannot reach http://127.0.0.1:{port} after 3 attempts"):
            storage.check("s3://bkt/x")
    assert storage.retry_count() - before == 2
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


class FlakyProxy:
    """A TCP proxy to the S3 server that cuts the first ``cut`` responses after ``after`` bytes:
    a connection lost mid-download, as on a busy network."""

    def __init__(self, target_port: int, cut: int, after: int):
        self.target, self.cut, self.after = target_port, cut, after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._copy, args=(client, upstream, None), daemon=True).start()
        limit = None
        if self.cut > 0:
            self.cut -= 1
            limit = self.after
        self._copy(upstream, client, limit)

    @staticmethod
    def _copy(src, dst, limit):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


@pytest.mark.slow
def test_download_cut_mid_object_resumes_where_it_stopped_and_counts_the_retry(s3_env, monkeypatch, caplog):
    bucket = s3_env.bucket()
    data = bytes(range(256)) * 8000  # 2 MB
    s3_env.client().put_object(Bucket=bucket, Key="shard.tar", Body=data)
    proxy = FlakyProxy(int(s3_env.endpoint.rsplit(":", 1)[1]), cut=0, after=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    storage.reset()
    url = f"s3://{bucket}/shard.tar"
    storage.check(url)  # the bucket check goes through whole
    proxy.cut, proxy.after = 1, 300_000  # the next response stops after 300 kB
    before = storage.retry_count()
    try:
        with caplog.at_level(logging.WARNING, logger="unet_dist.storage"):
            assert storage.read_bytes(url) == data
    finally:
        proxy.close()
    assert storage.retry_count() - before == 1
    assert any("retry 1 of 2" in r.getMessage() for r in caplog.records)
