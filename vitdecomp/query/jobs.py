"""The query jobs over a store: ``compattribute`` (every component against every property in one
pass), ``retrieve`` (by probe text or probe images), ``ablate``, ``mitigate`` and ``report``
(``heatmap`` is in :mod:`vitdecomp.query.heatmap_job`). Each takes its frozen config
(:mod:`vitdecomp.config`), writes Parquet tables, PNG plots and a report section into ``cfg.out``,
rebuilds ``cfg.out/report.html`` and returns what it computed."""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Optional

import numpy as np

from ..config import (AblateConfig, CompAttributeConfig, HeadOptions, MitigateConfig, OptionError, ReportConfig,
                      RetrieveConfig)
from ..io import OutputDir, open_output

log = logging.getLogger(__name__)


def _open(cfg):
    """The store and the aligner of a query config (the aligner checked against the store)."""
    from ..fit.compalign import Aligner, check_compatible
    from ..store import open_store

    cfg.check_required()
    st = open_store(cfg.store, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
    aligner = Aligner.load(cfg.aligner, cfg.s3()) if cfg.aligner else None
    if aligner is not None:
        check_compatible(aligner, st)
    return st, aligner


def _output(cfg) -> OutputDir:
    """The job's output directory (local or ``s3://``, through the job's S3 settings), created."""
    out = open_output(cfg.out, cfg.s3())
    out.makedirs()
    return out


# ----------------------------------------------------------------------------- compattribute
_SCORE_WHAT = {"correlation": "mean Pearson correlation",
               "specific": "mean Pearson correlation minus the largest other property's (if positive)",
               "variance-share": "mean share of the total's variance (covariance / variance of the total)"}


def run_compattribute(cfg: CompAttributeConfig) -> dict:
    """CompAttribute of every component (or ``cfg.components``) for every property."""
    from ..engine.names import select
    from ..fit.text import resolve_text_model
    from .compattribute import compattribute, heatmap, read_properties
    from .report import write_report, write_section

    st, aligner = _open(cfg)
    clip = resolve_text_model(st, aligner, cfg, what="CompAttribute")
    props = read_properties(cfg.properties, cfg.s3())
    if cfg.components:
        select(aligner.names if aligner else st.names, cfg.components)        # unknown names: close matches
    table, sc, names = compattribute(st, clip, props, components=cfg.components, aligner=aligner,
                                     distributed=cfg.distributed, cache_dir=cfg.text_cache, score=cfg.score)
    out = _output(cfg)
    out.write_parquet("compattribute.parquet", table)
    what = _SCORE_WHAT[cfg.score]
    png = out.savefig("compattribute.png", heatmap(sc, names, list(props),
                                                   f"CompAttribute ({cfg.score}) — {st.manifest['model']['name']}",
                                                   label=what), dpi=120)
    top = {p: names[int(sc[:, j].argmax())] for j, p in enumerate(props)}
    out.write_json("compattribute.json", {"store": st.uri, "properties": props, "top_component": top,
                                          "aligner": cfg.aligner, "score": cfg.score})
    write_section(out, "compattribute", "CompAttribute: components × properties", order=10,
                  summary=f"{what[0].upper() + what[1:]} (score {cfg.score!r}), over the {st.count()} images of the "
                          "store, of each component's projection with the (aligned) total's projection on each "
                          "property's orthonormalised description embeddings (docs/method.md, “CompAttribute”).",
                  facts={"store": st.uri, "model": st.manifest["model"]["name"], "aligner": cfg.aligner or "none",
                         "score": cfg.score, "components": len(names), "properties": len(props),
                         **{f"top component: {p}": f"{c} ({sc[names.index(c), j]:+.3f})"
                            for j, (p, c) in enumerate(top.items())}},
                  images=[("compattribute.png",
                           "CompAttribute score of every component (rows) for every property (columns)")],
                  tables=[{"path": "compattribute.parquet", "caption": "component, property, score", "max_rows": 40}])
    report = write_report(out)
    return {"table": table, "scores": sc, "names": names, "properties": list(props), "top": top, "png": png,
            "report": report}


# ---------------------------------------------------------------------------------- retrieve
def run_retrieve(cfg: RetrieveConfig) -> dict:
    """Retrieval by property (README “Query”). With ``text``: the property's top components by
    CompAttribute, images ranked by ⟨Σ_{k∈top} f_k(c_k), t⟩. With ``image_ids``: components ranked
    by how specifically they carry the property (``v_i − max(0, max_{j≠i} v_j)`` over every known
    property), images ranked by cosine similarity of their summed top components to the probes'
    (a Lance vector index for large stores). A table, a contact sheet and a report section."""
    import pyarrow as pa

    from ..fit.text import resolve_text_model
    from .compattribute import compattribute, read_properties
    from .report import write_report, write_section
    from .retrieval import INDEX_NAME, contact_sheet, retrieve_by_images, retrieve_by_text, specific_rank

    if bool(cfg.text) == bool(cfg.image_ids):
        raise OptionError("text", "give exactly one probe: a text (text-based retrieval) or image ids "
                                  "(image-based retrieval)")
    st, aligner = _open(cfg)
    clip = resolve_text_model(st, aligner, cfg, what="retrieval")
    props = read_properties(cfg.properties, cfg.s3())
    if cfg.property not in props:
        import difflib

        raise OptionError("property", f"unknown property {cfg.property!r}; known: {sorted(props)} "
                                      f"(close: {difflib.get_close_matches(cfg.property, list(props))})")
    out = _output(cfg)
    n_top = cfg.top_components
    distributed = aligner is None and st.count() >= 20_000      # Ray's start-up outweighs small stores
    if cfg.text:
        _, sc, names = compattribute(st, clip, {cfg.property: props[cfg.property]}, aligner=aligner,
                                     distributed=distributed, cache_dir=cfg.text_cache)
        rank = sc[:, 0]
        top = [names[i] for i in np.argsort(-rank, kind="stable")[:n_top]]
        hits, info = retrieve_by_text(st, top, cfg.text, clip, cfg.top_images, aligner, cache_dir=cfg.text_cache)
        probe, scored = f"text {cfg.text!r}", info["scored"]
    else:
        _, sc, names = compattribute(st, clip, props, aligner=aligner, distributed=distributed,
                                     cache_dir=cfg.text_cache)
        rank = specific_rank(sc, list(props).index(cfg.property))
        top = [names[i] for i in np.argsort(-rank, kind="stable")[:n_top]]
        hits, info = retrieve_by_images(st, top, list(cfg.image_ids), cfg.top_images, aligner, index=cfg.index,
                                        index_threshold=cfg.index_threshold,
                                        index_path=out.lance_uri(INDEX_NAME), nprobes=cfg.nprobes,
                                        storage_options=out.storage_options)
        probe, scored = f"images {list(cfg.image_ids)}", st.count()
    scores, ids = np.array([h[2] for h in hits]), [h[0] for h in hits]
    table = pa.table({"rank": list(range(len(hits))), "image_id": [h[0] for h in hits],
                      "uri": [h[1] for h in hits], "score": [h[2] for h in hits]})
    out.write_parquet("retrieval.parquet", table)
    comp_table = pa.table({"component": top, "rank_score": [float(rank[names.index(n)]) for n in top]})
    out.write_parquet("retrieval_components.parquet", comp_table)
    sheet, unreadable = contact_sheet(table.column("uri").to_pylist(), out.uri("retrieval.png"), s3=cfg.s3())
    if unreadable:
        log.warning("contact sheet: %d of %d retrieved images could not be read and are crossed out; first: %s (%s)",
                    len(unreadable), len(hits), *unreadable[0])
    how = ("the probe text's projection of the sum of the {n} components CompAttribute ranks highest for the "
           "property {p!r} (docs/method.md, “Retrieval by property”)" if cfg.text else
           "cosine similarity, to the probe images, of the normalised sum of the {n} components that carry the "
           "property {p!r} most specifically (CompAttribute for it minus the largest for any other property; "
           "docs/method.md, “Retrieval by property”)").format(n=len(top), p=cfg.property)
    write_section(out, "retrieve", f"Retrieval: {probe} through the {cfg.property!r} components", order=20,
                  summary=f"Every image of the store ranked by {how}.",
                  facts={"store": st.uri, "property": cfg.property, "probe": probe,
                         "components used": top, "images scored": scored, "search": info["search"],
                         "aligner": cfg.aligner or "none", "unreadable tiles": len(unreadable),
                         **({"unreadable images": [f"{u}: {why}" for u, why in unreadable[:5]]} if unreadable else {})},
                  images=[("retrieval.png", f"top {len(hits)} images, best first (row-major)"
                           + (f"; {len(unreadable)} unreadable, crossed out" if unreadable else ""))] if sheet else [],
                  tables=[{"path": "retrieval.parquet", "caption": "rank, image_id, uri, score", "max_rows": 40},
                          {"path": "retrieval_components.parquet", "caption": "the components used"}])
    report = write_report(out)
    return {"table": table, "components": top, "scores": scores, "ids": ids, "report": report, "sheet": sheet,
            "unreadable_tiles": unreadable, "probe": probe, **info}


# ------------------------------------------------------------------------------------ heads
def head_kind(st, cfg: HeadOptions, aligner) -> str:
    """``cfg.head``, defaulting to zeroshot for an open_clip CLIP store or with an aligner, else probe."""
    m = st.manifest["model"]
    is_clip = m["readout"]["space"] == "clip" and m["name"].startswith("open_clip:")
    return cfg.head or ("zeroshot" if (is_clip or aligner is not None) else "probe")


def build_head(st, cfg: HeadOptions, aligner, fit_ids=None):
    """The classifier the job evaluates: ``cfg.head`` zeroshot, probe or model (default: zeroshot for a
    CLIP store or with an aligner, else a probe fitted on ``fit_ids`` and saved in ``cfg.out``)."""
    from ..fit.probe import LinearHead, class_list, fit_probe, model_head, zeroshot_head
    from ..fit.text import resolve_text_model

    kind = head_kind(st, cfg, aligner)
    if kind == "zeroshot":
        clip = resolve_text_model(st, aligner, cfg, what="a zero-shot head")
        classes = class_list(st, cfg.label_column, cfg.class_names)
        return zeroshot_head(clip, classes, aligned=aligner is not None, cache_dir=cfg.text_cache)
    if kind == "probe":
        if cfg.probe:
            head = LinearHead.load(cfg.probe, cfg.s3())
            if head.W.shape[1] != st.manifest["d"]:
                raise OptionError("probe", f"{cfg.probe} reads {head.W.shape[1]}-d readouts, {st.uri} holds "
                                           f"{st.manifest['d']}-d ones")
            return head
        head, info = fit_probe(st, cfg.label_column, ids=fit_ids, class_names=cfg.class_names)
        path = head.save(open_output(cfg.out, cfg.s3()).uri("probe"), cfg.s3())
        log.info("fitted a linear probe on %d readouts (train accuracy %.3f) -> %s.safetensors", info["rows"],
                 info["train_accuracy"], path)
        return head
    return model_head(st, cfg.checkpoint, cfg.class_names)


def _warn_few_evaluated(st, label_column: str, ids, classes) -> Optional[str]:
    from ..fit.probe import few_per_class

    labels = st.read(columns=[label_column], ids=ids).column(label_column).to_pylist()
    return few_per_class(labels, list(classes), "accuracy is evaluated")


def _needs_probe_fit(st, cfg: HeadOptions, aligner) -> bool:
    return head_kind(st, cfg, aligner) == "probe" and not cfg.probe


def _section(out: OutputDir, name, title, order, summary, facts, images, tables):
    from .report import write_report, write_section

    write_section(out, name, title=title, order=order, summary=summary, facts=facts, images=images, tables=tables)
    return write_report(out)


# ------------------------------------------------------------------------------------ ablate
def run_ablate(cfg: AblateConfig) -> dict:
    """Mean-ablation curves (cumulative over layers and per layer) of the chosen head's accuracy."""
    from ..store.splits import select_ids
    from .ablation import ablation_curves, plot_curves

    st, aligner = _open(cfg)
    out = _output(cfg)
    if cfg.split_column and not cfg.eval_split:
        raise OptionError("eval_split", "with a split column, name the split(s) whose accuracy the curves show")
    ids = select_ids(st, cfg.split_column, cfg.eval_split) if cfg.split_column else None
    fit_ids = None
    if _needs_probe_fit(st, cfg, aligner):
        # a probe is never fitted on the rows it is evaluated on
        if cfg.split_column:
            fit_ids = select_ids(st, cfg.split_column, cfg.fit_split) if cfg.fit_split else \
                sorted(set(st.ids()) - set(ids))
        else:
            fit_ids = select_ids(st, None, None, holdout=False)
            ids = select_ids(st, None, None, holdout=True)
        if not fit_ids or set(fit_ids) & set(ids):
            raise OptionError("fit_split", "the probe needs rows of its own: give a fit split disjoint from the "
                                           "evaluated split, or a fitted probe")
    head = build_head(st, cfg, aligner, fit_ids=fit_ids)
    _warn_few_evaluated(st, cfg.label_column, ids, head.classes)
    table, rows, n = ablation_curves(st, head, cfg.label_column, ids=ids, aligner=aligner, order=cfg.order,
                                     kinds=cfg.kinds or ("all", "attn", "mlp"))
    out.write_parquet("ablation.parquet", table)
    base = rows[0]["accuracy"]
    png = out.savefig("ablation.png", plot_curves(
        rows, f"Mean ablation — {st.manifest['model']['name']} ({head.kind} head, {n} images)"), dpi=110)
    final = {r["kind"]: r["accuracy"] for r in rows if r["curve"] == "cumulative"}     # last step per kind
    summary = {"store": st.uri, "head": head.kind, "images": n, "baseline_accuracy": base,
               "all_ablated_accuracy": final, "order": cfg.order}
    out.write_json("ablation.json", summary)
    report = _section(out, "ablation", "Mean-ablation curves", 30,
                      f"Components replaced by their mean over the evaluated rows, cumulatively from the "
                      f"{'last' if cfg.order == 'reverse' else 'first'} layer and one layer at a time; accuracy of "
                      f"the {head.kind} head on the label column {cfg.label_column!r}.",
                      {"baseline accuracy": round(base, 4), "images": n, "head": head.kind,
                       **{("accuracy, every component ablated" if k == "all" else f"accuracy, every {k} ablated"):
                          round(v, 4) for k, v in final.items()}},
                      [{"path": "ablation.png", "caption": "accuracy under mean ablation"}],
                      [{"path": "ablation.parquet", "caption": "one row per ablation set", "max_rows": 80}])
    return {"table": table, "rows": rows, "summary": summary, "head": head, "png": png, "report": report}


# ---------------------------------------------------------------------------------- mitigate
def run_mitigate(cfg: MitigateConfig) -> dict:
    """Spurious-feature mitigation: mean-ablate the top-k components of a ranking chosen on the fit
    rows, per-group accuracy before and after on the evaluated rows."""
    import pyarrow as pa

    from ..fit.text import resolve_text_model
    from ..store.splits import check_column, select_ids
    from .ablation import component_means, mitigate, plot_mitigation, rows_of, signed_push
    from .compattribute import compattribute, named_properties

    st, aligner = _open(cfg)
    check_column(st, cfg.label_column, "label_column")
    check_column(st, cfg.group_column, "group_column")
    out = _output(cfg)
    frac = cfg.val_fraction
    if cfg.split_column and not (cfg.eval_split and (cfg.fit_split or cfg.protocol == "same-pool")):
        raise OptionError("fit_split", "with a split column, name the fit split (where components and means are "
                                       "chosen) and the eval split (where accuracy is measured), e.g. val and test")
    eval_ids = select_ids(st, cfg.split_column, cfg.eval_split, fraction=frac, holdout=True)
    fit_ids = eval_ids if cfg.protocol == "same-pool" else \
        select_ids(st, cfg.split_column, cfg.fit_split, fraction=frac, holdout=False)
    if cfg.protocol == "heldout" and set(fit_ids) & set(eval_ids):
        raise OptionError("fit_split", "the fit and eval splits overlap; the held-out protocol needs disjoint "
                                       "splits (or use the same-pool protocol)")
    head = build_head(st, cfg, aligner, fit_ids=fit_ids)
    names = aligner.names if (aligner is not None and head.space == "aligned") else st.names
    comps = []
    if cfg.ranking == "compattribute":
        if not (cfg.spurious and cfg.core):
            raise OptionError("spurious", "the spurious and core options name the two properties (defaults or "
                                          "from the properties file)")
        props = named_properties(cfg.properties, cfg.s3())
        missing = [p for p in (cfg.spurious, cfg.core) if p not in props]
        if missing:
            raise OptionError("spurious" if cfg.spurious in missing else "core",
                              f"unknown properties {missing}; known: {sorted(props)} (add your own in a "
                              "properties file)")
        clip = resolve_text_model(st, aligner, cfg, what="CompAttribute ranking")
        score_names = aligner.names if aligner is not None else st.names
        _, sc, _ = compattribute(st, clip, {p: props[p] for p in (cfg.spurious, cfg.core)}, aligner=aligner,
                                 ids=fit_ids, cache_dir=cfg.text_cache, components=score_names, score=cfg.score)
        by = {n: i for i, n in enumerate(score_names)}
        scores = np.array([sc[by[n], 0] - sc[by[n], 1] if n in by else -np.inf for n in names])
        comps = [{"component": n, "spurious": float(sc[by[n], 0]), "core": float(sc[by[n], 1]),
                  "score": float(scores[i])} for i, n in enumerate(names) if n in by]
    _warn_few_evaluated(st, cfg.label_column, eval_ids, head.classes)
    means = component_means(st, names, head, fit_ids, aligner)       # the ablation means (fit rows)
    if cfg.ranking == "signed":
        scores = signed_push(st, names, head, fit_ids, cfg.label_column, cfg.group_column, means, aligner)
        comps = [{"component": n, "spurious": None, "core": None, "score": float(scores[i])}
                 for i, n in enumerate(names)]
    res = mitigate(st, head, cfg.label_column, cfg.group_column, fit_ids=fit_ids, eval_ids=eval_ids, k=cfg.k,
                   scores=scores, names=names, aligner=aligner, random_draws=cfg.random_draws, seed=cfg.seed,
                   means=means)
    ranked = sorted(comps, key=lambda r: -r["score"])
    for i, r in enumerate(ranked):
        r["rank"] = i
        r["ablated"] = r["component"] in res["ablated"]
    table = pa.Table.from_pylist(rows_of(res))
    nm = cfg.name
    out.write_parquet(f"{nm}.parquet", table)
    out.write_parquet(f"{nm}_components.parquet", pa.Table.from_pylist(ranked))
    png = out.savefig(f"{nm}.png", plot_mitigation(
        res, f"Spurious mitigation — top {cfg.k} by {cfg.ranking} ({cfg.protocol})"), dpi=110)
    b, a = res["before"], res["after"]
    summary = {"store": st.uri, "head": head.kind, "ranking": cfg.ranking,
               **({"score": cfg.score} if cfg.ranking == "compattribute" else {}), "protocol": cfg.protocol, "k": cfg.k,
               "fit_rows": len(fit_ids), "eval_rows": len(eval_ids), "ablated": res["ablated"],
               "worst_group": {"before": b["worst"], "after": a["worst"],
                               **({"random": res["random"]["worst"]} if "random" in res else {})},
               "mean_group": {"before": b["mean"], "after": a["mean"]}, "accuracy": res["accuracy"],
               "groups": {"before": b["groups"], "after": a["groups"]}, "options": asdict(cfg)}
    out.write_json(f"{nm}.json", summary, default=str)
    how = (f"components chosen and means taken on {len(fit_ids)} rows, accuracy measured on {len(eval_ids)} "
           "held-out rows" if cfg.protocol == "heldout" else
           f"published protocol: components, means and accuracy all on the same {len(eval_ids)} rows")
    report = _section(out, nm, f"Spurious-feature mitigation ({cfg.ranking} ranking, {cfg.protocol})", 40,
                      f"Top {cfg.k} components by {cfg.ranking} "
                      + (f"(CompAttribute({cfg.spurious}) − CompAttribute({cfg.core}), score {cfg.score!r}) "
                         if cfg.ranking == "compattribute"
                         else "(signed push towards the class the group predicts) ")
                      + f"mean-ablated; {how}. 'random' averages {cfg.random_draws} random {cfg.k}-sets (a control).",
                      {"worst group before": round(b["worst"], 4), "worst group after": round(a["worst"], 4),
                       "mean group before": round(b["mean"], 4), "mean group after": round(a["mean"], 4),
                       "ablated": ", ".join(res["ablated"])},
                      [{"path": f"{nm}.png", "caption": "per-group accuracy before and after"}],
                      [{"path": f"{nm}.parquet", "caption": "accuracy per group and setting", "max_rows": 60},
                       {"path": f"{nm}_components.parquet", "caption": "component ranking", "max_rows": 30}])
    return {"results": res, "summary": summary, "components": ranked, "head": head, "png": png, "report": report}


# --------------------------------------------------------------------------- interpretability
def run_interpretability(cfg) -> dict:
    """Per-head property labels from TextSpan texts, association and entanglement scores
    (:mod:`vitdecomp.query.interpretability`); ``interpretability.parquet``/``.json``/``.png`` and a
    report section."""
    import pyarrow as pa

    from .compattribute import read_properties
    from .interpretability import (label_plot, read_textspan, read_vocabulary, score_heads, texts_from_table,
                                   vocabularies)

    cfg.check_required()
    texts = texts_from_table(read_textspan(cfg.textspan, cfg.s3()))
    vocab = vocabularies(read_properties(cfg.properties, cfg.s3()), read_vocabulary(cfg.vocabulary, cfg.s3()))
    rows, summary = score_heads(texts, vocab, texts_per_head=cfg.texts_per_head, min_share=cfg.min_share)
    out = _output(cfg)
    props = list(vocab)
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [("component", pa.string()), ("label", pa.string()), ("texts", pa.int64()), ("association", pa.float64()),
         ("mixed", pa.bool_()), ("present", pa.list_(pa.string())), ("matched", pa.list_(pa.string()))]
        + [(f"n_{p}", pa.int64()) for p in props]))
    out.write_parquet("interpretability.parquet", table)
    summary = {**summary, "textspan": cfg.textspan, "properties": props,
               "vocabulary": {p: [" ".join(t) for t in ts] for p, ts in vocab.items()}}
    out.write_json("interpretability.json", summary)
    png = out.savefig("interpretability.png", label_plot(rows, props, "TextSpan texts matching each property"),
                      dpi=110)
    fmt = lambda v: "n/a" if v is None else round(v, 4)            # noqa: E731
    report = _section(out, "interpretability", "Interpretability: head labels, association and entanglement", 50,
                      "Each head's TextSpan texts matched against the properties' vocabularies: the head's label is "
                      "the property most of its texts name; association = the share of its texts that name it "
                      "(mean over labelled heads); entanglement = the share of labelled heads whose label another "
                      "head shares (README “Interpretability scores”).",
                      {"association score": fmt(summary["association_score"]),
                       "entanglement score": fmt(summary["entanglement_score"]),
                       "labelled heads": f"{summary['labelled']} of {summary['heads']}",
                       "mixed heads (fraction)": fmt(summary["mixed_fraction"]),
                       **{f"heads labelled {p}": n for p, n in summary["per_property"].items()}},
                      [{"path": "interpretability.png", "caption": "matching texts per head and property"}],
                      [{"path": "interpretability.parquet", "caption": "one row per head", "max_rows": 60}])
    return {"table": table, "rows": rows, "summary": summary, "png": png, "report": report}


# ------------------------------------------------------------------------------------ report
def run_report(cfg: ReportConfig) -> dict:
    """Gather the ``*.section.json`` sidecars in ``cfg.out`` into one static ``report.html``."""
    from .report import write_report

    cfg.check_required()
    return {"report": write_report(open_output(cfg.out, cfg.s3()), title=cfg.title)}
