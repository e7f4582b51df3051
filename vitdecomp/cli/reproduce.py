"""``vitdecomp reproduce waterbirds | imagenet-ablation | segmentation``: a published experiment in one
command; prints the table of published and measured numbers (:mod:`vitdecomp.reproduce`)."""
from __future__ import annotations

import argparse

from .options import add_job_parser

HELP = {
    "root": "the dataset folder, in the dataset's own layout (see the experiment's description)",
    "out": "output directory: stores/, fit/, query/<experiment>/<model>/ (tables, plots, report.html) and "
           "reproduce-<experiment>.parquet/.json",
    "model": "one model: a short name (deit_b, dino_b, dinov2_b, clip_b16, swin_b, maxvit_s, clip_l14) or "
             "timm:<model>[.<tag>] / open_clip:<architecture>",
    "models": "several models, comma- or space-separated (default: the experiment's published set)",
    "pretrained": "download the published weights of each model (its short name's tag, a timm name's .tag or "
                  "--pretrained-tag)",
    "pretrained_tag": "weights tag for a full model name",
    "checkpoint": "local weights file of the one model (instead of --pretrained)",
    "head": "classifier: zeroshot (CLIP, or an aligned non-CLIP), probe, or model (the model's own head; "
            "default for timm models on imagenet-ablation)",
    "class_names": "class names in label order (default: the dataset's; waterbirds: landbird waterbird)",
    "batch_size": "decompose batch size", "dtype": "stored contribution precision",
    "concurrency": "model actors of the decompose job", "num_cpus": "CPUs for a local Ray",
    "device": "where models run", "ray_address": "a Ray cluster to join (default: a local Ray)",
    "cache_dir": "text-embedding cache", "seed": "random seed (random draws, CompAlign)",
    "teacher": "waterbirds, non-CLIP models: the CLIP teacher for CompAlign (default with --pretrained: "
               "open_clip:ViT-L-14 laion2b_s32b_b82k)",
    "teacher_pretrained": "its weights tag", "teacher_checkpoint": "its local weights file",
    "aligner": "waterbirds: a fitted CompAlign artefact for the one model (skips fitting one on the dataset)",
    "align_epochs": "CompAlign: most epochs", "align_lr": "CompAlign: learning rate",
    "properties": "YAML/JSON name: [descriptions…] added to the default properties",
    "spurious": "the spurious property", "core": "the core property",
    "k": "components mean-ablated (published: 10)",
    "ranking": "compattribute (published) or signed",
    "score": "the CompAttribute score of --ranking compattribute: correlation (published; default), specific or "
             "variance-share (docs/method.md, “CompAttribute”)", "random_draws": "random k-sets as a control",
    "protocol": "heldout: choose on the validation split, measure on test; same-pool: the published protocol "
                "(choose and measure on test)",
    "labels": "imagenet-ablation, flat layout: the labels file (default: <root>/LOC_val_solution.csv)",
    "synsets": "imagenet-ablation: 'wnid name' lines (default: open_clip's names for the 1,000 ILSVRC classes, "
               "else <root>/LOC_synset_mapping.txt)",
    "order": "imagenet-ablation: cumulative order of the curves",
    "components": "segmentation: heads or attention layers to map (default: the attention layers of the last "
                  "--last-layers blocks)",
    "last_layers": "segmentation: how many of the last blocks", "text": "segmentation: CLIP text direction",
    "class_index": "segmentation: classifier row (a class number or 'pred')",
    "limit": "segmentation: only the first N images (sorted by name)",
}


def _runner(module: str):
    def run(cfg) -> int:
        import importlib

        res = importlib.import_module(f"vitdecomp.reproduce.{module}").run(cfg)
        print(res["table"], flush=True)
        print(f"\ntables: {res['files']['parquet']}  {res['files']['json']}")
        for key, store in res["stores"].items():
            print(f"{key}: store {store}, report {res['reports'][key]}")
        return 0
    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..reproduce.config import ImagenetAblationConfig, SegmentationConfig, WaterbirdsConfig

    p = sub.add_parser("reproduce", help="a published experiment in one command, on the dataset's own layout",
                       description="Run a published experiment end to end (decompose → fit → query) on a dataset "
                                   "in "
                                   "its own layout and print the published number next to the measured one. A "
                                   "toy-world export (vitdecomp.toyworld.export) runs the same way offline.")
    rsub = p.add_subparsers(dest="reproduce", required=True, metavar="experiment")
    for name, cls, module, short, text in (
            ("waterbirds", WaterbirdsConfig, "waterbirds", "spurious-feature mitigation on Waterbirds",
             "Spurious-feature mitigation on the Waterbirds release (metadata.csv with img_id, img_filename, y, split, "
             "place; splits 0/1/2 = train/val/test): per model, decompose, CompAlign (non-CLIP), then mean-ablate the "
             "top 10 components by CompAttribute(Waterbirds spurious) − CompAttribute(Waterbirds core); worst-group "
             "and mean-group accuracy before and after."),
            ("imagenet-ablation", ImagenetAblationConfig, "imagenet_ablation",
             "zero-shot accuracy under mean ablation on ImageNet",
             "Zero-shot accuracy under mean ablation on an ImageNet-style validation set (val/<wnid>/*.JPEG, or flat "
             "val/*.JPEG with LOC_val_solution.csv): baseline and every MLP / attention layer mean-ablated."),
            ("segmentation", SegmentationConfig, "segmentation", "zero-shot segmentation: pixAcc, mIoU, mAP",
             "Zero-shot segmentation from token heatmaps on images/ + masks/ (same names, binary masks): pixAcc, "
             "mIoU (pooled) and mAP.")):
        add_job_parser(rsub, name, cls, HELP, _runner(module), help=short, description=text)
