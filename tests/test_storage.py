"""unet_dist.storage against real store server processes (moto's S3, fake-gcs-server, Azurite) and
the local disk."""
from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest

from unet_dist import storage
from unet_dist.errors import UnetDistError
from unet_dist.storage import location


def test_urls_are_parsed_in_one_place(tmp_path):
    s3 = location("s3://bkt/a/b/")
    assert (s3.scheme, s3.bucket, s3.key, s3.local_path) == ("s3", "bkt", "a/b", None)
    assert location(tmp_path).local_path == tmp_path.resolve() and location(tmp_path).scheme == "file"
    assert str(location("s3://bkt/a/")) == "s3://bkt/a"
    assert str(location("s3://bkt/a") / "run" / "x.json") == "s3://bkt/a/run/x.json"
    assert str(location(tmp_path) / "x") == str(tmp_path.resolve() / "x")
    assert (location("s3://bkt/a") / "x.tar").name == "x.tar"
    assert str(location("gs://bkt/shards/x.tar").parent) == "gs://bkt/shards"
    az = location("abfs://box@acct.dfs.core.windows.net/p/q")
    assert (az.scheme, az.bucket, az.key, az.account) == ("az", "box", "p/q", "acct")
    assert location(str(az)) == az and location("az://box/p/q") == location("abfss://box/p/q/")
    assert location(location("s3://b/k")) == location("s3://b/k")


@pytest.mark.parametrize("bad", ["s3:/bucket/shards", "s3:bucket", "hdfs://bucket/x", "s3://", "gs:/bucket/x",
                                 "az:/container/x", "abfs://box@not-a-host/x"])
def test_mangled_or_unknown_urls_are_refused_not_made_into_local_folders(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnetDistError, match="expected"):
        location(bad)
    assert not any(tmp_path.iterdir())


def test_local_publish_is_atomic_and_listable(tmp_path):
    target = location(tmp_path / "d" / "x.bin")
    tmp = target.staging()
    tmp.write_bytes(b"abc")
    assert location(tmp_path / "d").listdir() == [".x.bin.tmp"] and not target.exists()
    target.publish_file(tmp)
    assert target.read_bytes() == b"abc" and location(tmp_path / "d").listdir() == ["x.bin"]
    assert target.sha256() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_local_upload_tree_replaces_the_folder_in_one_rename(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "meta.json").write_text("{}")
    final = location(tmp_path / "run" / "ckpt")
    (final / "stale.pt").write_bytes(b"old")
    final.upload_tree(src, last="meta.json")
    assert final.listdir() == ["meta.json"] and location(tmp_path / "run").listdir() == ["ckpt"]


def download_tree(loc: storage.Location, dest: Path) -> None:
    """Every object under ``loc`` into the folder ``dest`` (what the tests compare)."""
    for name in loc.listdir():
        child = loc / name
        if child.is_dir():
            download_tree(child, dest / name)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(child.read_bytes())


@pytest.fixture(params=["s3", "gs", "az"])
def store(request, store_env):
    """Each store server in turn, this process pointed at it."""
    server = request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server", "az": "azurite"}[request.param])
    return store_env(server)


@pytest.mark.slow
def test_objects_round_trip_through_each_store_server(store, tmp_path):
    url = location(f"{store.scheme}://{store.bucket()}/pre/fix")
    assert url.listdir() == [] and not url.is_dir()
    (url / "a.json").write_json({"b": 1, "a": 2})
    assert (url / "a.json").read_text() == '{\n "a": 2,\n "b": 1\n}\n'
    big = url / "sub" / "big.bin"
    tmp = big.staging()
    data = bytes(range(256)) * 20000  # 5 MB: streamed in several ranged reads
    tmp.write_bytes(data)
    big.publish_file(tmp)
    assert not tmp.exists()
    assert url.listdir() == ["a.json", "sub"] and url.is_dir()
    assert url.walk() == ["a.json", "sub/big.bin"] and (url / "sub").walk() == ["big.bin"]
    assert big.size() == len(data) and big.exists() and not (url / "sub").exists()
    with big.open_read() as f:
        assert f.read(10) == data[:10] and f.read() == data[10:]
    download_tree(url, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "big.bin").read_bytes() == data
    assert big.cached_copy().read_bytes() == data
    with pytest.raises(FileNotFoundError):
        (url / "missing.json").read_bytes()
    (url / "sub").remove_tree()
    assert url.listdir() == ["a.json"]
    (url / "a.json").remove()
    (url / "a.json").remove()  # absent: nothing to do
    assert url.listdir() == [] and url.walk() == []


@pytest.mark.slow
def test_upload_tree_writes_the_marker_file_last(store, tmp_path, monkeypatch):
    from unet_dist.storage.objects import ObjectStore

    src = tmp_path / "ckpt"
    src.mkdir()
    for n in ("meta.json", "a.pt", "z.pt"):
        (src / n).write_bytes(n.encode())
    bucket = store.bucket()
    url = location(f"{store.scheme}://{bucket}/runs/r/checkpoint_step-00000001")
    (url / "old.pt").write_bytes(b"a half upload of an earlier attempt")
    order = []
    real = ObjectStore.upload
    monkeypatch.setattr(ObjectStore, "upload", lambda self, loc, p: (order.append(loc.name), real(self, loc, p))[1])
    url.upload_tree(src, last="meta.json")
    assert order == ["a.pt", "z.pt", "meta.json"]
    assert {k for k, v in store.objects(bucket).items() if v} == {
        f"runs/r/checkpoint_step-00000001/{n}" for n in ("a.pt", "z.pt", "meta.json")}


@pytest.mark.slow
def test_missing_bucket_is_one_line_naming_it(store):
    with pytest.raises(UnetDistError, match="bucket 'no-such-bucket' does not exist"):
        location(f"{store.scheme}://no-such-bucket/shards").listdir()


@pytest.mark.slow
def test_missing_credentials_are_one_line(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.reset()
    with pytest.raises(UnetDistError, match="no AWS credentials found"):
        location("s3://any-bucket/x").check()


def test_azure_without_an_account_is_one_line_naming_the_variable(monkeypatch):
    for k in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(k, raising=False)
    storage.reset()
    with pytest.raises(UnetDistError, match="AZURE_STORAGE_ACCOUNT_NAME: no Azure storage account"):
        location("az://box/x").exists()


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
            location("s3://bkt/x").check()
    assert storage.retry_count() - before == 2
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


class FlakyProxy:
    """A TCP proxy to a store server that cuts the first ``cut`` responses longer than ``after``
    bytes: a connection lost mid-download, as on a busy network. (Shorter responses, such as the
    HEAD pyarrow sends before a read, pass whole.)"""

    def __init__(self, target_port: int, cut: int, after: int):
        self.target, self.cut, self.after = target_port, cut, after
        self.lock = threading.Lock()
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
        threading.Thread(target=self._copy, args=(client, upstream, False), daemon=True).start()
        self._copy(upstream, client, True)

    def _take_cut(self) -> bool:
        with self.lock:
            if self.cut > 0:
                self.cut -= 1
                return True
            return False

    def _copy(self, src, dst, may_cut: bool):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if may_cut and sent + len(data) > self.after and self.cut > 0 and self._take_cut():
                    dst.sendall(data[: max(0, self.after - sent)])
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
    url = location(f"s3://{bucket}/shard.tar")
    url.check()  # the bucket check goes through whole
    proxy.cut, proxy.after = 1, 300_000  # the next long response stops after 300 kB
    before = storage.retry_count()
    try:
        with caplog.at_level(logging.WARNING, logger="unet_dist.storage"):
            assert url.read_bytes() == data
    finally:
        proxy.close()
    assert storage.retry_count() - before == 1
    assert any("retry 1 of 2" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_wrong_azure_key_is_one_line_access_denied(azurite, store_env, monkeypatch):
    store_env(azurite)
    container = azurite.bucket()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.env["AZURE_STORAGE_CONNECTION_STRING"].replace(
        "AccountKey=Eby8", "AccountKey=Xby8"))
    storage.reset()
    with pytest.raises(UnetDistError, match=rf"az://{container}/x: access denied"):
        location(f"az://{container}/x").listdir()


@pytest.mark.parametrize("entry, args, needles", [
    ("unet_dist.evaluate", ["--shards", "s3:/bucket/x", "--model", "runs/none"], ["s3:/bucket/x", "s3://BUCKET/PREFIX"]),
    ("unet_dist.preprocess", ["--set", "data.root=s3://bucket/raw", "--set", "shards.dir=shards"],
     ["data.root: s3://bucket/raw", "raw data must be a local path"]),
])
def test_entry_points_name_a_misplaced_url_in_one_line(entry, args, needles, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(entry).main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err[0]
    assert not any(tmp_path.iterdir())
