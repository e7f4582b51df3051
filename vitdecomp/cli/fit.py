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



from .query import ABLATION_HELP as PROBE_HELP  # noqa: E402  (the probe shares the ablation options)


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
