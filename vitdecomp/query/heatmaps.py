"""Token heatmaps and zero-shot segmentation (README “Query”), computed on demand from the source images.

For chosen attention heads (or whole attention layers = the sum of their heads) the engine returns
each head's per-source-token direct effect on the readout, ``c_{k,m} [d]`` (README “Components and names”, token
granularity: attention probability of the readout query × value × the head's out-projection
slice, carried through the frozen final norm / projection like any contribution). The heatmap of
image ``b`` at patch ``m`` is

    H[b, m] = Σ_{k ∈ components} ⟨f_k(c_{k,m}), u⟩

with ``u`` a text embedding (CLIP stores, or non-CLIP stores through a CompAlign aligner) or a
classifier weight row (the class logit of a timm model), and ``f_k`` the identity or the aligner's
linear map ``A_k`` of component ``k`` (its bias share ``b/K`` is input-independent and belongs to no
token). Prefix tokens (class, registers) are dropped; patches are laid out on the model's grid
(``Decomposition.token_map``), upsampled bilinearly to the model input and overlaid on it.

Segmentation metrics (per image, against a binary foreground mask brought to the model input by
the model's own preprocessing): the map is min–max normalised to [0, 1] and binarised at its own
mean (``> mean``; the protocol of the ViT-explainability segmentation benchmarks). Then
pixel accuracy, IoU of foreground and of background, mIoU = their mean, AP = average precision of
the normalised pixel scores against the foreground (Σ_n (R_n − R_{n−1}) P_n over distinct score
thresholds, ties grouped), and mAP = the mean of the foreground AP and the background AP
(scores ``1 − s``). A class whose prediction and mask are both empty has IoU 1; AP is NaN for an
image without foreground (or background) pixels and is left out of means.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import names as N
from ..config import OptionError
from ..errors import InputError
from ..io import figure_bytes
from ..io import read_image  # noqa: F401  (re-exported: source images are read through the I/O layer)
from ..models import rebuild_model  # noqa: F401  (re-exported: the store's model, checked)

log = logging.getLogger(__name__)

THRESHOLD_RULE = "per-image mean of the min-max normalised map"
METRICS = ("pixacc", "iou_fg", "iou_bg", "miou", "ap", "map")


# ------------------------------------------------------------------------------- components
def expand_components(model, components: Sequence[str], blocks=None) -> dict[str, list[str]]:
    """Requested name → the head names whose token maps make it up.

    ``<attn>.head.<h>`` is one head; ``<attn>`` (a whole attention layer) is all of its heads.
    Unknown names raise with close matches; MLPs, ``embed`` and ``bias`` have no per-token form.
    """
    from ..engine import components_for

    if not components:
        raise InputError("no components given: pass head names such as 'blocks.3.attn.head.0' or attention "
                         "layers such as 'blocks.3.attn'")
    heads = components_for(model, blocks=blocks, heads=True)
    layers = components_for(model, blocks=blocks, heads=False)
    known = list(dict.fromkeys([c.name for c in heads] + [c.name for c in layers]))
    by_name = {c.name: c for c in heads + layers}
    out: dict[str, list[str]] = {}
    for name, i in zip(components, N.select(known, components)):
        c = by_name[known[i]]
        if c.kind == "head":
            out[name] = [name]
        elif c.kind == "attn":
            out[name] = [h.name for h in heads if h.kind == "head" and h.path == c.path]
        else:
            attn = [a.name for a in layers if a.kind == "attn"]
            same = [a for a in attn if N.parse(a).block == c.block] or attn
            raise InputError(f"{name!r} is a {c.kind} component: token heatmaps exist for attention heads and whole "
                             f"attention layers, e.g. {same[0]!r} or {same[0] + '.head.0'!r}")
    return out


def _aligner_map(aligner, head: str, group: str) -> torch.Tensor:
    """The aligner's map ``A [d_t, d]`` for one head: its own, else its attention layer's."""
    path = N.parse(head).path
    for cand in (head, group, path):
        if cand in aligner.names:
            return aligner.maps[aligner.names.index(cand)]
    raise InputError(f"the aligner has no map for {head!r} (nor for its layer {path!r}); it maps "
                     f"{aligner.names[:4]}… — fit it on a store decomposed at the granularity you ask for")


# ---------------------------------------------------------------------------------- heatmaps
@dataclass
class HeatmapResult:
    maps: np.ndarray                # [B, gh, gw] float64
    per_component: dict             # requested name → [B, gh, gw] float64
    readout: np.ndarray             # [B, d] the model's readout (as the engine returned it)
    grid: tuple


def compute_heatmaps(lm, images: torch.Tensor, components: Sequence[str], direction, aligner=None,
                     convention: str = "centered", blocks=None, normalize: bool = False) -> HeatmapResult:
    """Heatmaps with their per-component parts and the readout (see :func:`token_heatmaps`)."""
    from ..engine import decompose

    groups = expand_components(lm, components, blocks)
    wanted = list(dict.fromkeys(h for hs in groups.values() for h in hs))
    dec = decompose(lm, images, blocks=blocks, heads=True, tokens=wanted, convention=convention,
                       normalize=normalize)
    dtype, B = dec.readout.dtype, dec.readout.shape[0]
    u = torch.as_tensor(np.asarray(direction, dtype=np.float64)).to(device=dec.readout.device, dtype=dtype)
    if u.dim() == 1:
        u = u[None].expand(B, -1)
    if u.dim() != 2 or u.shape[0] != B:
        raise InputError(f"direction must be a vector [d] or one per image [{B}, d], got shape {tuple(u.shape)}")
    want_dim = aligner.maps.shape[1] if aligner is not None else dec.readout.shape[-1]
    if u.shape[1] != want_dim:
        where = "the aligner's CLIP space" if aligner is not None else "the model's readout"
        raise InputError(f"direction has {u.shape[1]} dimensions but {where} has {want_dim}: a text embedding "
                         f"must come from the same CLIP space (non-CLIP stores: pass the aligner)")
    per = {}
    with torch.inference_mode():
        for name, hs in groups.items():
            acc = None
            for h in hs:
                tm = dec.token_map(h)                                         # [B, gh, gw, d]
                uh = u if aligner is None else u @ _aligner_map(aligner, h, name).to(u)      # [B, d]
                m = torch.einsum("bijd,bd->bij", tm, uh)                      # [B, gh, gw]
                acc = m if acc is None else acc + m
            per[name] = acc.double().cpu().numpy()
    total = sum(per.values())
    return HeatmapResult(np.asarray(total), per, dec.readout.double().cpu().numpy(), tuple(dec.grid))


def token_heatmaps(lm, images: torch.Tensor, components: Sequence[str], direction, aligner=None,
                   convention: str = "centered", blocks=None, normalize: bool = False) -> np.ndarray:
    """Token heatmaps ``[B, gh, gw]`` (float64) of ``components`` projected on ``direction``.

    Args:
        lm: a :class:`vitdecomp.LoadedModel` (or an eval-mode model the engine supports).
        images: preprocessed ``[B, 3, H, W]`` on the model's device.
        components: head names (``blocks.3.attn.head.0``) and/or attention layers (``blocks.3.attn``
            = Σ of its heads); the maps of all of them are summed.
        direction: ``[d]`` (or one per image, ``[B, d]``) — a text embedding in the readout's CLIP
            space, a classifier weight row (:func:`class_direction`), or with ``aligner`` a vector
            of the aligner's CLIP space.
        aligner: CompAlign :class:`~vitdecomp.compalign.Aligner`; each head's tokens are mapped by
            its own (or its layer's) ``A_k`` before the projection.
        convention, blocks, normalize: as the store was decomposed (README “How it works, and what it costs”; ``blocks`` decides
            which heads exist; ``normalize`` divides by ‖z‖).
    """
    return compute_heatmaps(lm, images, components, direction, aligner, convention, blocks, normalize).maps


def _classifier(lm) -> torch.nn.Linear:
    model = getattr(lm, "model", lm)
    if getattr(lm, "library", "timm") != "timm" or not hasattr(model, "get_classifier"):
        raise InputError(f"{getattr(lm, 'name', type(model).__name__)} has no classifier head: a class index needs a "
                         "timm classifier; project on a text for CLIP models")
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise InputError(f"{getattr(lm, 'name', '')}: the classifier head is {type(head).__name__}, not a Linear "
                         "layer (num_classes=0?); a class index needs a linear classifier")
    return head


def class_direction(lm, index: int) -> np.ndarray:
    """Weight row ``[d]`` of class ``index`` in a timm classifier head (the class logit's direction on
    the pre-logits readout; its bias is input-independent and dropped)."""
    head = _classifier(lm)
    k = int(index)
    if not 0 <= k < head.out_features:
        raise OptionError("class_index", f"{k} is out of range: the classifier has classes 0..{head.out_features - 1}")
    return head.weight[k].detach().double().cpu().numpy()


def predicted_classes(lm, readout) -> np.ndarray:
    """``argmax`` of the classifier's logits on pre-logits readouts ``[B, d]`` → ``[B]`` int."""
    head = _classifier(lm)
    z = torch.as_tensor(np.asarray(readout), dtype=head.weight.dtype, device=head.weight.device)
    with torch.inference_mode():
        return head(z).argmax(-1).cpu().numpy()


def upsample(maps, size: tuple[int, int]) -> np.ndarray:
    """``[B, gh, gw]`` → ``[B, H, W]`` by bilinear interpolation (``align_corners=False``)."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float64))
    if t.dim() == 2:
        t = t[None]
    return F.interpolate(t[:, None], size=tuple(int(s) for s in size), mode="bilinear",
                         align_corners=False)[:, 0].numpy()


# ---------------------------------------------------------------------------------- metrics
def normalise(score: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1] (a constant map becomes all zeros)."""
    s = np.asarray(score, dtype=np.float64)
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


def binarise(score: np.ndarray) -> tuple[np.ndarray, float]:
    """Foreground prediction: normalised map ``> its mean`` (returns the prediction and the threshold)."""
    s = normalise(score)
    t = float(s.mean())
    return s > t, t


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds in decreasing order (tied
    scores enter together); NaN when there are no positives."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise InputError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]               # last index of each tie group
    tp = np.cumsum(y)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _iou(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, float]:
    inter, union = int((pred & truth).sum()), int((pred | truth).sum())
    return inter, union, (inter / union if union else 1.0)


def segmentation_metrics(score: np.ndarray, mask: np.ndarray) -> dict:
    """Per-image metrics of a score map ``[H, W]`` against a binary mask ``[H, W]`` (see the module doc)."""
    score, mask = np.asarray(score), np.asarray(mask).astype(bool)
    if score.shape != mask.shape:
        raise InputError(f"heatmap {score.shape} and mask {mask.shape} differ in size")
    s = normalise(score)
    pred, thr = binarise(score)
    i1, u1, iou_fg = _iou(pred, mask)
    i0, u0, iou_bg = _iou(~pred, ~mask)
    ap = average_precision(s, mask)
    ap_bg = average_precision(1 - s, ~mask)
    both = [a for a in (ap, ap_bg) if not np.isnan(a)]
    return {"pixacc": float((pred == mask).mean()), "iou_fg": iou_fg, "iou_bg": iou_bg,
            "miou": (iou_fg + iou_bg) / 2, "ap": ap, "ap_bg": ap_bg,
            "map": float(np.mean(both)) if both else float("nan"),
            "threshold": thr, "foreground_fraction": float(mask.mean()),
            "correct": int((pred == mask).sum()), "pixels": int(mask.size),
            "inter_fg": i1, "union_fg": u1, "inter_bg": i0, "union_bg": u0}


def summarise(rows: Sequence[dict]) -> dict:
    """Means over images of each metric (NaN left out), and the pooled values the segmentation
    benchmarks accumulate over a dataset: Σcorrect/Σpixels and the mean over the two classes of
    ΣIoU-intersections/ΣIoU-unions."""
    out = {f"mean_{k}": float(np.nanmean([r[k] for r in rows])) if rows and not all(np.isnan(r[k]) for r in rows)
           else float("nan") for k in METRICS}
    if rows:
        keys = ("correct", "pixels", "inter_fg", "union_fg", "inter_bg", "union_bg")
        tot = {k: sum(r[k] for r in rows) for k in keys}
        out["pooled_pixacc"] = tot["correct"] / tot["pixels"]
        out["pooled_miou"] = ((tot["inter_fg"] / tot["union_fg"] if tot["union_fg"] else 1.0) +
                              (tot["inter_bg"] / tot["union_bg"] if tot["union_bg"] else 1.0)) / 2
    out["images"] = len(rows)
    return out


# ---------------------------------------------------------------------------------- figures
COLORBAR_LABEL = "heat, per image: 0 = min, 1 = max"


def _overlay_axes(ax, image: np.ndarray, heat: np.ndarray, alpha: float, cmap: str):
    ax.imshow(image, interpolation="nearest")
    im = ax.imshow(normalise(heat), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    return im


def _colorbar(fig, mappable, axes) -> None:
    bar = fig.colorbar(mappable, ax=axes, fraction=0.046, pad=0.02, shrink=0.9)
    bar.set_label(COLORBAR_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.solids.set_alpha(1.0)


def _wrap(title: str, width: int = 26) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(title, width, break_on_hyphens=False)[:3]) or title


def overlay_png(image: np.ndarray, heat: np.ndarray, title: str = "", mask: Optional[np.ndarray] = None,
                alpha: float = 0.5, cmap: str = "jet") -> bytes:
    """PNG bytes, side by side: the image (as the model saw it) | the normalised heatmap over it [| the
    mask]. The job writes them through its output directory (:class:`vitdecomp.io.OutputDir`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + (mask is not None)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_axis_off()
    im = _overlay_axes(axes[1], image, heat, alpha, cmap)
    if mask is not None:
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[2].set_axis_off()
        axes[2].set_title("mask", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _colorbar(fig, im, list(axes))
    return figure_bytes(fig, dpi=100)


def grid_png(images: Sequence[np.ndarray], heats: Sequence[np.ndarray], titles: Sequence[str],
             title: str = "", cols: int = 4, alpha: float = 0.5, cmap: str = "jet") -> bytes:
    """PNG bytes of one figure for the run: image | overlay pairs, ``cols`` pairs per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.0 * 2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    mappable = None
    for i, (im, h, t) in enumerate(zip(images, heats, titles)):
        r, c = divmod(i, cols)
        axes[r, 2 * c].imshow(im, interpolation="nearest")
        axes[r, 2 * c].set_title(_wrap(t), fontsize=7)       # names whole, wrapped
        mappable = _overlay_axes(axes[r, 2 * c + 1], im, h, alpha, cmap)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if mappable is not None:
        _colorbar(fig, mappable, axes.ravel().tolist())
    return figure_bytes(fig, dpi=100)


# ------------------------------------------------------------------------------- job pieces
def to_display(x: torch.Tensor, preprocess: dict) -> np.ndarray:
    """Preprocessed ``[3, H, W]`` → ``[H, W, 3]`` in [0, 1] (undo the normalisation)."""
    mean = torch.tensor(preprocess.get("mean", (0.0, 0.0, 0.0)), dtype=x.dtype)[:, None, None]
    std = torch.tensor(preprocess.get("std", (1.0, 1.0, 1.0)), dtype=x.dtype)[:, None, None]
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def mask_to_input(mask_img, lm) -> np.ndarray:
    """A mask image (source resolution) → boolean ``[H, W]`` at the model input, through the model's
    own preprocessing (same resize and crop), foreground where the resampled value is ≥ 0.5."""
    from PIL import Image

    m = np.asarray(mask_img.convert("L")) > 127
    rgb = Image.fromarray((m * 255).astype(np.uint8)).convert("RGB")
    x = lm.transform(rgb)
    return to_display(x, lm.preprocess)[..., 0] >= 0.5


def find_mask_file(masks_dir: str, image_id: str) -> Optional[str]:
    """``DIR/<image_id>.png``, else ``DIR/<image_id>`` (ids that are file names), else the id with its
    extension replaced by ``.png``."""
    root = os.path.realpath(masks_dir)
    cands = [image_id + ".png", image_id, os.path.splitext(image_id)[0] + ".png"]
    for c in cands:
        p = os.path.realpath(os.path.join(root, c))
        if os.path.commonpath([root, p]) != root:
            raise InputError(f"image id {image_id!r} points outside the masks directory {masks_dir!r} (an absolute "
                             "path or '..'): masks are only read from inside it")
        if os.path.isfile(p):
            return p
    return None


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s.replace("/", "__"))[:80]
