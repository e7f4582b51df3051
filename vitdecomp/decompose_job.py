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

import argparse
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError, VitdecompError
from .storage import (DTYPES, FORMATS, S3Settings, Store, StoreError, components_to_json, contributions_schema,
                      column_for, retry, vectors_to_arrow)

log = logging.getLogger(__name__)


@dataclass
class DecomposeConfig:
    input: str = ""
    output: str = ""
    model: str = ""
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    format: str = "lance"
    source: str = "auto"
    blocks: Optional[str] = None
    heads: bool = True
    convention: str = "centered"
    normalize: bool = False
    dtype: str = "fp16"
    batch_size: int = 32
    concurrency: int = 1
    teacher: Optional[str] = None
    teacher_pretrained: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    label_from_folder: bool = False
    id_column: Optional[str] = None
    uri_column: Optional[str] = None
    bytes_column: Optional[str] = None
    columns: Optional[list] = None
    commit_every: int = 512
    limit: Optional[int] = None
    device: str = "auto"
    s3_endpoint: Optional[str] = None
    s3_region: Optional[str] = None
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = None
    worker_resources: Optional[dict] = None   # custom Ray resources per model actor (JSON object)
    decode_resources: Optional[dict] = None   # custom Ray resources per decode task (JSON object)
    readout_only: bool = False         # benchmark baseline: same pipeline, readout column only

    def validate(self) -> None:
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise InputError(f"--{name} is required (flag or config file)")
        if self.format not in FORMATS:
            raise InputError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.concurrency < 1 or self.commit_every < 1:
            raise InputError("--batch-size, --concurrency and --commit-every must be positive")
        if self.pretrained and self.checkpoint:
            raise InputError("pass either --pretrained or --checkpoint, not both")
        self.worker_resources = parse_resources(self.worker_resources, "--worker-resources")
        self.decode_resources = parse_resources(self.decode_resources, "--decode-resources")


def parse_resources(value, flag: str) -> Optional[dict]:
    """``'{"gpu_node": 1}'`` (a JSON object; a dict from a config file) → ``{name: float}`` of custom Ray
    resources, or None. CPUs and GPUs are not custom resources (they follow --concurrency and --device)."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"{flag} {value!r}: not a JSON object ({e}); use e.g. '{{\"gpu_node\": 1}}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a mapping of Ray resource name to amount, got {value!r}")
    out = {}
    for k, v in value.items():
        if str(k) in ("CPU", "GPU", "memory", "object_store_memory"):
            raise InputError(f"{flag}: {k!r} is not a custom resource; CPUs/GPUs follow --concurrency and --device")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"{flag}: the amount of {k!r} must be a positive number, got {v!r}")
        out[str(k)] = float(v)
    return out


def _node_id() -> Optional[str]:
    """The Ray node this code runs on (None outside Ray: unit tests call the stages directly)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def parse_blocks(spec: Optional[str]) -> Optional[list[int]]:
    """``"7-11"``, ``"7,8,9,10,11"``, ``"-4:"`` (last four) or None (all)."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, (list, tuple)):
        return [int(b) for b in spec]
    s = str(spec).strip()
    try:
        if s.endswith(":"):
            return list(range(int(s[:-1]), 0))
        if "-" in s[1:]:
            lo, hi = s.split("-", 1) if not s.startswith("-") else ("-" + s[1:].split("-", 1)[0], s[1:].split("-", 1)[1])
            return list(range(int(lo), int(hi) + 1))
        return [int(b) for b in s.split(",")]
    except ValueError:
        raise InputError(f"--blocks {spec!r}: use e.g. '7-11', '7,8,9,10,11' or '-4:' (the last four)") from None


# ------------------------------------------------------------------------------ stage functions
def decode_block(t: pa.Table, transform, teacher_transform, s3: dict) -> pa.Table:
    """Bytes or URI → preprocessed float32 pixels (``_pixels``), or ``_error`` with the reason."""
    from PIL import Image, UnidentifiedImageError

    from .storage import resolve

    n = t.num_rows
    data = t.column("_bytes").to_pylist() if "_bytes" in t.column_names else [None] * n
    uris = t.column("uri").to_pylist()
    pixels, tpixels, errors = [], [], []
    for b, uri in zip(data, uris):
        err, px, tpx = None, None, None
        try:
            if b is None:
                if not uri:
                    raise ValueError("no image bytes and no URI")
                fs, path = resolve(uri, S3Settings(**s3))
                with fs.open_input_file(path) as f:
                    b = f.read()
            with Image.open(io.BytesIO(b)) as im:
                im.load()
                img = im.convert("RGB")
            px = np.ascontiguousarray(transform(img).numpy(), dtype=np.float32).tobytes()
            if teacher_transform is not None:
                tpx = np.ascontiguousarray(teacher_transform(img).numpy(), dtype=np.float32).tobytes()
        except FileNotFoundError as e:
            err = f"missing: {e}"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            err = f"undecodable: {type(e).__name__}: {e}"
        pixels.append(px)
        tpixels.append(tpx)
        errors.append(err)
    out = t.drop_columns([c for c in ("_bytes",) if c in t.column_names])
    out = out.append_column("_pixels", pa.array(pixels, pa.large_binary()))
    out = out.append_column("_decode_node", pa.array([_node_id()] * n, pa.string()))
    if teacher_transform is not None:
        out = out.append_column("_tpixels", pa.array(tpixels, pa.large_binary()))
    return out.append_column("_error", pa.array(errors, pa.string()))


class DecomposeWorker:
    """Actor: loads the model (and teacher) once, decomposes batches of preprocessed pixels."""

    def __init__(self, spec: dict):
        import torch

        import vitdecomp as vd

        self.spec = spec
        dev = spec["device"]
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        torch.manual_seed(spec.get("seed", 0))
        self.lm = vd.load_model(spec["model"], pretrained=spec["pretrained"] or False, checkpoint=spec["checkpoint"],
                                device=self.device)
        self.teacher = None
        if spec["teacher"]:
            torch.manual_seed(spec.get("seed", 0))      # random-init models: each built from seed 0
            self.teacher = vd.load_model(spec["teacher"], pretrained=spec["teacher_pretrained"] or False,
                                         checkpoint=spec["teacher_checkpoint"], device=self.device)
        self.size = (3, *self.lm.image_size)
        self.tsize = (3, *self.teacher.image_size) if self.teacher else None
        self.schema = pa.ipc.read_schema(pa.py_buffer(spec["schema"]))
        self.node = _node_id()

    def __call__(self, t: pa.Table) -> pa.Table:
        import torch

        import vitdecomp as vd

        ok = pc.is_null(t.column("_error")).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(ok)
        n, spec = t.num_rows, self.spec
        d = self.lm.readout.dim
        K = len(spec["components"])
        contrib = np.zeros((n, K, d), np.float32)
        readout = np.zeros((n, d), np.float32)
        teacher = np.zeros((n, self.teacher.readout.dim), np.float32) if self.teacher else None
        if len(idx):
            px = t.column("_pixels").to_pylist()
            x = torch.from_numpy(np.stack([np.frombuffer(px[i], np.float32).reshape(self.size) for i in idx]))
            x = x.to(self.device)
            if spec["readout_only"]:
                with torch.inference_mode():
                    z = vd.engine.plan_for(self.lm.vision).readout(x).float()
                readout[idx] = z.cpu().numpy()
            else:
                dec = vd.decompose(self.lm, x, blocks=spec["blocks"], heads=spec["heads"],
                                   convention=spec["convention"], normalize=spec["normalize"])
                if dec.names != spec["components"]:
                    raise VitdecompError("the worker's component list differs from the manifest's; "
                                         "driver and workers must run the same vitdecomp and model")
                contrib[idx] = dec.contributions.float().cpu().numpy()
                readout[idx] = dec.readout.float().cpu().numpy()
            if self.teacher is not None:
                tp = t.column("_tpixels").to_pylist()
                tx = torch.from_numpy(np.stack([np.frombuffer(tp[i], np.float32).reshape(self.tsize) for i in idx]))
                with torch.inference_mode():
                    e = self.teacher.model.encode_image(tx.to(self.device), normalize=True).float()
                teacher[idx] = e.cpu().numpy()
        keep = [c for c in t.column_names if not c.startswith("_")]
        out = {c: t.column(c) for c in keep}
        dtype = spec["dtype"]
        out["readout"] = vectors_to_arrow(readout, dtype, ok)
        if not spec["readout_only"]:
            for k, name in enumerate(spec["components"]):
                out[column_for(name)] = vectors_to_arrow(contrib[:, k], dtype, ok)
        if teacher is not None:
            out["teacher"] = vectors_to_arrow(teacher, dtype, ok)
        out["_error"] = t.column("_error")
        if "_decode_node" in t.column_names:
            out["_decode_node"] = t.column("_decode_node")
        out["_model_node"] = pa.array([self.node] * n, pa.string())
        return pa.table(out)


def write_block(t: pa.Table, store_uri: str, fmt: str, schema_bytes: bytes, s3: dict) -> pa.Table:
    """Write the valid rows of one block (retried from the materialised table), report error rows."""
    import uuid

    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    is_err = pc.is_valid(t.column("_error"))
    good = t.filter(pc.invert(is_err)).drop_columns(["_error"])
    bad = t.filter(is_err)
    rows = {"kind": [], "payload": [], "rows": []}
    if good.num_rows:
        good = good.select(schema.names).cast(schema)
        store = Store(store_uri, S3Settings(**s3))
        if fmt == "lance":
            from lance_ray.fragment import write_fragment

            frags = retry(lambda: write_fragment([good], store.lance_uri("contributions"), schema=schema,
                                                 storage_options=store.storage_options), "write Lance fragment")
            for frag, _ in frags:
                rows["kind"].append("fragment")
                rows["payload"].append(json.dumps({"fragment": frag.to_json()}))
                rows["rows"].append(frag.num_rows)
        else:
            import pyarrow.parquet as pq

            name = f"contributions/{uuid.uuid4().hex}.parquet"
            retry(lambda: pq.write_table(good, store._p(name), filesystem=store.fs), "write Parquet file")
            rows["kind"].append("file")
            rows["payload"].append(json.dumps({"file": name, "rows": good.num_rows}))
            rows["rows"].append(good.num_rows)
    for i, u, e in zip(bad.column("image_id").to_pylist(), bad.column("uri").to_pylist(),
                       bad.column("_error").to_pylist()):
        rows["kind"].append("error")
        rows["payload"].append(json.dumps({"image_id": i, "uri": u, "stage": "decode", "reason": e}))
        rows["rows"].append(1)
    # where the rows were decoded and decomposed (rows=0: counted in the payload, not as written rows)
    if "_model_node" in t.column_names:
        nodes = pa.table({"decode": t.column("_decode_node") if "_decode_node" in t.column_names
                          else pa.nulls(t.num_rows, pa.string()), "model": t.column("_model_node")})
        for g in nodes.group_by(["decode", "model"]).aggregate([([], "count_all")]).to_pylist():
            rows["kind"].append("placement")
            rows["payload"].append(json.dumps({"decode": g["decode"], "model": g["model"], "inputs": g["count_all"]}))
            rows["rows"].append(0)
    return pa.table({"kind": pa.array(rows["kind"], pa.string()), "payload": pa.array(rows["payload"], pa.string()),
                     "rows": pa.array(rows["rows"], pa.int64())})


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
    from . import __version__

    def weights(m, pretrained, checkpoint):
        return {"pretrained": pretrained or None, "checkpoint": os.path.basename(checkpoint) if checkpoint else None,
                "checkpoint_sha256": m.checkpoint_sha256 if checkpoint else None}

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


def run(cfg: DecomposeConfig) -> Summary:
    """Run the decompose job (see the module docstring); returns the summary it prints."""
    import ray

    import vitdecomp as vd
    from .models import check_name
    from .sources import open_source

    cfg.validate()
    t0 = time.time()
    # 1. everything that can fail without touching the data fails first
    check_name(cfg.model, cfg.pretrained)
    if cfg.teacher:
        if not cfg.teacher.startswith("open_clip:"):
            raise InputError(f"--teacher must be an open_clip model (open_clip:<arch>), got {cfg.teacher!r}")
        check_name(cfg.teacher, cfg.teacher_pretrained)
    blocks = parse_blocks(cfg.blocks)
    lm = vd.load_model(cfg.model, pretrained=cfg.pretrained or False, checkpoint=cfg.checkpoint, load_weights=False)
    teacher = (vd.load_model(cfg.teacher, pretrained=cfg.teacher_pretrained or False,
                             checkpoint=cfg.teacher_checkpoint, load_weights=False) if cfg.teacher else None)
    components = vd.components_for(lm, blocks=blocks, heads=cfg.heads)
    s3 = S3Settings.from_env(cfg.s3_endpoint, cfg.s3_region)
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
        raise InputError("--device cuda but the Ray cluster has no GPU")
    spec = {"model": cfg.model, "pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint, "teacher": cfg.teacher,
            "teacher_pretrained": cfg.teacher_pretrained, "teacher_checkpoint": cfg.teacher_checkpoint,
            "device": "cuda" if use_gpu else "cpu", "blocks": blocks, "heads": cfg.heads,
            "convention": cfg.convention, "normalize": cfg.normalize, "dtype": cfg.dtype,
            "components": [c.name for c in components], "readout_only": cfg.readout_only,
            "schema": schema.serialize().to_pybytes()}
    s3d = {"endpoint": s3.endpoint, "region": s3.region}
    for flag, res in (("--worker-resources", cfg.worker_resources), ("--decode-resources", cfg.decode_resources)):
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
    print(summary, flush=True)
    return summary


# ------------------------------------------------------------------------------------- CLI
HELP = {
    "input": "images: a folder (recursive), a Parquet file/dir or Lance dataset with a URI or bytes column, "
             "or WebDataset .tar shards; local path or s3://bucket/prefix",
    "output": "store location (local directory or s3://bucket/prefix); rerunning into it resumes",
    "model": "timm:<name>[.<tag>] or open_clip:<architecture>",
    "pretrained": "weights tag (timm: e.g. fb_in1k; open_clip: e.g. laion2b_s34b_b88k); default: random init",
    "checkpoint": "local weights file (.safetensors/.pt) readable on every worker; its SHA-256 goes in the manifest",
    "format": "store format: lance (default) or parquet",
    "source": "input kind: auto (default; detected), folder, table, webdataset",
    "blocks": "blocks to decompose: '7-11', '7,8,9', '-4:' (last four); earlier blocks fold into embed. Default: all",
    "heads": "split attention into heads (default) or keep one component per attention layer (--no-heads)",
    "convention": "centered (default) or uniform (SPEC §2.2)",
    "normalize": "divide contributions by the readout's norm (CLIP retrieval space)",
    "dtype": "storage precision of vector columns: fp16 (default) or fp32; computation is fp32",
    "batch_size": "images per batch for decoding and per model call (default 32)",
    "concurrency": "model actors in the pool (default 1; one GPU each when the cluster has GPUs)",
    "teacher": "open_clip model whose normalised image embedding is stored as 'teacher' (needed by CompAlign)",
    "teacher_pretrained": "weights tag of the teacher", "teacher_checkpoint": "local weights file of the teacher",
    "label_from_folder": "folder input: add a 'label' column with each image's parent folder name",
    "id_column": "table input: column holding a stable image id (default: image_id, else the URI, else SHA-1 of bytes)",
    "uri_column": "table input: column with image URIs (default: uri/path/url/image_path)",
    "bytes_column": "table input: column with encoded image bytes (default: image/bytes/image_bytes/jpg/png)",
    "columns": "table/webdataset input: pass-through columns to keep (default: all)",
    "commit_every": "commit a chunk every this many images (default 512); a crash redoes at most the open chunk",
    "limit": "decompose at most this many (new) images",
    "device": "auto (GPU actors when the cluster has GPUs), cpu or cuda",
    "s3_endpoint": "S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL); "
                   "credentials come from the standard AWS environment/config, never from flags",
    "s3_region": "S3 region (default: $AWS_REGION)",
    "ray_address": "Ray cluster address (default: the cluster of `ray job submit`, else a local instance)",
    "num_cpus": "CPUs of the local Ray instance (default: all)",
    "worker_resources": "custom Ray resources each model actor needs, as JSON, e.g. '{\"gpu_pool\": 1}' "
                        "(pins the actor pool to the nodes that offer them)",
    "decode_resources": "custom Ray resources each decode task needs, as JSON, e.g. '{\"decode\": 1}' "
                        "(keeps decoding on CPU nodes)",
    "readout_only": "store only the readout (the plain-embedding baseline of `benchmark job`)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_job_parser(sub, "decompose", DecomposeConfig, HELP, run,
                   help="decompose an image corpus into a Lance/Parquet store",
                   description="Stream images through a model on a Ray Data actor pool and store every image's "
                               "exact per-component contributions. Flags override values from --config.")


# ------------------------------------------------------------------ config file + flags (shared)
def add_job_parser(sub: argparse._SubParsersAction, name: str, cls, helps: dict, run_fn, **kw) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``cls`` (flags override ``--config``) and which calls
    ``run_fn(cls(...))``."""
    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
    add_config_arguments(p, cls, helps)
    p.set_defaults(func=lambda ns: run_fn(config_from_args(ns, cls)) and None)
    return p


def add_config_arguments(p: argparse.ArgumentParser, cls, helps: dict) -> None:
    p.add_argument("--config", help="YAML or JSON file with option values (keys as the flags, - or _)")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        h = helps.get(f.name, "")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif "list" in str(f.type):
            p.add_argument(flag, dest=f.name, nargs="+", default=None, help=h)
        elif f.type in ("int", "Optional[int]"):
            p.add_argument(flag, dest=f.name, type=int, default=None, help=h)
        else:
            p.add_argument(flag, dest=f.name, default=None, help=h)


def config_from_args(args: argparse.Namespace, cls):
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config, cls))
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def load_config_file(path: str, cls) -> dict:
    import yaml

    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as e:
        raise InputError(f"--config {path!r}: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"--config {path!r} must hold a mapping of option: value")
    known = {f.name for f in fields(cls)}
    out = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise InputError(f"--config {path!r}: unknown option {k!r}" + (f"; did you mean {close}?" if close else ""))
        out[key] = v
    return out
