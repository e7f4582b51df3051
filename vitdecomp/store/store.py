"""The contribution store (SPEC §3): layout, manifest, schema, chunked commits and the reader API.

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

Columns: ``image_id`` (stable key from the source), ``uri``, pass-through columns, ``readout``,
one ``fixed_size_list<dtype>[d]`` column per component (``c_`` + the name with dots as ``_``; the
manifest maps names to columns), ``teacher`` (optional, L2-normalised teacher image embedding).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..engine.names import Component
from ..errors import InputError, VitdecompError
from ..io import S3Settings, is_s3, join, resolve, retry
from .manifest import IDENTITY_FIELDS, MANIFEST, components_from_json, components_to_json, manifest_diff
from .schema import DTYPES, ERRORS_SCHEMA, RESERVED, arrow_to_vectors, column_for, contributions_schema, vector_type, vectors_to_arrow

log = logging.getLogger(__name__)

FORMATS = ("lance", "parquet")


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
                self._manifest = json.loads(f.read().decode())
        return self._manifest

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

    # ------------------------------------------------------------------ creation
    def create(self, manifest: dict, schema: pa.Schema) -> None:
        """Write the manifest and empty tables; refuse an existing store with a different manifest."""
        if self.exists():
            diff = manifest_diff(self.manifest, manifest)
            if diff:
                raise StoreError(
                    f"{self.uri} already holds a store whose manifest differs in {diff}; appending would mix "
                    f"incompatible rows. Write to a new output location, or rerun with the original settings "
                    f"(stored: { {k: self.manifest.get(k) for k in diff if k != 'components'} })")
            return
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise StoreError(f"cannot create the output {self.uri}: {e}") from e
        if manifest["format"] == "lance":
            import lance

            for table, sch in (("contributions", schema), ("errors", ERRORS_SCHEMA)):
                retry(lambda: lance.write_dataset(sch.empty_table(), self.lance_uri(table), schema=sch, mode="create",
                                                  storage_options=self.storage_options), f"create {table}.lance")
        else:
            for sub in ("contributions", "errors", "_commits"):
                self.fs.create_dir(self._p(sub), recursive=True)
            with self.fs.open_output_stream(self._p("_schema.json")) as f:
                f.write(schema.serialize().to_pybytes())
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        retry(lambda: self._write_bytes(MANIFEST, data), "write manifest")
        self._manifest = manifest

    def _write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._p(rel)) as f:
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
    def commit(self, written: list[dict], errors: Optional[pa.Table]) -> None:
        """Make a chunk visible: first its error rows, then its data (fragments or files)."""
        if errors is not None and errors.num_rows:
            errors = errors.cast(ERRORS_SCHEMA)
            if self.format == "lance":
                import lance

                retry(lambda: lance.write_dataset(errors, self.lance_uri("errors"), mode="append",
                                                  storage_options=self.storage_options), "commit errors")
            else:
                name = f"errors/{uuid.uuid4().hex}.parquet"
                retry(lambda: pq.write_table(errors, self._p(name), filesystem=self.fs), "write errors")
                written = written + [{"file": name, "rows": errors.num_rows, "table": "errors"}]
        if not written:
            return
        if self.format == "lance":
            import lance
            from lance.fragment import FragmentMetadata

            frags = [FragmentMetadata.from_json(json.dumps(w["fragment"])) for w in written]

            def do():
                ds = lance.dataset(self.lance_uri("contributions"), storage_options=self.storage_options)
                lance.LanceDataset.commit(self.lance_uri("contributions"), lance.LanceOperation.Append(frags),
                                          read_version=ds.version, storage_options=self.storage_options)
            retry(do, "commit contributions")
        else:
            rec = {"files": written, "time": time.time()}
            name = f"_commits/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            retry(lambda: self._write_bytes(name, json.dumps(rec).encode()), "write commit record")

    # ------------------------------------------------------------------ reading
    def _parquet_files(self, table: str) -> list[str]:
        sel = pafs.FileSelector(self._p("_commits"), allow_not_found=True)
        files = []
        for info in sorted(self.fs.get_file_info(sel), key=lambda i: i.path):
            if not info.path.endswith(".json"):
                continue
            with self.fs.open_input_stream(info.path) as f:
                rec = json.loads(f.read().decode())
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
             table: str = "contributions") -> pa.Table:
        """Committed rows (optionally only ``columns`` and the rows whose ``image_id`` is in ``ids``)."""
        cols = None if columns is None else list(dict.fromkeys(columns))
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
        """Ids already committed as rows or as errors (skipped by a rerun)."""
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
                     dtype=np.float32) -> Iterator["StoreBatch"]:
        """Committed rows in batches: ``StoreBatch(ids, contributions [b, K, d], readout, teacher, columns)``.

        ``components`` (default: all) selects and orders ``K``; ``ids`` restricts the rows. To read
        contributions mapped into a CLIP space, see :func:`vitdecomp.fit.compalign.aligned_batches`."""
        comp_names = self.names if components is None else list(components)
        comp_cols = self.columns_for(comp_names)
        if teacher and not self.has_teacher:
            raise StoreError(f"{self.uri} has no teacher column; decompose with a teacher (an open_clip model) to add one")
        want = ["image_id", "readout", *comp_cols, *(["teacher"] if teacher else []), *columns]
        if self.format == "lance":
            filt = None if ids is None else pc.field("image_id").isin(pa.array(list(ids), pa.string()))
            batches = self._lance("contributions").to_batches(columns=list(dict.fromkeys(want)), filter=filt,
                                                              batch_size=batch_size)
        else:
            batches = self.read(want, ids).to_batches(max_chunksize=batch_size)
        for rb in batches:
            if rb.num_rows == 0:
                continue
            t = pa.Table.from_batches([rb])
            contrib = np.stack([arrow_to_vectors(t.column(c), dtype) for c in comp_cols], 1) if comp_cols else \
                np.zeros((t.num_rows, 0, self.manifest["d"]), dtype)
            yield StoreBatch(ids=t.column("image_id").to_pylist(), names=comp_names, contributions=contrib,
                             readout=arrow_to_vectors(t.column("readout"), dtype),
                             teacher=arrow_to_vectors(t.column("teacher"), dtype) if teacher else None,
                             columns={c: t.column(c) for c in columns})

    def to_ray(self, columns: Optional[Sequence[str]] = None):
        """The committed rows as a Ray Dataset (distributed passes of the fit and query jobs)."""
        import ray

        if self.format == "lance":
            import lance_ray

            return lance_ray.read_lance(self.lance_uri("contributions"), columns=None if columns is None else list(columns),
                                        storage_options=self.storage_options)
        files = self._parquet_files("contributions")
        fs = self.fs
        if not files:
            return ray.data.from_arrow(self.schema().empty_table())
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


def open_store(uri: str, *, s3_endpoint: Optional[str] = None, s3_region: Optional[str] = None) -> Store:
    """Open an existing store for reading (local path or ``s3://``)."""
    st = Store(uri, S3Settings.from_env(s3_endpoint, s3_region))
    st.manifest  # noqa: B018  -- fail now if there is no store
    return st
