"""CompAlign (README “Fit CompAlign and TextSpan”): per-component linear maps of a non-CLIP model into a CLIP teacher's space.

``f_k(c) = A_k c + b/K`` with ``Σ_k f_k(c_k)`` trained to match the teacher's unit image embedding:

    L = mean_batch[1 − cos(Σ_k f_k(c_k), z_teacher)] + λ · ortho(A)

``ortho(A) = Σ_k ‖A_k A_kᵀ − I‖²_F / (K · d_teacher)`` (the Gram matrix on the teacher side; the
published code writes it as ``d_teacher · mean_{k,i,j} (A_k A_kᵀ − I)²_ij``, the same expression). Adam, lr 3e-4, weight decay 1e-6, batch 32, ``A ~ N(0, 0.02²)``. Training streams the
stored contributions and teacher column (images are never decomposed again), holds out a
validation split chosen by a hash of ``image_id``, and stops deterministically: after
``max_epochs``, or when the validation cosine has not improved by ``min_delta`` for ``patience``
epochs (the best epoch's maps are kept). Artefacts are safetensors + JSON; loading never unpickles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AlignConfig
from ..errors import InputError
from ..io import S3Settings, load_artefact, save_artefact
from ..store.manifest import manifest_hash

log = logging.getLogger(__name__)


@dataclass
class Aligner:
    names: list[str]
    maps: torch.Tensor            # [K, d_t, d]
    bias: torch.Tensor            # [d_t], split evenly over components
    meta: dict = field(default_factory=dict)

    def apply(self, contributions):
        """``[b, K, d]`` → ``[b, K, d_t]`` (each component mapped, with its bias share). Also maps a
        store batch (its ``names`` must be the aligner's, in order) or an iterable of them —
        ``aligner.apply(store.iter_batches(components=aligner.names))`` yields aligned batches; see
        :func:`aligned_batches` for any subset of components."""
        if hasattr(contributions, "contributions") and hasattr(contributions, "names"):
            b = contributions
            if list(b.names) != list(self.names):
                raise InputError(f"the batch holds components {list(b.names)[:3]}…, the aligner maps "
                                 f"{self.names[:3]}…: read them with components=aligner.names, or use aligned_batches")
            return dataclasses.replace(b, contributions=self.apply(b.contributions).astype(b.contributions.dtype,
                                                                                            copy=False))
        if not hasattr(contributions, "shape") and not isinstance(contributions, (list, tuple)):
            return (self.apply(b) for b in contributions)          # an iterator of store batches
        c = torch.as_tensor(np.asarray(contributions), dtype=torch.float32)
        out = torch.einsum("kod,bkd->bko", self.maps, c) + self.bias / len(self.names)
        return out.numpy()

    def subset(self, names: Sequence[str]) -> "Aligner":
        """The maps of ``names`` only, each keeping its own bias share ``b/K``."""
        sel = [self.names.index(n) for n in names]
        return Aligner([self.names[i] for i in sel], self.maps[sel], self.bias * len(sel) / len(self.names), self.meta)

    def save(self, path: str, s3: Optional[S3Settings] = None) -> str:
        """Write ``<path>.safetensors`` and ``<path>.json`` (``path`` local or ``s3://``, written
        atomically with the job's S3 settings ``s3``); returns ``path`` without extension."""
        return save_artefact(path, {"maps": self.maps, "bias": self.bias}, {"components": self.names, **self.meta}, s3)

    @classmethod
    def load(cls, path: str, s3: Optional[S3Settings] = None) -> "Aligner":
        """The artefact :meth:`save` wrote at ``path`` (with or without extension; local or ``s3://``)."""
        t, meta = load_artefact(path, "CompAlign artefact (fit one with `vitdecomp fit compalign`)", s3)
        return cls(meta.pop("components"), t["maps"], t["bias"], meta)


def in_validation(image_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the id (stable across runs, machines and store orders)."""
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def ortho_penalty(maps: torch.Tensor) -> torch.Tensor:
    """``Σ_k ‖A_k A_kᵀ − I‖²_F / (K · d_teacher)`` for ``maps [K, d_teacher, d]`` (README “Fit CompAlign and TextSpan”). The
    published code's form, ``d_teacher · mean_{k,i,j} (A_k A_kᵀ − I)²_ij``, is the same expression."""
    K, dt, _ = maps.shape
    gram = maps @ maps.transpose(1, 2) - torch.eye(dt, dtype=maps.dtype)
    return (gram ** 2).sum() / (K * dt)


def fit(batches: Callable[[str], Iterable[tuple[np.ndarray, np.ndarray]]], names: Sequence[str], d: int, d_t: int,
        cfg: AlignConfig = AlignConfig(), progress: bool = True) -> tuple[Aligner, dict]:
    """Train from ``batches(split)`` → iterables of ``(contributions [b, K, d], teacher [b, d_t])``,
    ``split`` in {"train", "val"}. Returns the aligner (best validation epoch) and the metrics."""
    torch.manual_seed(cfg.seed)
    K = len(names)
    maps = torch.nn.Parameter(torch.randn(K, d_t, d) * cfg.init_std)
    bias = torch.nn.Parameter(torch.zeros(d_t))
    opt = torch.optim.Adam([maps, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)

    def predict(c):
        return torch.einsum("kod,bkd->bo", maps, c) + bias

    def evaluate(split):
        cos, n = 0.0, 0
        with torch.no_grad():
            for c, z in batches(split):
                c, z = torch.as_tensor(c, dtype=torch.float32), torch.as_tensor(z, dtype=torch.float32)
                cos += float(F.cosine_similarity(predict(c), z, dim=-1).sum())
                n += len(c)
        return cos / n if n else float("nan")

    history, best, best_state, stale = [], -np.inf, None, 0
    t0 = time.time()
    for epoch in range(cfg.max_epochs):
        tr_cos, tr_n = 0.0, 0
        for c, z in batches("train"):
            order = rng.permutation(len(c))
            for s in range(0, len(c), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                cb = torch.as_tensor(c[idx], dtype=torch.float32)
                zb = torch.as_tensor(z[idx], dtype=torch.float32)
                cos = F.cosine_similarity(predict(cb), zb, dim=-1)
                loss = (1 - cos).mean() + cfg.lam * ortho_penalty(maps)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tr_cos += float(cos.detach().sum())
                tr_n += len(idx)
        val = evaluate("val")
        history.append({"epoch": epoch + 1, "train_cosine": tr_cos / max(tr_n, 1), "val_cosine": val})
        if progress:                      # one log line per epoch: the only progress display (no bar)
            log.info("CompAlign epoch %d/%d train cos %.4f val cos %.4f (%.0f s)", epoch + 1, cfg.max_epochs,
                     tr_cos / max(tr_n, 1), val, time.time() - t0)
        if val > best + cfg.min_delta:
            best, stale = val, 0
            best_state = (maps.detach().clone(), bias.detach().clone())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is None:
        raise InputError("CompAlign saw no validation data: raise val_fraction or add images")
    metrics = {"history": history, "best_val_cosine": best, "epochs": len(history), "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AlignConfig)}}
    return Aligner(list(names), best_state[0], best_state[1], {"metrics": metrics}), metrics


def fit_store(store, cfg: AlignConfig = AlignConfig(), components: Optional[Sequence[str]] = None,
              read_batch: int = 2048) -> tuple[Aligner, dict]:
    """CompAlign from a store with a teacher column (streamed; split by a hash of image_id)."""
    if not store.has_teacher:
        raise InputError(f"{store.uri} has no teacher column: CompAlign needs the teacher's image embeddings. "
                         "Decompose again with a teacher (an open_clip model: the decompose job's teacher option)")
    names = list(components or store.names)
    d, d_t = store.manifest["d"], store.manifest["teacher"]["dim"]

    def batches(split):
        for b in store.iter_batches(components=names, batch_size=read_batch, teacher=True):
            keep = np.array([in_validation(i, cfg.val_fraction) == (split == "val") for i in b.ids])
            if keep.any():
                yield b.contributions[keep], b.teacher[keep]

    aligner, metrics = fit(batches, names, d, d_t, cfg)
    aligner.meta.update({"model": store.manifest["model"], "teacher": store.manifest["teacher"],
                         "store": store.uri, "store_manifest_sha256": manifest_hash(store.manifest)})
    return aligner, metrics


def check_compatible(aligner: Aligner, store) -> None:
    """An aligner may only be applied to stores of the model it was trained for."""
    if aligner.meta.get("store_manifest_sha256") not in (None, manifest_hash(store.manifest)):
        if aligner.meta.get("model", {}).get("name") != store.manifest["model"]["name"] or \
                aligner.names != [n for n in aligner.names if n in store.names]:
            raise InputError(f"the aligner was trained for {aligner.meta.get('model', {}).get('name')} on "
                             f"{aligner.meta.get('store')}, not for this store ({store.manifest['model']['name']}, "
                             f"{store.uri}); fit one with `vitdecomp fit compalign --store {store.uri}`")
    missing = [n for n in aligner.names if n not in store.names]
    if missing:
        raise InputError(f"the aligner's components {missing[:3]} are not in {store.uri}")


def aligned_batches(store, aligner: Optional[Aligner] = None, components: Optional[Sequence[str]] = None,
                    **kwargs) -> Iterator:
    """``store.iter_batches(...)`` with every batch's contributions mapped by ``aligner`` into its
    teacher's space (``[b, K, d_teacher]``); components default to the aligner's. Without an
    aligner, the store's own batches."""
    if aligner is None:
        yield from store.iter_batches(components=components, **kwargs)
        return
    check_compatible(aligner, store)
    names = list(components) if components is not None else list(aligner.names)
    missing = [c for c in names if c not in aligner.names]
    if missing:
        raise InputError(f"the aligner has no map for {missing[:3]}")
    sub = aligner.subset(names)
    for b in store.iter_batches(components=names, **kwargs):
        yield dataclasses.replace(b, contributions=sub.apply(b.contributions).astype(b.contributions.dtype, copy=False))
