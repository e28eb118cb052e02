"""Pick and open a store backend from one URL setting (e.g. ``VPT_STORE_URL``).

- ``/var/lib/vpt/store``, ``./store`` (anything without ``://``) or ``file:///var/lib/vpt/store`` →
  `LocalStore`;
- ``s3://bucket`` or ``s3://bucket/some/prefix`` → `S3Store`. Endpoint, region and credentials come
  from boto3's standard chain (``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance
  roles) unless given as keyword options.

Non-secret options may also ride in the query string, e.g.
``s3://tasks/prod?endpoint_url=http://minio:9000&region=eu-west-1``; keyword options win. Credentials
are refused in the query string: URLs end up in logs and process listings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from prompt_store.base import PromptStore

__all__ = ["open_store"]

_COMMON_QUERY: dict[str, Callable[[str], Any]] = {"keep_versions": int}
_LOCAL_QUERY: dict[str, Callable[[str], Any]] = {**_COMMON_QUERY, "lock_timeout": float}
_S3_QUERY: dict[str, Callable[[str], Any]] = {
    **_COMMON_QUERY,
    "endpoint_url": str,
    "region": str,
    "addressing_style": str,
    "connect_timeout": float,
    "read_timeout": float,
    "max_attempts": int,
    "max_pool_connections": int,
    "commit_attempts": int,
    "lock_ttl": float,
    "lock_timeout": float,
}
_SECRETS = frozenset({"access_key_id", "secret_access_key", "session_token", "aws_access_key_id",
                      "aws_secret_access_key", "aws_session_token", "password"})  # fmt: skip


def open_store(url: str | os.PathLike[str], **options: Any) -> PromptStore:
    """Open the store that `url` names; `options` go to the backend's constructor.

    Args:
        url: a directory path, a ``file://`` URL or an ``s3://bucket[/prefix]`` URL.
        **options: backend keyword arguments (`LocalStore` / `S3Store`), e.g. keep_versions=10,
            endpoint_url="http://127.0.0.1:9000", access_key_id=..., secret_access_key=....

    Raises:
        ValueError: an empty or malformed URL, an unknown scheme or query option, or credentials in
            the query string.
        StoreUnavailable: the local directory cannot be created (or is missing with create=False).
    """
    text = os.fspath(url)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the store URL is empty")
    if "://" not in text:
        # A plain path, even one with a ':' in it; file:// is there for anything ambiguous.
        from prompt_store.local import LocalStore

        return LocalStore(text, **options)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {text!r} names a remote host; use a local path")
        if not parts.path:
            raise ValueError(f"file URL {text!r} has no path")
        from prompt_store.local import LocalStore

        return LocalStore(unquote(parts.path), **{**_query_options(parts.query, _LOCAL_QUERY), **options})
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket or "@" in bucket:
            raise ValueError(f"S3 URL {text!r} needs the form s3://bucket[/prefix] (no user info)")
        from prompt_store.s3 import S3Store

        prefix = unquote(parts.path).strip("/")
        return S3Store(bucket, prefix, **{**_query_options(parts.query, _S3_QUERY), **options})
    raise ValueError(
        f"unsupported store URL scheme {parts.scheme!r} in {text!r} (use a path, file:// or s3://)"
    )


def _query_options(query: str, allowed: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise ValueError(f"malformed store URL query {query!r}: {e}") from None
    for key, value in pairs:
        if key in _SECRETS:
            raise ValueError(f"credentials ({key}) do not belong in the store URL; use the AWS_* variables")
        if key not in allowed:
            raise ValueError(f"unknown store URL option {key!r} (allowed: {', '.join(sorted(allowed))})")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise ValueError(
                f"store URL option {key}={value!r} is not a valid {allowed[key].__name__}"
            ) from None
    return out
