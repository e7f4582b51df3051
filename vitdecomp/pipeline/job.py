"""The decompose job: image corpus → contribution store (``vitdecomp decompose --help``).

Pipeline (one streaming Ray Data execution)::

    source reader → decode + preprocess (CPU tasks, the model's own transforms)
      → DecomposeWorker (actor pool: loads the model once; GPU when the cluster has one)
      → write_block (tasks: Lance fragments via lance-ray, or Parquet files) → driver commits

The driver commits what the writers produced every ``--commit-every`` images (error rows first,
then data). Work that is cut off leaves only uncommitted files, so a rerun — which skips every
committed id — never duplicates a row and redoes at most the chunks that were in flight.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..config import DecomposeConfig, parse_blocks
from ..errors import InputError
from ..store import Store, StoreError
from ..store.manifest import components_to_json
from ..store.schema import contributions_schema

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

    @property
    def images_per_s(self) -> float:
        return (self.written + self.errors) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"decompose: {self.written} images written, {self.errors} errors, {self.skipped} already stored "
                f"(skipped), {self.commits} commits in {self.seconds:.1f} s = {self.images_per_s:.2f} images/s; "
                f"store {self.store} holds {self.total_rows} rows, {self.bytes_per_image / 1024:.1f} KiB/image"
                + "".join(f"\ndecompose: {_STAGES[stage]} ran on " + ", ".join(f"{n} ({c} inputs)" for n, c in
                                                                                sorted(per.items()))
                          for stage, per in self.nodes.items() if per))


_STAGES = {"decode": "decoding", "model": "model actors"}


def _manifest(cfg: DecomposeConfig, lm, teacher, components, d: int, source_kind: str) -> dict:
    from ..version import __version__

    def weights(m, pretrained, checkpoint):
        out = {"pretrained": pretrained or None, "checkpoint": os.path.basename(checkpoint) if checkpoint else None,
               "checkpoint_sha256": m.checkpoint_sha256 if checkpoint else None}
        if not (pretrained or checkpoint):
            out["seed"] = cfg.seed             # random init: the weights are those of this seed
        return out

    return {
        "format": cfg.format,
        "model": {"name": lm.name, "readout": asdict(lm.readout), **weights(lm, cfg.pretrained, cfg.checkpoint)},
        "teacher": None if teacher is None else {"name": teacher.name, "dim": teacher.readout.dim,
                                                 **weights(teacher, cfg.teacher_pretrained, cfg.teacher_checkpoint)},
        "preprocess": lm.preprocess,
        "teacher_preprocess": teacher.preprocess if teacher else None,
        "options": {"blocks": parse_blocks(cfg.blocks), "heads": cfg.heads, "convention": cfg.convention,
                    "normalize": cfg.normalize, "readout_only": cfg.readout_only},
        "components": [] if cfg.readout_only else components_to_json(components),
        "d": d,
        "dtype": cfg.dtype,
        "passthrough": None,
        "source": {"kind": source_kind},
        "package": {"vitdecomp": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_decompose(cfg: DecomposeConfig) -> Summary:
    """Run the decompose job (see the module docstring); returns its summary."""
    import ray

    from ..config import OptionError
    from ..engine import components_for
    from ..models import check_name, extension_modules, load_model
    from .decode import decode_block
    from .decomposer import DecomposeWorker
    from .sources import open_source
    from .write import write_block

    cfg.check_required()
    t0 = time.time()
    # 1. everything that can fail without touching the data fails first
    check_name(cfg.model, cfg.pretrained)
    if cfg.teacher:
        if not cfg.teacher.startswith("open_clip:"):
            raise OptionError("teacher", f"must be an open_clip model (open_clip:<arch>), got {cfg.teacher!r}")
        check_name(cfg.teacher, cfg.teacher_pretrained)
    blocks = parse_blocks(cfg.blocks)
    lm = load_model(cfg.model, pretrained=cfg.pretrained or False, checkpoint=cfg.checkpoint, load_weights=False)
    teacher = (load_model(cfg.teacher, pretrained=cfg.teacher_pretrained or False,
                          checkpoint=cfg.teacher_checkpoint, load_weights=False) if cfg.teacher else None)
    components = components_for(lm, blocks=blocks, heads=cfg.heads)
    s3 = cfg.s3()
    store = Store(cfg.output, s3)
    store.check_writable()
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, num_cpus=cfg.num_cpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    skip = store.done_ids() if store.exists() else set()
    src = open_source(cfg.input, cfg.source, s3=s3, label_from_folder=cfg.label_from_folder, id_column=cfg.id_column,
                      uri_column=cfg.uri_column, bytes_column=cfg.bytes_column, columns=cfg.columns,
                      skip_ids=skip, limit=cfg.limit)
    d = lm.readout.dim
    schema = contributions_schema([] if cfg.readout_only else components, d, cfg.dtype, src.passthrough,
                                  teacher.readout.dim if teacher else None)
    manifest = _manifest(cfg, lm, teacher, components, d, src.kind)
    manifest["passthrough"] = [f"{f.name}:{f.type}" for f in src.passthrough]
    store.create(manifest, schema)            # refuses a store whose manifest differs
    summary = Summary(store=cfg.output, skipped=len(skip))
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
            "schema": schema.serialize().to_pybytes(), "seed": cfg.seed, "extensions": list(extension_modules())}
    s3d = {"endpoint": s3.endpoint, "region": s3.region}
    for flag, res in (("worker_resources", cfg.worker_resources), ("decode_resources", cfg.decode_resources)):
        missing = sorted(set(res or {}) - set(ray.cluster_resources()))
        if missing:
            log.warning("%s: no node of the cluster offers %s now; the job waits until one does "
                        "(e.g. an autoscaled worker group)", flag, missing)
    decode_kw = {"resources": cfg.decode_resources} if cfg.decode_resources else {}
    worker_kw = {"resources": cfg.worker_resources} if cfg.worker_resources else {}
    # decoding runs in CPU tasks of its own (its resources differ from the actors', so Ray Data does
    # not fuse it into the model actors, which would serialise decoding behind the model)
    ds = src.dataset.map_batches(decode_block, batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=0.5,
                                 fn_args=(lm.transform, teacher.transform if teacher else None, s3d), **decode_kw)
    ds = ds.map_batches(DecomposeWorker, batch_format="pyarrow", batch_size=cfg.batch_size,
                        fn_constructor_args=(spec,), compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                        num_gpus=1 if use_gpu else 0, num_cpus=1, **worker_kw)
    # writers are I/O-bound and must never starve behind decoding and the model (else nothing is
    # committed until the end and results pile up in the object store)
    ds = ds.map_batches(write_block, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                        fn_args=(cfg.output, cfg.format, schema.serialize().to_pybytes(), s3d))

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
        store.commit(pending, err_tbl)
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
    if t_first is not None and t_last > t_first and n_seen > n_first:
        summary.steady_images_per_s = (n_seen - n_first) / (t_last - t_first)
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    summary.nodes = {stage: {address.get(k, k or "?"): c for k, c in per.items()} for stage, per in placement.items()}
    return _finish(summary, store, t0)


def _finish(summary: Summary, store: Store, t0: float) -> Summary:
    summary.seconds = time.time() - t0
    summary.total_rows = store.count()
    ids = store.read(columns=["image_id"]).column("image_id")
    if len(pc.unique(ids)) != len(ids):
        raise StoreError(f"{store.uri}: duplicate image_id rows after the run — please report this")
    summary.bytes_per_image = store.nbytes() / summary.total_rows if summary.total_rows else 0.0
    return summary
