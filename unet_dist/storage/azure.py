"""Azure Blob Storage (``az://CONTAINER/PREFIX``, ``abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX``).

The account and its secret come from the standard variables, never from our YAML:

- ``AZURE_STORAGE_CONNECTION_STRING`` (what the Azure SDKs, the az CLI and MLflow read): account,
  key or SAS token, and the endpoint (``BlobEndpoint`` for Azurite or a private endpoint); or
- ``AZURE_STORAGE_ACCOUNT_NAME`` (or the URL's account) with ``AZURE_STORAGE_ACCOUNT_KEY`` (the az
  CLI's ``AZURE_STORAGE_KEY`` also works) or ``AZURE_STORAGE_SAS_TOKEN``; with neither, pyarrow's
  DefaultAzureCredential: ``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/``AZURE_CLIENT_SECRET``, AKS
  workload identity, a managed identity.
"""
from __future__ import annotations

import os

from unet_dist.errors import UnetDistError

NAME = "Azure Blob"
ATTEMPTS_VARS = ("UNET_DIST_MAX_ATTEMPTS",)
DENIED = ("AuthorizationFailure", "AuthenticationFailed", "AuthorizationPermissionMismatch", " 403 ")
NO_BUCKET = ("ContainerNotFound",)
NO_CREDENTIALS = ("DefaultAzureCredential", "CredentialUnavailable", "ManagedIdentityCredential")


def connection_string() -> dict[str, str]:
    raw = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    parts = dict(p.split("=", 1) for p in raw.split(";") if "=" in p)
    if parts.get("UseDevelopmentStorage", "").lower() == "true":  # Azurite's well-known account
        parts.setdefault("AccountName", "devstoreaccount1")
        parts.setdefault("AccountKey", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
                                       "K1SZFPTOtr/KBHBeksoGMGw==")
        parts.setdefault("BlobEndpoint", "http://127.0.0.1:10000/devstoreaccount1")
    return parts


def settings(account: str) -> dict:
    """pyarrow AzureFileSystem keyword arguments from the environment (``account``: the URL's)."""
    cs = connection_string()
    name = account or cs.get("AccountName") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") \
        or os.environ.get("AZURE_STORAGE_ACCOUNT", "")
    if not name:
        raise UnetDistError("AZURE_STORAGE_ACCOUNT_NAME: no Azure storage account given; set it (or "
                            "AZURE_STORAGE_CONNECTION_STRING), or name it in the URL: "
                            "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX")
    opts: dict = {"account_name": name}
    key = cs.get("AccountKey") or os.environ.get("AZURE_STORAGE_ACCOUNT_KEY") or os.environ.get("AZURE_STORAGE_KEY")
    sas = cs.get("SharedAccessSignature") or os.environ.get("AZURE_STORAGE_SAS_TOKEN")
    if key:
        opts["account_key"] = key
    elif sas:
        opts["sas_token"] = sas.lstrip("?")
    blob = cs.get("BlobEndpoint", "")
    if blob:  # http://127.0.0.1:10000/devstoreaccount1 (Azurite) or https://ACCOUNT.blob.core.windows.net
        scheme, _, rest = blob.partition("://")
        opts.update(blob_storage_scheme=scheme, blob_storage_authority=rest.split("/", 1)[0],
                    dfs_storage_scheme=scheme, dfs_storage_authority=rest.split("/", 1)[0])
    elif cs.get("EndpointSuffix"):
        suffix = cs["EndpointSuffix"]
        opts.update(blob_storage_authority=f".blob.{suffix}", dfs_storage_authority=f".dfs.{suffix}")
    if cs.get("DefaultEndpointsProtocol") and not blob:
        opts.update(blob_storage_scheme=cs["DefaultEndpointsProtocol"], dfs_storage_scheme=cs["DefaultEndpointsProtocol"])
    return opts


def endpoint(account: str = "") -> str:
    try:
        opts = settings(account)
    except UnetDistError:
        return "the Azure Blob endpoint"
    authority = opts.get("blob_storage_authority", ".blob.core.windows.net")
    host = f"{opts['account_name']}{authority}" if authority.startswith(".") else authority
    return f"{opts.get('blob_storage_scheme', 'https')}://{host}"


def reset() -> None:
    pass


def check_credentials(url: str) -> None:
    """Without a key or SAS token pyarrow asks DefaultAzureCredential on the first request: an
    error naming it is mapped by :data:`NO_CREDENTIALS`."""


def filesystem(account: str, sdk_attempts: int):
    """pyarrow does not expose the Azure SDK's retry policy: its default (3 retries, exponential
    from 0.8 s) stays under each of our attempts."""
    import pyarrow.fs as pafs

    return pafs.AzureFileSystem(**settings(account))


def hint_denied() -> str:
    return "check the account key, SAS token or role assignment (AZURE_STORAGE_CONNECTION_STRING)"
