"""Which backend serves a :class:`~unet_dist.storage.Location`: the local one or an object store
(one per scheme and Azure account, kept for the process; :func:`reset` forgets them)."""
from __future__ import annotations

import importlib
import threading

from unet_dist.storage.local import Local

MODULES = {"s3": "unet_dist.storage.s3", "gs": "unet_dist.storage.gcs", "az": "unet_dist.storage.azure"}
_LOCAL = Local()
_STORES: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def backend(loc):
    if loc.scheme == "file":
        return _LOCAL
    with _LOCK:
        key = (loc.scheme, loc.account)
        if key not in _STORES:
            from unet_dist.storage.objects import ObjectStore

            _STORES[key] = ObjectStore(importlib.import_module(MODULES[loc.scheme]), loc.account)
        return _STORES[key]


def reset() -> None:
    """Forget the filesystems and the buckets checked (after the environment changed)."""
    with _LOCK:
        _STORES.clear()
    for name in MODULES.values():
        importlib.import_module(name).reset()
