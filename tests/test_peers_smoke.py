"""The peers of benchmarks/bench_peers.py (the plain PyTorch script, Ray Data ingest under Ray Train,
smp.Unet in our loop) each train 3 steps and evaluate, so that the comparison keeps working.

They run in the peers' venv (``make peers-setup``: torch 2.14.1 + torchvision + smp over this venv's
packages), which ``.ci/run`` makes: in CI a missing venv fails this test, it never skips.
"""
from __future__ import annotations

import os
import re
import subprocess
import pytest

from conftest import REPO, clean_env, patient

PEERS_PY = REPO / ".venv-peers" / "bin" / "python"
PEERS = ("plain PyTorch", "Ray Data", "smp.Unet")


@pytest.mark.slow  # torchrun twice, a private Ray with Ray Train and Ray Data once
def test_each_peer_trains_three_steps_with_the_labels_of_our_shards(tmp_path):
    if not PEERS_PY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PEERS_PY} is missing: .ci/run must run `make peers-setup` before the tests")
        pytest.skip("no .venv-peers here: run `make peers-setup` to test the peers")
    cmd = [str(PEERS_PY), "benchmarks/bench_peers.py", "--quick", "--skip", "city", "--cache", str(tmp_path),
           *(a for case in PEERS for a in ("--case", case))]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=patient(400))
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    # The plain peer maps colours with the shards' quantizer: its labels are the shards' labels.
    assert "labels identical to the shards' on 24/24 samples (train + val)" in out
    assert "(the peer) |" in out  # the FLOPs row of the smp encoder
    for case in PEERS:  # trained 3 steps, evaluated the val split, and is in the tables
        assert re.search(rf"round 1, {re.escape(case)}: start-up [\d.]+ s, 3 steps in", out), out
        assert f"| {case} | " in out
