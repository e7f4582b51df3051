"""The contribution store (README “The store”): layout, manifest, schema, chunked commits and the reader API.

A store is a directory (local path or ``s3://bucket/prefix``)::

    manifest.json           what was decomposed and how (model, weights, preprocessing, options,
                            ordered components with structured fields, dtype, package version)
    contributions.lance     one row per image  (format "lance", the default)
    errors.lance            one row per image that could not be used (id, URI, stage, reason)
    -- or, with format "parquet" --
    contributions/*.parquet, errors/*.parquet, _commits/*.json

Rows become visible only when committed: a Lance ``Append`` of the fragments that Ray workers
wrote, or (Parquet) a commit record listing the data files. Files written by work that was cut
off are never committed, so a rerun never sees a row twice.

Without Ray, :meth:`Store.create` (from a :class:`~vitdecomp.store.manifest.Manifest`) and
:meth:`Store.append` (one :class:`vitdecomp.engine.Decomposition` chunk, committed atomically) write
a store through the same row builder (:func:`~vitdecomp.store.schema.rows_table`), file writer
(:meth:`Store.write_uncommitted`) and commit (:meth:`Store.commit`) as the decompose job.

Columns: ``image_id`` (stable key from the source), ``uri``, pass-through columns, ``readout``,
one ``fixed_size_list<dtype>[d]`` column per component (``c_`` + the name with dots as ``_``; the
manifest maps names to columns), ``teacher`` (optional, L2-normalised teacher image embedding).
In the compact layout (README “Store layout”, :mod:`vitdecomp.store.compact`) a head's column holds
its coordinates in a per-head basis (``basis.safetensors``, checksummed in the manifest) and
``chain_offset`` the readout chain's offset when needed; every reader decodes them to ``d``-vectors.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..engine.names import Component
from ..errors import InputError, VitdecompError
from ..io import S3Settings, is_s3, join, resolve, retry
from .manifest import MANIFEST, Manifest, components_from_json, manifest_diff
from .schema import ERRORS_SCHEMA, arrow_to_vectors, column_for, rows_table

log = logging.getLogger(__name__)

FORMATS = ("lance", "parquet")
LANCE_MAX_ROWS_PER_FILE = 64 * 1024 * 1024      # one fragment per written chunk (lance-ray's default)


class StoreError(VitdecompError):
    """A store that cannot be created, opened or appended to."""


# -------------------------------------------------------------------------------- the store
class Store:
    """An opened store (read side, plus the commit operations the decompose driver uses)."""

    def __init__(self, uri: str, s3: Optional[S3Settings] = None):
        self.uri = uri.rstrip("/")
        self.s3 = s3 or S3Settings.from_env()
        self.fs, self.path = resolve(self.uri, self.s3)
        self._manifest: Optional[dict] = None

    # ------------------------------------------------------------------ locations
    def _p(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def lance_uri(self, table: str) -> str:
        return join(self.uri if is_s3(self.uri) else self.path, f"{table}.lance")

    @property
    def storage_options(self) -> Optional[dict[str, str]]:
        return self.s3.lance_options() if is_s3(self.uri) else None

    def exists(self) -> bool:
        return self.fs.get_file_info(self._p(MANIFEST)).type == pafs.FileType.File

    # ------------------------------------------------------------------ manifest
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            if not self.exists():
                raise StoreError(f"no store at {self.uri}: {MANIFEST} is missing (create one with `vitdecomp decompose`)")
            with self.fs.open_input_stream(self._p(MANIFEST)) as f:
                raw = f.read()
            try:
                self._manifest = json.loads(raw.decode())
            except (ValueError, UnicodeDecodeError) as e:
                raise StoreError(f"{self.uri}: {MANIFEST} is unreadable ({e}); it is written atomically, so it was "
                                 "damaged after it was written: restore it from a backup, or decompose into a new "
                                 "output location") from None
            from .manifest import check_reader

            check_reader(self._manifest, self.uri)     # a newer layout is refused before any row is read
        return self._manifest

    @property
    def layout(self) -> str:
        """``"full"`` or ``"compact"`` (README “Store layout”)."""
        return self.manifest.get("layout", "full")

    @property
    def compact_layout(self):
        """The :class:`~vitdecomp.store.compact.CompactLayout` of a compact store (bases checked against the
        manifest's SHA-256 before they are parsed), or None for a full store."""
        if self.layout != "compact":
            return None
        if getattr(self, "_compact", None) is None:
            from .compact import CompactLayout

            self._compact = CompactLayout.from_bytes(self.basis_bytes(), self.manifest.get("compact") or {}, self.uri)
        return self._compact

    def basis_bytes(self) -> bytes:
        """The raw basis file of a compact store (checked by :meth:`CompactLayout.from_bytes` before use)."""
        from .compact import BASIS_FILE

        rel = (self.manifest.get("compact") or {}).get("basis", BASIS_FILE)
        try:
            with self.fs.open_input_stream(self._p(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"{self.uri}: the compact store's basis file {rel} is missing; restore it from a "
                             "backup (its rows cannot be read without it)") from None

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def components(self) -> list[Component]:
        return components_from_json(self.manifest["components"])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def has_teacher(self) -> bool:
        return bool(self.manifest.get("teacher"))

    @property
    def typed_manifest(self) -> Manifest:
        """The manifest as a frozen :class:`~vitdecomp.store.manifest.Manifest` (``manifest`` is its dict)."""
        return Manifest.from_dict(self.manifest)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, uri: str, manifest: Union[Manifest, dict], schema: Optional[pa.Schema] = None, *,
               s3: Optional[S3Settings] = None, basis: Optional[bytes] = None) -> "Store":
        """Create the store ``uri`` (local path or ``s3://``) for ``manifest`` and return it opened.

        ``schema`` defaults to the manifest's (:meth:`Manifest.schema`: components, ``d``, dtype,
        pass-through columns, teacher). A store that already exists there with the same identity
        fields is reopened as it is (rows are then added by :meth:`append`); one whose manifest differs
        is refused with :class:`StoreError`. A compact manifest (README “Store layout”) needs its
        ``basis`` file bytes (:meth:`~vitdecomp.store.compact.CompactLayout.to_bytes`).
        """
        if not isinstance(uri, (str, os.PathLike)):
            raise TypeError(f"Store.create(uri, manifest, schema=None): uri must be a path or s3:// URI, got "
                            f"{type(uri).__name__}; to write the tables of an opened store use initialize()")
        m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
        st = cls(os.fspath(uri), s3)
        st.initialize(m.to_dict(), m.schema() if schema is None else schema, basis=basis)
        return st

    def initialize(self, manifest: Union[Manifest, dict], schema: pa.Schema, *, basis: Optional[bytes] = None) -> None:
        """Write the manifest and empty tables (and a compact store's ``basis`` file, checked against the
        manifest's SHA-256); refuse an existing store with a different manifest."""
        if isinstance(manifest, Manifest):
            manifest = manifest.to_dict()
        if self.exists():
            diff = manifest_diff(self.manifest, manifest)
            if diff:
                raise StoreError(
                    f"{self.uri} already holds a store whose manifest differs in {diff}; appending would mix "
                    f"incompatible rows. Write to a new output location, or rerun with the original settings "
                    f"(stored: { {k: self.manifest.get(k) for k in diff if k != 'components'} })")
            return
        entry = manifest.get("compact") if manifest.get("layout") == "compact" else None
        if entry is not None:
            from .compact import sha256

            if basis is None or sha256(basis) != entry.get("basis_sha256"):
                raise StoreError(f"{self.uri}: a compact manifest needs its basis file (CompactLayout.to_bytes()) "
                                 f"whose SHA-256 the manifest records; {'none was given' if basis is None else 'the given bytes differ'}")
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise StoreError(f"cannot create the output {self.uri}: {e}") from e
        if entry is not None:
            retry(lambda: self._write_bytes(entry["basis"], basis), "write basis")
        if manifest["format"] == "lance":
            import lance

            for table, sch in (("contributions", schema), ("errors", ERRORS_SCHEMA)):
                retry(lambda: lance.write_dataset(sch.empty_table(), self.lance_uri(table), schema=sch, mode="create",
                                                  storage_options=self.storage_options), f"create {table}.lance")
        else:
            for sub in ("contributions", "errors", "_commits"):
                self.fs.create_dir(self._p(sub), recursive=True)
            self._write_bytes("_schema.json", schema.serialize().to_pybytes())
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        retry(lambda: self._write_bytes(MANIFEST, data), "write manifest")
        self._manifest = manifest

    def _write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: locally to a unique temporary name, then renamed (readers
        never see a partial file); an S3 PUT is atomic by itself."""
        target = self._p(rel)
        if isinstance(self.fs, pafs.LocalFileSystem):
            head, _, tail = target.rpartition("/")
            tmp = f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def check_writable(self) -> None:
        """Fail before any work if the output cannot be written."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            created = self.fs.get_file_info(self.path).type == pafs.FileType.NotFound
            self.fs.create_dir(self.path, recursive=True)
            self._write_bytes(probe, b"ok")
            self.fs.delete_file(self._p(probe))
            if created and isinstance(self.fs, pafs.LocalFileSystem):
                self.fs.delete_dir(self.path)        # leave nothing behind if a later check fails
        except OSError as e:
            raise StoreError(f"the output {self.uri} is not writable: {e}") from e

    # ------------------------------------------------------------------ commits (driver side)
    def commit(self, written: list[dict], errors: Optional[pa.Table], *, chunk: Optional[str] = None,
               fence: Optional[Callable[[], None]] = None) -> None:
        """Make a chunk visible: first its error rows, then its data (fragments or files).

        Idempotent: a commit whose reply was lost (it landed, but the call failed) is not repeated on
        retry. Lance: each attempt first looks whether the chunk's data files are already in the
        latest version; Parquet: the commit record's name is fixed before the first attempt, so a
        retry rewrites the same object. ``chunk`` (default: a new id) tags the commit (Lance
        transaction property / Parquet record field ``chunk``). Only errors that can go away are
        retried (:func:`commit_retryable`); each retry is logged with its reason. ``fence`` (a writer's
        :meth:`~vitdecomp.store.lease.Lease.check`) is called before every attempt, so a commit retried
        through an outage never lands after the writer's lease could have been taken over."""
        chunk = chunk or uuid.uuid4().hex
        if errors is not None and errors.num_rows:
            errors = errors.cast(ERRORS_SCHEMA)
            if self.format == "lance":
                from lance.fragment import write_fragments

                frags = retry_commit(lambda: write_fragments(errors, self.lance_uri("errors"), schema=ERRORS_SCHEMA,
                                                             storage_options=self.storage_options),
                                     f"{self.uri}: write error rows")
                self._append_lance("errors", [json.loads(f.to_json()) if isinstance(f.to_json(), str)
                                              else f.to_json() for f in frags], chunk, fence)
            else:
                name = f"errors/{uuid.uuid4().hex}.parquet"
                retry_commit(lambda: pq.write_table(errors, self._p(name), filesystem=self.fs),
                             f"{self.uri}: write error rows")
                written = written + [{"file": name, "rows": errors.num_rows, "table": "errors"}]
        if not written:
            return
        if self.format == "lance":
            self._append_lance("contributions", [w["fragment"] for w in written], chunk, fence)
        else:
            self.commit_record({"files": written, "time": time.time(), "chunk": chunk}, fence)

    def _append_lance(self, table: str, fragments: list, chunk: str, fence: Optional[Callable[[], None]] = None) -> int:
        """Commit a Lance ``Append`` of ``fragments`` (JSON of written fragments) to ``table`` exactly
        once; returns the version that holds them."""
        import lance
        from lance.fragment import FragmentMetadata

        frags = [FragmentMetadata.from_json(f if isinstance(f, str) else json.dumps(f)) for f in fragments]
        ours = {d.path.rsplit("/", 1)[-1] for f in frags for d in f.files}
        uri = self.lance_uri(table)
        tried = [0]

        def once() -> int:
            ds = lance.dataset(uri, storage_options=self.storage_options)
            if tried[0]:
                have = _lance_holding(ds, ours)
                if have == len(ours):
                    log.warning("%s: the commit of chunk %s had landed although its reply was lost (version %d "
                                "holds its %d data files); not committing it again", self.uri, chunk[:8], ds.version,
                                len(ours))
                    return ds.version
                if have:
                    raise StoreError(f"{uri}: version {ds.version} holds {have} of the {len(ours)} data files of "
                                     f"chunk {chunk[:8]}, which were committed together; run `vitdecomp store check "
                                     f"{self.uri}`")
            if fence is not None:
                fence()
            tried[0] += 1
            txn = lance.Transaction(read_version=ds.version, operation=lance.LanceOperation.Append(frags),
                                    transaction_properties={"vitdecomp.chunk": chunk})
            return lance.LanceDataset.commit(uri, txn, storage_options=self.storage_options).version

        return retry_commit(once, f"{self.uri}: commit {table} chunk {chunk[:8]}")

    def commit_record(self, rec: dict, fence: Optional[Callable[[], None]] = None) -> None:
        """Parquet format: make ``rec`` (``files`` it adds, optionally ``remove``) visible, atomically.
        The record's name is chosen once, so a retry after a lost reply rewrites the same object."""
        name = f"_commits/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        data = json.dumps(rec).encode()

        def once() -> None:
            if fence is not None:
                fence()
            self._write_bytes(name, data)

        retry_commit(once, f"{self.uri}: write commit record {name}")

    # ------------------------------------------------------------------ writing rows
    def write_uncommitted(self, table: pa.Table, *, format: Optional[str] = None) -> list[dict]:
        """Write ``table`` (rows of the contributions schema) as files no reader sees yet: Lance
        fragments or one Parquet file. Returns the records :meth:`commit` takes (``{"fragment": …,
        "rows": n}`` / ``{"file": …, "rows": n}``). Retried from the materialised table, so a retry
        never loses rows; files of a failed attempt or of a chunk never committed are orphans.
        ``format`` (default: the manifest's) spares the Ray writers a manifest read per block."""
        if not table.num_rows:
            return []
        if (format or self.format) == "lance":
            from lance.fragment import write_fragments

            frags = retry_commit(lambda: write_fragments(table, self.lance_uri("contributions"), schema=table.schema,
                                                         max_rows_per_file=LANCE_MAX_ROWS_PER_FILE,
                                                         max_rows_per_group=1024,
                                                         storage_options=self.storage_options),
                                 f"{self.uri}: write Lance fragment")
            return [{"fragment": f.to_json(), "rows": f.num_rows} for f in frags]
        name = f"contributions/{uuid.uuid4().hex}.parquet"
        retry_commit(lambda: pq.write_table(table, self._p(name), filesystem=self.fs), f"{self.uri}: write Parquet file")
        return [{"file": name, "rows": table.num_rows}]

    def append(self, decomposition: Any, ids: Sequence[str], columns: Optional[Mapping[str, Sequence]] = None,
               teacher: Any = None, *, uris: Optional[Sequence[Optional[str]]] = None) -> int:
        """Add one chunk of rows, committed atomically (all rows become visible, or none). No Ray needed.

        Args:
            decomposition: a :class:`vitdecomp.engine.Decomposition` of ``n`` images, or anything with
                ``names`` (the manifest's components, in order), ``contributions [n, K, d]`` and
                ``readout [n, d]`` (torch tensors on any device, or numpy arrays; stored as the
                manifest's dtype). A readout-only store keeps only ``readout``.
            ids: ``n`` distinct image ids, none of them already in the store.
            columns: the store's pass-through columns, name → ``n`` values.
            teacher: ``[n, d_t]`` teacher embeddings (required iff the store has a teacher column).
            uris: ``n`` image URIs (default: null).

        Returns the number of rows added. Raises :class:`StoreError` (names, ``d``, ids, columns that
        do not fit) before anything is written. Holds the store's lease while it writes, so it is
        refused while a decompose run (or another append) writes the same store.
        """
        from .lease import LEASE, Lease

        m = self.typed_manifest
        ids = [str(i) for i in ids]
        names = list(getattr(decomposition, "names", None) or [])
        readout = _numpy(decomposition.readout)
        n = len(ids)
        if m.options.readout_only:
            names, contributions = [], None
        else:
            if names != m.names:
                extra = [x for x in names if x not in set(m.names)]
                absent = [x for x in m.names if x not in set(names)]
                raise StoreError(f"{self.uri}: the decomposition's components differ from the store's "
                                 f"({len(names)} vs {len(m.names)}; not in the store: {extra[:5]}, missing: "
                                 f"{absent[:5]}{'' if extra or absent else '; same names in another order'}); "
                                 "decompose with the manifest's blocks and heads")
            contributions = _numpy(decomposition.contributions)
            if contributions.ndim != 3 or contributions.shape[0] != n or contributions.shape[2] != m.d:
                raise StoreError(f"{self.uri}: contributions have shape {list(contributions.shape)}; the store "
                                 f"holds [n={n}, K={len(m.names)}, d={m.d}]")
        if readout.ndim != 2 or readout.shape != (n, m.d):
            raise StoreError(f"{self.uri}: the readout has shape {list(readout.shape)}; the store holds "
                             f"[n={n}, d={m.d}] (model {m.model.name})")
        for attr, want in (("convention", m.options.convention), ("normalized", m.options.normalize)):
            got = getattr(decomposition, attr, None)
            if got is not None and got != want:
                raise StoreError(f"{self.uri}: the decomposition was made with {attr}={got!r}; the store's "
                                 f"manifest records {want!r}")
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        if dup:
            raise StoreError(f"{self.uri}: the chunk repeats {len(dup)} image ids, e.g. {dup[:5]}")
        if n == 0:
            return 0
        lease = Lease(self.lance_uri(LEASE[:-len(".lance")]), self.storage_options)
        lease.acquire("Store.append")
        try:
            stored = self.read(columns=["image_id"], ids=ids).column("image_id").to_pylist()
            if stored:
                raise StoreError(f"{self.uri}: {len(set(stored))} of these image ids are already stored, e.g. "
                                 f"{sorted(set(stored))[:5]}; append only new ids")
            try:
                off = getattr(decomposition, "offset", None)
                table = rows_table(self.schema(), names, ids, uris, dict(columns or {}), readout, contributions,
                                   None if teacher is None else _numpy(teacher), codec=self.compact_layout,
                                   offset=None if off is None else _numpy(off))
            except InputError as e:
                raise StoreError(f"{self.uri}: {e}") from None
            written = self.write_uncommitted(table)
            self.commit(written, None, fence=lease.check)
        finally:
            lease.release()
        log.info("appended %d rows to %s", n, self.uri)
        return n

    # ------------------------------------------------------------------ reading
    def commit_records(self) -> list[tuple[str, dict]]:
        """Parquet format: the commit records in commit order, as ``(path, record)``. A record lists the
        data files it adds (``files``) and, after a repair, the ones it retires (``remove``). Records
        are written atomically; one that does not parse stops the read with the repair command."""
        sel = pafs.FileSelector(self._p("_commits"), allow_not_found=True)
        out = []
        for info in sorted(self.fs.get_file_info(sel), key=lambda i: i.path):
            if not info.path.endswith(".json") or info.path.rsplit("/", 1)[-1].startswith("."):
                continue
            with self.fs.open_input_stream(info.path) as f:
                raw = f.read()
            try:
                rec = json.loads(raw.decode())
                if not isinstance(rec, dict) or not isinstance(rec.get("files"), list):
                    raise ValueError("not a commit record")
            except (ValueError, UnicodeDecodeError) as e:
                raise StoreError(f"{self.uri}: the commit record {info.path} is unreadable ({e}); run "
                                 f"`vitdecomp store check {self.uri}` and `vitdecomp store repair {self.uri}`") from None
            out.append((info.path, rec))
        return out

    def _parquet_files(self, table: str) -> list[str]:
        files: list[str] = []
        for _, rec in self.commit_records():
            gone = {self._p(r) for r in rec.get("remove", ())}
            files = [f for f in files if f not in gone]
            files += [self._p(w["file"]) for w in rec["files"] if w.get("table", "contributions") == table]
        return files

    def schema(self) -> pa.Schema:
        if self.format == "lance":
            return self._lance("contributions").schema
        with self.fs.open_input_stream(self._p("_schema.json")) as f:
            return pa.ipc.read_schema(pa.py_buffer(f.read()))

    def _lance(self, table: str):
        import lance

        return lance.dataset(self.lance_uri(table), storage_options=self.storage_options)

    def columns_for(self, components: Optional[Sequence[str]] = None) -> list[str]:
        from ..engine.names import select

        names = self.names
        idx = range(len(names)) if components is None else select(names, components)
        return [column_for(names[i]) for i in idx]

    def read(self, columns: Optional[Sequence[str]] = None, ids: Optional[Sequence[str]] = None,
             table: str = "contributions", *, coefficients: bool = False) -> pa.Table:
        """Committed rows (optionally only ``columns`` and the rows whose ``image_id`` is in ``ids``).

        Component columns hold ``d``-vectors whatever the layout: a compact store's coordinate columns are
        decoded (float32; README “Store layout”) unless ``coefficients`` (then they are returned as stored,
        with the ``chain_offset`` column when the store has one)."""
        t = self._read_raw(columns, ids, table)
        if table != "contributions" or coefficients or self.layout != "compact" or \
                not any(c.startswith("c_") for c in t.column_names):
            return t
        t = decode_table(t, self.compact_layout, self.manifest["d"])
        return t.drop_columns(["chain_offset"]) if columns is not None and "chain_offset" not in columns and \
            "chain_offset" in t.column_names else t

    def _read_raw(self, columns: Optional[Sequence[str]], ids: Optional[Sequence[str]], table: str) -> pa.Table:
        cols = None if columns is None else list(dict.fromkeys(columns))
        layout = self.compact_layout if table == "contributions" and self.layout == "compact" and (
            cols is None or any(c.startswith("c_") for c in cols)) else None
        if layout is not None and layout.needs_offset and cols is not None and "chain_offset" not in cols and any(
                c.startswith("c_") for c in cols):
            cols.append("chain_offset")
        filt = None if ids is None else pc.field("image_id").isin(pa.array(list(ids), pa.string()))
        if self.format == "lance":
            return self._lance(table).to_table(columns=cols, filter=filt)
        files = self._parquet_files(table)
        schema = self.schema() if table == "contributions" else ERRORS_SCHEMA
        if not files:
            t = schema.empty_table()
            return t if cols is None else t.select(cols)
        import pyarrow.dataset as pads

        dset = pads.dataset(files, schema=schema, filesystem=self.fs, format="parquet")
        return dset.to_table(columns=cols, filter=filt)

    def count(self) -> int:
        if self.format == "lance":
            return self._lance("contributions").count_rows()
        return self.read(columns=["image_id"]).num_rows

    def ids(self) -> list[str]:
        return self.read(columns=["image_id"]).column("image_id").to_pylist()

    def errors(self) -> pa.Table:
        return self.read(table="errors")

    def done_ids(self) -> set[str]:
        """Ids already committed as rows or as errors, as a Python set (≈ 100 bytes per id: for small
        stores; a decompose rerun skips them with :class:`vitdecomp.pipeline.resume.StoredIds`)."""
        return set(self.ids()) | set(self.read(columns=["image_id"], table="errors").column("image_id").to_pylist())

    def nbytes(self) -> int:
        """Bytes of committed contribution data on storage."""
        if self.format == "lance":
            base = self._p("contributions.lance", "data")
            sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            live = {f.path for frag in self._lance("contributions").get_fragments() for f in frag.data_files()}
            return sum(i.size for i in self.fs.get_file_info(sel) if i.path.rsplit("/", 1)[-1] in
                       {p.rsplit("/", 1)[-1] for p in live})
        return sum(self.fs.get_file_info(f).size for f in self._parquet_files("contributions"))

    def iter_batches(self, components: Optional[Sequence[str]] = None, ids: Optional[Sequence[str]] = None,
                     batch_size: int = 1024, columns: Sequence[str] = (), teacher: bool = False,
                     dtype=np.float32, coefficients: bool = False) -> Iterator["StoreBatch"]:
        """Committed rows in batches: ``StoreBatch(ids, contributions [b, K, d], readout, teacher, columns)``.

        ``components`` (default: all) selects and orders ``K``; ``ids`` restricts the rows. To read
        contributions mapped into a CLIP space, see :func:`vitdecomp.fit.compalign.aligned_batches`.
        Any layout gives the same ``d``-vectors (compact columns are decoded, README “Store layout”).

        ``coefficients=True`` (code that works in coefficient space): ``contributions`` is None;
        ``coefficients`` maps each compact component to its stored coordinates ``u [b, r]`` and ``full``
        each other component to ``[b, d]``; ``offset [b, d]`` is the chain offset (None when no
        compact component needs it) and ``layout`` the store's
        :class:`~vitdecomp.store.compact.CompactLayout` (``c = u @ Q.T + w · offset``)."""
        comp_names = self.names if components is None else list(components)
        comp_cols = self.columns_for(comp_names)
        if teacher and not self.has_teacher:
            raise StoreError(f"{self.uri} has no teacher column; decompose with a teacher (an open_clip model) to add one")
        layout = self.compact_layout
        need_off = layout is not None and any(layout.weight(n) for n in comp_names if n in layout.bases)
        want = ["image_id", "readout", *comp_cols, *(["chain_offset"] if need_off else []),
                *(["teacher"] if teacher else []), *columns]
        if self.format == "lance":
            filt = None if ids is None else pc.field("image_id").isin(pa.array(list(ids), pa.string()))
            batches = self._lance("contributions").to_batches(columns=list(dict.fromkeys(want)), filter=filt,
                                                              batch_size=batch_size)
        else:
            batches = self._read_raw(want, ids, "contributions").to_batches(max_chunksize=batch_size)
        d = self.manifest["d"]
        for rb in batches:
            if rb.num_rows == 0:
                continue
            t = pa.Table.from_batches([rb])
            off = arrow_to_vectors(t.column("chain_offset"), dtype) if need_off else None
            extra: dict = {}
            if coefficients:
                contrib = None
                coef = {n: arrow_to_vectors(t.column(c), dtype) for n, c in zip(comp_names, comp_cols)
                        if layout is not None and n in layout.bases}
                full = {n: arrow_to_vectors(t.column(c), dtype) for n, c in zip(comp_names, comp_cols) if n not in coef}
                extra = {"coefficients": coef, "full": full, "offset": off, "layout": layout}
            elif comp_cols:
                contrib = np.empty((t.num_rows, len(comp_cols), d), dtype)
                for k, (n, c) in enumerate(zip(comp_names, comp_cols)):
                    v = arrow_to_vectors(t.column(c), dtype)
                    contrib[:, k] = layout.decode(n, v, off, dtype) if layout is not None and n in layout.bases else v
            else:
                contrib = np.zeros((t.num_rows, 0, d), dtype)
            yield StoreBatch(ids=t.column("image_id").to_pylist(), names=comp_names, contributions=contrib,
                             readout=arrow_to_vectors(t.column("readout"), dtype),
                             teacher=arrow_to_vectors(t.column("teacher"), dtype) if teacher else None,
                             columns={c: t.column(c) for c in columns}, **extra)

    def to_ray(self, columns: Optional[Sequence[str]] = None, *, coefficients: bool = False):
        """The committed rows as a Ray Dataset (distributed passes of the fit and query jobs).

        Component columns hold ``d``-vectors whatever the layout (a compact store's are decoded in the
        read tasks) unless ``coefficients`` (stored coordinates, plus ``chain_offset`` when needed)."""
        ds = self._to_ray_raw(columns)
        layout = self.compact_layout
        if layout is None or coefficients:
            return ds
        cols = self.schema().names if columns is None else list(columns)
        if not any(c in {column_for(n) for n in layout.bases} for c in cols):
            return ds
        return ds.map_batches(decode_table, batch_format="pyarrow", fn_args=(layout, self.manifest["d"]),
                              zero_copy_batch=True)

    def _to_ray_raw(self, columns: Optional[Sequence[str]] = None):
        import ray

        layout = self.compact_layout
        if layout is not None and layout.needs_offset and columns is not None and "chain_offset" not in columns:
            columns = [*columns, "chain_offset"]
        if self.format == "lance":
            import lance_ray

            return lance_ray.read_lance(self.lance_uri("contributions"), columns=None if columns is None else list(columns),
                                        storage_options=self.storage_options)
        files = self._parquet_files("contributions")
        fs = self.fs
        if not files:
            t = self.schema().empty_table()
            return ray.data.from_arrow(t if columns is None else t.select(list(columns)))
        ds = ray.data.read_parquet(files, filesystem=fs, partitioning=None)
        return ds if columns is None else ds.select_columns(list(columns))


@dataclass
class StoreBatch:
    ids: list[str]
    names: list[str]
    contributions: np.ndarray          # [b, K, d]
    readout: np.ndarray                # [b, d]
    teacher: Optional[np.ndarray] = None
    columns: dict = field(default_factory=dict)
    # coefficients=True only (Store.iter_batches): compact components' coordinates, the others' vectors
    coefficients: Optional[dict] = None        # name -> u [b, r]
    full: Optional[dict] = None                # name -> [b, d]
    offset: Optional[np.ndarray] = None        # [b, d] chain offset (None when not needed)
    layout: Any = None                         # the store's CompactLayout (None: full store)


def decode_table(t: pa.Table, layout, d: int) -> pa.Table:
    """A compact store's rows → the same rows with every compact column decoded to a float32
    ``fixed_size_list[d]`` (``c = u @ Q.T + w · chain_offset``); other columns unchanged."""
    from .schema import vectors_to_arrow

    names = {column_for(n): n for n in layout.bases}
    off = arrow_to_vectors(t.column("chain_offset")) if "chain_offset" in t.column_names else None
    for i, c in enumerate(t.column_names):
        if c in names:
            vec = layout.decode(names[c], arrow_to_vectors(t.column(c)), off)
            valid = None if t.column(c).null_count == 0 else pc.is_valid(t.column(c)).to_numpy(zero_copy_only=False)
            t = t.set_column(i, c, vectors_to_arrow(vec, "fp32", valid))
    return t


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, fp16/fp32/fp64) or array-like → numpy float32."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _lance_holding(ds, names: set) -> int:
    """How many of the data files ``names`` (file names) the Lance dataset version ``ds`` references."""
    return sum(1 for frag in ds.get_fragments() for d in frag.data_files() if d.path.rsplit("/", 1)[-1] in names)


def commit_retryable(e: BaseException) -> Optional[str]:
    """Why ``e`` is worth another attempt (a network error, throttling, a commit conflict), or None.

    Never a ``ValueError``/``TypeError``/``KeyError`` (a bad value stays bad), nor a full disk, a
    read-only or forbidden location (:func:`vitdecomp.io.transient` says which OS errors are permanent)."""
    from ..io import transient

    if not isinstance(e, (OSError, RuntimeError)) or isinstance(e, (ValueError, TypeError, KeyError)):
        return None
    if type(e).__name__ == "CommitConflictError":
        return "a concurrent commit (conflict)"
    if isinstance(e, (ConnectionError, TimeoutError)):
        return "a network error"
    if not transient(e):
        text = str(e).lower()          # object_store's wording for a request that got no reply
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError)) and any(
                t in text for t in ("error sending request", "http error", "error performing", "io error")) \
                and not any(t in text for t in ("access denied", "forbidden", "no space", "read-only")):
            return "a network error"
        return None
    text = str(e).lower()
    return "throttling" if any(t in text for t in ("throttl", "slow down", "slowdown", " 503")) else \
        "a commit conflict" if "conflict" in text else "a network or service error"


def retry_commit(fn, what: str, attempts: int = 6, first_delay: float = 0.5):
    """Call ``fn`` (which must be safe to repeat: idempotent) until it succeeds; retry only what
    :func:`commit_retryable` names, with exponential backoff, logging each retry and its reason."""
    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- classified below; anything not retryable is re-raised as is
            why = commit_retryable(e)
            if why is None or i == attempts - 1:
                raise
            log.warning("%s failed with %s (%s: %s); retry %d/%d in %.1f s", what, why, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "", i + 1, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def open_store(uri: str, *, s3_endpoint: Optional[str] = None, s3_region: Optional[str] = None) -> Store:
    """Open an existing store for reading (local path or ``s3://``)."""
    st = Store(uri, S3Settings.from_env(s3_endpoint, s3_region))
    st.manifest  # noqa: B018  -- fail now if there is no store
    return st
