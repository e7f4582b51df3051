"""The fit jobs over a store: CompAlign, TextSpan and a linear probe. Each takes its frozen config
(:mod:`vitdecomp.config`), writes its artefacts to ``cfg.out`` and returns what it computed."""
from __future__ import annotations

import logging
import time

import numpy as np

from ..config import CompAlignConfig, OptionError, ProbeConfig, TextSpanConfig

log = logging.getLogger(__name__)


def run_compalign(cfg: CompAlignConfig) -> dict:
    """CompAlign from the store's teacher column; saves ``cfg.out`` + ``.safetensors``/``.json``
    (local or ``s3://``). Returns the metrics, the aligner and where it was saved."""
    from ..io import open_output, split
    from ..store import open_store
    from .compalign import fit_store

    cfg.check_required()
    st = open_store(cfg.store, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
    open_output(split(cfg.out)[0], cfg.s3()).makedirs()        # a bad output location fails before training
    aligner, metrics = fit_store(st, cfg)
    path = aligner.save(cfg.out, cfg.s3())
    log.info("compalign: %d components -> %d-d teacher space; best validation cosine %.4f after %d epochs",
             len(aligner.names), aligner.maps.shape[1], metrics["best_val_cosine"], metrics["epochs"])
    return {**metrics, "aligner": aligner, "path": path}


def default_components(store, last_layers: int) -> list[str]:
    """Every head of the last ``last_layers`` decomposed blocks."""
    heads = [c for c in store.components if c.kind == "head"]
    if not heads:
        raise OptionError("components", f"{store.uri} has no per-head components (it was decomposed without heads); "
                                        "name the components to explain")
    blocks = sorted({c.block for c in heads})[-last_layers:]
    return [c.name for c in heads if c.block in blocks]


def run_textspan(cfg: TextSpanConfig) -> dict:
    """TextSpan for the chosen components (default: the heads of the last ``last_layers`` blocks);
    writes ``textspan.parquet``, ``textspan.txt`` and ``textspan.json`` into ``cfg.out`` (local or
    ``s3://``)."""
    from ..io import open_output
    from ..store import open_store
    from .compalign import Aligner
    from .text import encode_texts, read_pool, resolve_text_model
    from .textspan import moments_from_store, reconstruction_accuracy, report, textspan

    cfg.check_required()
    st = open_store(cfg.store, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
    m = st.manifest
    aligner = Aligner.load(cfg.aligner, cfg.s3()) if cfg.aligner else None
    clip = resolve_text_model(st, aligner, cfg, what="TextSpan")
    names = list(cfg.components) if cfg.components else default_components(st, cfg.last_layers)
    pool = read_pool(cfg.pool, cfg.s3())
    out = open_output(cfg.out, cfg.s3())
    out.makedirs()                                  # a bad output location fails before any work
    t0 = time.time()
    texts = encode_texts(clip, pool, cache_dir=cfg.text_cache)
    log.info("encoded %d descriptions in %.0f s", len(pool), time.time() - t0)
    mo = moments_from_store(st, names, distributed=cfg.distributed)
    if aligner is not None:
        sel = [aligner.names.index(n) for n in names]
        mo = mo.affine(aligner.maps.numpy()[sel].astype(np.float64),
                       aligner.bias.numpy().astype(np.float64) / len(aligner.names))
    table, spans = textspan(mo, names, texts, pool, m=cfg.texts_per_head, rank=cfg.rank)
    evaluation = None
    if cfg.label_column:
        evaluation = reconstruction_accuracy(st, clip, spans, cfg.label_column, cfg.class_names, aligner,
                                             cache_dir=cfg.text_cache)
    out.write_parquet("textspan.parquet", table)
    text = report(table, f"TextSpan — {m['model']['name']} ({st.uri}), {mo.n} images, {len(pool)} descriptions")
    out.write_text("textspan.txt", text)
    out.write_json("textspan.json", {"store": st.uri, "model": m["model"]["name"], "components": names,
                                     "pool": cfg.pool or "default", "pool_size": len(pool),
                                     "texts_per_head": cfg.texts_per_head, "rank": cfg.rank, "aligner": cfg.aligner,
                                     "images": mo.n, "evaluation": evaluation})
    report_path = _textspan_section(out, table, st, mo.n, len(pool), cfg, evaluation)
    return {"table": table, "images": mo.n, "evaluation": evaluation, "spans": spans, "text": text,
            "components": names, "out": out.uri(), "report": report_path}


def _textspan_section(out, table, st, images: int, pool_size: int, cfg: TextSpanConfig, evaluation) -> str:
    """One row per component (its texts with the variance each explains) as ``textspan_by_component.parquet``
    and a report section; returns the report's path. The per-text table stays in ``textspan.parquet``."""
    import pyarrow as pa

    from ..query.report import write_report, write_section

    by: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        by.setdefault(r["component"], []).append(r)
    rows = [{"component": c, "texts": " · ".join(f"{r['text']} (+{r['variance_explained']:.3f})" for r in rs),
             "variance_explained": rs[-1]["cumulative"] if rs else 0.0} for c, rs in by.items()]
    out.write_parquet("textspan_by_component.parquet", pa.Table.from_pylist(rows))
    facts = {"images": images, "descriptions in the pool": pool_size, "texts per component": cfg.texts_per_head,
             "rank r": cfg.rank, "aligner": cfg.aligner or "none (the store is in a CLIP space)"}
    if evaluation:
        facts.update({"zero-shot accuracy, full model": evaluation["accuracy_full"],
                      "… components replaced by their TextSpan reconstruction": evaluation["accuracy_reconstructed"]})
    write_section(out, "textspan", "TextSpan: the texts that span each component", order=5,
                  summary=f"For each component, the descriptions picked greedily from the pool; each explains the "
                          f"share of the component's variance over the store's {images} images shown after it "
                          f"(+…), and the column variance_explained is their total.",
                  facts=facts,
                  tables=[{"path": "textspan_by_component.parquet", "caption": "one row per component",
                           "max_rows": len(rows)},
                          {"path": "textspan.parquet", "caption": "one row per picked text", "max_rows": 20}])
    return write_report(out)


def run_probe(cfg: ProbeConfig) -> dict:
    """A linear probe on the stored readouts (rows of ``fit_split`` when a split column is given),
    saved as ``cfg.out`` + ``.safetensors``/``.json`` (local or ``s3://``)."""
    from ..store import open_store
    from ..store.splits import select_ids
    from .probe import fit_probe

    cfg.check_required()
    st = open_store(cfg.store, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
    ids = select_ids(st, cfg.split_column, cfg.fit_split) if cfg.split_column else None
    head, info = fit_probe(st, cfg.label_column, ids=ids, class_names=cfg.class_names, l2=cfg.l2,
                           max_rows=cfg.max_rows)
    path = head.save(cfg.out, cfg.s3())
    return {"head": head, "path": path, **info}

