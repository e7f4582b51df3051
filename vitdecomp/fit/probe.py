"""Linear heads on the readout (``logits = z Wᵀ + b``): a zero-shot text head, the model's own
classifier, or a linear probe fitted on the stored readouts (multinomial logistic regression)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..config import OptionError
from ..errors import InputError
from ..io import S3Settings, load_artefact, save_artefact
from ..store.splits import check_column

log = logging.getLogger(__name__)


@dataclass
class LinearHead:
    """``logits = z Wᵀ + b`` over ``classes``; ``space`` says which contributions it reads:
    ``"aligned"`` (zero-shot text head through a CompAlign aligner) or ``"native"``."""

    kind: str                       # zeroshot | probe | model
    classes: list[str]
    W: np.ndarray                   # [C, d]
    b: np.ndarray                   # [C]
    space: str = "native"
    meta: dict = field(default_factory=dict)

    def logits(self, z: np.ndarray) -> np.ndarray:
        return z @ self.W.T + self.b

    def save(self, path: str, s3: Optional[S3Settings] = None) -> str:
        """Write ``<path>.safetensors`` and ``<path>.json`` (``path`` local or ``s3://``, written
        atomically with the job's S3 settings ``s3``); returns ``path`` without extension."""
        import torch

        return save_artefact(path, {"W": torch.as_tensor(self.W), "b": torch.as_tensor(self.b)},
                             {"kind": self.kind, "classes": self.classes, "space": self.space, **self.meta}, s3)

    @classmethod
    def load(cls, path: str, s3: Optional[S3Settings] = None) -> "LinearHead":
        """The head :meth:`save` wrote at ``path`` (with or without extension; local or ``s3://``)."""
        t, meta = load_artefact(path, "linear head (fit one with `vitdecomp fit probe`)", s3)
        return cls(meta.pop("kind"), meta.pop("classes"), t["W"].double().numpy(), t["b"].double().numpy(),
                   meta.pop("space", "native"), meta)


def label_indices(values: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Class index per label value (``-1`` when it is none of the classes): by name first, then, for
    integer labels, as an index into ``classes``."""
    pos = {c: i for i, c in enumerate(classes)}
    out = np.full(len(values), -1, np.int64)
    for i, v in enumerate(values):
        if v is None:
            continue
        if str(v) in pos:
            out[i] = pos[str(v)]
        elif isinstance(v, (int, np.integer)) and 0 <= int(v) < len(classes):
            out[i] = int(v)
    return out


def class_list(st, label_column: str, class_names: Optional[Sequence[str]], ids=None) -> list[str]:
    if class_names:
        return [str(c) for c in class_names]
    vals = st.read(columns=[label_column], ids=ids).column(label_column).to_pylist()
    classes = sorted({str(v) for v in vals if v is not None})
    if len(classes) < 2:
        raise InputError(f"label column {label_column!r} has fewer than two classes")
    return classes


def zeroshot_head(clip, classes: Sequence[str], aligned: bool, cache_dir: Optional[str] = None) -> LinearHead:
    """Zero-shot text head: one templated, normalised text embedding per class name."""
    from .text import encode_texts

    W = np.asarray(encode_texts(clip, list(classes), cache_dir=cache_dir), np.float64)
    return LinearHead("zeroshot", list(classes), W, np.zeros(len(classes)), "aligned" if aligned else "native",
                      {"text_model": clip.name})


def model_head(st, checkpoint: Optional[str] = None, class_names: Optional[Sequence[str]] = None) -> LinearHead:
    """The model's own linear classifier on its readout (timm ``get_classifier()``)."""
    from torch import nn

    from ..models import rebuild_model

    lm = rebuild_model(st.manifest, checkpoint)
    head = lm.model.get_classifier() if hasattr(lm.model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise InputError(f"{st.manifest['model']['name']} has no linear classifier head "
                         f"({type(head).__name__}); use the zeroshot head (CLIP, or with an aligner) or a probe")
    if head.in_features != st.manifest["d"]:
        raise InputError(f"the model's head reads {head.in_features}-d features, the store's readout is "
                         f"{st.manifest['d']}-d")
    C = head.out_features
    classes = [str(c) for c in class_names] if class_names else [str(i) for i in range(C)]
    if len(classes) != C:
        raise OptionError("class_names", f"lists {len(classes)} classes, the model's head has {C} outputs")
    return LinearHead("model", classes, head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
                      if head.bias is not None else np.zeros(C), "native", {"model": st.manifest["model"]["name"]})


MIN_IMAGES_PER_CLASS = 20     # below this, a probe's weights or an accuracy are mostly noise


def few_per_class(labels: Sequence, classes: Sequence[str], what: str) -> Optional[str]:
    """A warning when some class of ``classes`` has fewer than :data:`MIN_IMAGES_PER_CLASS` of ``labels``
    (label values, mapped as :func:`label_indices` does; others are ignored), else ``None``. Logged too."""
    counts = {c: 0 for c in classes}
    for y in label_indices(list(labels), classes):
        if y >= 0:
            counts[classes[y]] += 1
    low = {c: n for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS}
    if not low:
        return None
    msg = (f"{what} on {sum(counts.values())} images, fewer than {MIN_IMAGES_PER_CLASS} in class(es) "
           + ", ".join(f"{c!r} ({n})" for c, n in low.items())
           + ": the figures are unreliable; use more labelled images (a larger split)")
    log.warning(msg)
    return msg


def fit_probe(st, label_column: str, ids: Optional[Sequence[str]] = None, class_names=None, l2: float = 1e-3,
              max_rows: int = 200_000, max_iter: int = 200, seed: int = 0) -> tuple[LinearHead, dict]:
    """Multinomial logistic regression on the stored readouts (L-BFGS, L2 penalty ``l2``·‖W‖²,
    features standardised inside and folded back into ``W, b``)."""
    import torch

    check_column(st, label_column, "label_column")
    classes = class_list(st, label_column, class_names, ids)
    zs, ys = [], []
    for b in st.iter_batches(components=[], ids=ids, columns=[label_column], dtype=np.float64):
        y = label_indices(b.columns[label_column].to_pylist(), classes)
        keep = y >= 0
        zs.append(b.readout[keep])
        ys.append(y[keep])
    if not zs or sum(len(y) for y in ys) == 0:
        raise InputError(f"no labelled rows to fit a probe on in {st.uri} (label column {label_column!r})")
    z, y = np.concatenate(zs), np.concatenate(ys)
    few_per_class(y.tolist(), classes, "the linear probe is fitted")
    if len(z) > max_rows:
        sel = np.random.default_rng(seed).choice(len(z), max_rows, replace=False)
        z, y = z[sel], y[sel]
    mu, sd = z.mean(0), z.std(0) + 1e-8
    x = torch.as_tensor((z - mu) / sd)
    yt = torch.as_tensor(y)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(z.shape[1], len(classes)).double()
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), yt) + l2 * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W = lin.weight.detach().numpy() / sd[None]
    b = lin.bias.detach().numpy() - W @ mu
    head = LinearHead("probe", classes, W, b, "native",
                      {"label_column": label_column, "l2": l2, "rows": int(len(z)), "store": st.uri})
    acc = float(((z @ W.T + b).argmax(1) == y).mean())
    return head, {"train_accuracy": acc, "rows": int(len(z)), "classes": classes}
