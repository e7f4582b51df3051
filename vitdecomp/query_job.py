"""The query job (``vitdecomp query <subcommand> --help``): ``compattribute`` (every component against
every property in one distributed pass), ``retrieve`` (by text or by probe images), ``ablate``,
``mitigate``, ``heatmap`` and ``report``. Each writes Parquet tables, PNG plots and a report section
into ``--out`` and rebuilds ``--out/report.html``."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional

from .decompose_job import add_job_parser
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
    from .report import write_report, write_section

    write_section(job.out, "compattribute", "CompAttribute: components × properties", order=10,
                  summary=f"Mean Pearson correlation, over the {st.count()} images of the store, between each "
                          "component's projection and the (aligned) total's projection on each property's "
                          "orthonormalised description embeddings (SPEC §6).",
                  facts={"store": st.uri, "model": st.manifest["model"]["name"], "aligner": job.aligner or "none",
                         "components": len(names), "properties": len(props),
                         **{f"top component: {p}": f"{c} ({sc[names.index(c), j]:+.3f})"
                            for j, (p, c) in enumerate(top.items())}},
                  images=[(png, "CompAttribute score of every component (rows) for every property (columns)")],
                  tables=[{"path": "compattribute.parquet", "caption": "component, property, score", "max_rows": 40}])
    report = write_report(job.out)
    print("compattribute: top component per property: " + ", ".join(f"{p}: {c}" for p, c in top.items()))
    print(f"compattribute: {len(names)} components x {len(props)} properties -> {job.out}/compattribute.parquet, "
          f"{png}, {report}")
    return {"table": table, "scores": sc, "names": names, "properties": list(props), "report": report}


@dataclass
class RetrieveJob:
    store: str = ""
    out: str = ""
    property: str = ""
    text: str = ""
    image_ids: Optional[list] = None
    top_components: int = 5
    top_images: int = 16
    properties: Optional[str] = None
    index: str = "auto"
    index_threshold: int = 100_000
    nprobes: Optional[int] = None
    aligner: Optional[str] = None
    clip: Optional[str] = None
    clip_pretrained: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    cache_dir: Optional[str] = None
    s3_endpoint: Optional[str] = None


def run_retrieve(job: RetrieveJob) -> dict:
    """Retrieval by property (SPEC §7). With ``--text``: the property's top components by
    CompAttribute, images ranked by ⟨Σ_{k∈top} f_k(c_k), t⟩. With ``--image-ids``: components ranked
    by how specifically they carry the property (``v_i − max(0, max_{j≠i} v_j)`` over every known
    property), images ranked by cosine similarity of their summed top components to the probes'
    (a Lance vector index for large stores). A table, a contact sheet and a report section."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .compalign import Aligner
    from .compattribute import compattribute, read_properties
    from .fit_job import resolve_text_model
    from .storage import open_store
    from .text import encode_texts

    if not (job.store and job.out and job.property):
        raise InputError("--store, --out and --property are required")
    if bool(job.text) == bool(job.image_ids):
        raise InputError("give exactly one probe: --text \"a description\" (text-based) or --image-ids ID [ID …] "
                         "(image-based)")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    aligner = Aligner.load(job.aligner) if job.aligner else None
    clip = resolve_text_model(st, aligner, job.clip, job.clip_pretrained, job.clip_checkpoint, what="retrieval")
    props = read_properties(job.properties)
    if job.property not in props:
        import difflib

        raise InputError(f"unknown property {job.property!r}; known: {sorted(props)} "
                         f"(close: {difflib.get_close_matches(job.property, list(props))})")
    cache = job.cache_dir or os.path.expanduser("~/.cache/vitdecomp/text")
    os.makedirs(job.out, exist_ok=True)
    n_top = int(job.top_components)
    distributed = aligner is None and st.count() >= 20_000      # Ray's start-up outweighs small stores
    if job.text:
        _, sc, names = compattribute(st, clip, {job.property: props[job.property]}, aligner=aligner,
                                     distributed=distributed, cache_dir=cache)
        rank = sc[:, 0]
        top = [names[i] for i in np.argsort(-rank, kind="stable")[:n_top]]
        t = encode_texts(clip, [job.text], cache_dir=cache)[0]
        ids, uris, scores = [], [], []
        for b in st.iter_batches(components=top, aligner=aligner, columns=["uri"]):
            ids += b.ids
            uris += b.columns["uri"].to_pylist()
            scores.append(b.contributions.sum(1) @ t)
        scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-scores, kind="stable")[:int(job.top_images)]
        hits = [(ids[i], uris[i], float(scores[i])) for i in order]
        info, probe, scored = {"search": "exact"}, f"text {job.text!r}", len(ids)
    else:
        from .retrieval import default_index_path, retrieve_by_images, specific_rank

        _, sc, names = compattribute(st, clip, props, aligner=aligner, distributed=distributed, cache_dir=cache)
        rank = specific_rank(sc, list(props).index(job.property))
        top = [names[i] for i in np.argsort(-rank, kind="stable")[:n_top]]
        hits, info = retrieve_by_images(st, top, list(job.image_ids), int(job.top_images), aligner, index=job.index,
                                        index_threshold=int(job.index_threshold),
                                        index_path=default_index_path(job.out),
                                        nprobes=int(job.nprobes) if job.nprobes else None)
        scores, ids = np.array([h[2] for h in hits]), [h[0] for h in hits]
        probe, scored = f"images {list(job.image_ids)}", st.count()
    table = pa.table({"rank": list(range(len(hits))), "image_id": [h[0] for h in hits],
                      "uri": [h[1] for h in hits], "score": [h[2] for h in hits]})
    pq.write_table(table, os.path.join(job.out, "retrieval.parquet"))
    comp_table = pa.table({"component": top, "rank_score": [float(rank[names.index(n)]) for n in top]})
    pq.write_table(comp_table, os.path.join(job.out, "retrieval_components.parquet"))
    sheet = contact_sheet(table.column("uri").to_pylist(), os.path.join(job.out, "retrieval.png"))
    from .report import write_report, write_section

    how = ("the probe text's projection of the sum of the {n} components CompAttribute ranks highest for the "
           "property {p!r} (SPEC §7, text-based retrieval by property)" if job.text else
           "cosine similarity, to the probe images, of the normalised sum of the {n} components that carry the "
           "property {p!r} most specifically (CompAttribute for it minus the largest for any other property; "
           "SPEC §7, image-based retrieval)").format(n=len(top), p=job.property)
    write_section(job.out, "retrieve", f"Retrieval: {probe} through the {job.property!r} components", order=20,
                  summary=f"Every image of the store ranked by {how}.",
                  facts={"store": st.uri, "property": job.property, "probe": probe,
                         "components used": top, "images scored": scored, "search": info["search"],
                         "aligner": job.aligner or "none"},
                  images=[(sheet, f"top {len(hits)} images, best first (row-major)")] if sheet else [],
                  tables=[{"path": "retrieval.parquet", "caption": "rank, image_id, uri, score", "max_rows": 40},
                          {"path": "retrieval_components.parquet", "caption": "the components used"}])
    report = write_report(job.out)
    print(f"retrieve: property {job.property!r} via {top}; top {len(hits)} images for {probe} ({info['search']}) -> "
          f"{job.out}/retrieval.parquet" + (f", {sheet}" if sheet else "") + f", {report}")
    return {"table": table, "components": top, "scores": scores, "ids": ids, "report": report, **info}


def contact_sheet(uris, path: str, size: int = 96, cols: int = 8) -> Optional[str]:
    """A grid of the images at ``uris`` (read through the same filesystems as the job); None if none load."""
    import io

    from PIL import Image

    from .storage import resolve

    tiles = []
    for u in uris:
        try:
            fs, p = resolve(u.split("#", 1)[0])
            with fs.open_input_file(p) as f:
                tiles.append(Image.open(io.BytesIO(f.read())).convert("RGB").resize((size, size)))
        except Exception:  # noqa: BLE001 -- a missing source image leaves a blank tile
            tiles.append(Image.new("RGB", (size, size), (128, 128, 128)))
    if not tiles:
        return None
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * size, (i // cols) * size))
    sheet.save(path)
    return path


@dataclass
class ReportJob:
    out: str = ""
    title: Optional[str] = None


def run_report(job: ReportJob) -> dict:
    """Gather the ``*.section.json`` sidecars in ``--out`` into one static ``report.html``."""
    from .report import write_report

    if not job.out:
        raise InputError("--out is required (a directory written by query subcommands)")
    path = write_report(job.out, title=job.title)
    print(f"report: {path}")
    return {"report": path}


HELP = {
    "store": "the store written by `vitdecomp decompose`",
    "out": "output directory: the query's tables (Parquet), plots (PNG), <name>.section.json and report.html",
    "title": "report: the page title (default: from the directory name)",
    "properties": "YAML/JSON mapping name: [descriptions…] added to the defaults (color, texture, animal, person, "
                  "location, pattern, shape); the order of descriptions is the QR order",
    "components": "components to score (default: all, or the aligner's)",
    "aligner": "CompAlign artefact for a non-CLIP store",
    "clip": "open_clip text model (default: the store's CLIP or the aligner's teacher)",
    "clip_pretrained": "its weights tag", "clip_checkpoint": "its local weights file",
    "cache_dir": "text-embedding cache", "distributed": "sums via Ray Data (default) or in this process",
    "s3_endpoint": "S3-compatible endpoint for s3:// stores",
    "property": "retrieve: the property whose top components are used", "text": "retrieve: the probe text",
    "top_components": "retrieve: how many top components of the property (default 5)",
    "top_images": "retrieve: how many images to return (default 16)",
    "image_ids": "retrieve: probe image ids (image-based retrieval; instead of --text)",
    "index": "retrieve --image-ids: auto (a Lance vector index from --index-threshold rows), exact or lance",
    "index_threshold": "retrieve: rows from which auto builds the Lance IVF index (default 100000)",
    "nprobes": "retrieve: IVF partitions searched (default: Lance's)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="query a store: CompAttribute, retrieval, ablation, mitigation, heatmaps, report",
                       description="Corpus-wide queries over a store; each writes Parquet tables, PNG plots and a "
                                   "section of --out/report.html.")
    qsub = p.add_subparsers(dest="query", required=True)
    add_job_parser(qsub, "compattribute", CompAttributeJob, HELP, run_compattribute,
                   help="score every component against text-described properties")
    add_job_parser(qsub, "retrieve", RetrieveJob, HELP, run_retrieve,
                   help="retrieval by property: probe text or probe images (top components)")
    from .ablation_job import add_query_parsers
    from .heatmaps import add_parser as add_heatmap_parser

    add_query_parsers(qsub)
    add_heatmap_parser(qsub)
    add_job_parser(qsub, "report", ReportJob, HELP, run_report,
                   help="one static HTML page of every query section in --out (tables, plots, links)")
