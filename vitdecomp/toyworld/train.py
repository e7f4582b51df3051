"""Train the toy world's tiny models on 2 CPU cores (seeded, cached by content hash, safetensors).

- the tiny **classifier** (``timm:vitdecomp_toy_vit``) learns the hue-family label on the training
  split, where the background agrees with the label for ``agreement`` of the images;
- the tiny **CLIP** (``open_clip:vitdecomp-toy-clip``) is trained contrastively on the captions.

Both are reloaded through ``vitdecomp.load_model(name, checkpoint=path)`` like any other checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .generate import load_metadata
from .registry import TOY_CLIP, TOY_VIT

log = logging.getLogger(__name__)
TRAIN_VERSION = 1          # bump when the training code changes what it produces


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    classifier_epochs: int = 12
    clip_epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    max_train: Optional[int] = None     # cap on training images (tests)


def load_images(world_dir: str, split: str, transform: Callable, limit: Optional[int] = None):
    """Preprocessed images of one split with their metadata rows."""
    from PIL import Image

    meta = load_metadata(world_dir, split)
    if limit is not None:
        meta = meta.slice(0, limit)
    rows = meta.to_pylist()
    x = torch.stack([transform(Image.open(r["uri"]).convert("RGB")) for r in rows])
    return x, rows


def _trainable(name: str, world_dir: str, cfg: TrainConfig):
    """A freshly seeded model in training mode with gradients on, and the training split for it."""
    from ..models import load_model

    lm = load_model(name, seed=cfg.seed)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    x, rows = load_images(world_dir, "train", lm.transform, cfg.max_train)
    return lm, lm.model.train(), x, rows


def _progress(what: str, epoch: int, epochs: int, t0: float, **metrics) -> None:
    m = " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
    log.info("%s epoch %d/%d %s (%.0f s)", what, epoch, epochs, m, time.time() - t0)


def _schedule(opt, total_steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=total_steps,
                                               pct_start=0.1)


def train_classifier(world_dir: str, out_path: str, cfg: TrainConfig = TrainConfig()) -> dict:
    lm, model, x, rows = _trainable(TOY_VIT, world_dir, cfg)
    y = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.classifier_epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    sched = _schedule(opt, steps)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for epoch in range(cfg.classifier_epochs):
        perm = torch.randperm(len(x), generator=g)
        correct, total = 0, 0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            logits = model(xb)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(-1) == y[idx]).sum())
            total += len(idx)
        _progress("classifier", epoch + 1, cfg.classifier_epochs, t0, loss=float(loss.detach()), train_acc=correct / total)
    model.eval()
    _save(model, out_path)
    return {"train_acc": correct / total, "seconds": time.time() - t0}


def train_clip(world_dir: str, out_path: str, cfg: TrainConfig = TrainConfig()) -> dict:
    lm, model, x, rows = _trainable(TOY_CLIP, world_dir, cfg)
    tokens = lm.tokenizer([r["caption"] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = max(cfg.batch_size, 128)                       # contrastive batches want many negatives
    steps = cfg.clip_epochs * ((len(x) + bs - 1) // bs)
    sched = _schedule(opt, steps)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for epoch in range(cfg.clip_epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            img = F.normalize(model.encode_image(x[idx]), dim=-1)
            txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            # identical captions in a batch are positives too
            caps = [rows[j]["caption"] for j in idx.tolist()]
            same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
            target = same / same.sum(1, keepdim=True)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        _progress("clip", epoch + 1, cfg.clip_epochs, t0, loss=float(loss.detach()))
    model.eval()
    _save(model, out_path)
    return {"final_loss": float(loss.detach()), "seconds": time.time() - t0}


def _save(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)                      # a cut-off training never leaves a half-written file


# ------------------------------------------------------------------------------ shipped weights
# The two tiny models trained on the default world ship with the package (fp16 safetensors, ~7 MB), so
# the demo needs no training. ``vitdecomp demo --retrain --export-weights DIR`` reproduces them.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED_INDEX = "weights.json"
MODELS = (("classifier", TOY_VIT), ("clip", TOY_CLIP))
# the recorded figures of a retraining may differ by this much (CPU kernels differ between machines)
RETRAIN_TOLERANCE = 0.05


def world_distribution(world_cfg) -> dict:
    """What a trained model depends on in a world's config: everything but the split sizes."""
    d = asdict(world_cfg)
    for k in ("n_train", "n_val", "n_test"):
        d.pop(k, None)
    return d


def shipped_index(directory: str = SHIPPED_DIR) -> Optional[dict]:
    path = os.path.join(directory, SHIPPED_INDEX)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def shipped_models(world_cfg, cfg: "TrainConfig", directory: str = SHIPPED_DIR) -> Optional[dict]:
    """The shipped checkpoints when they were trained on this world distribution with this training
    config and code version (else ``None``); their SHA-256 is checked against the index."""
    from ..models import sha256_file

    index = shipped_index(directory)
    if (index is None or index.get("train_version") != TRAIN_VERSION or index.get("train_config") != asdict(cfg)
            or index.get("world") != world_distribution(world_cfg)):
        return None
    out = {}
    for file, name in MODELS:
        entry = index["models"][file]
        path = os.path.join(directory, entry["file"])
        digest = sha256_file(path) if os.path.exists(path) else None
        if digest != entry["sha256"]:
            raise RuntimeError(f"the shipped weights {path} do not match their recorded SHA-256 "
                               f"({digest} != {entry['sha256']}); reinstall vitdecomp or run `vitdecomp demo --retrain`")
        out[file] = {"model": name, "checkpoint": path, "cached": True, "shipped": True,
                     **{k: v for k, v in entry.items() if k not in ("file", "sha256")}}
    return out


def export_weights(models: dict, world_cfg, cfg: "TrainConfig", out_dir: str, figures: dict,
                   reduced: Optional[dict] = None) -> dict:
    """Write the trained checkpoints of ``models`` (what :func:`ensure_models` returned) as the shipped
    fp16 weights in ``out_dir`` with their index: training config, world, SHA-256 and ``figures`` (the
    accuracies measured with the fp16 weights). Returns the index."""
    from safetensors.torch import load_file, save_file

    from ..models import sha256_file

    os.makedirs(out_dir, exist_ok=True)
    index = {"train_version": TRAIN_VERSION, "train_config": asdict(cfg), "world": world_distribution(world_cfg),
             "dtype": "fp16", "produced_by": "vitdecomp demo --retrain --export-weights DIR", "models": {}}
    for file, name in MODELS:
        path = os.path.join(out_dir, f"{file}.safetensors")
        sd = load_file(models[file]["checkpoint"])
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, path)
        index["models"][file] = {"file": os.path.basename(path), "sha256": sha256_file(path), "model": name,
                                 "train_seconds": round(float(models[file].get("seconds", 0.0)), 1),
                                 **figures.get(file, {})}
    if reduced is not None:
        index["reduced_schedule_check"] = reduced
    with open(os.path.join(out_dir, SHIPPED_INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return index


def record_figures(out_dir: str, figures: dict, reduced: Optional[dict] = None) -> dict:
    """Add measured ``figures`` (per model) and the reduced-schedule check to a shipped-weights index."""
    path = os.path.join(out_dir, SHIPPED_INDEX)
    with open(path) as f:
        index = json.load(f)
    for file, fig in figures.items():
        index["models"][file].update(fig)
    if reduced is not None:
        index["reduced_schedule_check"] = reduced
    with open(path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return index


REDUCED = dict(classifier_epochs=3, clip_epochs=3, max_train=1000)   # the CI retraining check's schedule


def reduced_schedule_figures(world_dir: str, seed: int, cache_dir: str, limit: Optional[int] = 300) -> dict:
    """Train both models with the reduced schedule and measure them (test split, first ``limit`` images):
    recorded with the shipped weights, and compared with a retraining by the tests."""
    from ..models import load_model

    cfg = TrainConfig(seed=seed, **REDUCED)
    models = ensure_models(world_dir, "reduced", cache_dir, cfg, retrain=True)
    clf = load_model(TOY_VIT, checkpoint=models["classifier"]["checkpoint"])
    clip = load_model(TOY_CLIP, checkpoint=models["clip"]["checkpoint"])
    g = group_accuracy(clf, world_dir, limit=limit)
    return {"train_config": asdict(cfg), "test_limit": limit,
            "classifier": {"accuracy": g["accuracy"], "worst_group": g["worst_group"]},
            "clip": {"zero_shot": zero_shot_accuracy(clip, world_dir, limit=limit)}}


def _cache_path(cache_dir: str, file: str, world_key: str, cfg: "TrainConfig") -> str:
    key = hashlib.sha256(json.dumps({"world": world_key, "train": asdict(cfg), "v": TRAIN_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{file}-{key}.safetensors")


def cached_models(world_dir: str, world_cfg, cache_dir: str, cfg: "TrainConfig") -> bool:
    """Whether both models for this world and training config are in ``cache_dir`` already."""
    return all(os.path.exists(_cache_path(cache_dir, f, world_cfg.key(), cfg)) for f, _ in MODELS)


def ensure_models(world_dir: str, world_key: str, cache_dir: str, cfg: TrainConfig = TrainConfig(),
                  only: tuple = ("classifier", "clip"), world_cfg=None, retrain: bool = False) -> dict:
    """The two tiny models for this world: the shipped weights when they fit ``world_cfg`` and ``cfg``
    (and ``retrain`` is false), else a cached checkpoint for this (world, training config, code
    version), else trained now. Returns their checkpoint paths and training reports."""
    if world_cfg is not None and not retrain:
        shipped = shipped_models(world_cfg, cfg)
        if shipped is not None:
            return {k: v for k, v in shipped.items() if k in only}
    out = {}
    for name, fn, file in ((TOY_VIT, train_classifier, "classifier"), (TOY_CLIP, train_clip, "clip")):
        if file not in only:
            continue
        path = _cache_path(cache_dir, file, world_key, cfg)
        report_path = path.replace(".safetensors", ".json")
        if os.path.exists(path) and os.path.exists(report_path):
            with open(report_path) as f:
                report = json.load(f)
            report["cached"] = True
        else:
            log.info("training the toy %s (cached afterwards in %s)", file, cache_dir)
            report = fn(world_dir, path, cfg)
            with open(report_path, "w") as f:
                json.dump(report, f)
            report["cached"] = False
        out[file] = {"model": name, "checkpoint": path, **report}
    return out


@torch.inference_mode()
def zero_shot_accuracy(clip_lm, world_dir: str, split: str = "test", limit: Optional[int] = None) -> dict:
    """Tiny-CLIP zero-shot accuracy per attribute: caption-style prompts of each value vs the others
    (a value with several prompts — a background family and its scenes — uses their mean embedding)."""
    from .generate import SCENES, SHAPES, TEXTURES

    x, rows = load_images(world_dir, split, clip_lm.transform, limit)
    img = F.normalize(clip_lm.model.encode_image(x), dim=-1)
    prompts = {
        "shape": {s: f"a {s}" for s in SHAPES},
        "texture": {t: (f"a {t} shape" if t != "plain" else "a plain shape") for t in TEXTURES},
        "scene": {s: f"a shape on {s}" for fam in SCENES.values() for s in fam},
        "background": {fam: [f"a shape on {s}" for s in scenes] for fam, scenes in SCENES.items()},
        "label_name": {"warm": "a red shape", "cool": "a green shape"},
    }
    out = {}
    for attr, choices in prompts.items():
        names = list(choices)
        txt = []
        for p in choices.values():
            e = F.normalize(clip_lm.model.encode_text(clip_lm.tokenizer(p if isinstance(p, list) else [p])), dim=-1)
            txt.append(F.normalize(e.mean(0), dim=-1))
        txt = torch.stack(txt)
        pred = (img @ txt.T).argmax(-1).tolist()
        out[attr] = float(np.mean([names[p] == r[attr] for p, r in zip(pred, rows)]))
    return out


@torch.inference_mode()
def group_accuracy(classifier_lm, world_dir: str, split: str = "test", limit: Optional[int] = None) -> dict:
    x, rows = load_images(world_dir, split, classifier_lm.transform, limit)
    pred = classifier_lm.model(x).argmax(-1).tolist()
    groups: dict[str, list[bool]] = {}
    for p, r in zip(pred, rows):
        groups.setdefault(r["group"], []).append(p == r["label"])
    acc = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
    return {"groups": acc, "worst_group": min(acc.values()), "mean_group": float(np.mean(list(acc.values()))),
            "accuracy": float(np.mean([p == r["label"] for p, r in zip(pred, rows)]))}
