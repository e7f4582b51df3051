"""Checking and repairing a store: distinct ids, referenced files present, manifest consistent,
orphans listed — and a repair that drops duplicate rows (keeping one) and removes orphan files.

Orphans are data files that no committed version references: files written by work that was cut
off before its commit (a killed run, a full disk), or retired by a repair. They are never read, so
they waste space only; the decompose job removes them when it starts and when it ends (holding the
store's lease, so that no other run is writing), and ``vitdecomp store vacuum`` (or ``repair``) does on
demand — refused while another run holds the lease, whose uncommitted files are in flight.

A repair rewrites each data file (Lance fragment or Parquet file) that holds a surplus copy of an
id and commits the replacement in one atomic step (a Lance ``Update``; for Parquet a commit record
that adds the rewritten files and retires the old ones), so a crash during a repair changes nothing.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .lease import LEASE, Lease, LeaseInfo
from .store import Store, StoreError

log = logging.getLogger(__name__)

TABLES = ("contributions", "errors")


@dataclass
class CheckReport:
    """What :func:`check_store` found. ``ok`` when nothing needs repairing."""

    uri: str
    format: str
    rows: int = 0
    error_rows: int = 0
    duplicates: dict = field(default_factory=dict)          # table → {image_id: copies}
    missing_files: list = field(default_factory=list)
    orphan_files: list = field(default_factory=list)
    problems: list = field(default_factory=list)            # manifest / schema inconsistencies
    lease: Optional[LeaseInfo] = None

    @property
    def ok(self) -> bool:
        return not (any(self.duplicates.values()) or self.missing_files or self.orphan_files or self.problems)

    def lines(self) -> list[str]:
        out = [f"store {self.uri} ({self.format}): {self.rows} rows, {self.error_rows} error rows"]
        for t, d in self.duplicates.items():
            if d:
                extra = sum(d.values()) - len(d)
                out.append(f"{t}: {len(d)} ids stored more than once ({extra} surplus rows), e.g. "
                           f"{sorted(d)[:5]}")
        if self.missing_files:
            out.append(f"{len(self.missing_files)} referenced files are missing, e.g. {self.missing_files[:3]}")
        if self.orphan_files:
            out.append(f"{len(self.orphan_files)} orphan files (written by cut-off work, never read), e.g. "
                       f"{self.orphan_files[:3]}")
        out += self.problems
        if self.lease and self.lease.expires > 0:
            out.append(f"lease: {self.lease.describe()}")
        out.append("ok" if self.ok else f"repair with: vitdecomp store repair {self.uri} --apply")
        return out


# ---------------------------------------------------------------------------------- listing
def _files_under(store: Store, rel: str) -> list[str]:
    sel = pafs.FileSelector(store._p(rel), recursive=True, allow_not_found=True)
    return sorted(i.path for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File)


def _lance_referenced(store: Store, table: str) -> set[str]:
    ds = store._lance(table)
    names = set()
    for frag in ds.get_fragments():
        names.update(f.path.rsplit("/", 1)[-1] for f in frag.data_files())
    return names


def orphan_files(store: Store) -> list[str]:
    """Data files no committed version of the store references (full paths in the store's filesystem)."""
    out = []
    if store.format == "lance":
        for table in TABLES:
            live = _lance_referenced(store, table)
            out += [p for p in _files_under(store, f"{table}.lance/data") if p.rsplit("/", 1)[-1] not in live]
    else:
        live = set(store._parquet_files("contributions")) | set(store._parquet_files("errors"))
        for table in TABLES:
            out += [p for p in _files_under(store, table) if p not in live]
    return out


def missing_files(store: Store) -> list[str]:
    """Files a committed version references that are not there."""
    if store.format == "lance":
        out = []
        for table in TABLES:
            present = {p.rsplit("/", 1)[-1] for p in _files_under(store, f"{table}.lance/data")}
            out += [f"{table}.lance/data/{n}" for n in sorted(_lance_referenced(store, table)) if n not in present]
        return out
    return [p for t in TABLES for p in store._parquet_files(t)
            if store.fs.get_file_info(p).type != pafs.FileType.File]


def _duplicates(ids: list) -> dict:
    counts: dict = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    return {i: c for i, c in counts.items() if c > 1}


# ------------------------------------------------------------------------------------ check
def check_store(store: Store) -> CheckReport:
    """Ids distinct (rows and error rows), every referenced file present, the manifest consistent
    with the table's schema, orphans listed. Reads the id columns only."""
    rep = CheckReport(store.uri, store.format)
    m = store.manifest
    rep.missing_files = missing_files(store)
    if rep.missing_files:
        rep.problems.append("the store references missing files: rows cannot be read until they are restored")
        return rep
    ids = store.read(columns=["image_id"]).column("image_id").to_pylist()
    errs = store.read(columns=["image_id"], table="errors").column("image_id").to_pylist()
    rep.rows, rep.error_rows = len(ids), len(errs)
    rep.duplicates = {"contributions": _duplicates(ids), "errors": _duplicates(errs)}
    rep.orphan_files = orphan_files(store)
    names = set(store.schema().names)
    want = {c["column"] for c in m.get("components", [])} | {"image_id", "uri", "readout"}
    if m.get("teacher"):
        want.add("teacher")
    missing_cols = sorted(want - names)
    if missing_cols:
        rep.problems.append(f"the table lacks columns the manifest lists: {missing_cols[:5]}")
    _, rep.lease = Lease(store.lance_uri(LEASE[:-len(".lance")]), store.storage_options).read()
    return rep


# ------------------------------------------------------------------------------------ repair
@dataclass
class RepairReport:
    uri: str
    applied: bool
    actions: list = field(default_factory=list)

    def lines(self) -> list[str]:
        head = "repaired" if self.applied else "dry run (nothing changed; add --apply to repair)"
        return [f"{head}: {self.uri}"] + [f"  {a}" for a in self.actions] + ([] if self.actions else ["  nothing to do"])


def _dedupe_lance(store: Store, table: str, dups: dict, apply: bool) -> int:
    """Rewrite every fragment holding a surplus copy; one ``Update`` commit. Returns rows dropped."""
    import lance

    ds = store._lance(table)
    t = ds.to_table(columns=["image_id"], with_row_address=True,
                    filter=pc.field("image_id").isin(pa.array(sorted(dups), pa.string())))
    keep = {}
    for i, addr in sorted(zip(t.column("image_id").to_pylist(), t.column("_rowaddr").to_pylist()), key=lambda r: r[1]):
        keep.setdefault(i, addr)                                # the first copy stays
    drop = {addr for i, addr in zip(t.column("image_id").to_pylist(), t.column("_rowaddr").to_pylist())
            if keep[i] != addr}
    frag_ids = sorted({a >> 32 for a in drop})
    if not apply or not drop:
        return len(drop)
    new_frags, removed = [], []
    for fid in frag_ids:
        frag = ds.get_fragment(fid)
        ft = frag.to_table(with_row_address=True)
        mask = pa.array([a not in drop for a in ft.column("_rowaddr").to_pylist()])
        kept = ft.filter(mask).drop_columns(["_rowaddr"])
        removed.append(fid)
        if kept.num_rows:
            new_frags += lance.fragment.write_fragments(kept, store.lance_uri(table), schema=ds.schema,
                                                        storage_options=store.storage_options)
    op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=[], new_fragments=new_frags)
    lance.LanceDataset.commit(store.lance_uri(table), op, read_version=ds.version,
                              storage_options=store.storage_options)
    return len(drop)


def _dedupe_parquet(store: Store, table: str, dups: dict, apply: bool) -> int:
    import pyarrow.parquet as pq

    seen: set = set()
    retire, add, dropped = [], [], 0
    for path in store._parquet_files(table):
        t = pq.read_table(path, filesystem=store.fs)
        ids = t.column("image_id").to_pylist()
        mask = []
        for i in ids:
            dup = i in dups and i in seen
            seen.add(i)
            mask.append(not dup)
        n = len(mask) - sum(mask)
        if n == 0:
            continue
        dropped += n
        retire.append(path)
        kept = t.filter(pa.array(mask))
        if kept.num_rows and apply:
            name = f"{table}/{uuid.uuid4().hex}.parquet"
            pq.write_table(kept, store._p(name), filesystem=store.fs)
            add.append({"file": name, "rows": kept.num_rows, "table": table})
    if apply and retire:
        rel = [p[len(store.path) + 1:] for p in retire]
        store.commit_record({"files": add, "remove": rel, "reason": "repair: duplicate ids"})
    return dropped


def remove_orphans(store: Store) -> list[str]:
    """Delete the store's orphan files (call only while no run writes the store); returns them."""
    files = orphan_files(store)
    for p in files:
        try:
            store.fs.delete_file(p)
        except FileNotFoundError:
            pass
    if store.format == "lance" and files:
        import datetime

        for table in TABLES:                           # Lance's own bookkeeping of the versions they came from
            store._lance(table).cleanup_old_versions(older_than=datetime.timedelta(0), delete_unverified=True)
    return files


@dataclass
class VacuumReport:
    uri: str
    removed: list = field(default_factory=list)          # paths of the orphan files removed
    bytes: int = 0

    def lines(self) -> list[str]:
        if not self.removed:
            return [f"vacuum {self.uri}: no orphan files"]
        return [f"vacuum {self.uri}: removed {len(self.removed)} orphan files ({self.bytes / 2**20:.1f} MiB) left by "
                f"cut-off work, e.g. {[p.rsplit('/', 1)[-1] for p in self.removed[:3]]}"]


def vacuum_store(store: Store) -> VacuumReport:
    """Remove the orphan files of ``store`` (written by a commit that was cut off, e.g. a killed run;
    never read). Takes the store's lease first, so it is refused with
    :class:`~vitdecomp.store.lease.StoreBusyError` while a decompose run (or an append) writes the
    store: a running writer's uncommitted files are in flight, not orphans. Rows are never touched."""
    lease = Lease(store.lance_uri(LEASE[:-len(".lance")]), store.storage_options)
    lease.start("vitdecomp store vacuum")
    try:
        rep = VacuumReport(store.uri)
        sizes = {}
        for p in orphan_files(store):
            info = store.fs.get_file_info(p)
            sizes[p] = info.size or 0
        lease.check()
        rep.removed = remove_orphans(store)
        rep.bytes = sum(sizes.get(p, 0) for p in rep.removed)
    finally:
        lease.release()
    log.info("vacuum %s: removed %d orphan files (%d bytes)", store.uri, len(rep.removed), rep.bytes)
    return rep


def repair_store(store: Store, apply: bool = False) -> RepairReport:
    """Drop surplus copies of duplicated ids (the first stays) and remove orphan files. A dry run by
    default (``apply=False``) reports what it would do. Takes the store's lease, so it refuses to run
    while a decompose job writes the store."""
    rep = RepairReport(store.uri, apply)
    chk = check_store(store)
    if chk.missing_files:
        raise StoreError(f"{store.uri} references missing files ({chk.missing_files[:3]}): restore them first; a "
                         "repair cannot recreate rows")
    lease = Lease(store.lance_uri(LEASE[:-len(".lance")]), store.storage_options)
    if apply:
        lease.start("vitdecomp store repair")
    try:
        for table in TABLES:
            dups = chk.duplicates.get(table) or {}
            if not dups:
                continue
            fn = _dedupe_lance if store.format == "lance" else _dedupe_parquet
            n = fn(store, table, dups, apply)
            rep.actions.append(f"{table}: drop {n} surplus rows of {len(dups)} duplicated ids (one copy of each kept)")
        orphans = orphan_files(store)
        if orphans:
            if apply:
                remove_orphans(store)
            rep.actions.append(f"remove {len(orphans)} orphan files, e.g. "
                               f"{[p.rsplit('/', 1)[-1] for p in orphans[:3]]}")
    finally:
        if apply:
            lease.release()
    return rep

