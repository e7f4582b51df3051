"""Image sources for the decompose job → a Ray Dataset of ``image_id``, ``uri``, optional ``_bytes``
and pass-through columns. Local paths or ``s3://``; Ray Data readers do the reading.

- **folder**: every file under the directory (recursive); ``image_id`` is the path relative to the
  folder; ``label_from_folder`` adds ``label`` = the parent folder's name. Non-image files are kept
  and end up in the errors table. Local folders are listed by :func:`_walk_local` (symlinks followed,
  nothing visited twice, cycles, dangling links and unreadable entries as error rows, dot-files
  skipped by rule and counted); names Ray's reader cannot take (a newline) are read by the decode stage.
- **table**: a Parquet file/directory or a Lance dataset with a URI column (fetched by the decode
  tasks) or a bytes column; other columns pass through. ``image_id``: ``id_column``, else an
  ``image_id`` column, else the URI, else the SHA-1 of the bytes. Duplicate or null ids are refused
  before any work (``dedupe_ids`` keeps the first row of each id instead); a row with neither a URI
  nor bytes is an error row.
- **webdataset**: ``.tar`` shards; ``image_id`` = ``<shard name>/<__key__>``; the image is the first
  member with an image extension; other members pass through as text columns; a sample without an
  image member is an error row.

Inputs known bad before reading carry the reason in ``_input_error``; the decode stage turns them into
error rows.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ..config import OptionError
from ..errors import InputError
from ..io import S3Settings, is_s3, resolve
from ..store.schema import RESERVED
from .resume import StoredIds, not_stored

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
KINDS = ("auto", "folder", "table", "webdataset")


def preflight(uri: str, kind: str = "auto", s3: Optional[S3Settings] = None) -> str:
    """The checks on the input that need no cluster (run before Ray starts): it exists, it is a kind of
    input the job reads, and a local folder holds at least one file. Returns the detected kind."""
    if kind not in ("auto", "folder"):
        return kind
    fs, path = resolve(uri, s3)
    found = _detect(uri, fs, path) if kind == "auto" else "folder"
    if found == "folder" and isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isdir(path):
            raise InputError(f"input {uri!r} does not exist" if not os.path.exists(path) else
                             f"input {uri!r} is not a folder")
        for _, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if any(not f.startswith(".") for f in files):
                return found
        raise InputError(f"input folder {uri!r} holds no files (hidden files are skipped); point --input at "
                         "the folder of images")
    return found


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
    if isinstance(fs, pafs.LocalFileSystem):     # names that are not UTF-8 break pyarrow's listing
        try:
            with os.scandir(path) as it:
                names = [os.fsdecode(e.name).lower() for e in it if not e.name.startswith(".") and _is_file(e)]
        except OSError as e:
            raise InputError(f"input folder {uri!r} cannot be listed: {e.strerror}") from None
    else:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        names = [e.path.lower() for e in entries if e.type == pafs.FileType.File]
    if names and all(n.endswith(".tar") for n in names):
        return "webdataset"
    if names and all(n.endswith(".parquet") for n in names):
        return "table"
    return "folder"


@dataclass
class Entry:
    """One listed input of a folder: a file to read, or an error row (``error`` says why)."""

    rel: str                        # image_id: the path relative to the folder, '/'-separated
    path: str                       # path inside the filesystem (the URI without ``s3://``)
    error: Optional[str] = None     # why it cannot be read (becomes an error row), else None
    by_uri: bool = False            # read by the decode stage from its URI (a name Ray's reader cannot take)


@dataclass
class Listing:
    """The inputs of a folder: ``entries`` (sorted by ``rel``) and the entries skipped by rule."""

    entries: list = field(default_factory=list)        # list[Entry]
    skipped: dict = field(default_factory=dict)        # rule → number of entries it skipped

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skip(self, rule: str) -> None:
        self.skipped[rule] = self.skipped.get(rule, 0) + 1


def _is_file(entry: os.DirEntry) -> bool:
    """A regular file (through symlinks); False for dangling links and entries that cannot be examined."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _odd_name(name: str) -> bool:
    """A name Ray's ``read_binary_files`` cannot take (it fails the whole read on a newline)."""
    return any(ord(c) < 32 or c == "\x7f" for c in name)


def _list_files(fs: pafs.FileSystem, path: str) -> Listing:
    """Every input under the folder ``path`` (recursive; rules in :func:`_walk_local`)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(path)
    out = Listing()
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path) + 1:] if info.path.startswith(path + "/") else posixpath.relpath(info.path, path)
        if any(part.startswith(".") for part in rel.split("/")):
            out.skip("hidden")
            continue
        out.entries.append(Entry(rel, info.path, by_uri=_odd_name(rel)))
    out.entries.sort(key=lambda e: e.rel)
    return out


def _walk_local(root: str) -> Listing:
    """List a local folder with ``os.scandir`` on bytes paths. Rules:

    - hidden entries (names starting with ``.``) are skipped by rule and counted; a hidden folder
      counts once and is not entered;
    - symlinks are followed, but no file and no folder is visited twice: the real tree is walked
      first, so a file reachable both directly and through a symlink (or a hard link) is listed once,
      under its first real path; the other paths are skipped by rule ("duplicate file/folder");
    - a folder symlink that leads back to one of its own ancestors (``sub/up -> ..``) is a cycle:
      an error row, not followed;
    - dangling symlinks, symlink loops, entries that cannot be examined, unlistable folders, special
      files (FIFOs, sockets, devices: never read) and names that are not valid UTF-8 are error rows;
    - names with control characters (a newline) are read by the decode stage from their URI.
    """
    import errno
    import stat
    from collections import deque

    out = Listing()
    root_b = os.fsencode(root)
    try:
        st = os.stat(root_b)
        with os.scandir(root_b):
            pass
    except OSError as e:
        raise InputError(f"input folder {root!r} cannot be listed: {e.strerror}") from None
    root_key = (st.st_dev, st.st_ino)
    seen_dirs: dict = {root_key: b""}
    seen_files: dict = {}
    links: deque = deque()

    def names(rel_b: bytes) -> tuple[str, Optional[str]]:
        try:
            return rel_b.decode("utf-8"), None
        except UnicodeDecodeError:
            return (rel_b.decode("utf-8", "backslashreplace"),
                    "the file name is not valid UTF-8 (shown with \\x escapes); rename it to have it read")

    def add(rel_b: bytes, error: Optional[str] = None) -> None:
        rel, bad_name = names(rel_b)
        err = error or bad_name
        out.entries.append(Entry(rel, f"{root}/{rel}", err, by_uri=err is None and _odd_name(rel)))

    def shown(rel_b: bytes) -> str:
        return repr(names(rel_b)[0]) if rel_b else "the input folder itself"

    def visit(rel_b: bytes, path_b: bytes, st: os.stat_result, chain: tuple) -> None:
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if key in chain:
                add(rel_b, f"folder symlink cycle: it leads back to {shown(seen_dirs[key])}, one of its own "
                           "parent folders (not followed)")
            elif key in seen_dirs:
                out.skip("duplicate folder")
            else:
                seen_dirs[key] = rel_b
                walk(path_b, rel_b, chain + (key,))
        elif stat.S_ISREG(st.st_mode):
            if key in seen_files:
                out.skip("duplicate file")
            else:
                seen_files[key] = rel_b
                add(rel_b)
        else:
            kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                    else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file")
            add(rel_b, f"not a regular file (a {kind}); not read")

    def walk(dir_b: bytes, rel_b: bytes, chain: tuple) -> None:
        try:
            with os.scandir(dir_b) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            add(rel_b, f"cannot list the folder: {e.strerror}")
            return
        for e in items:
            rel = rel_b + b"/" + e.name if rel_b else e.name
            if e.name.startswith(b"."):
                out.skip("hidden")
                continue
            try:
                if e.is_symlink():
                    links.append((rel, e.path, chain))
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError as x:
                add(rel, f"cannot examine the entry: {x.strerror}")
                continue
            visit(rel, e.path, st, chain)

    walk(root_b, b"", (root_key,))
    while links:                                  # symlinks after the real tree (which wins duplicates)
        rel, path_b, chain = links.popleft()
        try:
            st = os.stat(path_b)
        except OSError as x:
            try:
                target = repr(os.fsdecode(os.readlink(path_b)))
            except OSError:
                target = "an unreadable target"
            if x.errno == errno.ELOOP:
                add(rel, f"symlink loop: it points to {target}, which leads back to itself")
            elif x.errno == errno.ENOENT:
                add(rel, f"dangling symlink: it points to {target}, which does not exist")
            else:
                add(rel, f"cannot follow the symlink to {target}: {x.strerror}")
            continue
        visit(rel, path_b, st, chain)
    out.entries.sort(key=lambda e: e.rel)
    return out


def open_source(uri: str, kind: str = "auto", *, s3: Optional[S3Settings] = None, label_from_folder: bool = False,
                id_column: Optional[str] = None, uri_column: Optional[str] = None, bytes_column: Optional[str] = None,
                columns: Optional[list[str]] = None, stored: Optional["StoredIds"] = None,
                limit: Optional[int] = None, dedupe_ids: bool = False, read_cpus: Optional[float] = None) -> Source:
    """Open ``uri`` as a Ray Dataset of images to decompose, leaving out the ids ``stored`` holds
    (:class:`~vitdecomp.pipeline.resume.StoredIds`, a handle on the store being resumed; no id set):
    a folder's listing is anti-joined on the driver before anything is read, table and WebDataset
    blocks in their read tasks. ``read_cpus``: CPUs each read task reserves (default: Ray Data's), for
    clusters with very few CPUs.

    ``notes`` of the result: ``skipped_by_rule`` (hidden files, duplicate paths, dropped duplicate ids)
    and, where known, ``inputs`` (everything listed, skipped entries included). Table inputs with
    duplicate or null ids are refused (:class:`OptionError` on ``id_column``) unless ``dedupe_ids``.
    """
    import ray

    _rd = {"ray_remote_args": {"num_cpus": read_cpus}} if read_cpus else {}
    _mb = {"num_cpus": read_cpus} if read_cpus else {}

    if kind not in KINDS:
        raise OptionError("source", f"must be one of {KINDS}, got {kind!r}")
    s3 = s3 or S3Settings.from_env()
    fs, path = resolve(uri, s3)
    if kind == "auto":
        kind = _detect(uri, fs, path)
    prefix = "s3://" if is_s3(uri) else ""

    if kind == "folder":
        listing = _list_files(fs, path)
        notes = {"listed": len(listing.entries), "skipped_by_rule": listing.skipped_total,
                 "skipped_by_rule_why": dict(listing.skipped),
                 "inputs": len(listing.entries) + listing.skipped_total}
        if not listing.entries:
            raise InputError(f"input folder {uri!r} holds no files"
                             + (f" ({listing.skipped_total} entries skipped by rule: {dict(listing.skipped)})"
                                if listing.skipped_total else ""))
        todo = listing.entries
        if stored is not None and not stored.empty:
            keep = not_stored([e.rel for e in todo], stored)
            todo = [e for e, k in zip(todo, keep) if k]
        notes["already_stored"] = len(listing.entries) - len(todo)
        notes["left_by_limit"] = max(0, len(todo) - limit) if limit is not None else 0
        if limit is not None:
            todo = todo[:limit]
        passthrough = pa.schema([pa.field("label", pa.string())]) if label_from_folder else pa.schema([])
        if listing.skipped_total:
            log.info("%s: %d entries skipped by rule %s", uri, listing.skipped_total, dict(listing.skipped))
        if not todo:
            return Source(kind, uri, None, passthrough, 0, notes)
        root = path

        def label_of(p: str) -> Optional[str]:
            return posixpath.basename(posixpath.dirname(p)) or None

        def to_rows(t: pa.Table) -> pa.Table:
            paths = [p.to_py() if hasattr(p, "to_py") else p for p in t.column("path").to_pylist()]
            cols = {"image_id": pa.array([p[len(root) + 1:] for p in paths], pa.string()),
                    "uri": pa.array([prefix + p for p in paths], pa.string()),
                    "_bytes": t.column("bytes").cast(pa.large_binary())}
            if label_from_folder:
                cols["label"] = pa.array([label_of(p) for p in paths], pa.string())
            cols["_input_error"] = pa.nulls(t.num_rows, pa.string())
            return pa.table(cols)

        readable = [e.path for e in todo if e.error is None and not e.by_uri]
        other = [e for e in todo if e.error is not None or e.by_uri]
        parts = []
        if readable:
            parts.append(ray.data.read_binary_files(readable, include_paths=True, filesystem=fs, **_rd)
                         .map_batches(to_rows, batch_format="pyarrow", **_mb))
        if other:       # error rows and names Ray's reader cannot take: no bytes, the decode stage reads the URI
            cols = {"image_id": pa.array([e.rel for e in other], pa.string()),
                    "uri": pa.array([prefix + e.path for e in other], pa.string()),
                    "_bytes": pa.nulls(len(other), pa.large_binary())}
            if label_from_folder:
                cols["label"] = pa.array([label_of(e.path) for e in other], pa.string())
            cols["_input_error"] = pa.array([e.error for e in other], pa.string())
            parts.append(ray.data.from_arrow(pa.table(cols)))
        ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
        return Source(kind, uri, ds, passthrough, len(todo), notes)

    if kind == "table":
        if path.rstrip("/").lower().endswith(".lance"):
            import lance_ray

            opts = s3.lance_options() if is_s3(uri) else None
            ds = lance_ray.read_lance(uri if is_s3(uri) else path, storage_options=opts, **_rd)
        else:
            ds = ray.data.read_parquet(path, filesystem=fs, partitioning=None, **_rd)
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
        # every row needs a unique id (it keys the store and resumption): checked before any work
        id_cols = dict(id_column=id_column, uri_column=uri_column, bytes_column=bytes_column)
        key = id_column or uri_column or bytes_column
        scan = _scan_ids(_table_batches(uri, fs, path, s3, [key]), **id_cols)
        dropped = scan["nulls"] + sum(c - 1 for c in scan["dups"].values())
        if dropped and not dedupe_ids:
            source = (f"column {id_column!r}" if id_column else f"the URI column {uri_column!r}" if uri_column
                      else f"the SHA-1 of the bytes column {bytes_column!r}")
            what = []
            if scan["dups"]:
                shown = sorted(scan["dups"])[:10]
                what.append(f"{len(scan['dups'])} ids occur more than once ({shown}"
                            + (", ..." if len(scan["dups"]) > 10 else "") + ")")
            if scan["nulls"]:
                what.append(f"{scan['nulls']} rows have no id (null)")
            raise OptionError("id_column", f"input table {uri!r}: the image ids (from {source}) must be unique and "
                                           f"present, they key the store and its resumption; {' and '.join(what)}. "
                                           "Fix the table, choose another id column, or set the dedupe_ids option to "
                                           "keep the first row of each id and drop rows without one")
        if dropped:
            log.warning("%s: %d rows dropped by dedupe_ids (%d duplicate ids, %d rows without an id)", uri, dropped,
                        len(scan["dups"]), scan["nulls"])
        dups = frozenset(scan["dups"])

        def to_rows(t: pa.Table, stored: Optional[StoredIds], drop: frozenset = frozenset()) -> pa.Table:
            n = t.num_rows
            uris = t.column(uri_column).cast(pa.string()) if uri_column else pa.nulls(n, pa.string())
            data = t.column(bytes_column).cast(pa.large_binary()) if bytes_column else pa.nulls(n, pa.large_binary())
            ids = _row_ids(t, **id_cols)
            no_image = pc.and_(pc.is_null(uris), pc.is_null(data)).to_pylist()
            why = ("no image: the URI is null and there are no image bytes" if bytes_column and uri_column
                   else "no image: the URI is null" if uri_column else "no image: the image bytes are null")
            cols = {"image_id": pa.array(ids, pa.string()), "uri": uris, "_bytes": data}
            for c in keep:
                cols[c] = t.column(c)
            cols["_input_error"] = pa.array([why if e else None for e in no_image], pa.string())
            out = pa.table(cols)
            mask = np.array([i is not None and i not in drop for i in ids], bool)
            if stored is not None and mask.any():          # anti-join with the store, in this read task
                mask &= ~stored.present(out.column("image_id"))
            return out.filter(pa.array(mask))

        live = stored if stored is not None and not stored.empty else None
        ds = ds.map_batches(to_rows, batch_format="pyarrow", fn_args=(live, dups if dedupe_ids else frozenset()), **_mb)
        if dedupe_ids and dups:
            # the first row of each duplicate id, in table order, is read here and joins the others
            firsts = _first_rows(_table_batches(uri, fs, path, s3, names, _isin(key, types[key], dups)), dups,
                                 **id_cols)
            ds = ds.union(ray.data.from_arrow(to_rows(firsts, live)))
        if limit is not None:
            ds = ds.limit(limit)
        return Source(kind, uri, ds, passthrough, None, {"uri_column": uri_column, "bytes_column": bytes_column,
                                                         "id_column": id_column, "skipped_by_rule": dropped,
                                                         "skipped_by_rule_why": {"duplicate or missing id": dropped}
                                                         if dropped else {}, "inputs": scan["rows"]})

    # webdataset
    shards = [path] if path.endswith(".tar") else [e.path for e in _list_files(fs, path).entries
                                                   if e.error is None and e.path.endswith(".tar")]
    if not shards:
        raise InputError(f"no .tar shards under {uri!r}")
    ds = ray.data.read_webdataset(shards, filesystem=fs, decoder=None, **_rd)
    schema = ds.schema()
    members = [n for n in schema.names if not n.startswith("__")]
    image_members = [m for m in members if m.lower() in IMAGE_EXTS]
    if not image_members:
        raise InputError(f"WebDataset shards under {uri!r} have no image members (extensions {IMAGE_EXTS}); "
                         f"found {members}")
    other = [m for m in members if m not in image_members and (columns is None or m in columns)]
    passthrough = pa.schema([pa.field(m, pa.string()) for m in other])
    _check_passthrough(passthrough, uri)
    live = stored if stored is not None and not stored.empty else None

    def wds_rows(t: pa.Table, stored: Optional[StoredIds]) -> pa.Table:
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
        cols["_input_error"] = pa.array([None if b is not None else f"no image member (extensions {IMAGE_EXTS}) "
                                         "in this sample" for b in img], pa.string())
        out = pa.table(cols)
        if stored is None:
            return out
        return out.filter(pa.array(~stored.present(out.column("image_id"))))   # anti-join, in this read task

    ds = ds.map_batches(wds_rows, batch_format="pyarrow", fn_args=(live,), **_mb)
    if limit is not None:
        ds = ds.limit(limit)
    return Source("webdataset", uri, ds, passthrough, None, {"shards": len(shards)})


def _row_ids(t: pa.Table, id_column: Optional[str], uri_column: Optional[str],
             bytes_column: Optional[str]) -> list:
    """The image id of every row of a table input: the id column, else the URI, else the SHA-1 of the bytes."""
    import hashlib

    if id_column:
        return [None if v is None else str(v) for v in t.column(id_column).to_pylist()]
    if uri_column:
        return t.column(uri_column).cast(pa.string()).to_pylist()
    return [hashlib.sha1(b).hexdigest() if b is not None else None for b in t.column(bytes_column).to_pylist()]


def _table_batches(uri: str, fs: pafs.FileSystem, path: str, s3: S3Settings, columns: list[str], where=None):
    """The ``columns`` of a Parquet or Lance table input (rows matching ``where``, a pyarrow expression,
    when given), batch by batch, in table order, read by the driver."""
    if path.rstrip("/").lower().endswith(".lance"):
        import lance

        opts = s3.lance_options() if is_s3(uri) else None
        yield from lance.dataset(uri if is_s3(uri) else path, storage_options=opts).to_batches(columns=columns,
                                                                                              filter=where)
    else:
        import pyarrow.dataset as pads

        yield from pads.dataset(path, filesystem=fs, format="parquet").to_batches(columns=columns, filter=where)


SPILL_IDS = 1_000_000          # ids held in memory before _scan_ids spills them to hash buckets on local disk
ID_BUCKETS = 64


def _id_array(t: pa.Table, id_column: Optional[str], uri_column: Optional[str],
              bytes_column: Optional[str]) -> pa.Array:
    """:func:`_row_ids` as an Arrow string array (no Python object per row for string, integer or URI ids)."""
    col = t.column(id_column or uri_column) if (id_column or uri_column) else None
    if col is not None and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or
                            pa.types.is_integer(col.type)):
        return col.combine_chunks().cast(pa.string())
    return pa.array(_row_ids(t, id_column, uri_column, bytes_column), pa.string())


def _id_buckets(ids: pa.Array, buckets: int) -> np.ndarray:
    """A bucket per id (a polynomial hash of its UTF-8 bytes, vectorised with NumPy) for hash partitioning."""
    ids = ids.cast(pa.large_string())
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset:ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].astype(np.uint64)
    lens = np.diff(offsets)
    if data.size == 0:
        return np.zeros(len(ids), np.int64)
    starts = offsets[:-1] - offsets[0]
    pos = np.arange(data.size, dtype=np.int64) - np.repeat(starts, lens)
    weights = np.random.default_rng(20261203).integers(1, 2 ** 61, 4096, dtype=np.uint64) | np.uint64(1)
    h = np.zeros(len(ids), np.uint64)
    nz = lens > 0                                   # empty ids hash to 0; the others' segments are exact
    with np.errstate(over="ignore"):
        terms = (data + np.uint64(1)) * weights[pos % 4096]
        h[nz] = np.add.reduceat(terms, starts[nz])
    return ((h >> np.uint64(17)) % np.uint64(buckets)).astype(np.int64)


def _count_dups(ids: pa.Array) -> dict:
    """``{id: occurrences}`` of the ids that occur more than once (Arrow group-by)."""
    counts = pa.table({"i": ids}).group_by("i").aggregate([("i", "count")])
    many = counts.filter(pc.greater(counts.column("i_count"), 1))
    return dict(zip(many.column("i").to_pylist(), many.column("i_count").to_pylist()))


def _scan_ids(batches, id_column: Optional[str], uri_column: Optional[str], bytes_column: Optional[str],
              spill: int = SPILL_IDS, buckets: int = ID_BUCKETS) -> dict:
    """Rows, rows with a null id and duplicate ids (id → occurrences) of a table input, in bounded
    driver memory: ids are counted with an Arrow group-by; past ``spill`` ids they are hash-partitioned
    into ``buckets`` Arrow IPC files in a temporary folder, and each bucket is counted on its own
    (memory ≈ the ids of one bucket, not of the table)."""
    import shutil
    import tempfile

    held: list = []
    n_held = rows = nulls = 0
    tmp = writers = None
    schema = pa.schema([pa.field("i", pa.string())])

    def spill_out(arrays) -> None:
        for a in arrays:
            b = _id_buckets(a, buckets)
            order = np.argsort(b, kind="stable")
            cuts = np.searchsorted(b[order], np.arange(buckets + 1))
            sorted_ids = a.take(pa.array(order))
            for k in range(buckets):
                if cuts[k + 1] > cuts[k]:
                    writers[k].write_batch(pa.record_batch([sorted_ids.slice(cuts[k], cuts[k + 1] - cuts[k])],
                                                           schema=schema))

    try:
        for batch in batches:
            ids = _id_array(pa.Table.from_batches([batch]), id_column, uri_column, bytes_column)
            rows += len(ids)
            nulls += ids.null_count
            if ids.null_count:
                ids = ids.drop_null()
            if writers is not None:
                spill_out([ids])
                continue
            held.append(ids)
            n_held += len(ids)
            if n_held > spill:
                tmp = tempfile.mkdtemp(prefix="vitdecomp-ids-")
                writers = [pa.ipc.new_stream(os.path.join(tmp, f"{k}.arrow"), schema) for k in range(buckets)]
                spill_out(held)
                held, n_held = [], 0
        if writers is None:
            dups = _count_dups(pa.concat_arrays(held)) if held else {}
        else:
            dups = {}
            for k, w in enumerate(writers):
                w.close()
                with pa.ipc.open_stream(os.path.join(tmp, f"{k}.arrow")) as r:
                    t = r.read_all()
                if t.num_rows:
                    dups.update(_count_dups(t.column("i").combine_chunks()))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "nulls": nulls, "dups": dups}


def _isin(column: str, type_, ids: frozenset):
    """A filter pushed into the reader (string id or URI columns), else None (read every row)."""
    t = _arrow(type_)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.field(column).isin(pa.array(sorted(ids), t))
    return None


def _first_rows(batches, ids: frozenset, id_column: Optional[str], uri_column: Optional[str],
                bytes_column: Optional[str]) -> pa.Table:
    """The first row (in table order) of each id in ``ids``."""
    taken: set = set()
    parts = []
    for b in batches:
        t = pa.Table.from_batches([b])
        keep = []
        for k, i in enumerate(_row_ids(t, id_column, uri_column, bytes_column)):
            if i in ids and i not in taken:
                taken.add(i)
                keep.append(k)
        if keep:
            parts.append(t.take(pa.array(keep, pa.int64())))
    return pa.concat_tables(parts)


def _arrow(t) -> pa.DataType:
    """Ray may report numpy-ish or extension types; keep Arrow types as they are."""
    return t if isinstance(t, pa.DataType) else pa.from_numpy_dtype(t)


def _is_binary(t) -> bool:
    t = _arrow(t)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)
