"""``vitdecomp reproduce waterbirds``: spurious-feature mitigation on the Waterbirds release.

Per model: decompose every image (the published component set; a CLIP teacher column for non-CLIP
models) → CompAlign into the teacher's space (non-CLIP models, unless ``--aligner``) → ``query
mitigate`` with the published settings: score_k = CompAttribute(Waterbirds spurious) −
CompAttribute(Waterbirds core), the top k = 10 mean-ablated, groups = (y, place); ``--protocol
heldout`` (default) chooses components and means on the validation split (1) and measures on the test
split (2); ``same-pool`` does everything on the test split, as the published numbers did.
"""
from __future__ import annotations

import csv
import logging
import os

from ..config import OptionError
from .common import TEACHER, DatasetError, row
from .config import WaterbirdsConfig

log = logging.getLogger(__name__)

SOURCE = ("Waterbirds (Sagawa et al., 2020, “Distributionally Robust Neural Networks”) is distributed by the "
          "Group DRO authors (github.com/kohpangwei/group_DRO, the archive waterbird_complete95_forest2water2) and "
          "through the WILDS package (dataset 'waterbirds'); unpack it and pass the folder that holds metadata.csv "
          "and one sub-folder per bird species as --root")
COLUMNS = ("img_id", "img_filename", "y", "split", "place")
SPLITS = {0: "train", 1: "val", 2: "test"}
DEFAULT_MODELS = ("deit_b", "clip_b16", "dino_b", "dinov2_b", "swin_b", "maxvit_s")
# worst-group accuracy before → after mitigation (top 10 by CompAttribute, same-pool protocol)
PUBLISHED = {"deit_b": (0.733, 0.815), "clip_b16": (0.507, 0.744), "dino_b": (0.800, 0.911),
             "dinov2_b": (0.967, 0.978), "swin_b": (0.834, 0.871), "maxvit_s": (0.777, 0.814)}
CLASS_NAMES = ["landbird", "waterbird"]


def validate(root: str) -> dict:
    """Check the release layout before any work: ``metadata.csv`` (or ``waterbird_complete95_forest2water2/
    metadata.csv`` under ``root``) with the release's columns and codes, and every image it lists.
    Returns ``{"root", "metadata", "rows"}`` (rows with ``uri`` and the split's name)."""
    root = os.path.abspath(os.path.expanduser(root))
    meta = os.path.join(root, "metadata.csv")
    nested = os.path.join(root, "waterbird_complete95_forest2water2", "metadata.csv")
    if not os.path.isfile(meta) and os.path.isfile(nested):
        root, meta = os.path.dirname(nested), nested
    if not os.path.isdir(root):
        raise DatasetError(root, "no such folder (expected the Waterbirds release with metadata.csv in it)", SOURCE)
    if not os.path.isfile(meta):
        raise DatasetError(meta, "not found (the Waterbirds release's metadata table: img_id, img_filename, y, "
                                 "split, place)", SOURCE)
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(meta, f"lacks the columns {missing} (has {reader.fieldnames}); the release's "
                                     f"metadata.csv has {', '.join(COLUMNS)}", SOURCE)
        raw = list(reader)
    if not raw:
        raise DatasetError(meta, "has no rows", SOURCE)
    rows, absent = [], []
    for i, r in enumerate(raw, 2):
        try:
            y, split, place = int(r["y"]), int(r["split"]), int(r["place"])
        except ValueError:
            raise DatasetError(meta, f"line {i}: y, split and place must be whole numbers, got "
                                     f"{r['y']!r}, {r['split']!r}, {r['place']!r}", SOURCE) from None
        if split not in SPLITS or y not in (0, 1) or place not in (0, 1):
            raise DatasetError(meta, f"line {i}: split must be 0/1/2 (train/val/test), y and place 0 or 1; got "
                                     f"split={split}, y={y}, place={place}", SOURCE)
        path = os.path.join(root, r["img_filename"])
        if not os.path.isfile(path):
            absent.append(path)
        rows.append({"image_id": r["img_filename"], "uri": path, "img_id": str(r["img_id"]), "y": y,
                     "place": place, "split": SPLITS[split], "group": f"y{y}_place{place}"})
    if absent:
        raise DatasetError(absent[0], f"not found ({len(absent)} of the {len(rows)} images metadata.csv lists are "
                                      "missing; the first is shown)", SOURCE)
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DatasetError(meta, "lists an img_filename twice", SOURCE)
    for code, name in ((1, "val"), (2, "test")):
        if not any(r["split"] == name for r in rows):
            raise DatasetError(meta, f"has no {name} rows (split {code})", SOURCE)
    return {"root": root, "metadata": meta, "rows": rows}


def run(cfg: WaterbirdsConfig) -> dict:
    """The experiment; returns ``{"rows", "table", "stores", "mitigation", "files"}``."""
    from ..config import CompAlignConfig, MitigateConfig
    from ..fit.jobs import run_compalign
    from ..query.compattribute import named_properties
    from ..query.jobs import run_mitigate
    from .common import decompose, format_table, marker, resolve_models, write_inputs, write_properties, \
        write_results

    cfg.check_required()
    layout = validate(cfg.root)                                   # the dataset first: nothing runs without it
    mk = marker(layout["root"])
    specs = resolve_models(cfg, DEFAULT_MODELS)
    out = os.path.abspath(cfg.out)
    props = write_properties(mk, out, cfg.properties)
    toy = (mk or {}).get("reproduce", {})
    spurious = cfg.spurious if cfg.spurious != WaterbirdsConfig.spurious or not toy else toy["spurious"]
    core = cfg.core if cfg.core != WaterbirdsConfig.core or not toy else toy["core"]
    classes = cfg.class_names or toy.get("class_names") or CLASS_NAMES
    if cfg.ranking == "compattribute":
        known = named_properties(props)
        for opt, p in (("spurious", spurious), ("core", core)):
            if p not in known:
                raise OptionError(opt, f"unknown property {p!r}; known: {sorted(known)}")
    if cfg.aligner and len(specs) != 1:
        raise OptionError("aligner", "an aligner belongs to one model: pass --model")
    teachers = {}
    # a CLIP space (teacher + CompAlign) is needed by CompAttribute and by the zero-shot head
    needs_space = cfg.ranking == "compattribute" or cfg.head in (None, "zeroshot")
    for s in specs:
        if s.is_clip or cfg.aligner or not needs_space:
            continue
        t_name = cfg.teacher or TEACHER[0]
        t_tag = cfg.teacher_pretrained or (TEACHER[1] if (cfg.pretrained and t_name == TEACHER[0]
                                                          and not cfg.teacher_checkpoint) else None)
        if not (t_tag or cfg.teacher_checkpoint):
            raise OptionError("teacher", f"{s.key} is not a CLIP: CompAttribute needs its components in a CLIP space, "
                                         "fitted against a CLIP teacher (--pretrained uses the published "
                                         f"{TEACHER[0]} {TEACHER[1]}; else --teacher with --teacher-checkpoint or "
                                         "--teacher-pretrained), or a fitted --aligner")
        teachers[s.key] = (t_name, t_tag, cfg.teacher_checkpoint)

    inputs = write_inputs(layout["rows"], os.path.join(out, "inputs", "waterbirds.parquet"))
    res_rows, stores, mitigation = [], {}, {}
    fit, evl = (["val"], ["test"]) if cfg.protocol == "heldout" else (None, ["test"])
    for s in specs:
        log.info("waterbirds: %s (%s)", s.key, s.name)
        store = stores[s.key] = os.path.join(out, "stores", s.key)
        decompose(cfg, s, inputs, store, teacher=teachers.get(s.key))
        aligner = cfg.aligner
        if s.key in teachers:
            aligner = os.path.join(out, "fit", f"{s.key}-compalign")
            run_compalign(CompAlignConfig(store=store, out=aligner, max_epochs=cfg.align_epochs, lr=cfg.align_lr,
                                          seed=cfg.seed))
        clip_ck = s.checkpoint if s.is_clip else teachers.get(s.key, (None, None, None))[2]
        r = run_mitigate(MitigateConfig(
            store=store, out=os.path.join(out, "query", "waterbirds", s.key), label_column="y", group_column="place",
            class_names=classes, head=cfg.head, checkpoint=s.checkpoint if cfg.head == "model" else None,
            aligner=aligner, properties=props, spurious=spurious, core=core, k=cfg.k, ranking=cfg.ranking,
            score=cfg.score, protocol=cfg.protocol, split_column="split", fit_split=fit, eval_split=evl,
            random_draws=cfg.random_draws, seed=cfg.seed, clip_checkpoint=clip_ck, cache_dir=cfg.cache_dir))
        sm = mitigation[s.key] = r["summary"]
        before, after = PUBLISHED.get(s.key, (None, None))
        res_rows += [row("waterbirds", s.key, "worst-group accuracy, before", before, sm["worst_group"]["before"], mk,
                         "worst_group_before"),
                     row("waterbirds", s.key, f"worst-group accuracy, top {cfg.k} ablated ({cfg.protocol})", after,
                         sm["worst_group"]["after"], mk, "worst_group_after"),
                     row("waterbirds", s.key, "mean-group accuracy, before", None, sm["mean_group"]["before"], mk,
                         "mean_group_before"),
                     row("waterbirds", s.key, f"mean-group accuracy, top {cfg.k} ablated ({cfg.protocol})", None,
                         sm["mean_group"]["after"], mk, "mean_group_after")]
    files = write_results(out, "waterbirds", res_rows, {"options": cfg.to_dict(), "protocol": cfg.protocol,
                                                        "stores": stores, "mitigation": mitigation})
    reports = {k: os.path.join(out, "query", "waterbirds", k, "report.html") for k in stores}
    return {"rows": res_rows, "table": format_table(res_rows), "stores": stores, "reports": reports,
            "mitigation": mitigation, "files": files, "properties": props, "spurious": spurious, "core": core,
            "class_names": classes}

