"""The query job (``vitdecomp query <subcommand> --help``). Today: ``compattribute`` — every
component against every property in one distributed pass → a Parquet table and a heatmap PNG."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional

from .decompose_job import add_config_arguments, config_from_args
from .errors import InputError


@dataclass
class CompAttributeJob:
    store: str = ""
    out: str = ""
    properties: Optional[str] = None
    components: Optional[list] = None
    aligner: Optional[str] = None
    clip: Optional[str] = None
    clip_pretrained: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    cache_dir: Optional[str] = None
    distributed: bool = True
    s3_endpoint: Optional[str] = None


def run_compattribute(job: CompAttributeJob) -> dict:
    import pyarrow.parquet as pq

    from .compalign import Aligner
    from .compattribute import compattribute, heatmap, read_properties
    from .fit_job import resolve_text_model
    from .storage import open_store

    if not job.store or not job.out:
        raise InputError("--store and --out are required")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    aligner = Aligner.load(job.aligner) if job.aligner else None
    clip = resolve_text_model(st, aligner, job.clip, job.clip_pretrained, job.clip_checkpoint, what="CompAttribute")
    props = read_properties(job.properties)
    if job.components:
        from .names import select

        select(aligner.names if aligner else st.names, job.components)        # unknown names: close matches
    table, sc, names = compattribute(st, clip, props, components=job.components, aligner=aligner,
                                     distributed=bool(job.distributed),
                                     cache_dir=job.cache_dir or os.path.expanduser("~/.cache/vitdecomp/text"))
    os.makedirs(job.out, exist_ok=True)
    pq.write_table(table, os.path.join(job.out, "compattribute.parquet"))
    png = heatmap(sc, names, list(props), os.path.join(job.out, "compattribute.png"),
                  f"CompAttribute — {st.manifest['model']['name']}")
    top = {p: names[int(sc[:, j].argmax())] for j, p in enumerate(props)}
    with open(os.path.join(job.out, "compattribute.json"), "w") as f:
        json.dump({"store": st.uri, "properties": props, "top_component": top, "aligner": job.aligner}, f, indent=2)
    print("compattribute: top component per property: " + ", ".join(f"{p}: {c}" for p, c in top.items()))
    print(f"compattribute: {len(names)} components x {len(props)} properties -> {job.out}/compattribute.parquet, {png}")
    return {"table": table, "scores": sc, "names": names, "properties": list(props)}


HELP = {
    "store": "the store written by `vitdecomp decompose`",
    "out": "output directory (compattribute.parquet, compattribute.png, compattribute.json)",
    "properties": "YAML/JSON mapping name: [descriptions…] added to the defaults (color, texture, animal, person, "
                  "location, pattern, shape); the order of descriptions is the QR order",
    "components": "components to score (default: all, or the aligner's)",
    "aligner": "CompAlign artefact for a non-CLIP store",
    "clip": "open_clip text model (default: the store's CLIP or the aligner's teacher)",
    "clip_pretrained": "its weights tag", "clip_checkpoint": "its local weights file",
    "cache_dir": "text-embedding cache", "distributed": "sums via Ray Data (default) or in this process",
    "s3_endpoint": "S3-compatible endpoint for s3:// stores",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="query a store: CompAttribute (more to come)",
                       description="Corpus-wide queries over a store. Implemented: compattribute.")
    qsub = p.add_subparsers(dest="query", required=True)
    c = qsub.add_parser("compattribute", help="score every component against text-described properties",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(c, CompAttributeJob, HELP)
    c.set_defaults(func=lambda ns: run_compattribute(config_from_args(ns, CompAttributeJob)) and None)
