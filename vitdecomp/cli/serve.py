"""``vitdecomp serve``: the explorer, a local web app over a store (:mod:`vitdecomp.serve`)."""
from __future__ import annotations

import argparse

from ..config import ServeConfig
from .options import add_job_parser

HELP = {
    "store": "the store written by `vitdecomp decompose` (opened read-only)",
    "fit": "directory of `vitdecomp fit textspan` (textspan.parquet: the heads' texts)",
    "query": "directory of the query subcommands (compattribute, mitigate, ablate, interpretability outputs)",
    "aligner": "CompAlign artefact mapping a non-CLIP store into its teacher's CLIP space (text queries)",
    "checkpoint": "the local weights file the store was made with (uploads and segmentation rebuild the model)",
    "properties": "YAML/JSON name: [descriptions…] added to the default properties",
    "host": "address to listen on (default 127.0.0.1: this machine only)",
    "port": "port (default 8000; 0: any free port)",
    "index_threshold": "rows from which nearest neighbours use a Lance vector index (default 100000)",
    "nprobes": "IVF partitions searched (default: Lance's)",
    "top_images": "images per result (default 16)", "top_components": "components per property (default 5)",
    "max_upload_bytes": "largest accepted upload (default 8 MiB)",
    "index_cache": "where vector indexes and on-demand scores are cached (default: <store>.explorer-cache next "
                   "to a local store, else ~/.cache/vitdecomp/explorer)",
    "device": "cpu (default), cuda or auto for on-the-fly decomposition",
    "clip": "open_clip text model (default: the store's CLIP or the aligner's teacher)",
    "clip_pretrained": "its weights tag", "clip_checkpoint": "its local weights file",
    "cache_dir": "text-embedding cache", "s3_endpoint": "S3-compatible endpoint for s3:// stores",
}


def serve(cfg: ServeConfig) -> int:
    from ..serve import serve as run

    def ready(url: str) -> None:
        print(f"serve: {cfg.store} at {url}/ (Ctrl-C stops)", flush=True)

    run(cfg, ready=ready)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_job_parser(sub, "serve", ServeConfig, HELP, serve,
                   help="the explorer: a local web app over a store (components, neighbours, segmentation, …)",
                   description="Start a local web app over a store: the CompAttribute heatmap with each "
                               "component's images, TextSpan texts and ablation effect; property-based and "
                               "per-head nearest neighbours (store images, uploads, texts); topic and contrastive "
                               "segmentation; group-robustness plots; interpretability scores. Read-only; binds "
                               "127.0.0.1 unless --host says otherwise.")
