"""S3 and S3-compatible stores (MinIO, Ceph RGW, moto): the pyarrow filesystem and its settings.

Endpoint, credentials and region come from where every AWS tool reads them, never from our YAML:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``
(+ ``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` and ``~/.aws/*``, web identity (IRSA), container and
instance roles. pyarrow's AWS SDK resolves the credentials itself; botocore (installed for MLflow's
S3 artifact store) only answers, once per process, whether any exist, because the AWS SDK silently
sends unsigned requests when none do, and the region, as boto3 resolves it.
"""
from __future__ import annotations

import os

from unet_dist.errors import UnetDistError

NAME = "S3"
ATTEMPTS_VARS = ("UNET_DIST_MAX_ATTEMPTS", "AWS_MAX_ATTEMPTS")
DENIED = ("ACCESS_DENIED", "AccessDenied", "[code 403]", "InvalidAccessKeyId", "SignatureDoesNotMatch",
          "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")
NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")
NO_CREDENTIALS = ("No credentials", "NoCredentials")
_SESSION = None


def endpoint(account: str = "") -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS S3 endpoint"


def _botocore_session():
    global _SESSION
    if _SESSION is None:
        import botocore.session

        _SESSION = botocore.session.get_session()
    return _SESSION


def reset() -> None:
    global _SESSION
    _SESSION = None


def check_credentials(url: str) -> None:
    import logging

    logging.getLogger("botocore").setLevel(logging.WARNING)  # it logs where it found them at INFO
    if _botocore_session().get_credentials() is None:
        raise UnetDistError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")


def filesystem(account: str, sdk_attempts: int):
    """``sdk_attempts``: 1 for our own I/O (every retry is ours, counted), the bound itself for
    the filesystem handed to Ray, whose uploads have no retry of ours around them."""
    import pyarrow.fs as pafs

    opts: dict = {}
    if endpoint() != "the AWS S3 endpoint":
        opts["endpoint_override"] = endpoint()
    # With an endpoint of its own (MinIO, Ceph) and no region configured, the AWS SDK would ask the
    # EC2 metadata service for one; boto3 takes us-east-1 there, and so do we.
    region = _botocore_session().get_config_variable("region") or ("us-east-1" if "endpoint_override" in opts else None)
    if region:
        opts["region"] = region
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts), **opts)


def hint_denied() -> str:
    return "check the AWS credentials and the bucket policy"
