"""``RAY_ADDRESS``, checked before anything waits on it.

Why: ``ray.init`` on an address where no cluster runs retries its GCS connection for minutes,
printing warnings, before it fails. A TCP connect with a short timeout tells the same in seconds,
and the error names the variable to fix.
"""
from __future__ import annotations

import os
import re
import socket

from unet_dist.errors import UnetDistError

TIMEOUT_S = 5.0
_HOST_PORT = re.compile(r"(?:ray://)?(\[[0-9a-fA-F:]+\]|[^:/\s]+):(\d{1,5})/?")
FORMS = "HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379), ray://HOST:PORT, auto or local"


def check(address: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
    """Refuse a malformed ``RAY_ADDRESS`` or one nothing answers on within ``timeout_s``."""
    address = os.environ.get("RAY_ADDRESS", "") if address is None else address
    text = address.strip()
    if text in ("", "auto", "local"):
        return  # unset/local: a private Ray; auto: Ray looks for a cluster on this machine itself
    m = _HOST_PORT.fullmatch(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UnetDistError(f"RAY_ADDRESS={address}: expected {FORMS}")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        why = f"no answer within {timeout_s:g} s" if isinstance(e, socket.timeout) else (e.strerror or str(e)).lower()
        raise UnetDistError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({why}); "
                            "start the cluster, fix the address, or unset RAY_ADDRESS to train on a local Ray") from None
