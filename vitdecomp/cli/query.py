"""``vitdecomp query compattribute | retrieve | ablate | mitigate | heatmap | report``."""
from __future__ import annotations

import argparse

from ..config import (AblateConfig, CompAttributeConfig, HeatmapConfig, InterpretabilityConfig, MitigateConfig,
                      ReportConfig, RetrieveConfig)
from .options import add_job_parser

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
    "score": "compattribute: correlation (the published mean Pearson correlation; default), specific (minus the "
             "largest other property's score, if positive) or variance-share (covariance with the total / its "
             "variance); docs/method.md, “CompAttribute”",
}



ABLATION_HELP = {
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
    "ranking": "mitigate: compattribute (CompAttribute of the spurious property − of the core one) or signed "
               "(signed logit push towards the class the group predicts; needs labels on the fit rows); formulas in "
               "docs/method.md, “Spurious-feature mitigation”",
    "score": "mitigate --ranking compattribute: the CompAttribute score, correlation (published; default), "
             "specific or variance-share (docs/method.md, “CompAttribute”)",
    "protocol": "mitigate: heldout (choose on --fit-split, evaluate on --eval-split) or same-pool (the published "
                "protocol: choose and evaluate on the same rows)",
    "val_fraction": "without --split-column: fraction of ids (by hash) used to choose components",
    "random_draws": "mitigate: random k-sets averaged as a control (0: none)", "seed": "random seed",
    "name": "mitigate: output file and report-section name (several runs can share one --out)",
    "l2": "probe: L2 penalty on the standardised weights", "max_rows": "probe: at most this many rows (sampled)",
}



HEATMAP_HELP = {
    "store": "the store written by `vitdecomp decompose`; its manifest decides model, weights, preprocessing, "
             "blocks and convention",
    "out": "output directory (heatmaps.parquet, heatmaps/*.png, heatmap_grid.png, segmentation.parquet)",
    "components": "attention heads (blocks.3.attn.head.0) and/or whole attention layers (blocks.3.attn); "
                  "their token maps are summed",
    "image_ids": "images of the store to map (by image_id)",
    "top_n": "map the first N images: of --retrieval's ranking, else of the store's sorted ids (default 8 "
             "when --image-ids is not given)",
    "retrieval": "a retrieval.parquet (from `vitdecomp query retrieve`) whose top --top-n images are mapped",
    "text": "project on this text's CLIP embedding (CLIP stores, or with --aligner)",
    "class_index": "project on the classifier's weight row of this class (timm classifiers); 'pred': each "
                   "image's predicted class",
    "aligner": "CompAlign artefact mapping a non-CLIP store into its teacher's CLIP space (with --text)",
    "checkpoint": "the local weights file the store was made with (its SHA-256 must match the manifest's)",
    "clip": "open_clip text model (default: the store's CLIP or the aligner's teacher)",
    "clip_pretrained": "its weights tag", "clip_checkpoint": "its local weights file",
    "mask_column": "store column with each image's foreground-mask URI (or PNG bytes): adds segmentation metrics",
    "masks_dir": "folder with foreground masks DIR/<image_id>.png: adds segmentation metrics",
    "batch_size": "images per model call (default 16)", "device": "cpu (default), cuda or auto",
    "cache_dir": "text-embedding cache (default ~/.cache/vitdecomp/text)",
    "s3_endpoint": "S3-compatible endpoint for s3:// stores and images",
}





def compattribute(cfg: CompAttributeConfig) -> int:
    from ..query import run_compattribute

    r = run_compattribute(cfg)
    print("compattribute: top component per property: " + ", ".join(f"{p}: {c}" for p, c in r["top"].items()))
    print(f"compattribute: {len(r['names'])} components x {len(r['properties'])} properties -> "
          f"{cfg.out}/compattribute.parquet, {r['png']}, {r['report']}")
    return 0


def retrieve(cfg: RetrieveConfig) -> int:
    from ..query import run_retrieve

    r = run_retrieve(cfg)
    print(f"retrieve: property {cfg.property!r} via {r['components']}; top {r['table'].num_rows} images for "
          f"{r['probe']} ({r['search']}) -> {cfg.out}/retrieval.parquet" + (f", {r['sheet']}" if r["sheet"] else "")
          + f", {r['report']}")
    if r["unreadable_tiles"]:
        print(f"retrieve: {len(r['unreadable_tiles'])} of {r['table'].num_rows} images could not be read for the "
              f"contact sheet (crossed out); first: {r['unreadable_tiles'][0][0]}: {r['unreadable_tiles'][0][1]}")
    return 0


def ablate(cfg: AblateConfig) -> int:
    from ..query import run_ablate

    r = run_ablate(cfg)
    s = r["summary"]
    print(f"ablate: baseline accuracy {s['baseline_accuracy']:.4f} on {s['images']} images; fully ablated " +
          ", ".join(f"{k} {v:.4f}" for k, v in s["all_ablated_accuracy"].items()) +
          f" -> {cfg.out}/ablation.parquet, {r['png']}, {r['report']}")
    return 0


def mitigate(cfg: MitigateConfig) -> int:
    from ..query import run_mitigate

    r = run_mitigate(cfg)
    b, a = r["results"]["before"], r["results"]["after"]
    print(f"mitigate: worst-group {b['worst']:.4f} -> {a['worst']:.4f}, mean-group {b['mean']:.4f} -> "
          f"{a['mean']:.4f} (ablated {', '.join(r['results']['ablated'])}) -> {cfg.out}/{cfg.name}.parquet, "
          f"{r['png']}, {r['report']}")
    return 0


def heatmap(cfg: HeatmapConfig) -> int:
    from ..query import run_heatmap

    r = run_heatmap(cfg)
    gh, gw = r["maps"].shape[1:3]
    print(f"heatmap: {len(r['ids'])} images, {' + '.join(cfg.components)} on {r['target']} ({gh}x{gw} patches) -> "
          f"{cfg.out}/heatmaps.parquet, {r['grid']}")
    s = r["summary"]
    if s:
        print(f"heatmap: segmentation over {s['images']} images: pixAcc {s['mean_pixacc']:.4f} "
              f"mIoU {s['mean_miou']:.4f} AP {s['mean_ap']:.4f} mAP {s['mean_map']:.4f} "
              f"(pooled pixAcc {s['pooled_pixacc']:.4f}, mIoU {s['pooled_miou']:.4f})")
    return 0


INTERPRETABILITY_HELP = {
    "textspan": "the TextSpan output of `vitdecomp fit textspan` (its --out directory or textspan.parquet)",
    "out": "output directory: interpretability.parquet/.json/.png and a section of report.html",
    "properties": "YAML/JSON name: [descriptions…] added to the defaults; each property's vocabulary is its "
                  "descriptions without the words they all share",
    "vocabulary": "YAML/JSON name: [terms…] replacing (or adding) properties' vocabularies",
    "texts_per_head": "use each head's first N TextSpan texts (default: all)",
    "min_share": "a property is present in a head from this share of its texts (default 0.2; 'mixed' heads)",
    "s3_endpoint": "S3-compatible endpoint for s3:// paths",
}


def interpretability(cfg: InterpretabilityConfig) -> int:
    from ..query.jobs import run_interpretability

    r = run_interpretability(cfg)
    s = r["summary"]
    f = lambda v: "n/a" if v is None else f"{v:.4f}"            # noqa: E731
    print(f"interpretability: {s['labelled']} of {s['heads']} heads labelled; association score "
          f"{f(s['association_score'])}, entanglement score {f(s['entanglement_score'])} -> "
          f"{cfg.out}/interpretability.parquet, {r['png']}, {r['report']}")
    return 0


def report(cfg: ReportConfig) -> int:
    from ..query import run_report

    print(f"report: {run_report(cfg)['report']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="query a store: CompAttribute, retrieval, ablation, mitigation, heatmaps, report",
                       description="Corpus-wide queries over a store; each writes Parquet tables, PNG plots and a "
                                   "section of --out/report.html.")
    qsub = p.add_subparsers(dest="query", required=True, metavar="query")
    add_job_parser(qsub, "compattribute", CompAttributeConfig, HELP, compattribute,
                   help="score every component against text-described properties",
                   description="Score every component against every property (mean Pearson correlation of its "
                               "projection with the total's, over the whole store, in one pass).")
    add_job_parser(qsub, "retrieve", RetrieveConfig, HELP, retrieve,
                   help="retrieval by property: probe text or probe images (top components)",
                   description="Rank the store's images through the components that carry a property: by a "
                               "probe text (--text) or by probe images (--image-ids).")
    add_job_parser(qsub, "ablate", AblateConfig, ABLATION_HELP, ablate,
                   help="mean-ablation curves (cumulative and per layer) → table, plot, report",
                   description="Accuracy of a head (zero-shot, probe or the model's own) as components are "
                               "replaced by their mean: cumulatively over layers and one layer at a time.")
    add_job_parser(qsub, "mitigate", MitigateConfig, ABLATION_HELP, mitigate,
                   help="spurious-feature mitigation: ablate the top-k components, per-group accuracy before/after",
                   description="Rank components (CompAttribute spurious − core, or the signed push), mean-ablate "
                               "the top k chosen on the fit rows, report per-group accuracy on the eval rows.")
    add_job_parser(qsub, "heatmap", HeatmapConfig, HEATMAP_HELP, heatmap,
                   help="token heatmaps of chosen heads on a text or class logit, overlays, segmentation metrics",
                   description="Recompute per-token contributions of chosen heads for chosen images of a store "
                               "(its model rebuilt from the manifest), project them on a text embedding or a "
                               "class logit, upsample and overlay them; with masks, pixel accuracy, mIoU and AP.")
    add_job_parser(qsub, "interpretability", InterpretabilityConfig, INTERPRETABILITY_HELP, interpretability,
                   help="per-head property labels from TextSpan texts; association and entanglement scores",
                   description="Label each head by the property its TextSpan texts name most (matched against "
                               "the properties' vocabularies) and score the model: association (share of a "
                               "head's texts naming its label) and entanglement (share of heads whose label "
                               "another head shares).")
    add_job_parser(qsub, "report", ReportConfig, HELP, report,
                   help="one static HTML page of every query section in --out (tables, plots, links)",
                   description="Gather every query section written into --out into one static report.html.")
