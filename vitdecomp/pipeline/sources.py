"""Image sources for the decompose job → a Ray Dataset of ``image_id``, ``uri``, optional ``_bytes``
and pass-through columns. Local paths or ``s3://``; Ray Data readers do the reading.

- **folder**: every file under the directory (recursive; dot-files skipped); ``image_id`` is the
  path relative to the folder; ``--label-from-folder`` adds ``label`` = the parent folder's name.
  Non-image files are kept and end up in the errors table.
- **table**: a Parquet file/directory or a Lance dataset with a URI column (fetched by the decode
  tasks) or a bytes column; other columns pass through. ``image_id``: ``--id-column``, else an
  ``image_id`` column, else the URI, else the SHA-1 of the bytes.
- **webdataset**: ``.tar`` shards; ``image_id`` = ``<shard name>/<__key__>``; the image is the first
  member with an image extension; other members pass through as text columns.
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs

from ..config import OptionError
from ..errors import InputError
from ..io import S3Settings, is_s3, resolve
from ..store.schema import RESERVED

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
KINDS = ("auto", "folder", "table", "webdataset")


@dataclass
class Source:
    kind: str
    uri: str
    dataset: object                      # ray.data.Dataset
    passthrough: pa.Schema               # schema of the pass-through columns
    count: Optional[int] = None          # known before reading (folder), else None
    notes: dict = field(default_factory=dict)


def _check_passthrough(schema: pa.Schema, where: str) -> None:
    bad = [n for n in schema.names if n in RESERVED or n.startswith("c_") or n.startswith("_")]
    if bad:
        raise InputError(f"{where}: pass-through column(s) {bad} clash with the store's own columns "
                         f"({list(RESERVED)}, c_*, _*); rename them or choose the pass-through columns")


def _detect(uri: str, fs: pafs.FileSystem, path: str) -> str:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri!r} does not exist")
    low = path.rstrip("/").lower()
    if low.endswith(".lance"):
        return "table"
    if info.type == pafs.FileType.File:
        if low.endswith(".parquet"):
            return "table"
        if low.endswith(".tar"):
            return "webdataset"
        raise InputError(f"input {uri!r} is a file but neither .parquet nor .tar; pass a folder of images, "
                         "a Parquet/Lance table or WebDataset shards")
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = [e.path.lower() for e in entries if e.type == pafs.FileType.File]
    if names and all(n.endswith(".tar") for n in names):
        return "webdataset"
    if names and all(n.endswith(".parquet") for n in names):
        return "table"
    return "folder"


def _list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    sel = pafs.FileSelector(path, recursive=True)
    out = []
    for info in fs.get_file_info(sel):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, path) if not info.path.startswith(path + "/") else info.path[len(path) + 1:]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(info.path)
    return sorted(out)


def open_source(uri: str, kind: str = "auto", *, s3: Optional[S3Settings] = None, label_from_folder: bool = False,
                id_column: Optional[str] = None, uri_column: Optional[str] = None, bytes_column: Optional[str] = None,
                columns: Optional[list[str]] = None, skip_ids: Optional[set] = None, limit: Optional[int] = None) -> Source:
    """Open ``uri`` as a Ray Dataset of images to decompose (rows in ``skip_ids`` left out where cheap)."""
    import ray

    if kind not in KINDS:
        raise OptionError("source", f"must be one of {KINDS}, got {kind!r}")
    s3 = s3 or S3Settings.from_env()
    fs, path = resolve(uri, s3)
    if kind == "auto":
        kind = _detect(uri, fs, path)
    prefix = "s3://" if is_s3(uri) else ""

    if kind == "folder":
        files = _list_files(fs, path)
        if not files:
            raise InputError(f"input folder {uri!r} holds no files")
        rel = {f: f[len(path) + 1:] for f in files}
        todo = [f for f in files if not skip_ids or rel[f] not in skip_ids]
        if limit is not None:
            todo = todo[:limit]
        passthrough = pa.schema([pa.field("label", pa.string())]) if label_from_folder else pa.schema([])
        if not todo:
            return Source(kind, uri, None, passthrough, 0, {"listed": len(files)})
        ds = ray.data.read_binary_files(todo, include_paths=True, filesystem=fs)
        root = path

        def to_rows(t: pa.Table) -> pa.Table:
            paths = [p.to_py() if hasattr(p, "to_py") else p for p in t.column("path").to_pylist()]
            cols = {"image_id": [p[len(root) + 1:] for p in paths], "uri": [prefix + p for p in paths],
                    "_bytes": t.column("bytes")}
            if label_from_folder:
                cols["label"] = [posixpath.basename(posixpath.dirname(p)) or None for p in paths]
            return pa.table(cols)

        ds = ds.map_batches(to_rows, batch_format="pyarrow")
        return Source(kind, uri, ds, passthrough, len(todo), {"listed": len(files)})

    if kind == "table":
        if path.rstrip("/").lower().endswith(".lance"):
            import lance_ray

            opts = s3.lance_options() if is_s3(uri) else None
            ds = lance_ray.read_lance(uri if is_s3(uri) else path, storage_options=opts)
        else:
            ds = ray.data.read_parquet(path, filesystem=fs, partitioning=None)
        schema = ds.schema()
        names = list(schema.names)
        if not names:
            raise InputError(f"input table {uri!r} has no columns")
        types = dict(zip(names, schema.types))
        uri_column = uri_column or next((c for c in ("uri", "path", "url", "image_path") if c in names), None)
        bytes_column = bytes_column or next((c for c in ("image", "bytes", "image_bytes", "jpg", "png")
                                             if c in names and _is_binary(types[c])), None)
        for what, col in (("uri_column", uri_column), ("bytes_column", bytes_column), ("id_column", id_column)):
            if col is not None and col not in names:
                raise OptionError(what, f"{col!r} is not a column of {uri!r} (columns: {names})")
        if uri_column is None and bytes_column is None:
            raise InputError(f"input table {uri!r} needs a URI column or an image-bytes column; name them with "
                             f"the uri_column / bytes_column options (columns: {names})")
        id_column = id_column or ("image_id" if "image_id" in names else None)
        used = {uri_column, bytes_column, id_column}
        keep = [c for c in (columns if columns is not None else names) if c not in used]
        missing = [c for c in keep if c not in names]
        if missing:
            raise OptionError("columns", f"{missing} are not columns of {uri!r} (columns: {names})")
        passthrough = pa.schema([pa.field(c, _arrow(types[c])) for c in keep])
        _check_passthrough(passthrough, uri)
        done = frozenset(skip_ids or ())

        def to_rows(t: pa.Table, done_ids: set) -> pa.Table:
            import hashlib

            n = t.num_rows
            uris = t.column(uri_column).cast(pa.string()) if uri_column else pa.nulls(n, pa.string())
            data = t.column(bytes_column) if bytes_column else None
            if id_column:
                ids = [str(v) for v in t.column(id_column).to_pylist()]
            elif uri_column:
                ids = uris.to_pylist()
            else:
                ids = [hashlib.sha1(b).hexdigest() if b is not None else None for b in data.to_pylist()]
            cols = {"image_id": ids, "uri": uris}
            if data is not None:
                cols["_bytes"] = data.cast(pa.large_binary())
            for c in keep:
                cols[c] = t.column(c)
            out = pa.table(cols)
            mask = pa.array([i is not None and i not in done_ids for i in ids])
            return out.filter(mask)

        ds = ds.map_batches(to_rows, batch_format="pyarrow", fn_args=(done,))
        if limit is not None:
            ds = ds.limit(limit)
        return Source(kind, uri, ds, passthrough, None, {"uri_column": uri_column, "bytes_column": bytes_column,
                                                         "id_column": id_column})

    # webdataset
    shards = [path] if path.endswith(".tar") else [f for f in _list_files(fs, path) if f.endswith(".tar")]
    if not shards:
        raise InputError(f"no .tar shards under {uri!r}")
    ds = ray.data.read_webdataset(shards, filesystem=fs, decoder=None)
    schema = ds.schema()
    members = [n for n in schema.names if not n.startswith("__")]
    image_members = [m for m in members if m.lower() in IMAGE_EXTS]
    if not image_members:
        raise InputError(f"WebDataset shards under {uri!r} have no image members (extensions {IMAGE_EXTS}); "
                         f"found {members}")
    other = [m for m in members if m not in image_members and (columns is None or m in columns)]
    passthrough = pa.schema([pa.field(m, pa.string()) for m in other])
    _check_passthrough(passthrough, uri)
    done = frozenset(skip_ids or ())

    def wds_rows(t: pa.Table, done_ids: set) -> pa.Table:
        urls = t.column("__url__").to_pylist() if "__url__" in t.column_names else [""] * t.num_rows
        keys = t.column("__key__").to_pylist()
        ids = [f"{posixpath.basename(u)}/{k}" for u, k in zip(urls, keys)]
        img = [None] * t.num_rows
        for m in [c for c in t.column_names if c.lower() in IMAGE_EXTS]:     # members differ between blocks
            for i, b in enumerate(t.column(m).to_pylist()):
                if img[i] is None and isinstance(b, (bytes, bytearray)):   # absent members come back as NaN
                    img[i] = bytes(b)
        cols = {"image_id": ids, "uri": [f"{prefix}{u}#{k}" for u, k in zip(urls, keys)],
                "_bytes": pa.array(img, pa.large_binary())}
        for m in other:
            vals = t.column(m).to_pylist() if m in t.column_names else [None] * t.num_rows
            cols[m] = pa.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else v if isinstance(v, str)
                                else None for v in vals], pa.string())
        out = pa.table(cols)
        return out.filter(pa.array([i not in done_ids for i in ids]))

    ds = ds.map_batches(wds_rows, batch_format="pyarrow", fn_args=(done,))
    if limit is not None:
        ds = ds.limit(limit)
    return Source("webdataset", uri, ds, passthrough, None, {"shards": len(shards)})


def _arrow(t) -> pa.DataType:
    """Ray may report numpy-ish or extension types; keep Arrow types as they are."""
    return t if isinstance(t, pa.DataType) else pa.from_numpy_dtype(t)


def _is_binary(t) -> bool:
    t = _arrow(t)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)
