"""``vitdecomp reproduce imagenet-ablation``: zero-shot accuracy under mean ablation on an ImageNet-style
validation set (published: CLIP ViT-B/16, 70.22 → 67.04 with all MLPs mean-ablated).

Layouts: ``<root>/val/<wnid>/*.JPEG`` (one folder per class), or the flat ``<root>/val/*.JPEG`` with a
labels file (``--labels``, else ``<root>/LOC_val_solution.csv``: ``ImageId,PredictionString`` whose
first word is the wnid; a ``name wnid`` line format works too). Class names: ``--synsets`` (``wnid
name`` per line, the first comma-separated name is used), else open_clip's curated ImageNet class
names when the folder holds the 1,000 ILSVRC classes, else ``<root>/LOC_synset_mapping.txt``.
Every block is decomposed at layer granularity, so "all MLPs" means every MLP of the model; the
ablation means are taken over the evaluated images (``query ablate``).
"""
from __future__ import annotations

import csv
import logging
import os
import re
from typing import Optional

from ..config import OptionError
from .common import DatasetError, is_image, row
from .config import ImagenetAblationConfig

log = logging.getLogger(__name__)

SOURCE = ("The ImageNet ILSVRC2012 validation set (50,000 images, 1,000 classes) comes from image-net.org "
          "(after registration) or from Kaggle's “ImageNet Object Localization Challenge” (ILSVRC/Data/CLS-LOC/val "
          "with LOC_val_solution.csv and LOC_synset_mapping.txt); pass the folder that holds val/ as --root, with "
          "val/<wnid>/*.JPEG (the usual valprep layout) or the flat val/*.JPEG and its labels file")
WNID = re.compile(r"^n\d{8}$")
DEFAULT_MODELS = ("clip_b16",)
PUBLISHED = {"clip_b16": (0.7022, 0.6704)}          # zero-shot top-1: baseline, every MLP mean-ablated


def _labels_file(path: str) -> dict[str, str]:
    """``stem → wnid`` from Kaggle's ``LOC_val_solution.csv`` or ``name wnid`` / ``name,wnid`` lines."""
    out = {}
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.lower().startswith("imageid"):
            for r in csv.DictReader(f):
                words = (r.get("PredictionString") or "").split()
                if r.get("ImageId") and words:
                    out[os.path.splitext(r["ImageId"])[0]] = words[0]
        else:
            for line in f:
                parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
                if len(parts) >= 2:
                    out[os.path.splitext(os.path.basename(parts[0]))[0]] = parts[1]
    if not out:
        raise DatasetError(path, "holds no labels (expected ImageId,PredictionString rows or 'file wnid' lines)",
                           SOURCE)
    return out


def _synsets(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            w, _, name = line.strip().partition(" ")
            if w:
                out[w] = name.split(",")[0].strip() or w
    return out


def validate(root: str, labels: Optional[str] = None, synsets: Optional[str] = None) -> dict:
    """Check the layout before any work; returns ``{"root", "layout", "rows", "wnids", "class_names"}``
    with rows ``image_id, uri, label`` (index of the wnid in sorted order) and ``wnid``."""
    root = os.path.abspath(os.path.expanduser(root))
    val = os.path.join(root, "val")
    if not os.path.isdir(val):
        raise DatasetError(val, "not found (expected an ImageNet-style validation folder val/ under --root)", SOURCE)
    entries = sorted(os.listdir(val))
    folders = [e for e in entries if os.path.isdir(os.path.join(val, e))]
    files = [e for e in entries if is_image(e)]
    pairs = []                                            # (relative path, wnid)
    if folders:
        bad = [d for d in folders if not WNID.match(d)]
        if bad:
            raise DatasetError(os.path.join(val, bad[0]), "is not a WordNet id folder (val/<wnid>/ with wnid like "
                                                          "n01440764)", SOURCE)
        for d in folders:
            imgs = sorted(f for f in os.listdir(os.path.join(val, d)) if is_image(f))
            if not imgs:
                raise DatasetError(os.path.join(val, d), "holds no images", SOURCE)
            pairs += [(f"{d}/{f}", d) for f in imgs]
        layout = "folders"
    elif files:
        lab = labels or os.path.join(root, "LOC_val_solution.csv")
        if not os.path.isfile(lab):
            raise DatasetError(lab, "not found: the flat val/*.JPEG layout needs its labels file (or pass --labels)",
                               SOURCE)
        by_stem = _labels_file(lab)
        unlabelled = [f for f in files if os.path.splitext(f)[0] not in by_stem]
        if unlabelled:
            raise DatasetError(os.path.join(val, unlabelled[0]), f"has no label in {lab} ({len(unlabelled)} images "
                                                                 "without one)", SOURCE)
        pairs = [(f, by_stem[os.path.splitext(f)[0]]) for f in files]
        layout = "flat"
    else:
        raise DatasetError(val, "holds neither class folders nor images", SOURCE)
    wnids = sorted({w for _, w in pairs})
    if synsets:
        names = _synsets(synsets)
    elif len(wnids) == 1000:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = dict(zip(wnids, IMAGENET_CLASSNAMES))     # open_clip's names are in sorted-wnid order
    else:
        path = os.path.join(root, "LOC_synset_mapping.txt")
        if not os.path.isfile(path):
            raise DatasetError(path, f"not found: {len(wnids)} classes are not the 1,000 ILSVRC ones, so their names "
                                     "must come from a 'wnid name' file (or pass --synsets)", SOURCE)
        names = _synsets(path)
    unnamed = [w for w in wnids if w not in names]
    if unnamed:
        raise DatasetError(synsets or os.path.join(root, "LOC_synset_mapping.txt"),
                           f"has no name for {unnamed[:5]}", SOURCE)
    index = {w: i for i, w in enumerate(wnids)}
    rows = [{"image_id": rel, "uri": os.path.join(val, rel), "label": index[w], "wnid": w} for rel, w in pairs]
    return {"root": root, "layout": layout, "rows": rows, "wnids": wnids, "class_names": [names[w] for w in wnids]}


def run(cfg: ImagenetAblationConfig) -> dict:
    """The experiment; returns ``{"rows", "table", "stores", "ablation", "files"}``."""
    from ..config import AblateConfig
    from ..query.jobs import run_ablate
    from .common import decompose, format_table, marker, resolve_models, write_inputs, write_results

    cfg.check_required()
    layout = validate(cfg.root, cfg.labels, cfg.synsets)
    mk = marker(layout["root"])
    specs = resolve_models(cfg, DEFAULT_MODELS)
    classes = cfg.class_names or layout["class_names"]
    if len(classes) != len(layout["wnids"]):
        raise OptionError("class_names", f"{len(classes)} names for {len(layout['wnids'])} classes")
    out = os.path.abspath(cfg.out)
    inputs = write_inputs(layout["rows"], os.path.join(out, "inputs", "imagenet-val.parquet"))
    res_rows, stores, ablation = [], {}, {}
    for s in specs:
        head = cfg.head or ("zeroshot" if s.is_clip else "model")
        log.info("imagenet-ablation: %s (%s), %s head, %d images", s.key, s.name, head, len(layout["rows"]))
        store = stores[s.key] = os.path.join(out, "stores", f"{s.key}-layers")
        decompose(cfg, s, inputs, store, heads=False, all_blocks=True)
        r = run_ablate(AblateConfig(store=store, out=os.path.join(out, "query", "imagenet-ablation", s.key),
                                    label_column="label", class_names=classes, head=head,
                                    checkpoint=s.checkpoint if head == "model" else None,
                                    clip_checkpoint=s.checkpoint if s.is_clip else None, order=cfg.order,
                                    kinds=["all", "attn", "mlp"], cache_dir=cfg.cache_dir))
        sm = ablation[s.key] = r["summary"]
        base, mlp = PUBLISHED.get(s.key, (None, None))
        res_rows += [row("imagenet-ablation", s.key, f"{head} accuracy", base, sm["baseline_accuracy"], mk,
                         "baseline_accuracy"),
                     row("imagenet-ablation", s.key, "accuracy, every MLP mean-ablated", mlp,
                         sm["all_ablated_accuracy"]["mlp"], mk, "mlp_ablated_accuracy"),
                     row("imagenet-ablation", s.key, "accuracy, every attention layer mean-ablated", None,
                         sm["all_ablated_accuracy"]["attn"], mk, "attn_ablated_accuracy")]
    files = write_results(out, "imagenet-ablation", res_rows, {"options": cfg.to_dict(), "layout": layout["layout"],
                                                               "classes": len(classes), "stores": stores,
                                                               "ablation": ablation})
    reports = {k: os.path.join(out, "query", "imagenet-ablation", k, "report.html") for k in stores}
    return {"rows": res_rows, "table": format_table(res_rows), "stores": stores, "reports": reports,
            "ablation": ablation, "files": files, "class_names": classes, "layout": layout["layout"]}
