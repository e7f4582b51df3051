"""``vitdecomp decompose``: an image corpus → a contribution store."""
from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone

from ..config import DecomposeConfig
from .options import add_job_parser

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
    "convention": "how input-independent offsets are shared: centered (default; exact, granularity-independent) or uniform (the TextSpan paper's convention)",
    "normalize": "divide contributions by the readout's norm (CLIP retrieval space)",
    "dtype": "storage precision of vector columns: fp16 (default) or fp32; computation is fp32",
    "layout": "store layout of a new store: compact (default; attention heads as exact coordinates in a per-head "
              "basis, 4-6x smaller for ViT-B) or full (one vector per component); an existing store keeps its layout",
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
    "seed": "random-init models (no weights given) are built from this seed; recorded in the manifest",
    "max_pixels": "refuse images whose header declares more pixels than this, before decoding them (they go to "
                  "the errors table); default: Pillow's limit of 89,478,485 pixels",
    "alpha_background": "colour transparent pixels are composited on: a colour name or '#rrggbb' (default white)",
    "dedupe_ids": "table input: keep the first row of each duplicate id and drop rows without an id (counted as "
                  "skipped by rule) instead of refusing the table",
    "isolate_decoding": "decode each block in a child process so that an input that crashes the decoder becomes an "
                        "error row instead of stopping the job; --no-isolate-decoding decodes in the task itself "
                        "(slightly faster)",
}



SHOW_ERRORS = 10      # failed inputs listed at the end of a run


def run(cfg: DecomposeConfig) -> int:
    from ..pipeline import run_decompose

    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    summary = run_decompose(cfg)
    print(summary, flush=True)
    if summary.errors:
        print(failed_inputs(cfg, started, summary.errors), flush=True)
    return 0


def failed_inputs(cfg: DecomposeConfig, since: datetime, count: int, show: int = SHOW_ERRORS) -> str:
    """The first ``show`` inputs this run could not decompose, with their reasons, and the call that
    reads them all."""
    import pyarrow.compute as pc

    from ..store import open_store

    st = open_store(cfg.output, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
    errors = st.errors()
    errors = errors.filter(pc.greater_equal(errors["time"], since)).sort_by("time")
    lines = [f"decompose: {count} input{'s' if count != 1 else ''} failed"
             + (f"; the first {min(show, errors.num_rows)}:" if errors.num_rows > show else ":")]
    for row in errors.slice(0, show).to_pylist():
        lines.append(f"  {row['uri'] or row['image_id']}: {row['reason']} ({row['stage']})")
    endpoint = f", s3_endpoint={cfg.s3_endpoint!r}" if cfg.s3_endpoint else ""
    lines.append(f"all of them (every run): python -c \"import vitdecomp as vd; "
                 f"print(vd.open_store({cfg.output!r}{endpoint}).errors().to_pandas().to_string())\"")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_job_parser(sub, "decompose", DecomposeConfig, HELP, run,
                   help="decompose an image corpus into a Lance/Parquet store",
                   description="Stream images through a model on a Ray Data actor pool and store every image's "
                               "exact per-component contributions. Flags override values from --config.")
