"""The fit job: CompAlign and TextSpan from a stored table (``vitdecomp fit {compalign,textspan} --help``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from .decompose_job import add_job_parser
from .errors import InputError

log = logging.getLogger(__name__)


@dataclass
class CompAlignJob:
    store: str = ""
    out: str = ""
    lam: float = 1.0
    ortho: str = "paper"
    lr: float = 3e-4
    weight_decay: float = 1e-6
    batch_size: int = 32
    max_epochs: int = 20
    patience: int = 3
    val_fraction: float = 0.1
    seed: int = 0
    s3_endpoint: Optional[str] = None


@dataclass
class TextSpanJob:
    store: str = ""
    out: str = ""
    pool: Optional[str] = None
    components: Optional[list] = None
    last_layers: int = 4
    texts_per_head: int = 10
    rank: int = 80
    aligner: Optional[str] = None
    clip: Optional[str] = None
    clip_pretrained: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    cache_dir: Optional[str] = None
    distributed: bool = True
    label_column: Optional[str] = None
    class_names: Optional[list] = None
    s3_endpoint: Optional[str] = None


def run_compalign(job: CompAlignJob) -> dict:
    from .compalign import AlignConfig, fit_store
    from .storage import open_store

    if not job.store or not job.out:
        raise InputError("--store and --out are required")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    cfg = AlignConfig(lam=float(job.lam), ortho=job.ortho, lr=float(job.lr), weight_decay=float(job.weight_decay),
                      batch_size=int(job.batch_size), max_epochs=int(job.max_epochs), patience=int(job.patience),
                      val_fraction=float(job.val_fraction), seed=int(job.seed))
    aligner, metrics = fit_store(st, cfg)
    aligner.save(job.out)
    print(f"compalign: {len(aligner.names)} components -> {aligner.maps.shape[1]}-d teacher space; best validation "
          f"cosine {metrics['best_val_cosine']:.4f} after {metrics['epochs']} epochs; saved {job.out}.safetensors/.json")
    return metrics


def resolve_text_model(st, aligner, clip: Optional[str], clip_pretrained: Optional[str],
                       clip_checkpoint: Optional[str], what: str):
    """The open_clip model whose text tower shares the contributions' CLIP space (store or aligner teacher)."""
    import vitdecomp as vd

    from .compalign import check_compatible

    m = st.manifest
    is_clip = m["model"]["readout"]["space"] == "clip" and m["model"]["name"].startswith("open_clip:")
    if aligner is not None:
        check_compatible(aligner, st)
    if not is_clip and aligner is None:
        raise InputError(f"{st.uri} holds {m['model']['name']}, not an open_clip CLIP: {what} needs its "
                         "contributions in a CLIP space — fit an aligner with `vitdecomp fit compalign` and pass --aligner")
    space = (aligner.meta.get("teacher") or {}).get("name") if aligner else m["model"]["name"]
    clip_name = clip or space
    if clip_name != space:
        raise InputError(f"the text model {clip_name} is not the CLIP space of these contributions ({space}); "
                         "texts must be encoded by the same model")
    weights = (aligner.meta.get("teacher") if aligner else m["model"]) or {}
    if not (clip_pretrained or weights.get("pretrained") or clip_checkpoint):
        import torch

        torch.manual_seed(0)            # random-init: the same weights as the decompose job's (seed 0)
    lm = vd.load_model(clip_name, pretrained=clip_pretrained or weights.get("pretrained") or False,
                       checkpoint=clip_checkpoint)
    want_sha = weights.get("checkpoint_sha256")
    if want_sha and lm.checkpoint_sha256 != want_sha:
        raise InputError(f"--clip-checkpoint must be the checkpoint the store was made with (SHA-256 {want_sha[:12]}…)")
    return lm


def default_components(store, last_layers: int) -> list[str]:
    heads = [c for c in store.components if c.kind == "head"]
    if not heads:
        raise InputError(f"{store.uri} has no per-head components (it was decomposed with --no-heads); "
                         "pass --components explicitly")
    blocks = sorted({c.block for c in heads})[-last_layers:]
    return [c.name for c in heads if c.block in blocks]


def run_textspan(job: TextSpanJob) -> dict:
    from .compalign import Aligner
    from .storage import open_store
    from .text import encode_texts, read_pool
    from .textspan import moments_from_store, report, textspan

    if not job.store or not job.out:
        raise InputError("--store and --out are required")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    m = st.manifest
    aligner = Aligner.load(job.aligner) if job.aligner else None
    clip = resolve_text_model(st, aligner, job.clip, job.clip_pretrained, job.clip_checkpoint, what="TextSpan")
    names = list(job.components) if job.components else default_components(st, int(job.last_layers))
    pool = read_pool(job.pool)
    t0 = time.time()
    texts = encode_texts(clip, pool, cache_dir=job.cache_dir or os.path.expanduser("~/.cache/vitdecomp/text"))
    log.info("encoded %d descriptions in %.0f s", len(pool), time.time() - t0)
    mo = moments_from_store(st, names, distributed=bool(job.distributed))
    if aligner is not None:
        sel = [aligner.names.index(n) for n in names]
        mo = mo.affine(aligner.maps.numpy()[sel].astype(np.float64),
                       aligner.bias.numpy().astype(np.float64) / len(aligner.names))
    table, spans = textspan(mo, names, texts, pool, m=int(job.texts_per_head), rank=int(job.rank))
    evaluation = None
    if job.label_column:
        evaluation = reconstruction_accuracy(st, clip, spans, job.label_column, job.class_names, aligner,
                                             cache_dir=job.cache_dir)
        print(f"textspan evaluation: zero-shot accuracy {evaluation['accuracy_full']:.4f} with the full model, "
              f"{evaluation['accuracy_reconstructed']:.4f} with the {len(names)} components replaced by their "
              f"TextSpan reconstruction and earlier layers mean-ablated "
              f"({evaluation['accuracy_mean_ablated_only']:.4f} with only the mean-ablation)")
    import pyarrow.parquet as pq

    os.makedirs(job.out, exist_ok=True)
    pq.write_table(table, os.path.join(job.out, "textspan.parquet"))
    text = report(table, f"TextSpan — {m['model']['name']} ({st.uri}), {mo.n} images, {len(pool)} descriptions")
    with open(os.path.join(job.out, "textspan.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(job.out, "textspan.json"), "w") as f:
        json.dump({"store": st.uri, "model": m["model"]["name"], "components": names, "pool": job.pool or "default",
                   "pool_size": len(pool), "texts_per_head": job.texts_per_head, "rank": job.rank,
                   "aligner": job.aligner, "images": mo.n, "evaluation": evaluation}, f, indent=2)
    print(text[:2000] + ("…\n" if len(text) > 2000 else ""))
    print(f"textspan: {len(names)} components x {job.texts_per_head} texts -> {job.out}/textspan.parquet, textspan.txt")
    return {"table": table, "images": mo.n, "evaluation": evaluation, "spans": spans}


def reconstruction_accuracy(st, clip, spans: dict, label_column: str, class_names, aligner=None,
                            cache_dir: Optional[str] = None, batch_size: int = 1024) -> dict:
    """SPEC §5's evaluation: zero-shot accuracy with every explained component replaced by its
    TextSpan reconstruction ``μ + (x − μ)QQᵀ`` and every component of earlier blocks (and ``embed``)
    replaced by its corpus mean, next to the full model's accuracy. Two passes over the store."""
    from .text import encode_texts

    if label_column not in st._schema().names:
        raise InputError(f"--label-column {label_column!r} is not a column of {st.uri}")
    names = aligner.names if aligner is not None else st.names
    comps = {c.name: c for c in st.components}
    first = min(comps[n].block for n in spans)
    ablate = [k for k, n in enumerate(names) if comps[n].kind == "embed" or
              (comps[n].block is not None and comps[n].block < first)]
    span_idx = {names.index(n): r for n, r in spans.items()}
    labels_all = st.read(columns=[label_column]).column(label_column).to_pylist()
    classes = [str(c) for c in (class_names or sorted({str(v) for v in labels_all if v is not None}))]
    if len(classes) < 2:
        raise InputError(f"--label-column {label_column!r} has fewer than two classes")
    T = encode_texts(clip, classes, cache_dir=cache_dir or os.path.expanduser("~/.cache/vitdecomp/text"))
    sums, n = None, 0
    for b in st.iter_batches(components=names, batch_size=batch_size, aligner=aligner, dtype=np.float64):
        s = b.contributions.sum(0)
        sums = s if sums is None else sums + s
        n += len(b.ids)
    means = sums / n
    hits = {"full": 0, "recon": 0, "ablated": 0}
    total = 0
    for b in st.iter_batches(components=names, batch_size=batch_size, aligner=aligner, dtype=np.float64,
                             columns=[label_column]):
        y = [classes.index(str(v)) if str(v) in classes else -1 for v in b.columns[label_column].to_pylist()]
        c = b.contributions
        abl = c.copy()
        abl[:, ablate] = means[ablate]
        rec = abl.copy()
        for k, r in span_idx.items():
            Q = r.basis.T
            rec[:, k] = r.mean + (c[:, k] - r.mean) @ Q @ Q.T
        for key, arr in (("full", c), ("recon", rec), ("ablated", abl)):
            pred = (arr.sum(1) @ T.T).argmax(-1)
            hits[key] += int(sum(int(p == t) for p, t in zip(pred, y)))
        total += sum(t >= 0 for t in y)
    return {"classes": classes, "images": total, "accuracy_full": hits["full"] / total,
            "accuracy_reconstructed": hits["recon"] / total, "accuracy_mean_ablated_only": hits["ablated"] / total,
            "mean_ablated_components": [names[k] for k in ablate]}


HELP = {
    "store": "the store written by `vitdecomp decompose` (local or s3://)",
    "out": "compalign: artefact path without extension (.safetensors + .json); textspan: output directory",
    "lam": "weight of the orthogonality term", "ortho": "orthogonality term: paper or code (SPEC §4)",
    "lr": "Adam learning rate", "weight_decay": "Adam weight decay", "batch_size": "training batch size",
    "max_epochs": "at most this many epochs", "patience": "stop after this many epochs without validation gain",
    "val_fraction": "held-out fraction (chosen by a hash of image_id)", "seed": "random seed",
    "pool": "description pool file, one per line (default: the generated pool)",
    "components": "components to explain (default: every head of the last --last-layers blocks)",
    "last_layers": "default components: heads of this many last blocks (default 4)",
    "texts_per_head": "texts picked per component (default 10)", "rank": "SVD rank r (default 80)",
    "aligner": "CompAlign artefact mapping a non-CLIP store into its teacher's CLIP space",
    "clip": "open_clip model that encodes the texts (default: the store's CLIP, or the aligner's teacher)",
    "clip_pretrained": "its weights tag (default: the one recorded in the store)",
    "clip_checkpoint": "its local weights file (must match the store's recorded SHA-256)",
    "cache_dir": "text-embedding cache (default ~/.cache/vitdecomp/text)",
    "distributed": "compute the moments with Ray Data (default) or in this process (--no-distributed)",
    "label_column": "evaluate: zero-shot accuracy with the components replaced by their reconstruction "
                    "(earlier layers mean-ablated) vs the full model, on this label column",
    "class_names": "evaluate: the class names in label order (default: the label column's sorted values)",
    "s3_endpoint": "S3-compatible endpoint for s3:// stores",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit CompAlign, TextSpan or a linear probe from a store",
                       description="Fit CompAlign (per-component maps into a CLIP teacher's space) or TextSpan (a "
                                   "text basis per head, exact from streamed moments) from a stored table.")
    fsub = p.add_subparsers(dest="fit", required=True)
    add_job_parser(fsub, "compalign", CompAlignJob, HELP, run_compalign,
                   help="per-component linear maps into the teacher's CLIP space")
    add_job_parser(fsub, "textspan", TextSpanJob, HELP, run_textspan, help="TextSpan for heads, from streamed moments")
    from .ablation_job import add_fit_parser

    add_fit_parser(fsub)
