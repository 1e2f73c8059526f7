"""Google Cloud Storage (``gs://BUCKET/PREFIX``): the pyarrow filesystem and its settings.

Credentials are google-cloud-cpp's usual chain, resolved by pyarrow: ``GOOGLE_APPLICATION_CREDENTIALS``
(a service-account key file), gcloud's application-default credentials, or the metadata server
(GKE Workload Identity, GCE). ``STORAGE_EMULATOR_HOST`` (the variable Google's client libraries
read, e.g. ``http://127.0.0.1:4443``) points everything at an emulator, anonymously.
"""
from __future__ import annotations

import os
from datetime import timedelta

NAME = "GCS"
ATTEMPTS_VARS = ("UNET_DIST_MAX_ATTEMPTS",)
DENIED = ("PERMISSION_DENIED", "http_status_code=403", "Forbidden")
NO_BUCKET = ()  # a missing bucket is found by the bucket check (NotFound), not in an error text
NO_CREDENTIALS = ("Could not automatically determine credentials", "UNAUTHENTICATED", "http_status_code=401")


def emulator() -> tuple[str, str] | None:
    """``(scheme, host:port)`` of ``$STORAGE_EMULATOR_HOST``, or None."""
    raw = os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if not raw:
        return None
    scheme, sep, host = raw.partition("://")
    return (scheme, host) if sep else ("http", raw)


def endpoint(account: str = "") -> str:
    emu = emulator()
    return f"{emu[0]}://{emu[1]}" if emu else "storage.googleapis.com"


def reset() -> None:
    pass


def check_credentials(url: str) -> None:
    """google-cloud-cpp finds its credentials lazily (possibly from a metadata server): an error
    naming them comes from the first request, mapped by :data:`NO_CREDENTIALS`."""


def filesystem(account: str, sdk_attempts: int):
    """google-cloud-cpp retries by time, not attempts: 1 s (its minimum; 0 refuses to send at all)
    for our own I/O, about 2 s per attempt for Ray's."""
    import pyarrow.fs as pafs

    opts: dict = {"retry_time_limit": timedelta(seconds=1 if sdk_attempts <= 1 else 2 * sdk_attempts)}
    emu = emulator()
    if emu:
        opts.update(anonymous=True, scheme=emu[0], endpoint_override=emu[1])
    return pafs.GcsFileSystem(**opts)


def hint_denied() -> str:
    return "check the service account's roles on the bucket (GOOGLE_APPLICATION_CREDENTIALS)"
