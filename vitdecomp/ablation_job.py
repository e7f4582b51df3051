"""Query subcommands ``ablate`` (mean-ablation curves) and ``mitigate`` (spurious-feature
mitigation), and ``fit probe`` (the linear probe they can use). See :mod:`vitdecomp.ablation`."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .errors import InputError


@dataclass
class HeadOptions:
    """How predictions are made from a store (shared by ``ablate`` and ``mitigate``)."""

    store: str = ""
    out: str = ""
    label_column: str = ""
    class_names: Optional[list] = None
    head: Optional[str] = None
    probe: Optional[str] = None
    checkpoint: Optional[str] = None
    aligner: Optional[str] = None
    clip: Optional[str] = None
    clip_pretrained: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    cache_dir: Optional[str] = None
    split_column: Optional[str] = None
    s3_endpoint: Optional[str] = None


@dataclass
class AblateJob(HeadOptions):
    eval_split: Optional[list] = None
    fit_split: Optional[list] = None
    order: str = "reverse"
    kinds: Optional[list] = None


@dataclass
class MitigateJob(HeadOptions):
    group_column: str = ""
    spurious: str = ""
    core: str = ""
    properties: Optional[str] = None
    k: int = 10
    ranking: str = "compattribute"
    protocol: str = "heldout"
    fit_split: Optional[list] = None
    eval_split: Optional[list] = None
    val_fraction: str = "0.5"
    random_draws: int = 5
    seed: int = 0
    name: str = "mitigation"


@dataclass
class ProbeJob:
    store: str = ""
    out: str = ""
    label_column: str = ""
    class_names: Optional[list] = None
    split_column: Optional[str] = None
    fit_split: Optional[list] = None
    l2: str = "0.001"
    max_rows: int = 200_000
    s3_endpoint: Optional[str] = None


def _cache(job) -> str:
    return job.cache_dir or os.path.expanduser("~/.cache/vitdecomp/text")


def build_head(st, job: HeadOptions, aligner, fit_ids=None):
    """The classifier the job evaluates: ``--head zeroshot|probe|model`` (default: zeroshot for a CLIP
    store or with an aligner, else probe)."""
    from .ablation import LinearHead, class_list, fit_probe, model_head, zeroshot_head
    from .fit_job import resolve_text_model

    kind = head_kind(st, job, aligner)
    if kind == "zeroshot":
        clip = resolve_text_model(st, aligner, job.clip, job.clip_pretrained, job.clip_checkpoint, what="a zero-shot head")
        classes = class_list(st, job.label_column, job.class_names)
        return zeroshot_head(clip, classes, aligned=aligner is not None, cache_dir=_cache(job))
    if kind == "probe":
        if job.probe:
            head = LinearHead.load(job.probe)
            if head.W.shape[1] != st.manifest["d"]:
                raise InputError(f"--probe {job.probe} reads {head.W.shape[1]}-d readouts, {st.uri} holds "
                                 f"{st.manifest['d']}-d ones")
            return head
        head, info = fit_probe(st, job.label_column, ids=fit_ids, class_names=job.class_names)
        path = head.save(os.path.join(job.out, "probe"))
        print(f"    fitted a linear probe on {info['rows']} readouts (train accuracy {info['train_accuracy']:.3f}) "
              f"-> {path}.safetensors")
        return head
    if kind == "model":
        return model_head(st, job.checkpoint, job.class_names)
    raise InputError(f"--head must be zeroshot, probe or model, got {kind!r}")


def head_kind(st, job: HeadOptions, aligner) -> str:
    """``--head``, defaulting to zeroshot for an open_clip CLIP store or with an aligner, else probe."""
    m = st.manifest["model"]
    is_clip = m["readout"]["space"] == "clip" and m["name"].startswith("open_clip:")
    return job.head or ("zeroshot" if (is_clip or aligner is not None) else "probe")


def _needs_probe_fit(st, job: HeadOptions, aligner) -> bool:
    return head_kind(st, job, aligner) == "probe" and not job.probe


def _open(job: HeadOptions):
    from .compalign import Aligner
    from .storage import open_store

    if not job.store or not job.out:
        raise InputError("--store and --out are required")
    if not job.label_column:
        raise InputError("--label-column is required (the store column holding each image's class)")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    aligner = Aligner.load(job.aligner) if job.aligner else None
    if aligner is not None:
        from .compalign import check_compatible

        check_compatible(aligner, st)
    os.makedirs(job.out, exist_ok=True)
    return st, aligner


def _section(out, name, title, order, summary, facts, images, tables):
    from .report import write_report, write_section

    write_section(out, name, title=title, order=order, summary=summary, facts=facts, images=images, tables=tables)
    return write_report(out)


def run_ablate(job: AblateJob) -> dict:
    import pyarrow.parquet as pq

    from .ablation import ablation_curves, plot_curves, select_ids

    st, aligner = _open(job)
    if job.split_column and not job.eval_split:
        raise InputError("with --split-column give --eval-split (the rows whose accuracy the curves show)")
    ids = select_ids(st, job.split_column, job.eval_split) if job.split_column else None
    fit_ids = None
    if _needs_probe_fit(st, job, aligner):
        # a probe is never fitted on the rows it is evaluated on
        if job.split_column:
            fit_ids = select_ids(st, job.split_column, job.fit_split) if job.fit_split else \
                sorted(set(st.ids()) - set(ids))
        else:
            fit_ids = select_ids(st, None, None, holdout=False)
            ids = select_ids(st, None, None, holdout=True)
        if not fit_ids or set(fit_ids) & set(ids):
            raise InputError("the probe needs rows of its own: give --fit-split (disjoint from --eval-split) or "
                             "a fitted --probe")
    head = build_head(st, job, aligner, fit_ids=fit_ids)
    table, rows, n = ablation_curves(st, head, job.label_column, ids=ids, aligner=aligner, order=job.order,
                                     kinds=job.kinds or ("all", "attn", "mlp"))
    pq.write_table(table, os.path.join(job.out, "ablation.parquet"))
    base = rows[0]["accuracy"]
    png = plot_curves(rows, os.path.join(job.out, "ablation.png"),
                      f"Mean ablation — {st.manifest['model']['name']} ({head.kind} head, {n} images)")
    final = {r["kind"]: r["accuracy"] for r in rows if r["curve"] == "cumulative"}     # last step per kind
    summary = {"store": st.uri, "head": head.kind, "images": n, "baseline_accuracy": base,
               "all_ablated_accuracy": final, "order": job.order}
    with open(os.path.join(job.out, "ablation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    report = _section(job.out, "ablation", "Mean-ablation curves", 30,
                      f"Components replaced by their mean over the evaluated rows, cumulatively from the "
                      f"{'last' if job.order == 'reverse' else 'first'} layer and one layer at a time; accuracy of "
                      f"the {head.kind} head on the label column {job.label_column!r}.",
                      {"baseline accuracy": round(base, 4), "images": n, "head": head.kind,
                       **{f"all {k} ablated": round(v, 4) for k, v in final.items()}},
                      [{"path": "ablation.png", "caption": "accuracy under mean ablation"}],
                      [{"path": "ablation.parquet", "caption": "one row per ablation set", "max_rows": 80}])
    print(f"ablate: baseline accuracy {base:.4f} on {n} images; fully ablated " +
          ", ".join(f"{k} {v:.4f}" for k, v in final.items()) + f" -> {job.out}/ablation.parquet, {png}, {report}")
    return {"table": table, "rows": rows, "summary": summary, "head": head}


def run_mitigate(job: MitigateJob) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .ablation import mitigate, plot_mitigation, rows_of, select_ids, signed_push, component_means, _check_column
    from .compattribute import compattribute, named_properties
    from .fit_job import resolve_text_model

    st, aligner = _open(job)
    _check_column(st, job.label_column, "--label-column")
    _check_column(st, job.group_column, "--group-column")
    if job.protocol not in ("heldout", "same-pool"):
        raise InputError(f"--protocol must be heldout or same-pool, got {job.protocol!r}")
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", job.name or ""):
        raise InputError(f"--name {job.name!r} must be letters, digits, '_', '.' or '-' (it names the output files)")
    if job.ranking not in ("compattribute", "signed"):
        raise InputError(f"--ranking must be compattribute or signed, got {job.ranking!r}")
    frac = float(job.val_fraction)
    if job.split_column and not (job.eval_split and (job.fit_split or job.protocol == "same-pool")):
        raise InputError("with --split-column give --fit-split (where components and means are chosen) and "
                         "--eval-split (where accuracy is measured), e.g. --fit-split val --eval-split test")
    eval_ids = select_ids(st, job.split_column, job.eval_split, fraction=frac, holdout=True)
    fit_ids = eval_ids if job.protocol == "same-pool" else \
        select_ids(st, job.split_column, job.fit_split, fraction=frac, holdout=False)
    if job.protocol == "heldout" and set(fit_ids) & set(eval_ids):
        raise InputError("--fit-split and --eval-split overlap; the held-out protocol needs disjoint splits "
                         "(or pass --protocol same-pool)")
    head = build_head(st, job, aligner, fit_ids=fit_ids)
    names = aligner.names if (aligner is not None and head.space == "aligned") else st.names
    comps = []
    if job.ranking == "compattribute":
        if not (job.spurious and job.core):
            raise InputError("--spurious and --core name the two properties (defaults or from --properties)")
        props = named_properties(job.properties)
        missing = [p for p in (job.spurious, job.core) if p not in props]
        if missing:
            raise InputError(f"unknown properties {missing}; known: {sorted(props)} (add your own with --properties)")
        clip = resolve_text_model(st, aligner, job.clip, job.clip_pretrained, job.clip_checkpoint,
                                  what="CompAttribute ranking")
        score_names = aligner.names if aligner is not None else st.names
        _, sc, _ = compattribute(st, clip, {p: props[p] for p in (job.spurious, job.core)}, aligner=aligner,
                                 ids=fit_ids, cache_dir=_cache(job), components=score_names)
        by = {n: i for i, n in enumerate(score_names)}
        scores = np.array([sc[by[n], 0] - sc[by[n], 1] if n in by else -np.inf for n in names])
        comps = [{"component": n, "spurious": float(sc[by[n], 0]), "core": float(sc[by[n], 1]),
                  "score": float(scores[i])} for i, n in enumerate(names) if n in by]
    means = component_means(st, names, head, fit_ids, aligner)       # the ablation means (fit rows)
    if job.ranking == "signed":
        scores = signed_push(st, names, head, fit_ids, job.label_column, job.group_column, means, aligner)
        comps = [{"component": n, "spurious": None, "core": None, "score": float(scores[i])}
                 for i, n in enumerate(names)]
    res = mitigate(st, head, job.label_column, job.group_column, fit_ids=fit_ids, eval_ids=eval_ids, k=int(job.k),
                   scores=scores, names=names, aligner=aligner, random_draws=int(job.random_draws), seed=int(job.seed),
                   means=means)
    ranked = sorted(comps, key=lambda r: -r["score"])
    for i, r in enumerate(ranked):
        r["rank"] = i
        r["ablated"] = r["component"] in res["ablated"]
    table = pa.Table.from_pylist(rows_of(res))
    nm = job.name
    pq.write_table(table, os.path.join(job.out, f"{nm}.parquet"))
    pq.write_table(pa.Table.from_pylist(ranked), os.path.join(job.out, f"{nm}_components.parquet"))
    png = plot_mitigation(res, os.path.join(job.out, f"{nm}.png"),
                          f"Spurious mitigation — top {job.k} by {job.ranking} ({job.protocol})")
    b, a = res["before"], res["after"]
    summary = {"store": st.uri, "head": head.kind, "ranking": job.ranking, "protocol": job.protocol, "k": int(job.k),
               "fit_rows": len(fit_ids), "eval_rows": len(eval_ids), "ablated": res["ablated"],
               "worst_group": {"before": b["worst"], "after": a["worst"],
                               **({"random": res["random"]["worst"]} if "random" in res else {})},
               "mean_group": {"before": b["mean"], "after": a["mean"]}, "accuracy": res["accuracy"],
               "groups": {"before": b["groups"], "after": a["groups"]}, "options": asdict(job)}
    with open(os.path.join(job.out, f"{nm}.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    how = (f"components chosen and means taken on {len(fit_ids)} rows, accuracy measured on {len(eval_ids)} "
           "held-out rows" if job.protocol == "heldout" else
           f"published protocol: components, means and accuracy all on the same {len(eval_ids)} rows")
    report = _section(job.out, nm, f"Spurious-feature mitigation ({job.ranking} ranking, {job.protocol})", 40,
                      f"Top {job.k} components by {job.ranking} "
                      + (f"(CompAttribute({job.spurious}) − CompAttribute({job.core})) " if job.ranking == "compattribute"
                         else "(signed push towards the class the group predicts) ")
                      + f"mean-ablated; {how}. 'random' averages {job.random_draws} random {job.k}-sets (a control).",
                      {"worst group before": round(b["worst"], 4), "worst group after": round(a["worst"], 4),
                       "mean group before": round(b["mean"], 4), "mean group after": round(a["mean"], 4),
                       "ablated": ", ".join(res["ablated"])},
                      [{"path": f"{nm}.png", "caption": "per-group accuracy before and after"}],
                      [{"path": f"{nm}.parquet", "caption": "accuracy per group and setting", "max_rows": 60},
                       {"path": f"{nm}_components.parquet", "caption": "component ranking", "max_rows": 30}])
    print(f"mitigate: worst-group {b['worst']:.4f} -> {a['worst']:.4f}, mean-group {b['mean']:.4f} -> {a['mean']:.4f} "
          f"(ablated {', '.join(res['ablated'])}) -> {job.out}/{nm}.parquet, {png}, {report}")
    return {"results": res, "summary": summary, "components": ranked, "head": head}


def run_probe(job: ProbeJob) -> dict:
    from .ablation import fit_probe, select_ids
    from .storage import open_store

    if not job.store or not job.out or not job.label_column:
        raise InputError("--store, --out and --label-column are required")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    ids = select_ids(st, job.split_column, job.fit_split) if job.split_column else None
    head, info = fit_probe(st, job.label_column, ids=ids, class_names=job.class_names, l2=float(job.l2),
                           max_rows=int(job.max_rows))
    path = head.save(job.out)
    print(f"probe: {len(head.classes)} classes, {info['rows']} rows, train accuracy {info['train_accuracy']:.4f} "
          f"-> {path}.safetensors/.json")
    return {"head": head, **info}


HELP = {
    "store": "the store written by `vitdecomp decompose`", "out": "output directory",
    "label_column": "store column with each image's class (a pass-through column of the decompose input)",
    "class_names": "class names in label order (zero-shot: the texts; default: the label column's sorted values)",
    "head": "classifier: zeroshot (CLIP store, or --aligner), probe (linear probe on the readouts), model "
            "(the model's own linear head); default zeroshot for CLIP/aligned stores, else probe",
    "probe": "a probe fitted with `vitdecomp fit probe` (default: fit one on the fit rows and save it in --out)",
    "checkpoint": "--head model: the local checkpoint the store was made from",
    "aligner": "CompAlign artefact (zero-shot head and CompAttribute for a non-CLIP store)",
    "clip": "open_clip text model (default: the store's CLIP or the aligner's teacher)",
    "clip_pretrained": "its weights tag", "clip_checkpoint": "its local weights file",
    "cache_dir": "text-embedding cache", "s3_endpoint": "S3-compatible endpoint for s3:// stores",
    "split_column": "store column naming each row's split (default: a hash split of the ids)",
    "eval_split": "values of --split-column where accuracy is measured",
    "fit_split": "values of --split-column where components are ranked and means taken (mitigate), or the "
                 "probe is fitted (default for ablate: every row outside --eval-split)",
    "order": "ablate: cumulative order, reverse (from the last layer) or forward",
    "kinds": "ablate: component kinds with a curve each (all attn mlp conv)",
    "group_column": "mitigate: the spurious attribute (groups are label × this column)",
    "spurious": "mitigate: the spurious property's name (a default, 'Waterbirds spurious', or one from --properties)",
    "core": "mitigate: the core property's name (e.g. 'Waterbirds core')",
    "properties": "YAML/JSON name: [descriptions…] added to the defaults",
    "k": "mitigate: how many components to mean-ablate (default 10)",
    "ranking": "mitigate: compattribute (SPEC §7: spurious − core) or signed (SPEC §8: signed logit push towards the "
               "class the group predicts; needs labels on the fit rows)",
    "protocol": "mitigate: heldout (choose on --fit-split, evaluate on --eval-split) or same-pool (the published "
                "protocol: choose and evaluate on the same rows)",
    "val_fraction": "without --split-column: fraction of ids (by hash) used to choose components",
    "random_draws": "mitigate: random k-sets averaged as a control (0: none)", "seed": "random seed",
    "name": "mitigate: output file and report-section name (several runs can share one --out)",
    "l2": "probe: L2 penalty on the standardised weights", "max_rows": "probe: at most this many rows (sampled)",
}


def add_query_parsers(qsub) -> None:
    from .decompose_job import add_job_parser

    add_job_parser(qsub, "ablate", AblateJob, HELP, run_ablate,
                   help="mean-ablation curves (cumulative and per layer) → table, plot, report")
    add_job_parser(qsub, "mitigate", MitigateJob, HELP, run_mitigate,
                   help="spurious-feature mitigation: ablate the top-k components, per-group accuracy before/after")


def add_fit_parser(fsub) -> None:
    from .decompose_job import add_job_parser

    add_job_parser(fsub, "probe", ProbeJob, HELP, run_probe,
                   help="a linear probe (multinomial logistic regression) on the stored readouts")
