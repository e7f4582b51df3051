"""``vitdecomp fit compalign | textspan | probe``: fitting on a store."""
from __future__ import annotations

import argparse

from ..config import CompAlignConfig, ProbeConfig, TextSpanConfig
from .options import add_job_parser

HELP = {
    "store": "the store written by `vitdecomp decompose` (local or s3://)",
    "out": "compalign: artefact path without extension (.safetensors + .json); textspan: output directory",
    "lam": "weight of the orthogonality term λ·Σ_k‖A_kA_kᵀ − I‖²/(K·d_teacher)",
    "min_delta": "smallest validation-cosine gain that counts as progress (early stopping)",
    "init_std": "standard deviation of the maps' normal initialisation",
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



PROBE_HELP = {k: v for k, v in {

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
}.items()}


def compalign(cfg: CompAlignConfig) -> int:
    from ..fit import run_compalign

    r = run_compalign(cfg)
    a = r["aligner"]
    print(f"compalign: {len(a.names)} components -> {a.maps.shape[1]}-d teacher space; best validation "
          f"cosine {r['best_val_cosine']:.4f} after {r['epochs']} epochs; saved {cfg.out}.safetensors/.json")
    return 0


def textspan(cfg: TextSpanConfig) -> int:
    from ..fit import run_textspan

    r = run_textspan(cfg)
    ev = r["evaluation"]
    if ev:
        print(f"textspan evaluation: zero-shot accuracy {ev['accuracy_full']:.4f} with the full model, "
              f"{ev['accuracy_reconstructed']:.4f} with the {len(r['components'])} components replaced by their "
              f"TextSpan reconstruction and earlier layers mean-ablated "
              f"({ev['accuracy_mean_ablated_only']:.4f} with only the mean-ablation)")
    text = r["text"]
    print(text[:2000] + ("…\n" if len(text) > 2000 else ""))
    print(f"textspan: {len(r['components'])} components x {cfg.texts_per_head} texts -> "
          f"{cfg.out}/textspan.parquet, textspan.txt")
    return 0


def probe(cfg: ProbeConfig) -> int:
    from ..fit import run_probe

    r = run_probe(cfg)
    print(f"probe: {len(r['head'].classes)} classes, {r['rows']} rows, train accuracy {r['train_accuracy']:.4f} "
          f"-> {r['path']}.safetensors/.json")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit CompAlign, TextSpan or a linear probe from a store",
                       description="Fit CompAlign (per-component maps into a CLIP teacher's space), TextSpan (a "
                                   "text basis per head, exact from streamed moments) or a linear probe from a "
                                   "stored table.")
    fsub = p.add_subparsers(dest="fit", required=True, metavar="what")
    add_job_parser(fsub, "compalign", CompAlignConfig, HELP, compalign,
                   help="per-component linear maps into the teacher's CLIP space",
                   description="Train one linear map per component so that the mapped contributions sum to the "
                               "teacher's unit image embedding (stored by decompose --teacher); streamed from "
                               "the store, validated on a hash split, saved as safetensors + JSON.")
    add_job_parser(fsub, "textspan", TextSpanConfig, HELP, textspan,
                   help="TextSpan for heads, from streamed moments",
                   description="For each chosen component, greedily pick the descriptions whose directions "
                               "explain most of its variance over the store (exact from streamed moments).")
    add_job_parser(fsub, "probe", ProbeConfig, PROBE_HELP, probe,
                   help="a linear probe (multinomial logistic regression) on the stored readouts",
                   description="Fit a multinomial logistic regression on the stored readouts of a label column "
                               "(safetensors + JSON), for the ablate and mitigate queries.")
