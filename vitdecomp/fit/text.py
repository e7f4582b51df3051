"""Text embeddings for the fit and query stages (README “Fit CompAlign and TextSpan”).

Each description is wrapped in open_clip's 80 OpenAI ImageNet templates, each encoded and
L2-normalised, averaged and renormalised. Results are cached on disk by (model, weights, text).
Description pools: a user file (one per line; blank lines and duplicates dropped, order kept) or
the project's generated default pool (attributes × objects × scenes, deterministic).
"""
from __future__ import annotations

import hashlib
import itertools
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OptionError, TextModelOptions
from ..errors import InputError

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "cyan")
TEXTURES = ("striped", "spotted", "dotted", "furry", "smooth", "rough", "glossy", "wooden", "metallic", "checkered")
OBJECTS = ("circle", "square", "triangle", "cross", "shape", "animal", "bird", "dog", "cat", "car", "person", "flower",
           "tree", "building", "boat", "fish")
SCENES = ("ocean", "lake", "forest", "desert", "sky", "city", "beach", "field", "snow", "road", "water", "land")
SIZES = ("small", "large")


def default_pool() -> list[str]:
    """The generated default description pool (a few thousand lines, deterministic order)."""
    out = [f"a photo of a {o}" for o in OBJECTS] + [f"a photo of {s}" for s in SCENES]
    out += [f"{c} color" for c in COLORS] + [f"{t} texture" for t in TEXTURES]
    out += [f"a {c} {o}" for c, o in itertools.product(COLORS, OBJECTS)]
    out += [f"a {t} {o}" for t, o in itertools.product(TEXTURES, OBJECTS)]
    out += [f"a {z} {o}" for z, o in itertools.product(SIZES, OBJECTS)]
    out += [f"a {o} on {s}" for o, s in itertools.product(OBJECTS, SCENES)]
    out += [f"a {c} {o} on {s}" for c, o, s in itertools.product(COLORS, OBJECTS, SCENES)]
    return list(dict.fromkeys(out))


def read_pool(path: Optional[str], s3=None) -> list[str]:
    """A pool file (one description per line; blanks and duplicates dropped), or the default pool.
    ``path`` is a local file or ``s3://`` (read with the job's S3 settings ``s3``)."""
    if path is None:
        return default_pool()
    from ..io import read_bytes

    try:
        lines = [ln.strip() for ln in read_bytes(path, s3).decode("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"description pool {path!r}: {e}") from None
    pool = list(dict.fromkeys(ln for ln in lines if ln))
    if not pool:
        raise InputError(f"description pool {path!r} is empty (it needs one description per line)")
    return pool


def templates():
    import open_clip

    return open_clip.OPENAI_IMAGENET_TEMPLATES


def _key(model_id: str, text: str) -> str:
    return hashlib.sha256(f"{model_id}\x00{text}".encode()).hexdigest()


def model_id(lm) -> str:
    """What identifies a text tower's weights: name + tag or checkpoint hash."""
    return f"{lm.name}|{lm.pretrained or ''}|{lm.checkpoint_sha256 or ''}"


@torch.inference_mode()
def encode_texts(lm, texts: Sequence[str], *, use_templates: bool = True, batch_size: int = 256,
                 cache_dir: Optional[str] = None) -> np.ndarray:
    """Unit text embeddings ``[P, d]`` (float32) of ``texts`` with an open_clip model."""
    if lm.library != "open_clip" or lm.tokenizer is None:
        raise InputError(f"text embeddings need an open_clip model with a text tower, got {lm.name}")
    texts = list(texts)
    if not texts:
        raise InputError("no descriptions to encode (empty pool)")
    mid = model_id(lm) + ("|tpl80" if use_templates else "|plain")
    if not (lm.pretrained or lm.checkpoint_sha256):
        cache_dir = None            # random-init weights differ per build: never reuse their embeddings
    out: dict[int, np.ndarray] = {}
    todo = []
    for i, t in enumerate(texts):
        path = os.path.join(cache_dir, _key(mid, t)[:2], _key(mid, t) + ".npy") if cache_dir else None
        if path and os.path.exists(path):
            out[i] = np.load(path)
        else:
            todo.append((i, t, path))
    tpl = templates() if use_templates else [lambda c: c]
    dev = next(lm.model.parameters()).device
    for s in range(0, len(todo), max(1, batch_size // len(tpl))):
        chunk = todo[s:s + max(1, batch_size // len(tpl))]
        prompts = [f(t) for _, t, _ in chunk for f in tpl]
        e = F.normalize(lm.model.encode_text(lm.tokenizer(prompts).to(dev)).float(), dim=-1)
        e = F.normalize(e.view(len(chunk), len(tpl), -1).mean(1), dim=-1).cpu().numpy()
        for (i, _, path), v in zip(chunk, e):
            out[i] = v
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                np.save(path, v)
    return np.stack([out[i] for i in range(len(texts))]).astype(np.float32)


def resolve_text_model(st, aligner, options: TextModelOptions, what: str):
    """The open_clip model whose text tower shares the contributions' CLIP space: the store's own CLIP,
    or the aligner's teacher (weights as recorded; random-init models from the recorded seed)."""
    from ..models import import_extensions, load_model
    from .compalign import check_compatible

    import_extensions(st.manifest)

    clip, clip_pretrained, clip_checkpoint = options.clip, options.clip_pretrained, options.clip_checkpoint

    m = st.manifest
    is_clip = m["model"]["readout"]["space"] == "clip" and m["model"]["name"].startswith("open_clip:")
    if aligner is not None:
        check_compatible(aligner, st)
    if not is_clip and aligner is None:
        raise InputError(f"{st.uri} holds {m['model']['name']}, not an open_clip CLIP: {what} needs its "
                         "contributions in a CLIP space — fit an aligner with `vitdecomp fit compalign` and pass it")
    space = (aligner.meta.get("teacher") or {}).get("name") if aligner else m["model"]["name"]
    clip_name = clip or space
    if clip_name != space:
        raise OptionError("clip", f"the text model {clip_name} is not the CLIP space of these contributions ({space}); "
                         "texts must be encoded by the same model")
    weights = (aligner.meta.get("teacher") if aligner else m["model"]) or {}
    lm = load_model(clip_name, pretrained=clip_pretrained or weights.get("pretrained") or False,
                    checkpoint=clip_checkpoint, seed=int(weights.get("seed", 0)))
    want_sha = weights.get("checkpoint_sha256")
    if want_sha and lm.checkpoint_sha256 != want_sha:
        raise OptionError("clip_checkpoint", f"must be the checkpoint the store was made with (SHA-256 {want_sha[:12]}…)")
    return lm
