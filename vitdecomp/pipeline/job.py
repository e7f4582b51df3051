"""The decompose job: image corpus → contribution store (``vitdecomp decompose --help``).

Pipeline (one streaming Ray Data execution)::

    source reader → decode + preprocess (CPU tasks, the model's own transforms)
      → DecomposeWorker (actor pool: loads the model once; GPU when the cluster has one)
      → write_block (tasks: uncommitted Lance fragments or Parquet files, Store.write_uncommitted) → driver commits

The driver commits what the writers produced in chunks of at most ``--commit-every`` images (error
rows first, then data; each written file holds at most that many rows). Commits are idempotent (a
retry after a lost reply never adds a chunk twice). A rerun skips stored ids by anti-joins against
the store (:mod:`vitdecomp.pipeline.resume`), never by a driver-side id set. Work that is cut off
leaves only uncommitted files (orphans, removed by the next run or ``vitdecomp store vacuum``), so a
rerun — which skips every committed id — never duplicates a row and redoes at most the chunks that
were in flight.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..config import DecomposeConfig, parse_blocks
from ..store import Store, StoreError
from ..store.lease import LEASE, Lease
from ..store.manifest import Manifest

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ driver
@dataclass
class Summary:
    written: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    total_rows: int = 0
    bytes_per_image: float = 0.0
    commits: int = 0
    steady_images_per_s: float = 0.0    # after the first results arrived (excludes start-up)
    store: str = ""
    nodes: dict = field(default_factory=dict)   # {"decode"|"model": {node address: inputs}} of this run
    extra: dict = field(default_factory=dict)
    inputs: Optional[int] = None        # inputs the source listed (None: not known before reading)
    skipped_by_rule: int = 0            # hidden files, duplicate paths, dropped duplicate ids
    already_stored: Optional[int] = None    # listed inputs whose id the store held before (None: not known)
    left_by_limit: int = 0              # listed inputs not processed because of the limit option

    @property
    def images_per_s(self) -> float:
        return (self.written + self.errors) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"decompose: {self.written} images written, {self.errors} errors, {self.skipped} already stored "
                f"(skipped), {self.commits} commits in {self.seconds:.1f} s = {self.images_per_s:.2f} images/s; "
                f"store {self.store} holds {self.total_rows} rows, {self.bytes_per_image / 1024:.1f} KiB/image"
                + self._accounting()
                + "".join(f"\ndecompose: {_STAGES[stage]} ran on "
                          + ", ".join(f"{n} ({c} inputs)" for n, c in sorted(per.items()))
                          for stage, per in self.nodes.items() if per))


    def _accounting(self) -> str:
        """``inputs = rows + errors + skipped-by-rule (+ already stored + left by the limit)``."""
        if self.inputs is None:
            return f"; {self.skipped_by_rule} inputs skipped by rule" if self.skipped_by_rule else ""
        parts = [f"{self.written} rows", f"{self.errors} errors", f"{self.skipped_by_rule} skipped by rule"]
        rest = self.inputs - self.written - self.errors - self.skipped_by_rule
        if self.already_stored is not None:
            if self.already_stored:
                parts.append(f"{self.already_stored} already stored")
            if self.left_by_limit:
                parts.append(f"{self.left_by_limit} left by the limit")
        elif rest:
            parts.append(f"{rest} already stored or left by the limit")
        return f"\ndecompose: inputs {self.inputs} = " + " + ".join(parts)


_STAGES = {"decode": "decoding", "model": "model actors"}
# a decode task whose worker process dies (e.g. a decoder crash) is retried this often, then the job
# fails with the error; Ray Data's default (-1) would retry it forever
DECODE_MAX_RETRIES = 3


def run_decompose(cfg: DecomposeConfig) -> Summary:
    """Run the decompose job (see the module docstring); returns its summary."""
    import ray

    from ..config import OptionError
    from ..engine import components_for
    from ..models import check_name, load_model, verify_checkpoint

    cfg.check_required()
    t0 = time.time()
    # 1. everything that can fail without touching the data fails first
    check_name(cfg.model, cfg.pretrained)
    from .sources import preflight

    preflight(cfg.input, cfg.source, cfg.s3())       # a missing or empty input fails before Ray starts
    if cfg.teacher:
        if not cfg.teacher.startswith("open_clip:"):
            raise OptionError("teacher", f"must be an open_clip model (open_clip:<arch>), got {cfg.teacher!r}")
        check_name(cfg.teacher, cfg.teacher_pretrained)
    blocks = parse_blocks(cfg.blocks)
    lm = load_model(cfg.model, pretrained=cfg.pretrained or False, checkpoint=cfg.checkpoint, load_weights=False)
    teacher = (load_model(cfg.teacher, pretrained=cfg.teacher_pretrained or False,
                          checkpoint=cfg.teacher_checkpoint, load_weights=False) if cfg.teacher else None)
    for model, path in ((lm, cfg.checkpoint), (teacher, cfg.teacher_checkpoint)):
        if path:
            verify_checkpoint(model, path)        # readable without unpickling, and fits the architecture
    components = components_for(lm, blocks=blocks, heads=cfg.heads)
    s3 = cfg.s3()
    store = Store(cfg.output, s3)
    store.check_writable()
    started_here = not ray.is_initialized() and not cfg.ray_address and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, num_cpus=cfg.num_cpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    _check_resources(cfg, ray.cluster_resources(), fixed=started_here)
    # 2. one writer at a time: the store's lease (a second concurrent run is refused here, writing nothing)
    existed = store.exists()
    lease = Lease(store.lance_uri(LEASE[:-len(".lance")]), store.storage_options)
    lease.start(f"vitdecomp decompose --input {cfg.input}")
    try:
        plan = cpu_plan(ray.cluster_resources().get("CPU", 0.0), cfg.concurrency, tight=started_here)
        return _decompose_locked(cfg, store, s3, lm, teacher, components, blocks, t0, lease, existed, plan)
    except BaseException as e:
        lease.release()
        if not existed:
            _discard_if_empty(store)          # a run that failed before its first commit leaves nothing behind
        cause = _permanent_io_error(e)
        if cause is not None:                 # a full disk, a read-only or forbidden output: one line, no traceback
            raise StoreError(f"writing {store.uri} failed: {type(cause).__name__}: {str(cause).splitlines()[0][:240]}"
                             " — free space or make the output writable, then rerun: the run resumes where it "
                             "stopped") from None
        raise
    finally:
        lease.release()


def cpu_plan(cpus: float, concurrency: int, tight: bool = True) -> dict:
    """CPUs each stage reserves: a read task, a decode task, a model actor, a write task. With room for
    the actors and a CPU to spare (or on a cluster, which may scale), the defaults: read (Ray's own),
    decode 0.5, actor 1, write 0.25. On a smaller local instance (e.g. ``num_cpus=1``) the stages share:
    the actors take half of the CPUs between them and reading, decoding and writing share the other
    half, so no stage waits for a CPU another stage holds for good (which would hang the job)."""
    if not tight or cpus >= concurrency + 1:
        return {"read": None, "decode": 0.5, "actor": 1.0, "write": 0.25}
    rest = cpus / 2
    return {"read": rest / 4, "decode": rest / 2, "actor": cpus / 2 / concurrency, "write": rest / 4}


def _permanent_io_error(e: BaseException) -> "Optional[BaseException]":
    """The OS-level error under ``e`` (Ray wraps task errors) when it cannot go away by itself."""
    from ..io import transient

    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and not isinstance(x, FileNotFoundError) and not transient(x):
            text = str(x).lower()
            if isinstance(x, PermissionError) or getattr(x, "errno", None) or any(
                    t in text for t in ("no space left", "read-only", "permission denied", "access denied",
                                        "os error 28", "os error 30", "os error 13")):
                return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def _check_resources(cfg: DecomposeConfig, offered: dict, fixed: bool) -> None:
    """Custom resources no node offers: an error on a local Ray this job started (it can never get
    them), a warning on a cluster (an autoscaler may add a node that offers them)."""
    from ..config import OptionError

    custom = {k: v for k, v in offered.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
              and not k.startswith("node:") and not k.startswith("accelerator_type:")}
    for name, res in (("worker_resources", cfg.worker_resources), ("decode_resources", cfg.decode_resources)):
        short = {k: v for k, v in (res or {}).items() if offered.get(k, 0) < v}
        if not short:
            continue
        if fixed:
            raise OptionError(name, f"no node of the local Ray instance offers {short}; it offers "
                                    f"{custom or 'no custom resources'} (CPU {offered.get('CPU', 0):g}, "
                                    f"GPU {offered.get('GPU', 0):g}): drop the option, or submit to a cluster "
                                    "whose nodes declare these resources")
        log.warning("%s: no node of the cluster offers %s now (it offers %s); the job waits until one does "
                    "(e.g. an autoscaled worker group)", name, short, custom or "no custom resources")


def _discard_if_empty(store: Store) -> None:
    """Remove what a failed run wrote into an output that held no store before, if no row and no error
    row was committed (only the manifest, empty tables and the released lease), so that a corrected
    rerun starts afresh. Only the store's own entries are removed; other files are left alone."""
    import pyarrow.fs as pafs

    from ..store.manifest import MANIFEST

    own = {MANIFEST, "contributions.lance", "errors.lance", "contributions", "errors", "_commits", "_schema.json",
           LEASE}
    try:
        if store.exists() and (store.count() or store.read(columns=["image_id"], table="errors").num_rows):
            return
        for info in store.fs.get_file_info(pafs.FileSelector(store.path, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            if name in own or name.startswith(f".{MANIFEST}."):
                (store.fs.delete_dir if info.type == pafs.FileType.Directory else store.fs.delete_file)(info.path)
        if not store.fs.get_file_info(pafs.FileSelector(store.path, allow_not_found=True)):
            store.fs.delete_dir(store.path)
        log.info("removed the empty store %s left by the failed run", store.uri)
    except (OSError, StoreError) as e:
        log.warning("could not remove the empty store %s: %s", store.uri, e)


def _decompose_locked(cfg: DecomposeConfig, store: Store, s3, lm, teacher, components, blocks, t0: float,
                      lease, existed: bool, plan: dict) -> Summary:
    """The decompose job while holding the store's lease."""
    import ray

    from ..config import OptionError
    from ..models import extension_modules
    from ..store.maintenance import remove_orphans
    from .decode import decode_block
    from .decomposer import DecomposeWorker
    from .resume import StoredIds
    from .sources import open_source
    from .write import write_block

    stored = None
    if store.exists():                        # (looked at under the lease: a run that just ended is seen)
        orphans = remove_orphans(store)       # files of cut-off commits (no other writer: we hold the lease)
        if orphans:
            log.info("removed %d orphan files left by an earlier run that was cut off", len(orphans))
        stored = StoredIds.of(store)          # a handle (versions/files), not the ids: skipped by anti-joins
    src = open_source(cfg.input, cfg.source, s3=s3, label_from_folder=cfg.label_from_folder, id_column=cfg.id_column,
                      uri_column=cfg.uri_column, bytes_column=cfg.bytes_column, columns=cfg.columns,
                      stored=stored, limit=cfg.limit, dedupe_ids=cfg.dedupe_ids, read_cpus=plan["read"])
    from ..store.compact import layout_for_run

    layout_fields, basis = layout_for_run(cfg, store, components)    # README “Store layout”
    manifest = Manifest.build(lm, components, cfg, format=cfg.format, teacher=teacher, passthrough=src.passthrough,
                              source_kind=src.kind, seed=cfg.seed, readout_only=cfg.readout_only,
                              pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                              teacher_pretrained=cfg.teacher_pretrained, teacher_checkpoint=cfg.teacher_checkpoint,
                              layout_fields=layout_fields)
    schema = manifest.schema()
    store.initialize(manifest, schema, basis=basis)   # refuses a store whose manifest differs
    summary = Summary(store=cfg.output, skipped=stored.rows if stored else 0, inputs=src.notes.get("inputs"),
                      skipped_by_rule=src.notes.get("skipped_by_rule", 0),
                      already_stored=src.notes.get("already_stored"), left_by_limit=src.notes.get("left_by_limit", 0))
    if src.dataset is None:
        log.info("nothing to do: all %d inputs are already stored", src.notes.get("listed", 0))
        return _finish(summary, store, t0)

    use_gpu = cfg.device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) > 0
    if cfg.device == "cuda" and not use_gpu:
        raise OptionError("device", "cuda was asked for but the Ray cluster has no GPU")
    spec = {"model": cfg.model, "pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint, "teacher": cfg.teacher,
            "teacher_pretrained": cfg.teacher_pretrained, "teacher_checkpoint": cfg.teacher_checkpoint,
            "device": "cuda" if use_gpu else "cpu", "blocks": blocks, "heads": cfg.heads,
            "convention": cfg.convention, "normalize": cfg.normalize, "dtype": cfg.dtype,
            "components": [c.name for c in components], "readout_only": cfg.readout_only,
            "schema": schema.serialize().to_pybytes(), "seed": cfg.seed, "extensions": list(extension_modules()),
            "compact": store.manifest.get("compact") if store.layout == "compact" else None,
            "basis": basis if basis is not None or store.layout != "compact" else store.basis_bytes()}
    s3d = {"endpoint": s3.endpoint, "region": s3.region}
    decode_kw = {"resources": cfg.decode_resources} if cfg.decode_resources else {}
    worker_kw = {"resources": cfg.worker_resources} if cfg.worker_resources else {}
    # decoding runs in CPU tasks of its own (its resources differ from the actors', so Ray Data does
    # not fuse it into the model actors, which would serialise decoding behind the model)
    # (max_retries has no named parameter in Ray 2.60; its ray_remote_args deprecation warning is expected)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`ray_remote_args` is deprecated")
        ds = src.dataset.map_batches(decode_block, batch_format="pyarrow", batch_size=cfg.batch_size,
                                     num_cpus=plan["decode"],
                                     fn_args=(lm.transform, teacher.transform if teacher else None, s3d),
                                     fn_kwargs={"max_pixels": cfg.max_pixels,
                                                "alpha_background": cfg.alpha_background,
                                                "isolate_decoding": cfg.isolate_decoding},
                                     max_retries=DECODE_MAX_RETRIES, **decode_kw)
    ds = ds.map_batches(DecomposeWorker, batch_format="pyarrow", batch_size=cfg.batch_size,
                        fn_constructor_args=(spec,), compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                        num_gpus=1 if use_gpu else 0, num_cpus=plan["actor"], **worker_kw)
    # writers are I/O-bound and must never starve behind decoding and the model (else nothing is
    # committed until the end and results pile up in the object store)
    # (each written file holds at most commit_every rows, so that every commit can hold at most that many)
    ds = ds.map_batches(write_block, batch_format="pyarrow", batch_size=None, num_cpus=plan["write"],
                        fn_args=(cfg.output, cfg.format, schema.serialize().to_pybytes(), s3d),
                        fn_kwargs={"max_rows": cfg.commit_every})

    pending: list[dict] = []
    pending_errors: list[dict] = []
    pending_rows = 0

    def commit():
        nonlocal pending, pending_errors, pending_rows
        if not pending and not pending_errors:
            return
        err_tbl = None
        if pending_errors:
            now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
            err_tbl = pa.Table.from_pylist(pending_errors).append_column(
                "time", pa.array([now.value] * len(pending_errors), pa.timestamp("ms", tz="UTC")))
        # never commit after another run could have taken the store over (checked before every attempt)
        store.commit(pending, err_tbl, chunk=f"{lease.holder}-{summary.commits + 1}", fence=lease.check)
        summary.written += sum(p["rows"] for p in pending)
        summary.errors += len(pending_errors)
        summary.commits += 1
        log.info("committed chunk %d: %d rows, %d errors (total %d written)", summary.commits,
                 sum(p["rows"] for p in pending), len(pending_errors), summary.written)
        pending, pending_errors, pending_rows = [], [], 0

    t_first, n_first, n_seen = None, 0, 0
    placement: dict[str, dict] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        n_batch = int(pc.sum(batch.column("rows")).as_py() or 0)
        if t_first is None:
            t_first, n_first = time.time(), n_batch
        n_seen += n_batch
        for kind, payload, rows in zip(batch.column("kind").to_pylist(), batch.column("payload").to_pylist(),
                                       batch.column("rows").to_pylist()):
            rec = json.loads(payload)
            if kind == "placement":
                for stage in ("decode", "model"):
                    per = placement.setdefault(stage, {})
                    per[rec[stage]] = per.get(rec[stage], 0) + rec["inputs"]
                continue
            if pending_rows + rows > cfg.commit_every:
                commit()                      # a commit holds at most commit_every images (rows + error rows)
            if kind == "error":
                pending_errors.append(rec)
            else:
                rec["rows"] = rows
                pending.append(rec)
            pending_rows += rows
            if pending_rows >= cfg.commit_every:
                commit()
    t_last = time.time()
    commit()
    orphans = remove_orphans(store)           # files of failed write attempts (nothing is in flight any more)
    if orphans:
        log.info("removed %d orphan files (failed write attempts)", len(orphans))
    if t_first is not None and t_last > t_first and n_seen > n_first:
        summary.steady_images_per_s = (n_seen - n_first) / (t_last - t_first)
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    summary.nodes = {stage: {address.get(k, k or "?"): c for k, c in per.items()} for stage, per in placement.items()}
    before = stored.data_rows if stored else 0
    return _finish(summary, store, t0, before if before >= 0 else None)


# the end-of-run check reads every stored id (Arrow, ≈ 25 bytes each) only up to this many rows; above,
# it checks that the store grew by exactly the rows this run committed (`vitdecomp store check` reads all)
DISTINCT_CHECK_MAX_ROWS = 1_000_000


def _finish(summary: Summary, store: Store, t0: float, rows_before: Optional[int] = None) -> Summary:
    summary.seconds = time.time() - t0
    summary.total_rows = store.count()
    fix = (f"run `vitdecomp store check {store.uri}` to see them and `vitdecomp store repair {store.uri} --apply` "
           "to keep one copy")
    if rows_before is not None and summary.total_rows != rows_before + summary.written:
        raise StoreError(f"{store.uri}: the store holds {summary.total_rows} rows, but {rows_before} were stored "
                         f"before this run and it committed {summary.written}: some rows are stored twice; {fix}")
    if summary.total_rows <= DISTINCT_CHECK_MAX_ROWS:
        ids = store.read(columns=["image_id"]).column("image_id")
        if len(pc.unique(ids)) != len(ids):
            raise StoreError(f"{store.uri}: some image ids are stored more than once; {fix}")
    summary.bytes_per_image = store.nbytes() / summary.total_rows if summary.total_rows else 0.0
    return summary
