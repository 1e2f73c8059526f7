"""The multi-node preflight checks and the collective-interface choice, in one process (fast).
The same checks on a real two-node cluster: tests/test_multinode.py."""
from __future__ import annotations

import os

import pytest

from unet_dist.config import load_config
from unet_dist.errors import UnetDistError
from unet_dist import distributed
from unet_dist.train import multinode


@pytest.mark.parametrize("uri, local", [("sqlite:///runs/mlflow.db", True), ("/srv/mlruns", True),
                                        ("file:///srv/mlruns", True), ("http://mlflow:5000", False),
                                        ("databricks", False), ("mlruns", True), ("https://mlflow.example", False)])
def test_local_tracking_stores_are_told_apart_from_servers(uri, local):
    assert multinode.is_local_store(uri) is local


def test_local_tracking_store_is_refused_only_when_workers_span_nodes():
    multinode.check_tracking_store("sqlite:///x.db", 1)
    multinode.check_tracking_store("http://mlflow:5000", 4)
    with pytest.raises(UnetDistError, match=r"^mlflow\.tracking_uri: sqlite:///x\.db is a file on one machine.*2 nodes"):
        multinode.check_tracking_store("sqlite:///x.db", 2)


def test_places_in_s3_are_not_probed_since_every_node_reaches_the_same_bucket(tmp_path):
    cfg = load_config(None, ["shards.dir=s3://bucket/shards", f"train.checkpoint_dir={tmp_path / 'c'}"])
    probes = multinode.write_probes(cfg)
    assert list(probes) == ["train.checkpoint_dir"]
    multinode.remove_probes(probes)


def test_a_probe_another_node_cannot_read_names_the_key(tmp_path):
    cfg = load_config(None, [f"shards.dir={tmp_path / 's'}", f"train.checkpoint_dir={tmp_path / 'c'}"])
    probes = multinode.write_probes(cfg)
    assert multinode.missing_probes(probes) == []
    (tmp_path / "c").joinpath(probes["train.checkpoint_dir"].split()[0].rsplit("/", 1)[1]).write_text("other")
    assert multinode.missing_probes(probes) == ["train.checkpoint_dir"]  # another disk, same path
    multinode.remove_probes(probes)
    assert not list(tmp_path.rglob(".unet-dist-probe-*"))
    err = multinode.unseen_error(cfg, {"train.checkpoint_dir": ["node1"]})
    assert str(err).startswith(f"train.checkpoint_dir: {tmp_path / 'c'} is not the same folder on node1")


def test_collective_interface_follows_the_route_and_respects_the_users_choice(monkeypatch):
    for v in distributed.IFNAME_VARS:
        monkeypatch.delenv(v, raising=False)
    assert distributed.pin_interface("127.0.0.1", towards=True, why="test") == "lo"
    assert all(os.environ[v] == "lo" for v in distributed.IFNAME_VARS)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")
    assert distributed.pin_interface("127.0.0.1", towards=True, why="test") == "eth9"
    assert "NCCL_SOCKET_IFNAME" not in os.environ


def test_an_mlflow_server_no_node_can_reach_is_one_line_naming_the_key(monkeypatch):
    """The runtime env's default (the Kubernetes Service name) outside that cluster: one line after a
    short retry, not minutes of HTTP retries ending in a traceback."""
    import socket

    from unet_dist import tracking

    monkeypatch.setattr(tracking, "REACH_S", 1.0)
    with pytest.raises(UnetDistError, match=r"^mlflow\.tracking_uri: http://mlflow\.invalid:5000: cannot resolve"):
        tracking.check_access("http://mlflow.invalid:5000")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UnetDistError, match=rf"^mlflow\.tracking_uri: http://127\.0\.0\.1:{port}: no answer on port {port}"):
        tracking.check_access(f"http://127.0.0.1:{port}")
