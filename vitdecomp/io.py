"""One I/O layer over ``pyarrow.fs``: where a URI lives (local path or ``s3://``) and how to reach it.

Every read and write of every job resolves its URIs here, with one :class:`S3Settings`, so that an
S3 endpoint given to a job is the endpoint every request of that job goes to: source images through
:func:`read_bytes` / :func:`read_image` (local, ``s3://`` or a WebDataset member ``shard.tar#key``),
outputs through an :class:`OutputDir` (:func:`open_output`), single files through :func:`write_bytes`.
"""
from __future__ import annotations

import errno
import io as _io
import json
import logging
import mimetypes
import os
import posixpath
import re
import tarfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Union

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
            # Lance reads $AWS_ENDPOINT_URL_S3 into this key, which outranks aws_endpoint: pin both
            opts["aws_endpoint_url_s3"] = self.endpoint
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


_PERMANENT_ERRNO = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR,
                    errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG}
_PERMANENT_TEXT = ("no space left", "read-only file system", "permission denied", "access denied", "accessdenied",
                   "quota exceeded", "os error 28", "os error 30", "os error 13", "nosuchbucket", "invalidaccesskeyid",
                   "signaturedoesnotmatch")
_TRANSIENT_TEXT = ("timed out", "timeout", "connection", "throttl", "slowdown", "slow down", " 503", " 500",
                   "internal error", "internalerror", "temporar", "conflict", "preempted", "reset by peer",
                   "broken pipe", "dispatch failure", "network", "unavailable", "try again", "curlcode")


def transient(e: BaseException) -> bool:
    """Whether an error can go away by itself (network, throttling, a commit conflict) — worth a retry —
    rather than a full disk, a read-only or forbidden location or a bad value, which fail at once."""
    if isinstance(e, (InputError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, OSError) and e.errno in _PERMANENT_ERRNO:
        return False
    text = f"{type(e).__name__}: {e}".lower()
    if any(t in text for t in _PERMANENT_TEXT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(t in text for t in _TRANSIENT_TEXT)


def retry(fn, what: str, attempts: int = 6, first_delay: float = 1.0):
    """Call ``fn`` until it succeeds, with exponential backoff (idempotent operations only). Only
    :func:`transient` errors are retried; a full disk, a read-only or forbidden location or a bad
    value fails at once."""
    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except (OSError, RuntimeError, ValueError) as e:
            if i == attempts - 1 or not transient(e):
                raise
            log.warning("%s failed (%s: %s); retry %d/%d in %.0f s", what, type(e).__name__, str(e)[:200],
                        i + 1, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


# ------------------------------------------------------------------------------------- reading
# a WebDataset member is the first file of the shard named <key>.<ext> with one of these extensions
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
_MEMBER_RE = re.compile(r"^(.*?\.tar)#(.+)$", re.IGNORECASE)


class UndecodableImageError(OSError):
    """Bytes were read from a source URI but are not a decodable image (the message names the URI)."""


def split_member(uri: str) -> tuple[str, Optional[str]]:
    """``shard.tar#key`` → ``("shard.tar", "key")``; any other URI → ``(uri, None)``."""
    m = _MEMBER_RE.match(uri)
    return (m.group(1), m.group(2)) if m else (uri, None)


def _naming(e: OSError, message: str) -> OSError:
    """``e`` re-made with ``message`` (which names the URI), keeping its class (``PermissionError``,
    ``ConnectionError``…) where that class can be built from a message alone."""
    try:
        out = type(e)(message)
    except TypeError:                     # an OSError subclass with another constructor: a plain OSError
        out = OSError(message)
    out.errno = e.errno
    return out


def _source(uri: str, s3: Optional[S3Settings]) -> tuple[pafs.FileSystem, str]:
    try:
        return resolve(uri, s3)
    except InputError as e:
        raise OSError(f"cannot read {uri!r}: {e}") from None


def _read_member(uri: str, fs: pafs.FileSystem, path: str, key: str) -> bytes:
    """Stream the shard at ``path`` until the image member of ``key``; its bytes."""
    prefix = key + "."
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if (m.isfile() and m.name.startswith(prefix)
                        and m.name[len(prefix):].lower() in IMAGE_EXTENSIONS):
                    return tar.extractfile(m).read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: the shard does not exist") from e
    except (tarfile.TarError, EOFError) as e:
        raise OSError(f"{uri}: not a readable tar shard ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise _naming(e, f"{uri}: cannot read the shard ({e})") from e
    raise FileNotFoundError(f"{uri}: no image member {key!r} (extensions {', '.join(IMAGE_EXTENSIONS)}) "
                            "in the shard")


def read_bytes(uri: str, s3: Optional[S3Settings] = None) -> bytes:
    """The bytes at ``uri``: a local path, ``s3://bucket/key`` or a WebDataset member ``shard.tar#key``
    (local or S3 shard, streamed until the member; see :data:`IMAGE_EXTENSIONS`).

    Raises :class:`FileNotFoundError` (missing file, shard or member) or :class:`OSError` (anything
    else unreadable), the message naming ``uri``.
    """
    path, key = split_member(uri)
    fs, p = _source(path, s3)
    if key is not None:
        return _read_member(uri, fs, p, key)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e
    except OSError as e:
        raise _naming(e, f"{uri}: cannot read ({e})") from e


def decode_errors() -> tuple[type, ...]:
    """The exception types a decoder raises on bad bytes (Pillow's decompression-bomb error is not
    an ``OSError``)."""
    from PIL import Image

    from .errors import VitdecompError

    return OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, VitdecompError


def read_image(uri: str, s3: Optional[S3Settings] = None, **decode_kwargs: Any):
    """The image at ``uri`` (see :func:`read_bytes`) decoded by :func:`vitdecomp.images.decode_image`
    into an RGB ``PIL.Image``. Unreadable sources raise as :func:`read_bytes`; undecodable bytes
    raise :class:`UndecodableImageError` naming ``uri``."""
    from .images import decode_image

    data = read_bytes(uri, s3)
    try:
        return decode_image(data, **decode_kwargs)
    except decode_errors() as e:
        raise UndecodableImageError(f"{uri}: not a decodable image ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------- writing
def split(uri: str) -> tuple[str, str]:
    """``uri`` → (its parent directory URI, its last component), for local paths and ``s3://``."""
    u = uri.rstrip("/")
    if is_s3(u):
        parent, _, name = u.rpartition("/")
        if "/" not in u.split("://", 1)[1]:
            raise InputError(f"{uri!r} names a bucket, not an object inside one")
        return parent, name
    local = os.path.abspath(os.path.expanduser(u[len("file://"):] if u.startswith("file://") else u))
    return os.path.dirname(local), os.path.basename(local)


def figure_bytes(fig, format: str = "png", close: bool = True, **savefig_kwargs: Any) -> bytes:
    """A matplotlib figure rendered into bytes (``format``: png, svg, …); closes it unless told not to."""
    buf = _io.BytesIO()
    try:
        fig.savefig(buf, format=format, **savefig_kwargs)
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return buf.getvalue()


class OutputDir:
    """A job's output directory, local or ``s3://bucket/prefix``, written through ``pyarrow.fs`` with
    the job's :class:`S3Settings`. Local writes are atomic (a unique temporary name in the same
    directory, then ``os.replace``); S3 PUTs are atomic already (and retried, being idempotent).
    ``rel`` arguments are POSIX paths relative to the directory."""

    def __init__(self, uri: str, s3: Optional[S3Settings] = None):
        self.s3 = s3 or S3Settings.from_env()
        self.is_s3 = is_s3(uri)
        self.fs, self.root = resolve(uri, self.s3)
        self._base = "s3://" + self.root if self.is_s3 else self.root
        self._checked = False

    def __repr__(self) -> str:
        return f"OutputDir({self._base!r})"

    # ------------------------------------------------------------------ locations
    def path(self, rel: str = "") -> str:
        """``rel`` as a path inside :attr:`fs`."""
        return "/".join([self.root, rel.strip("/")]) if rel.strip("/") else self.root

    def uri(self, rel: str = "") -> str:
        """``rel`` as a URI a user can pass back (a local path, or ``s3://bucket/key``)."""
        return "/".join([self._base, rel.strip("/")]) if rel.strip("/") else self._base

    def relative(self, path: str) -> Optional[str]:
        """``path`` (relative to this directory, an absolute local path or an ``s3://`` URI) as a
        normalised relative POSIX path; None when it is not strictly inside the directory."""
        if is_s3(path) or os.path.isabs(path) or path.startswith("file://"):
            if is_s3(path) != self.is_s3:
                return None
            full = ("s3://" + path.split("://", 1)[1]) if self.is_s3 else \
                os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
            base = self._base
            if not full.startswith(base.rstrip("/") + "/"):
                return None
            path = full[len(base.rstrip("/")) + 1:]
        rel = posixpath.normpath(path.replace(os.sep, "/"))
        if rel in (".", "") or rel == ".." or rel.startswith("../") or rel.startswith("/"):
            return None
        return rel

    @property
    def storage_options(self) -> Optional[dict[str, str]]:
        """Lance ``storage_options`` for datasets in this directory (None for local ones)."""
        return self.s3.lance_options() if self.is_s3 else None

    def lance_uri(self, rel: str) -> str:
        """Where Lance writes the dataset ``rel`` (use with :attr:`storage_options`)."""
        return self.uri(rel)

    # ------------------------------------------------------------------ checks
    def _info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str = "") -> bool:
        """Whether a file or directory ``rel`` exists (on S3: an object or a key prefix)."""
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        """Whether ``rel`` is a file (an object on S3)."""
        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        """Whether ``rel`` is a directory (on S3: a key prefix with objects under it, or the bucket)."""
        return self._info(rel).type == pafs.FileType.Directory

    def list(self, suffix: str = "") -> list[str]:
        """Names of the files directly in the directory that end with ``suffix``, sorted."""
        sel = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        names = [posixpath.basename(i.path) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        return sorted(n for n in names if n.endswith(suffix))

    # ------------------------------------------------------------------ writing
    def makedirs(self, rel: str = "") -> None:
        """Create the directory (and ``rel`` below it). On S3 there are no directories: check that
        the bucket exists instead, so a typo fails before any work."""
        if self.is_s3:
            if not self._checked:
                bucket = self.root.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise InputError(f"cannot write to {self._base}: bucket {bucket!r} does not exist at "
                                     f"{self.s3.endpoint or 'the default S3 endpoint'}")
                self._checked = True
            return
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` atomically; returns :meth:`uri` of it."""
        if self.is_s3:
            self.makedirs()

            kind = mimetypes.guess_type(rel)[0] or "application/octet-stream"     # report.html opens in a browser

            def put():
                with self.fs.open_output_stream(self.path(rel), metadata={"Content-Type": kind}) as f:
                    f.write(data)

            retry(put, f"write {self.uri(rel)}")
            return self.uri(rel)
        target = self.path(rel)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)       # the umask applies
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return target

    def write_text(self, rel: str, text: str) -> str:
        """``text`` as UTF-8 into ``rel`` (atomically); returns its URI."""
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any, indent: int = 2, **json_kwargs: Any) -> str:
        """``obj`` as indented JSON into ``rel`` (atomically; ``json.dumps`` options pass through)."""
        return self.write_text(rel, json.dumps(obj, indent=indent, **json_kwargs))

    def write_parquet(self, rel: str, table) -> str:
        """A ``pyarrow.Table`` as one Parquet file (serialised in memory, then written atomically)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_bytes(rel, sink.getvalue().to_pybytes())

    def savefig(self, rel: str, fig, **savefig_kwargs: Any) -> str:
        """A matplotlib figure into ``rel`` (format from its extension); closes the figure."""
        fmt = posixpath.splitext(rel)[1].lstrip(".").lower() or "png"
        return self.write_bytes(rel, figure_bytes(fig, format=fmt, **savefig_kwargs))

    # ------------------------------------------------------------------ reading
    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``rel``; :class:`FileNotFoundError` naming its URI when it is missing."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(rel)}: no such file") from None

    def read_text(self, rel: str) -> str:
        """The UTF-8 text of ``rel``."""
        return self.read_bytes(rel).decode("utf-8")

    def open_input_file(self, rel: str):
        """A random-access file (e.g. for ``pyarrow.parquet.ParquetFile``)."""
        return self.fs.open_input_file(self.path(rel))


def open_output(uri: Union[str, OutputDir], s3: Optional[S3Settings] = None) -> OutputDir:
    """The :class:`OutputDir` at ``uri`` (a local directory or ``s3://bucket/prefix``; an OutputDir
    passes through)."""
    return uri if isinstance(uri, OutputDir) else OutputDir(uri, s3)


def write_bytes(uri: str, data: bytes, s3: Optional[S3Settings] = None) -> str:
    """Write one file at ``uri`` (local path or ``s3://``) atomically; returns ``uri`` as written."""
    parent, name = split(uri)
    return open_output(parent, s3).write_bytes(name, data)


# --------------------------------------------------------------------------------- artefacts
def save_artefact(path: str, tensors: dict, meta: dict, s3: Optional[S3Settings] = None) -> str:
    """Write ``<path>.safetensors`` (``tensors``: name → torch tensor) and ``<path>.json`` (``meta``),
    each atomically, locally or on ``s3://``; returns ``path`` without extension."""
    from safetensors.torch import save

    base = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    parent, name = split(base)
    out = open_output(parent, s3)
    out.makedirs()
    out.write_bytes(name + ".safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
    out.write_json(name + ".json", meta, sort_keys=True)
    return base


def load_artefact(path: str, what: str, s3: Optional[S3Settings] = None) -> tuple[dict, dict]:
    """The ``(tensors, meta)`` :func:`save_artefact` wrote at ``path`` (with or without extension);
    never unpickles. ``what`` names the artefact and how to make one, for the error."""
    from safetensors.torch import load

    base = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    base = base[:-len(".json")] if base.endswith(".json") else base
    try:
        return load(read_bytes(base + ".safetensors", s3)), json.loads(read_bytes(base + ".json", s3))
    except FileNotFoundError as e:
        raise InputError(f"no {what} at {base}(.safetensors|.json): {e}") from None
