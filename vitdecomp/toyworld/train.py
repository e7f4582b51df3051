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


def ensure_models(world_dir: str, world_key: str, cache_dir: str, cfg: TrainConfig = TrainConfig(),
                  only: tuple = ("classifier", "clip")) -> dict:
    """Train the two tiny models unless a checkpoint for this (world, training config, code version)
    is cached; return their checkpoint paths and training reports."""
    key = hashlib.sha256(json.dumps({"world": world_key, "train": asdict(cfg), "v": TRAIN_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = {}
    for name, fn, file in ((TOY_VIT, train_classifier, "classifier"), (TOY_CLIP, train_clip, "clip")):
        if file not in only:
            continue
        path = os.path.join(cache_dir, f"{file}-{key}.safetensors")
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
