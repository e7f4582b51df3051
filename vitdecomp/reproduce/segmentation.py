"""``vitdecomp reproduce segmentation``: zero-shot segmentation from token heatmaps against binary masks
(published, pixAcc / mIoU / mAP: DeiT-B .7719/.5291/.8305; CLIP ViT-L/14 heads 75.21/54.50/81.61).

Layouts: ``<root>/images/<name>.<ext>`` and ``<root>/masks/<name>.png`` (same stem, the image's size,
nonzero = object), or the ImageNet-segmentation benchmark (Guillaumin et al., 2014; 4,276 images) as
distributed, one MATLAB v7.3 (HDF5) file ``<root>/gtsegs_ijcv.mat`` — converted into the first
layout under ``<out>/inputs/`` (needs h5py), indexed as the benchmark's public readers do.
Per model: decompose (the published component set) → ``query heatmap`` over every image with the
masks: the token maps of the attention layers of the last ``--last-layers`` decomposed blocks
(``--components`` to choose), projected on each image's predicted class (classifiers) or on a text
(CLIP: ``--text``), min–max normalised and thresholded at their mean. pixAcc and mIoU are pooled over
all pixels of the dataset, mAP is the mean over images of the foreground/background AP mean.
"""
from __future__ import annotations

import logging
import os

from ..config import OptionError
from ..errors import InputError
from .common import DatasetError, is_image, row
from .config import SegmentationConfig

log = logging.getLogger(__name__)

SOURCE = ("ImageNet-segmentation (Guillaumin et al., 2014, “ImageNet Auto-annotation with Segmentation "
          "Propagation”; 4,276 images with binary masks) is distributed as one MATLAB file, gtsegs_ijcv.mat, with "
          "the transformer-explainability benchmarks: put it in --root; any other dataset of images and binary masks "
          "works "
          "as <root>/images/<name>.<ext> and <root>/masks/<name>.png (same name, the image's size, nonzero = object)")
DEFAULT_MODELS = ("deit_b",)
PUBLISHED = {"deit_b": (0.7719, 0.5291, 0.8305), "clip_l14": (0.7521, 0.5450, 0.8161)}
CLIP_TEXT = "an object"
MAT = "gtsegs_ijcv.mat"


def validate(root: str, limit=None) -> dict:
    """Check ``images/`` and ``masks/`` before any work (every image has a mask of its size); returns
    ``{"root", "rows", "masks"}`` with rows ``image_id`` (the stem), ``uri``."""
    from PIL import Image

    root = os.path.abspath(os.path.expanduser(root))
    images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
    mat = os.path.join(root, MAT)
    if not os.path.isdir(images) and os.path.isfile(mat):
        return {"root": root, "mat": mat, "count": _check_mat(mat)}
    if not os.path.isdir(images):
        raise DatasetError(images, f"not found (expected the images of an images/ + masks/ segmentation dataset, or "
                                   f"the ImageNet-segmentation file {mat})", SOURCE)
    if not os.path.isdir(masks):
        raise DatasetError(masks, "not found (expected one binary mask PNG per image, named like the image)", SOURCE)
    files = sorted(f for f in os.listdir(images) if is_image(f))[:limit]
    if not files:
        raise DatasetError(images, "holds no images", SOURCE)
    stems = [os.path.splitext(f)[0] for f in files]
    if len(set(stems)) != len(stems):
        raise DatasetError(images, "holds two images with the same name and different extensions", SOURCE)
    rows = []
    for f, stem in zip(files, stems):
        mpath = os.path.join(masks, stem + ".png")
        if not os.path.isfile(mpath):
            raise DatasetError(mpath, f"not found (the mask of images/{f})", SOURCE)
        with Image.open(os.path.join(images, f)) as im, Image.open(mpath) as mk:
            if im.size != mk.size:
                raise DatasetError(mpath, f"is {mk.size[0]}x{mk.size[1]} but images/{f} is {im.size[0]}x{im.size[1]}: "
                                          "a mask must have its image's size", SOURCE)
        rows.append({"image_id": stem, "uri": os.path.join(images, f)})
    return {"root": root, "rows": rows, "masks": masks}


def _h5py():
    try:
        import h5py
    except ImportError:
        raise InputError(f"reading {MAT} (HDF5) needs h5py: pip install h5py (or vitdecomp[reproduce])") from None
    return h5py


def _check_mat(path: str) -> int:
    """The number of image/mask pairs in ``gtsegs_ijcv.mat`` (``/value/img``, ``/value/gt``: [N, 1] references)."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            if "value/img" not in f or "value/gt" not in f:
                raise DatasetError(path, f"lacks /value/img or /value/gt (has {list(f.get('value', f).keys())[:5]})",
                                   SOURCE)
            n, m = f["value/img"].shape[0], f["value/gt"].shape[0]
    except OSError as e:
        raise DatasetError(path, f"is not an HDF5 (MATLAB v7.3) file: {e}", SOURCE) from None
    if n != m or n == 0:
        raise DatasetError(path, f"holds {n} images and {m} masks", SOURCE)
    return n


def convert_mat(path: str, dest: str, limit=None) -> str:
    """Write the pairs of ``gtsegs_ijcv.mat`` as ``dest/images/<i>.png`` and ``dest/masks/<i>.png`` (0/255),
    indexed as the benchmark's public readers do: image ``f[img[i, 0]]`` transposed (2, 1, 0), mask
    ``f[f[gt[i, 0]][0, 0]]`` transposed (1, 0). Reused when already converted from the same file."""
    import numpy as np
    from PIL import Image

    h5py = _h5py()
    st = os.stat(path)
    stamp = os.path.join(dest, "CONVERTED")
    key = f"{os.path.abspath(path)} {st.st_size} {st.st_mtime_ns} {limit}"
    if os.path.isfile(stamp) and open(stamp).read() == key:
        return dest
    os.makedirs(os.path.join(dest, "images"), exist_ok=True)
    os.makedirs(os.path.join(dest, "masks"), exist_ok=True)
    with h5py.File(path, "r") as f:
        n = f["value/img"].shape[0] if limit is None else min(limit, f["value/img"].shape[0])
        width = len(str(n - 1))
        for i in range(n):
            img = np.array(f[f["value/img"][i, 0]]).transpose((2, 1, 0))
            gt = np.array(f[f[f["value/gt"][i, 0]][0, 0]]).transpose((1, 0))
            name = f"{i:0{width}d}.png"
            Image.fromarray(img.astype(np.uint8)).convert("RGB").save(os.path.join(dest, "images", name))
            Image.fromarray(((gt > 0) * 255).astype(np.uint8), "L").save(os.path.join(dest, "masks", name))
    with open(stamp, "w") as fh:
        fh.write(key)
    log.info("converted %d image/mask pairs of %s into %s", n, path, dest)
    return dest


def default_components(store: str, last_layers: int) -> list[str]:
    """The attention layers of the store's last ``last_layers`` decomposed blocks."""
    from ..store import open_store

    comps = open_store(store).components
    paths = {}
    for c in comps:
        if c.kind == "head" and c.block is not None:
            paths.setdefault(c.block, c.name.rsplit(".head.", 1)[0])
    if not paths:
        raise OptionError("components", f"{store} has no attention heads to map; name the components")
    return [paths[b] for b in sorted(paths)[-last_layers:]]


def run(cfg: SegmentationConfig) -> dict:
    """The experiment; returns ``{"rows", "table", "stores", "segmentation", "files"}``."""
    from ..config import HeatmapConfig
    from ..query.heatmap_job import run_heatmap
    from .common import decompose, format_table, marker, resolve_models, write_inputs, write_results

    cfg.check_required()
    layout = validate(cfg.root, cfg.limit)
    mk = marker(layout["root"])
    specs = resolve_models(cfg, DEFAULT_MODELS)
    out = os.path.abspath(cfg.out)
    if "mat" in layout:                 # the benchmark's single file: converted into images/ + masks/ first
        layout = validate(convert_mat(layout["mat"], os.path.join(out, "inputs", "imagenet-segmentation"),
                                      cfg.limit))
    inputs = write_inputs(layout["rows"], os.path.join(out, "inputs", "segmentation.parquet"))
    ids = [r["image_id"] for r in layout["rows"]]
    res_rows, stores, seg = [], {}, {}
    for s in specs:
        store = stores[s.key] = os.path.join(out, "stores", s.key)
        decompose(cfg, s, inputs, store)
        comps = list(cfg.components) if cfg.components else default_components(store, cfg.last_layers)
        if cfg.class_index is not None or (not s.is_clip and not cfg.text):
            target = {"class_index": cfg.class_index or "pred"}
        else:
            target = {"text": cfg.text or (mk or {}).get("reproduce", {}).get("text") or CLIP_TEXT}
        log.info("segmentation: %s, %s on %s, %d images", s.key, " + ".join(comps), target, len(ids))
        r = run_heatmap(HeatmapConfig(store=store, out=os.path.join(out, "query", "segmentation", s.key),
                                      components=comps, image_ids=ids, masks_dir=layout["masks"],
                                      checkpoint=s.checkpoint, clip_checkpoint=s.checkpoint if s.is_clip else None,
                                      cache_dir=cfg.cache_dir, batch_size=cfg.batch_size,
                                      device=cfg.device, **target))
        sm = seg[s.key] = {**r["summary"], "components": comps, "target": r["target"]}
        pix, miou, mapv = PUBLISHED.get(s.key, (None, None, None))
        res_rows += [row("segmentation", s.key, "pixAcc (pooled)", pix, sm["pooled_pixacc"], mk, "pixacc"),
                     row("segmentation", s.key, "mIoU (pooled)", miou, sm["pooled_miou"], mk, "miou"),
                     row("segmentation", s.key, "mAP (mean over images)", mapv, sm["mean_map"], mk, "map")]
    files = write_results(out, "segmentation", res_rows, {"options": cfg.to_dict(), "stores": stores,
                                                          "segmentation": seg})
    reports = {k: os.path.join(out, "query", "segmentation", k, "report.html") for k in stores}
    return {"rows": res_rows, "table": format_table(res_rows), "stores": stores, "reports": reports,
            "segmentation": seg, "files": files}
