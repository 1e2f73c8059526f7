"""The wheels the image's dependency step downloads from PyPI, and their size, without downloading them.

    .venv/bin/python scripts/image_download_size.py     # the default (GPU) build: PyPI's CUDA torch

pip resolves the Dockerfile's `pip install -c constraints.txt ".[gpu]" "psycopg[binary]"` for this
interpreter's platform (run it with the project's Python 3.11 on Linux x86_64, as in the image;
`pip install --dry-run --report` reads only the wheels' metadata), and PyPI's simple index (its
JSON form) gives each chosen file's size. The machine's own pip settings (a local wheel cache, local
indexes) are switched off, so the answer is what a plain machine downloads. docs/cluster.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dependency_requirements() -> list[str]:
    """The requirements of the Dockerfile's dependency step, read from the Dockerfile itself."""
    text = (REPO / "Dockerfile").read_text()
    step = re.search(r'pip install \$\{TORCH_INDEX_URL[^\n]*?-c constraints\.txt ([^\n\\]+)', text).group(1)
    return re.findall(r'"([^"]+)"', step)


def resolve() -> list[dict]:
    """pip's installation report for the dependency step, against PyPI."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(REPO / "pyproject.toml", work)
        (work / "README.md").touch()
        (work / "unet_dist").mkdir()
        (work / "unet_dist" / "__init__.py").touch()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
        cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(work / "report.json"), "-c", str(REPO / "constraints.txt"),
               *(["--cert", cert] if cert else []), *dependency_requirements()]
        subprocess.run(cmd, cwd=work, env=env, check=True)
        return json.loads((work / "report.json").read_text())["install"]


def size_on_pypi(name: str, url: str) -> int:
    """The size PyPI's simple index (JSON form, PEP 691/700) lists for the file at ``url``."""
    req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    filename = url.rsplit("/", 1)[-1]
    return next(f["size"] for f in files if f["filename"] == filename)


def is_cuda(name: str) -> bool:
    """torch's CUDA build and what it brings: the part a CPU build replaces with one torch+cpu wheel."""
    return name == "torch" or name == "triton" or name.startswith(("nvidia-", "cuda-")) and name != "nvidia-ml-py"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = []
    for item in resolve():
        if item["download_info"]["url"].startswith("file:"):
            continue  # the project itself
        meta = item["metadata"]
        rows.append((size_on_pypi(meta["name"], item["download_info"]["url"]), meta["name"], meta["version"]))
    for size, name, version in sorted(rows, reverse=True)[:12]:
        print(f"{size / 2**20:9.1f} MiB  {name}=={version}")
    cuda = sum(size for size, name, _ in rows if is_cuda(name))
    total = sum(size for size, _, _ in rows)
    print(f"{total / 2**20:9.1f} MiB  total, {len(rows)} wheels: {cuda / 2**20:.1f} MiB torch (CUDA build) + "
          f"nvidia-* + triton + cuda-*, {(total - cuda) / 2**20:.1f} MiB the rest")


if __name__ == "__main__":
    main()
