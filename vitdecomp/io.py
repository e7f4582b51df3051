"""One I/O layer over ``pyarrow.fs``: where a URI lives (local path or ``s3://``) and how to reach it.

Every read and write of every job resolves its URIs here, with one :class:`S3Settings`, so that an
S3 endpoint given to a job is the endpoint every request of that job goes to.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs

from .errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 or an S3-compatible store. Credentials are never held here: they come from
    the standard AWS environment variables, config files or instance roles."""

    endpoint: Optional[str] = None       # e.g. http://127.0.0.1:9000 (else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)
    region: Optional[str] = None         # else $AWS_REGION / $AWS_DEFAULT_REGION

    @classmethod
    def from_env(cls, endpoint: Optional[str] = None, region: Optional[str] = None) -> "S3Settings":
        return cls(endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
                   region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None)

    def pyarrow_fs(self) -> pafs.S3FileSystem:
        kw: dict[str, Any] = {}
        if self.endpoint:
            scheme, _, host = self.endpoint.partition("://")
            if not host:
                scheme, host = "https", self.endpoint
            kw.update(endpoint_override=host, scheme=scheme)
        if self.region:
            kw["region"] = self.region
        return pafs.S3FileSystem(**kw)

    def lance_options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
        if self.endpoint:
            opts["aws_endpoint"] = self.endpoint
            if self.endpoint.startswith("http://"):
                opts["aws_allow_http"] = "true"
        if self.region:
            opts["aws_region"] = self.region
        # ride out short outages: object_store retries with backoff up to this long per request
        opts.setdefault("client_max_retries", "10")
        opts.setdefault("client_retry_timeout", "60")
        return opts


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def resolve(uri: str, s3: Optional[S3Settings] = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` → (pyarrow filesystem, path inside it)."""
    if is_s3(uri):
        return (s3 or S3Settings.from_env()).pyarrow_fs(), uri.split("://", 1)[1].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def retry(fn, what: str, attempts: int = 6, first_delay: float = 1.0):
    """Call ``fn`` until it succeeds, with exponential backoff (idempotent operations only)."""
    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except (OSError, RuntimeError, ValueError) as e:
            if i == attempts - 1 or isinstance(e, (FileNotFoundError, InputError)):
                raise
            log.warning("%s failed (%s: %s); retry %d/%d in %.0f s", what, type(e).__name__, str(e)[:200],
                        i + 1, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
