"""Where data lives: a local path or an object store, behind one type.

Everything that names a place (shards, checkpoints, the quantizer, sweep state) holds a
:class:`Location`, built by :func:`location` from a local path or a URL (``s3://``, ``gs://``,
``az://``, ``abfs://``); that function is the only code in the package that parses a URL, and
callers never ask which kind of place they hold. Local paths are plain files (temp file, fsync,
rename); object stores go through ``pyarrow.fs`` (the library Ray Train itself hands its storage
to), with counted retries, resumable reads and one-line errors. docs/storage.md has the why.

    shards = storage.location(cfg.shards.dir)
    manifest = json.loads((shards / "manifest.json").read_text())
"""
from __future__ import annotations

from unet_dist.storage.backends import reset
from unet_dist.storage.gopen import register_gopen
from unet_dist.storage.location import Location, PathOrUrl, location
from unet_dist.storage.retry import retry_count

__all__ = ["Location", "PathOrUrl", "location", "register_gopen", "reset", "retry_count"]
