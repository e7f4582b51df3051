"""Planted-truth images (README “The toy world”): an object with known shape, hue, texture, size and position on a
background scene, a caption built from those attributes, and Waterbirds-style splits.

The **label** is the object's hue family (0 = "warm", 1 = "cool") drawn from overlapping hue
ranges, so hue alone caps accuracy near 0.87 — learnable by a tiny ViT, but not perfectly (README “The toy world”:
a shape label is not learnable in the budget). The **spurious attribute** is the background
scene family (``water`` vs ``land``): in the training split it agrees with the label for a
fraction ``agreement`` of images (default 0.93); in validation and test it is independent of it.
Shape, texture, size and position are random nuisances. Everything is a pure function of the seed.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("plain", "striped", "dotted")
SIZES = ("small", "large")
SCENES = {"water": ("ocean", "lake"), "land": ("forest", "desert")}     # family → scenes
LABELS = ("warm", "cool")
# hue ranges (fractions of the colour wheel) per label; they overlap on [0.20, 0.30]
HUE_RANGES = {0: (-0.08, 0.30), 1: (0.20, 0.58)}
COLOR_NAMES = ((0.04, "red"), (0.10, "orange"), (0.19, "yellow"), (0.30, "lime"), (0.45, "green"),
               (0.55, "cyan"), (0.70, "blue"), (0.85, "purple"), (0.96, "pink"), (1.01, "red"))
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    size: int = 64
    n_train: int = 3000
    n_val: int = 600
    n_test: int = 600
    agreement: float = 0.93          # P(background family matches the label's) in train

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def color_name(hue: float) -> str:
    h = hue % 1.0
    return next(name for bound, name in COLOR_NAMES if h < bound)


def caption(a: dict) -> str:
    tex = "" if a["texture"] == "plain" else f"{a['texture']} "
    return f"a {a['size']} {a['color']} {tex}{a['shape']} on {a['scene']}"


def sample_attributes(cfg: WorldConfig) -> list[dict]:
    """Per-image attributes for every split (deterministic in ``cfg.seed``)."""
    rng = np.random.default_rng(cfg.seed)
    out = []
    for split, n in zip(SPLITS, (cfg.n_train, cfg.n_val, cfg.n_test)):
        for i in range(n):
            label = int(rng.integers(2))
            lo, hi = HUE_RANGES[label]
            hue = float(rng.uniform(lo, hi)) % 1.0
            if split == "train":
                family_label = label if rng.random() < cfg.agreement else 1 - label
            else:
                family_label = int(rng.integers(2))
            family = ("water", "land")[family_label]           # label 0 (warm) ↔ water in training
            scene = SCENES[family][int(rng.integers(2))]
            size = SIZES[int(rng.integers(2))]
            radius = cfg.size * (0.16 if size == "small" else 0.26)
            a = {
                "image_id": f"{split}/{i:05d}", "split": split, "label": label, "label_name": LABELS[label],
                "background": family, "scene": scene, "group": f"{LABELS[label]}_{family}",
                "shape": SHAPES[int(rng.integers(len(SHAPES)))], "texture": TEXTURES[int(rng.integers(3))],
                "size": size, "hue": hue, "color": color_name(hue),
                "sat": float(rng.uniform(0.65, 1.0)), "val": float(rng.uniform(0.7, 1.0)),
                "x": float(rng.uniform(radius, cfg.size - radius)), "y": float(rng.uniform(radius, cfg.size - radius)),
                "radius": radius, "angle": float(rng.uniform(0, 2 * math.pi)), "bg_seed": int(rng.integers(2**31)),
            }
            a["caption"] = caption(a)
            out.append(a)
    return out


def _background(scene: str, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0, 1, (size // 4 + 1, size // 4 + 1)).astype(np.float32)
    noise = np.kron(noise, np.ones((4, 4), np.float32))[:size, :size]
    phase = rng.uniform(0, 2 * np.pi)
    if scene == "ocean":
        waves = np.sin(2 * np.pi * (yy * 6 + 0.3 * np.sin(2 * np.pi * xx * 2 + phase)))
        base = np.stack([0.10 + 0.05 * waves, 0.30 + 0.08 * waves, 0.62 + 0.12 * waves], -1)
    elif scene == "lake":
        waves = np.sin(2 * np.pi * (yy * 10 + phase))
        base = np.stack([0.22 + 0.04 * waves, 0.42 + 0.05 * waves, 0.58 + 0.08 * waves], -1)
        base[: size // 5] = (0.55, 0.72, 0.90)                       # a strip of sky
    elif scene == "forest":
        base = np.stack([0.14 + 0.06 * noise, 0.36 + 0.10 * noise, 0.12 + 0.04 * noise], -1)
    else:  # desert
        dunes = np.sin(2 * np.pi * (yy * 3 + 0.2 * np.sin(2 * np.pi * xx + phase)))
        base = np.stack([0.72 + 0.06 * dunes, 0.58 + 0.05 * dunes, 0.36 + 0.04 * dunes], -1) + 0.02 * noise[..., None]
    return np.clip(base, 0, 1)


def _mask(a: dict, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy, r = xx - a["x"], yy - a["y"], a["radius"]
    c, s = math.cos(a["angle"]), math.sin(a["angle"])
    u, v = c * dx + s * dy, -s * dx + c * dy
    if a["shape"] == "circle":
        return dx * dx + dy * dy <= r * r
    if a["shape"] == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if a["shape"] == "cross":
        return ((np.abs(u) <= r) & (np.abs(v) <= r * 0.35)) | ((np.abs(v) <= r) & (np.abs(u) <= r * 0.35))
    # triangle: three half-planes
    inside = np.ones_like(u, bool)
    for k in range(3):
        t = a["angle"] + k * 2 * math.pi / 3
        inside &= (np.cos(t) * dx + np.sin(t) * dy) <= r * 0.5
    return inside


def render(a: dict, size: int = 64) -> np.ndarray:
    """The image of one attribute record, ``uint8 [size, size, 3]``."""
    img = _background(a["scene"], size, a["bg_seed"])
    m = _mask(a, size)
    rgb = np.array(colorsys.hsv_to_rgb(a["hue"], a["sat"], a["val"]), np.float32)
    obj = np.broadcast_to(rgb, img.shape).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    if a["texture"] == "striped":
        obj[((xx + yy) // 3) % 2 == 0] *= 0.45
    elif a["texture"] == "dotted":
        obj[((xx % 5) < 2) & ((yy % 5) < 2)] = (0.95, 0.95, 0.95)
    img[m] = obj[m]
    return (img * 255 + 0.5).astype(np.uint8)


def generate(out_dir: str, cfg: WorldConfig = WorldConfig()) -> str:
    """Write the world under ``out_dir`` (images/<split>/<i>.png + metadata.parquet); return the
    metadata path. Idempotent: an existing complete world with the same config is reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    meta_path = os.path.join(out_dir, "metadata.parquet")
    stamp = os.path.join(out_dir, "WORLD")
    if os.path.exists(meta_path) and os.path.exists(stamp) and open(stamp).read() == cfg.key():
        return meta_path
    attrs = sample_attributes(cfg)
    for a in attrs:
        path = os.path.join(out_dir, "images", a["image_id"] + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(render(a, cfg.size)).save(path)
        a["uri"] = os.path.abspath(path)
    cols = ["image_id", "uri", "split", "label", "label_name", "background", "scene", "group", "shape", "texture",
            "size", "color", "hue", "x", "y", "caption"]
    pq.write_table(pa.Table.from_pylist([{c: a[c] for c in cols} for a in attrs]), meta_path)
    with open(stamp, "w") as f:
        f.write(cfg.key())
    return meta_path


def load_metadata(out_dir: str, split: Optional[str] = None):
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(out_dir, "metadata.parquet"))
    if split is not None:
        import pyarrow.compute as pc

        t = t.filter(pc.equal(t.column("split"), split))
    return t


def vocabulary_pool() -> list[str]:
    """Descriptions built from the world's own vocabulary (the demo's TextSpan pool)."""
    colors = list(dict.fromkeys(name for _, name in COLOR_NAMES))
    scenes = [s for fam in SCENES.values() for s in fam]
    out = [f"a {c} {s}" for c in colors for s in SHAPES]
    out += [f"a {t} {s}" for t in TEXTURES if t != "plain" for s in SHAPES]
    out += [f"a {z} {s}" for z in SIZES for s in SHAPES]
    out += [f"a shape on {sc}" for sc in scenes] + [f"{c} color" for c in colors]
    out += [f"{t} texture" for t in TEXTURES] + ["water", "land", "a warm color", "a cool color"]
    return list(dict.fromkeys(out))


def object_mask(record: dict, size: int = 64) -> np.ndarray:
    """The object's foreground mask of one attribute record, ``bool [size, size]`` (exactly the
    pixels :func:`render` paints with the object)."""
    return _mask(record, size)


def write_masks(world_dir: str, cfg: WorldConfig = WorldConfig(), split: Optional[str] = None,
                out_dir: Optional[str] = None) -> str:
    """Write every image's object mask as ``<out_dir>/<image_id>.png`` (0/255, ``L`` mode, the image's
    size; ``out_dir`` defaults to ``<world_dir>/masks``) and return ``out_dir`` (``vitdecomp query
    heatmap --masks-dir``).

    The attribute records are regenerated from ``cfg`` (the metadata table lacks the radius and
    angle), so ``cfg`` must be the config the world was generated with: its key is checked against
    the world's stamp. Images, metadata and config hashes are untouched.
    """
    from PIL import Image

    stamp = os.path.join(world_dir, "WORLD")
    if not os.path.exists(stamp):
        raise FileNotFoundError(f"{world_dir} is not a generated toy world (no WORLD stamp); run generate() first")
    with open(stamp) as f:
        key = f.read().strip()
    if key != cfg.key():
        raise ValueError(f"{world_dir} was generated with another WorldConfig (key {key}, given {cfg.key()}); "
                         "pass the config the world was generated with")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = out_dir or os.path.join(world_dir, "masks")
    for a in sample_attributes(cfg):
        if split is not None and a["split"] != split:
            continue
        path = os.path.join(out, a["image_id"] + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray((object_mask(a, cfg.size) * 255).astype(np.uint8), "L").save(path)
    return out
