"""Resuming a decompose run without a driver-side id set (README “Decompose a corpus into a store”, Resume).

A rerun skips every image id the store already holds (as a row or as an error row). The driver never
gathers those ids: :class:`StoredIds` is a small picklable handle on the store *as it was when the run
started* (the Lance versions of its two tables, or the Parquet data files its commit records list),
and the skipping is an anti-join against it:

- in the read tasks (table and WebDataset sources): each block's ids are looked up in the store with
  the filter pushed into the scan (``image_id IN block``), so a task reads only the id column and keeps
  only the matches (:meth:`StoredIds.present`);
- for a folder source, whose listing the driver holds anyway (it decides what to read, so that stored
  files are never read), the stored ids stream past the listing batch by batch
  (:func:`not_stored`): memory is 16 bytes per listed id plus one batch, whatever the store's size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..io import S3Settings
from ..store import Store

log = logging.getLogger(__name__)

TABLES = ("contributions", "errors")
STREAM_BATCH = 1 << 16                # stored ids per batch of the driver-side anti-join (≈ 2 MB of ids)


@dataclass(frozen=True)
class StoredIds:
    """The ids a store held at one moment, as a handle (no ids inside): ``uri``, ``format``, the S3
    settings, and per table either the Lance version (``versions``) or the committed Parquet files
    (``files``). Cheap to pickle into every read task."""

    uri: str
    format: str
    endpoint: Optional[str] = None
    region: Optional[str] = None
    versions: tuple = ()              # lance: (contributions version, errors version)
    files: tuple = ()                 # parquet: (contribution files, error files), paths in the store's filesystem
    rows: int = 0                     # ids held (rows + error rows), from the tables' counts
    data_rows: int = 0                # of which rows of the contributions table (-1: not known)

    @classmethod
    def of(cls, store: Store) -> "StoredIds":
        """A snapshot of ``store`` (which must exist): versions/files and counts, no ids."""
        if store.format == "lance":
            dss = [store._lance(t) for t in TABLES]
            counts = [d.count_rows() for d in dss]
            return cls(store.uri, "lance", store.s3.endpoint, store.s3.region,
                       versions=tuple(d.version for d in dss), rows=sum(counts), data_rows=counts[0])
        live: dict = {}                   # path → (table, rows), in commit order (a repair retires files)
        for _, rec in store.commit_records():
            for r in rec.get("remove", ()):
                live.pop(store._p(r), None)
            for w in rec["files"]:
                live[store._p(w["file"])] = (w.get("table", "contributions"), w.get("rows"))
        files = tuple(tuple(p for p, (t, _) in live.items() if t == table) for table in TABLES)
        known = all(n is not None for _, n in live.values())      # records list each file's rows
        return cls(store.uri, "parquet", store.s3.endpoint, store.s3.region, files=files,
                   rows=sum(int(n or 0) for _, n in live.values()),
                   data_rows=sum(int(n) for t, n in live.values() if t == "contributions") if known else -1)

    @property
    def empty(self) -> bool:
        return not self.rows and not any(self.files)

    # ------------------------------------------------------------------ access
    def _store(self) -> Store:
        return Store(self.uri, S3Settings(self.endpoint, self.region))

    def _scan(self, table: int, keys: Optional[pa.Array] = None, batch_size: int = STREAM_BATCH):
        """Record batches of the ``image_id`` column of table ``table`` (0: contributions, 1: errors) at
        the snapshot; with ``keys``, only the ids among them (Lance: the filter is pushed into the scan;
        Parquet: row groups whose min/max statistics exclude every key are not read)."""
        st = self._store()
        if self.format == "lance":
            import lance

            ds = lance.dataset(st.lance_uri(TABLES[table]), version=self.versions[table],
                               storage_options=st.storage_options)
            filt = None if keys is None else pc.field("image_id").isin(keys)
            yield from ds.to_batches(columns=["image_id"], filter=filt, batch_size=batch_size)
            return
        import pyarrow.parquet as pq

        pool = pa.default_memory_pool()
        for path in self.files[table]:       # file by file, no pre-buffering: the stream stays small
            with st.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f, pre_buffer=False)
                if keys is None:
                    yield from pf.iter_batches(batch_size=batch_size, columns=["image_id"], use_threads=False)
                    continue
                col = pf.schema_arrow.get_field_index("image_id")
                for rg in range(pf.num_row_groups):
                    if _may_hold(pf.metadata.row_group(rg).column(col).statistics, keys):
                        t = pf.read_row_group(rg, columns=["image_id"], use_threads=False)
                        yield from t.filter(pc.is_in(t.column(0), value_set=keys)).to_batches()
            pool.release_unused()

    def batches(self, batch_size: int = STREAM_BATCH) -> Iterator[pa.Array]:
        """Every stored id (rows, then error rows), ``batch_size`` at a time, as Arrow string arrays."""
        for t in range(len(TABLES)):
            for rb in self._scan(t, batch_size=batch_size):
                if rb.num_rows:
                    yield rb.column(0).cast(pa.string())

    def present(self, ids) -> np.ndarray:
        """``bool [len(ids)]``: which of ``ids`` (a list or Arrow array of strings; nulls never match)
        the store held. The lookup is pushed into the scan: only matching ids are read back."""
        arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
        arr = arr.cast(pa.string())
        if self.empty or len(arr) == 0:
            return np.zeros(len(arr), bool)
        keys = pc.unique(arr.drop_null()) if arr.null_count else pc.unique(arr)
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        found = [rb.column(0).cast(pa.string()) for t in range(len(TABLES))
                 for rb in self._scan(t, keys) if rb.num_rows]
        if not found:
            return np.zeros(len(arr), bool)
        hit = pc.is_in(arr, value_set=pa.concat_arrays(found))
        return np.asarray(hit.fill_null(False).to_numpy(zero_copy_only=False), bool)


def _may_hold(stats, keys: pa.Array) -> bool:
    """Whether a Parquet row group whose ``image_id`` statistics are ``stats`` may hold one of ``keys``."""
    if stats is None or not stats.has_min_max or len(keys) == 0:
        return len(keys) > 0
    lo, hi = pa.scalar(stats.min, pa.string()), pa.scalar(stats.max, pa.string())
    inside = pc.and_(pc.greater_equal(keys, lo), pc.less_equal(keys, hi))
    return bool(pc.any(inside).as_py())


def not_stored(ids, stored: Optional[StoredIds], batch_size: int = STREAM_BATCH) -> np.ndarray:
    """``bool [len(ids)]``: which of ``ids`` (a list of strings, or an Arrow string column) the store
    does *not* hold — an exact anti-join that streams the stored ids past the listing one batch at a
    time. The listing is keyed by 64-bit hashes sorted once (16 bytes per id); each stored batch is
    hashed and looked up by binary search, and every hash match is confirmed by comparing the strings,
    so a hash collision can never skip an image. Driver memory: the listing's keys plus one batch."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = ids.to_pylist()
    n = len(ids)
    keep = np.ones(n, bool)
    if stored is None or stored.empty or n == 0:
        return keep
    keys = np.fromiter((hash(x) for x in ids), np.int64, n)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    for batch in stored.batches(batch_size):
        vals = batch.to_pylist()
        h = np.fromiter((hash(v) for v in vals), np.int64, len(vals))
        lo = np.searchsorted(keys, h, "left")
        hi = np.searchsorted(keys, h, "right")
        for j in np.flatnonzero(hi > lo):
            for k in range(lo[j], hi[j]):
                i = order[k]
                if ids[i] == vals[j]:
                    keep[i] = False
    return keep
