"""Shared entry-point plumbing: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from unet_dist.errors import UnetDistError


def run_main(fn: Callable[[], object]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        fn()
    except UnetDistError as e:
        sys.stderr.write(f"{_fresh_line()}error: {e}\n")  # one write: no other thread can split it
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _fresh_line() -> str:
    """A newline first while Ray forwards worker logs to this process: its thread prints each line
    as two writes (text, then newline), and the error line must not be glued to a worker's."""
    ray = sys.modules.get("ray")
    return "\n" if ray is not None and ray.is_initialized() else ""
