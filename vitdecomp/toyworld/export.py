"""The toy world exported in the layouts of the real datasets, so ``vitdecomp reproduce`` runs on it
exactly as on the real data (README “Reproduce the published experiments”).

- :func:`export_waterbirds` — the Waterbirds release layout (``waterbird_complete95_forest2water2``):
  ``metadata.csv`` with ``img_id, img_filename, y, split, place, place_filename``; splits 0/1/2 =
  train/val/test; images as ``<NNN.class>/<name>.jpg``. ``y`` is the world's label (0 warm, 1 cool),
  ``place`` its background family (1 water, 0 land, as in the release); in the training split warm
  goes with water (the planted spurious cue).
- :func:`export_imagenet` — an ImageNet-style validation folder, ``val/<wnid>/*.JPEG`` (or the flat
  ``val/*.JPEG`` with ``LOC_val_solution.csv``, the Kaggle release's labels file), whose classes are
  one world attribute (default: the scene), with ``LOC_synset_mapping.txt`` (``wnid name`` per line).
- :func:`export_segmentation` — ``images/<id>.png`` and ``masks/<id>.png`` (binary, 0/255, the image's
  size; the object's exact pixels); :func:`export_imagenet_segmentation` — the same as the
  ImageNet-segmentation benchmark's single file ``gtsegs_ijcv.mat`` (HDF5; needs h5py).

Every export also writes ``vitdecomp-toyworld.json``: the world config, the properties the tiny
CLIP knows (the demo's world properties), the reproduce options that fit the toy models and the
planted-truth expectations shown in place of published numbers.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np

from .generate import SPLITS, WorldConfig, object_mask, render, sample_attributes

MARKER = "vitdecomp-toyworld.json"
WATERBIRDS_DIR = "waterbird_complete95_forest2water2"
WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
PLACE_CODES = {"land": 0, "water": 1}
# attributes that can be the classes of the ImageNet-style export, with their values in a fixed order
IMAGENET_ATTRIBUTES = {"scene": ("ocean", "lake", "forest", "desert"), "label_name": ("warm", "cool"),
                       "shape": ("circle", "square", "triangle", "cross"), "texture": ("plain", "striped", "dotted")}


def wnid(i: int) -> str:
    """The synthetic WordNet-style id of the toy class ``i`` (``n90000000`` + i; no real synset uses it)."""
    return f"n{90000000 + i:08d}"


def _records(cfg: WorldConfig, splits: Sequence[str]) -> list[dict]:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"splits {bad} are not world splits; use some of {SPLITS}")
    return [a for a in sample_attributes(cfg) if a["split"] in splits]


def _save(img: np.ndarray, path: str, fmt: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}      # 4:4:4: thin stripes survive
    Image.fromarray(img).save(path, fmt, **kw)


def _marker(out_dir: str, kind: str, cfg: WorldConfig, extra: dict) -> str:
    from .demo import WORLD_PROPERTIES

    path = os.path.join(out_dir, MARKER)
    with open(path, "w") as f:
        json.dump({"kind": kind, "world": asdict(cfg), "world_key": cfg.key(), "properties": WORLD_PROPERTIES,
                   **extra}, f, indent=2)
    return path


def export_waterbirds(out_dir: str, cfg: WorldConfig = WorldConfig()) -> str:
    """Write the world as the Waterbirds release (every split) under ``out_dir``; return ``out_dir``.

    Images are JPEG (quality 95, no chroma subsampling) as in the release, so the pixels differ slightly
    from the world's PNGs.
    """
    recs = _records(cfg, SPLITS)
    rows = []
    for i, a in enumerate(recs, 1):
        folder = f"{a['label'] + 1:03d}.{a['label_name'].capitalize()}_{a['shape'].capitalize()}"
        name = f"{folder}/{a['label_name'].capitalize()}_{a['shape'].capitalize()}_{i:05d}.jpg"
        _save(render(a, cfg.size), os.path.join(out_dir, name), "JPEG")
        scene = a["scene"]
        rows.append({"img_id": i, "img_filename": name, "y": a["label"], "split": SPLIT_CODES[a["split"]],
                     "place": PLACE_CODES[a["background"]], "place_filename": f"/{scene[0]}/{scene}/{i:08d}.jpg"})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(WATERBIRDS_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    _marker(out_dir, "waterbirds", cfg, {
        "reproduce": {"spurious": "world background", "core": "world color", "class_names": ["warm", "cool"]},
        "expected": {"worst_group_before": "below the mean group (the planted background cue)",
                     "worst_group_after": "above the worst group before"}})
    return out_dir


def export_imagenet(out_dir: str, cfg: WorldConfig = WorldConfig(), attribute: str = "scene",
                    splits: Sequence[str] = ("val", "test"), layout: str = "folders") -> str:
    """Write the world's ``splits`` as an ImageNet-style validation set whose classes are ``attribute``'s
    values: ``val/<wnid>/<name>.JPEG`` (``layout="folders"``) or ``val/<name>.JPEG`` with
    ``LOC_val_solution.csv`` (``layout="flat"``; ``ImageId,PredictionString`` = wnid and the object's
    box), plus ``LOC_synset_mapping.txt``. Returns ``out_dir``."""
    if attribute not in IMAGENET_ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r} cannot be the classes; use one of {sorted(IMAGENET_ATTRIBUTES)}")
    if layout not in ("folders", "flat"):
        raise ValueError(f"layout must be 'folders' or 'flat', got {layout!r}")
    values = IMAGENET_ATTRIBUTES[attribute]
    ids = {v: wnid(i) for i, v in enumerate(values)}
    solution = []
    for i, a in enumerate(_records(cfg, splits), 1):
        stem = f"toyworld_val_{i:08d}"
        w = ids[a[attribute]]
        rel = f"val/{w}/{stem}.JPEG" if layout == "folders" else f"val/{stem}.JPEG"
        _save(render(a, cfg.size), os.path.join(out_dir, rel), "JPEG")
        ys, xs = np.nonzero(object_mask(a, cfg.size))
        solution.append((stem, f"{w} {xs.min()} {ys.min()} {xs.max()} {ys.max()}"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{ids[v]} {v}\n" for v in values)
    if layout == "flat":
        with open(os.path.join(out_dir, "LOC_val_solution.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            w.writerows(solution)
    _marker(out_dir, "imagenet", cfg, {
        "attribute": attribute, "classes": {ids[v]: v for v in values},
        "expected": {"baseline_accuracy": f"above chance ({1 / len(values):.2f})", "mlp_ablated_accuracy": "—"}})
    return out_dir


def export_segmentation(out_dir: str, cfg: WorldConfig = WorldConfig(), splits: Sequence[str] = ("test",),
                        limit: Optional[int] = None) -> str:
    """Write the world's ``splits`` (the first ``limit`` images) as ``images/<id>.png`` with the
    object's binary mask ``masks/<id>.png`` (0/255, ``L`` mode, the image's size). Returns ``out_dir``."""
    from PIL import Image

    recs = _records(cfg, splits)[:limit]
    fg = []
    for a in recs:
        stem = a["image_id"].replace("/", "_")
        _save(render(a, cfg.size), os.path.join(out_dir, "images", stem + ".png"), "PNG")
        m = object_mask(a, cfg.size)
        fg.append(float(m.mean()))
        os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
        Image.fromarray((m * 255).astype(np.uint8), "L").save(os.path.join(out_dir, "masks", stem + ".png"))
    chance = 1.0 - float(np.mean(fg)) if fg else None
    _marker(out_dir, "segmentation", cfg, {
        "foreground_fraction": None if chance is None else 1.0 - chance,
        "reproduce": {"text": "a shape"},
        "expected": {"pixacc": f"— (an all-background map: {chance:.2f})" if chance is not None else "—",
                     "miou": "—", "map": "above 0.5 (a map unrelated to the object)"}})
    return out_dir


SEG_MAT = "gtsegs_ijcv.mat"


def export_imagenet_segmentation(out_dir: str, cfg: WorldConfig = WorldConfig(), splits: Sequence[str] = ("test",),
                                 limit: Optional[int] = None) -> str:
    """Write the world's ``splits`` as the ImageNet-segmentation benchmark file ``out_dir/gtsegs_ijcv.mat``
    (MATLAB v7.3 = HDF5, the layout its public readers index): ``/value/img`` and ``/value/gt`` are
    ``[N, 1]`` object references; ``f[img[i, 0]]`` is the image stored ``[3, W, H]`` uint8 (read back
    with ``.transpose(2, 1, 0)``); ``f[gt[i, 0]]`` is a ``[1, 1]`` reference to the mask stored
    ``[W, H]`` uint8, 0/1 (read back with ``.transpose(1, 0)``). Returns ``out_dir``."""
    import h5py

    recs = _records(cfg, splits)[:limit]
    os.makedirs(out_dir, exist_ok=True)
    with h5py.File(os.path.join(out_dir, SEG_MAT), "w") as f:
        refs = f.create_group("#refs#")
        ref_dt = h5py.special_dtype(ref=h5py.Reference)
        img = f.create_dataset("value/img", (len(recs), 1), dtype=ref_dt)
        gt = f.create_dataset("value/gt", (len(recs), 1), dtype=ref_dt)
        for i, a in enumerate(recs):
            im = refs.create_dataset(f"img{i}", data=render(a, cfg.size).transpose(2, 1, 0))
            mk = refs.create_dataset(f"mask{i}", data=object_mask(a, cfg.size).astype(np.uint8).transpose(1, 0))
            cell = refs.create_dataset(f"gt{i}", (1, 1), dtype=ref_dt)
            cell[0, 0] = mk.ref
            img[i, 0], gt[i, 0] = im.ref, cell.ref
    fg = [float(object_mask(a, cfg.size).mean()) for a in recs]
    chance = 1.0 - float(np.mean(fg)) if fg else None
    _marker(out_dir, "segmentation", cfg, {
        "foreground_fraction": None if chance is None else 1.0 - chance, "reproduce": {"text": "a shape"},
        "expected": {"pixacc": f"— (an all-background map: {chance:.2f})" if chance is not None else "—",
                     "miou": "—", "map": "above 0.5 (a map unrelated to the object)"}})
    return out_dir


def read_marker(root: str) -> Optional[dict]:
    """The toy-world marker of an exported folder (``None`` for real data)."""
    path = os.path.join(root, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
