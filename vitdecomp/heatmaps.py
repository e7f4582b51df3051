"""Token heatmaps and zero-shot segmentation (SPEC §7), computed on demand from the source images.

For chosen attention heads (or whole attention layers = the sum of their heads) the engine returns
each head's per-source-token direct effect on the readout, ``c_{k,m} [d]`` (SPEC §2.1, token
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

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import names as N
from .errors import InputError
from .models import rebuild_model  # noqa: F401  (re-exported: the store's model, checked)

log = logging.getLogger(__name__)

THRESHOLD_RULE = "per-image mean of the min-max normalised map"
METRICS = ("pixacc", "iou_fg", "iou_bg", "miou", "ap", "map")


# ------------------------------------------------------------------------------- components
def expand_components(model, components: Sequence[str], blocks=None) -> dict[str, list[str]]:
    """Requested name → the head names whose token maps make it up.

    ``<attn>.head.<h>`` is one head; ``<attn>`` (a whole attention layer) is all of its heads.
    Unknown names raise with close matches; MLPs, ``embed`` and ``bias`` have no per-token form.
    """
    from .engine import components_for

    if not components:
        raise InputError("no components given: pass head names such as 'blocks.3.attn.head.0' or attention "
                         "layers such as 'blocks.3.attn' (--components)")
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
    import vitdecomp as vd

    groups = expand_components(lm, components, blocks)
    wanted = list(dict.fromkeys(h for hs in groups.values() for h in hs))
    dec = vd.decompose(lm, images, blocks=blocks, heads=True, tokens=wanted, convention=convention,
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
        convention, blocks, normalize: as the store was decomposed (SPEC §2.2; ``blocks`` decides
            which heads exist; ``normalize`` divides by ‖z‖).
    """
    return compute_heatmaps(lm, images, components, direction, aligner, convention, blocks, normalize).maps


def _classifier(lm) -> torch.nn.Linear:
    model = getattr(lm, "model", lm)
    if getattr(lm, "library", "timm") != "timm" or not hasattr(model, "get_classifier"):
        raise InputError(f"{getattr(lm, 'name', type(model).__name__)} has no classifier head: --class-index needs a "
                         "timm classifier; use --text for CLIP models")
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise InputError(f"{getattr(lm, 'name', '')}: the classifier head is {type(head).__name__}, not a Linear "
                         "layer (num_classes=0?); --class-index needs a linear classifier")
    return head


def class_direction(lm, index: int) -> np.ndarray:
    """Weight row ``[d]`` of class ``index`` in a timm classifier head (the class logit's direction on
    the pre-logits readout; its bias is input-independent and dropped)."""
    head = _classifier(lm)
    k = int(index)
    if not 0 <= k < head.out_features:
        raise InputError(f"--class-index {k} is out of range: the classifier has classes 0..{head.out_features - 1}")
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
def _overlay_axes(ax, image: np.ndarray, heat: np.ndarray, alpha: float, cmap: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.imshow(normalise(heat), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def overlay_png(image: np.ndarray, heat: np.ndarray, path: str, title: str = "", mask: Optional[np.ndarray] = None,
                alpha: float = 0.5, cmap: str = "jet") -> str:
    """Side by side: the image (as the model saw it) | the normalised heatmap over it [| the mask]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + (mask is not None)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_axis_off()
    _overlay_axes(axes[1], image, heat, alpha, cmap)
    if mask is not None:
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[2].set_axis_off()
        axes[2].set_title("mask", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_png(images: Sequence[np.ndarray], heats: Sequence[np.ndarray], titles: Sequence[str], path: str,
             title: str = "", cols: int = 4, alpha: float = 0.5, cmap: str = "jet") -> str:
    """One figure for the run: image | overlay pairs, ``cols`` pairs per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.0 * 2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (im, h, t) in enumerate(zip(images, heats, titles)):
        r, c = divmod(i, cols)
        axes[r, 2 * c].imshow(im, interpolation="nearest")
        axes[r, 2 * c].set_title(t[:28], fontsize=7)
        _overlay_axes(axes[r, 2 * c + 1], im, h, alpha, cmap)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- job pieces
def read_image(uri: str, s3=None):
    """A source image as RGB PIL (local path, s3://, or a WebDataset member ``shard.tar#key``)."""
    import tarfile

    from PIL import Image

    from .storage import resolve

    path, _, key = uri.partition("#")
    fs, p = resolve(path, s3)
    with fs.open_input_file(p) as f:
        data = f.read()
    if key:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.rsplit(".", 1)[0] == key and
                           m.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp", "bmp", "gif")), None)
            if member is None:
                raise FileNotFoundError(f"{uri}: no image member {key!r} in the shard")
            data = tar.extractfile(member).read()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


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
    cands = [image_id + ".png", image_id, os.path.splitext(image_id)[0] + ".png"]
    for c in cands:
        p = os.path.join(masks_dir, c)
        if os.path.isfile(p):
            return p
    return None


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s.replace("/", "__"))[:80]


# ------------------------------------------------------------------------------------- job
@dataclass
class HeatmapJob:
    store: str = ""
    out: str = ""
    components: Optional[list] = None
    image_ids: Optional[list] = None
    top_n: Optional[int] = None
    retrieval: Optional[str] = None
    text: Optional[str] = None
    class_index: Optional[str] = None
    aligner: Optional[str] = None
    checkpoint: Optional[str] = None
    clip: Optional[str] = None
    clip_pretrained: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    mask_column: Optional[str] = None
    masks_dir: Optional[str] = None
    batch_size: int = 16
    device: str = "cpu"
    cache_dir: Optional[str] = None
    s3_endpoint: Optional[str] = None


HELP = {
    "store": "the store written by `vitdecomp decompose`; its manifest decides model, weights, preprocessing, "
             "blocks and convention",
    "out": "output directory (heatmaps.parquet, heatmaps/*.png, heatmap_grid.png, segmentation.parquet)",
    "components": "attention heads (blocks.3.attn.head.0) and/or whole attention layers (blocks.3.attn); "
                  "their token maps are summed",
    "image_ids": "images of the store to map (by image_id)",
    "top_n": "map the first N images: of --retrieval's ranking, else of the store's sorted ids (default 8 "
             "when --image-ids is not given)",
    "retrieval": "a retrieval.parquet (from `vitdecomp query retrieve`) whose top --top-n images are mapped",
    "text": "project on this text's CLIP embedding (CLIP stores, or with --aligner)",
    "class_index": "project on the classifier's weight row of this class (timm classifiers); 'pred': each "
                   "image's predicted class",
    "aligner": "CompAlign artefact mapping a non-CLIP store into its teacher's CLIP space (with --text)",
    "checkpoint": "the local weights file the store was made with (its SHA-256 must match the manifest's)",
    "clip": "open_clip text model (default: the store's CLIP or the aligner's teacher)",
    "clip_pretrained": "its weights tag", "clip_checkpoint": "its local weights file",
    "mask_column": "store column with each image's foreground-mask URI (or PNG bytes): adds segmentation metrics",
    "masks_dir": "folder with foreground masks DIR/<image_id>.png: adds segmentation metrics",
    "batch_size": "images per model call (default 16)", "device": "cpu (default), cuda or auto",
    "cache_dir": "text-embedding cache (default ~/.cache/vitdecomp/text)",
    "s3_endpoint": "S3-compatible endpoint for s3:// stores and images",
}



def add_parser(qsub) -> None:
    """Register ``vitdecomp query heatmap`` on the query subcommands."""
    from .decompose_job import add_job_parser

    add_job_parser(qsub, "heatmap", HeatmapJob, HELP, run_heatmap,
                   help="token heatmaps of chosen heads on a text or class logit, overlays, segmentation metrics",
                   description="Recompute per-token contributions of chosen heads for chosen images of a store "
                               "(its model rebuilt from the manifest), project them on a text embedding or a "
                               "class logit, upsample and overlay them; with masks, pixel accuracy, mIoU and AP.")


def _select_ids(job: HeatmapJob, st) -> list[str]:
    import difflib

    if job.image_ids and (job.top_n is not None or job.retrieval):
        raise InputError("pass either --image-ids or --top-n/--retrieval, not both")
    all_ids = st.ids()
    if job.image_ids:
        ids = [str(i) for i in job.image_ids]
        have = set(all_ids)
        missing = [i for i in ids if i not in have]
        if missing:
            close = difflib.get_close_matches(missing[0], all_ids, n=3)
            raise InputError(f"image ids {missing[:5]} are not in {st.uri} ({len(all_ids)} images); "
                             f"close to {missing[0]!r}: {close or 'none'}")
        return list(dict.fromkeys(ids))
    n = 8 if job.top_n is None else int(job.top_n)
    if n < 1:
        raise InputError(f"--top-n must be positive, got {n}")
    if job.retrieval:
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(job.retrieval)
        except (OSError, ValueError) as e:
            raise InputError(f"--retrieval {job.retrieval!r}: {e}") from None
        if "image_id" not in t.column_names:
            raise InputError(f"--retrieval {job.retrieval!r} has no image_id column (columns: {t.column_names})")
        rows = t.to_pylist()
        if "rank" in t.column_names:
            rows.sort(key=lambda r: r["rank"])
        ids = [r["image_id"] for r in rows][:n]
        missing = [i for i in ids if i not in set(all_ids)]
        if missing:
            raise InputError(f"--retrieval lists ids {missing[:3]} that are not in {st.uri}: it was made from "
                             "another store")
        return ids
    return sorted(all_ids)[:n]


def _parse_class_index(value) -> Union[int, str, None]:
    if value is None:
        return None
    if str(value).strip().lower() in ("pred", "predicted"):
        return "pred"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"--class-index {value!r}: a class number (0, 1, …) or 'pred'") from None


def _directions(job: HeatmapJob, st, lm, aligner, readouts: np.ndarray) -> tuple[np.ndarray, list, list[str]]:
    """Per image: direction ``[n, d]``, class index (or None) and a label of the target."""
    n = len(readouts)
    k = _parse_class_index(job.class_index)
    if k is not None:
        if k == "pred":
            ks = [int(c) for c in predicted_classes(lm, readouts)]
            return np.stack([class_direction(lm, c) for c in ks]), ks, [f"class {c} (predicted)" for c in ks]
        u = class_direction(lm, k)
        return np.repeat(u[None], n, 0), [k] * n, [f"class {k}"] * n
    u = _text_direction(job, st, lm, aligner)
    return np.repeat(u[None], n, 0), [None] * n, [f"text {job.text!r}"] * n


def _text_direction(job: HeatmapJob, st, lm, aligner) -> np.ndarray:
    from .fit_job import resolve_text_model
    from .text import encode_texts

    if aligner is None and lm.library == "open_clip":
        if job.clip and job.clip != lm.name:
            raise InputError(f"the text model {job.clip} is not the CLIP space of these contributions ({lm.name}); "
                             "texts must be encoded by the same model")
        text_lm = lm                    # the store's own CLIP (same weights, seed included)
    else:
        torch.manual_seed(0)            # as DecomposeWorker builds a random-init teacher
        text_lm = resolve_text_model(st, aligner, job.clip, job.clip_pretrained, job.clip_checkpoint,
                                     what="a text heatmap")
    cache = job.cache_dir or os.path.expanduser("~/.cache/vitdecomp/text")
    return encode_texts(text_lm, [job.text], cache_dir=cache)[0].astype(np.float64)


def _load_masks(job: HeatmapJob, rows: list[dict], s3) -> Optional[list]:
    """The mask images (PIL, source resolution) of ``rows``, or None without mask options."""
    from PIL import Image

    if not (job.mask_column or job.masks_dir):
        return None
    out = []
    for r in rows:
        try:
            if job.mask_column:
                v = r[job.mask_column]
                if v is None:
                    raise InputError(f"image {r['image_id']!r} has no mask in column {job.mask_column!r}")
                img = Image.open(io.BytesIO(v)) if isinstance(v, (bytes, bytearray)) else read_image(str(v), s3)
            else:
                p = find_mask_file(job.masks_dir, r["image_id"])
                if p is None:
                    raise InputError(f"no mask for image {r['image_id']!r} in {job.masks_dir} (expected "
                                     f"{os.path.join(job.masks_dir, r['image_id'] + '.png')})")
                img = Image.open(p)
            img.load()
            out.append(img)
        except (OSError, FileNotFoundError) as e:
            raise InputError(f"cannot read the mask of {r['image_id']!r}: {e}") from None
    return out


def run_heatmap(job: HeatmapJob) -> dict:
    """``vitdecomp query heatmap``: token heatmaps of chosen images and components, overlays and
    (with masks) segmentation metrics. Returns the tables, the maps and the output paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .compalign import Aligner, check_compatible
    from .decompose_job import parse_blocks
    from .storage import S3Settings, arrow_to_vectors, open_store

    if not (job.store and job.out):
        raise InputError("--store and --out are required")
    if not job.components:
        raise InputError("--components is required: attention heads (blocks.3.attn.head.0) or layers (blocks.3.attn)")
    if (job.text is None) == (job.class_index is None):
        raise InputError("pass exactly one of --text (a CLIP text direction) and --class-index (a classifier row)")
    if job.class_index is not None and job.aligner:
        raise InputError("--class-index projects on the model's own classifier; --aligner (CLIP space) goes with "
                         "--text only")
    _parse_class_index(job.class_index)
    if job.mask_column and job.masks_dir:
        raise InputError("pass either --mask-column or --masks-dir, not both")
    st = open_store(job.store, s3_endpoint=job.s3_endpoint)
    m = st.manifest
    s3 = S3Settings.from_env(job.s3_endpoint)
    opts = m["options"]
    blocks, convention, normalize = parse_blocks(opts.get("blocks")), opts.get("convention", "centered"), \
        bool(opts.get("normalize"))
    if job.mask_column and job.mask_column not in st._schema().names:
        raise InputError(f"--mask-column {job.mask_column!r} is not a column of {st.uri} "
                         f"(columns: {[c for c in st._schema().names if not c.startswith('c_')]})")
    device = job.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = rebuild_model(m, job.checkpoint, device)
    groups = expand_components(lm, list(job.components), blocks)        # unknown names fail before any work
    aligner = Aligner.load(job.aligner) if job.aligner else None
    if aligner is not None:
        check_compatible(aligner, st)
        for name, hs in groups.items():
            for h in hs:
                _aligner_map(aligner, h, name)
    if job.class_index is not None:
        _classifier(lm)                                                  # no classifier: fail before reading
    ids = _select_ids(job, st)
    cols = ["image_id", "uri", "readout"] + ([job.mask_column] if job.mask_column else [])
    table = st.read(columns=cols, ids=ids)
    by_id = {r["image_id"]: r for r in table.select([c for c in cols if c != "readout"]).to_pylist()}
    stored = dict(zip(table.column("image_id").to_pylist(), arrow_to_vectors(table.column("readout"), np.float64)))
    rows = [by_id[i] for i in ids]
    for r in rows:
        if not r["uri"]:
            raise InputError(f"image {r['image_id']!r} has no source URI in {st.uri} (it was read from a bytes "
                             "column): heatmaps recompute tokens from the source images")
    mask_imgs = _load_masks(job, rows, s3)
    directions, classes, targets = _directions(job, st, lm, aligner, np.stack([stored[i] for i in ids]))
    target = targets[0] if len(set(targets)) == 1 else "each image's predicted class"

    os.makedirs(os.path.join(job.out, "heatmaps"), exist_ok=True)
    # fp16 storage, or TF32 convolutions on a GPU, move the readout by ~1e-3; a different model or image by O(1)
    tol = 2e-2 if m.get("dtype") == "fp16" or str(device).startswith("cuda") else 1e-3
    maps, ups, disp, pngs, masks = [], [], [], [], None if mask_imgs is None else []
    bs = max(1, int(job.batch_size))
    for s in range(0, len(rows), bs):
        chunk = rows[s:s + bs]
        try:
            srcs = [read_image(r["uri"], s3) for r in chunk]
        except (OSError, FileNotFoundError) as e:
            raise InputError(f"cannot read a source image of {[r['image_id'] for r in chunk]}: {e}") from None
        x = torch.stack([lm.transform(im) for im in srcs]).to(device)
        for j, (r, im) in enumerate(zip(chunk, srcs)):
            if mask_imgs is not None:
                mk = mask_imgs[s + j]
                if mk.size != im.size:
                    raise InputError(f"the mask of {r['image_id']!r} is {mk.size[0]}x{mk.size[1]} but the image is "
                                     f"{im.size[0]}x{im.size[1]}: masks must have the source image's size")
                masks.append(mask_to_input(mk, lm))
        res = compute_heatmaps(lm, x, list(job.components), directions[s:s + bs], aligner, convention, blocks,
                               normalize)
        for j, r in enumerate(chunk):
            z_s = stored[r["image_id"]]
            err = float(np.linalg.norm(res.readout[j] - z_s) / max(np.linalg.norm(z_s), 1e-30))
            if err > tol:
                raise InputError(f"the rebuilt {m['model']['name']} does not reproduce the stored readout of image "
                                 f"{r['image_id']!r} (relative difference {err:.2e} > {tol:g}): the weights, "
                                 "preprocessing or source image differ from those the store was made with")
        up = upsample(res.maps, x.shape[-2:])
        for j, r in enumerate(chunk):
            maps.append(res.maps[j])
            ups.append(up[j])
            disp.append(to_display(x[j], lm.preprocess))
    seg_rows = []
    for i, r in enumerate(rows):
        mk = masks[i] if masks is not None else None
        met = segmentation_metrics(ups[i], mk) if mk is not None else None
        if met is not None:
            seg_rows.append({"image_id": r["image_id"], **met})
        title = f"{r['image_id']} — {targets[i]}" + (f" — mIoU {met['miou']:.2f} AP {met['ap']:.2f}" if met else "")
        p = os.path.join(job.out, "heatmaps", f"{i:04d}_{_safe(r['image_id'])}.png")
        pngs.append(overlay_png(disp[i], ups[i], p, title, mask=mk))
    grid_path = grid_png(disp[:32], ups[:32], [r["image_id"] for r in rows[:32]],
                         os.path.join(job.out, "heatmap_grid.png"),
                         f"{m['model']['name']}: {' + '.join(job.components)} on {target}")
    gh, gw = maps[0].shape
    peaks = [divmod(int(np.argmax(mp)), gw) for mp in maps]
    comp_set = list(job.components)
    out_cols = {
        "image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows],
        "components": pa.array([comp_set] * len(rows), pa.list_(pa.string())),
        "target": targets, "text": [job.text] * len(rows),
        "class_index": pa.array(classes, pa.int64()),
        "grid_h": [gh] * len(rows), "grid_w": [gw] * len(rows),
        "heatmap": pa.array([mp.ravel().tolist() for mp in maps], pa.list_(pa.float64())),
        "peak_row": [p[0] for p in peaks], "peak_col": [p[1] for p in peaks],
        "png": [os.path.relpath(p, job.out) for p in pngs],
    }
    for k in METRICS:
        out_cols[k] = pa.array([sr[k] for sr in seg_rows] if masks is not None else [None] * len(rows), pa.float64())
    heat_table = pa.table(out_cols)
    pq.write_table(heat_table, os.path.join(job.out, "heatmaps.parquet"))
    seg_table, summary = None, None
    if masks is not None:
        summary = summarise(seg_rows)
        keep = ["image_id", *METRICS, "threshold", "foreground_fraction"]
        recs = [{"kind": "image", **{k: sr[k] for k in keep}} for sr in seg_rows]
        recs.append({"kind": "mean", "image_id": None, **{k: summary[f"mean_{k}"] for k in METRICS},
                     "threshold": None, "foreground_fraction": float(np.mean([sr["foreground_fraction"]
                                                                              for sr in seg_rows]))})
        recs.append({"kind": "pooled", "image_id": None, "pixacc": summary["pooled_pixacc"],
                     "miou": summary["pooled_miou"], **{k: None for k in METRICS if k not in ("pixacc", "miou")},
                     "threshold": None, "foreground_fraction": None})
        seg_table = pa.Table.from_pylist(recs, schema=pa.schema(
            [("kind", pa.string()), ("image_id", pa.string())] + [(k, pa.float64()) for k in METRICS] +
            [("threshold", pa.float64()), ("foreground_fraction", pa.float64())]))
        pq.write_table(seg_table, os.path.join(job.out, "segmentation.parquet"))
    meta = {"store": st.uri, "model": m["model"]["name"], "components": comp_set,
            "heads": {k: v for k, v in groups.items()}, "target": target, "aligner": job.aligner,
            "images": len(rows), "grid": [gh, gw], "threshold_rule": THRESHOLD_RULE, "segmentation": summary}
    with open(os.path.join(job.out, "heatmap.json"), "w") as f:
        json.dump(meta, f, indent=2)
    _write_report_section(job.out, meta, grid_path, masks is not None)
    print(f"heatmap: {len(rows)} images, {' + '.join(comp_set)} on {target} ({gh}x{gw} patches) -> "
          f"{job.out}/heatmaps.parquet, {grid_path}")
    if summary:
        print(f"heatmap: segmentation over {summary['images']} images: pixAcc {summary['mean_pixacc']:.4f} "
              f"mIoU {summary['mean_miou']:.4f} AP {summary['mean_ap']:.4f} mAP {summary['mean_map']:.4f} "
              f"(pooled pixAcc {summary['pooled_pixacc']:.4f}, mIoU {summary['pooled_miou']:.4f})")
    return {"table": heat_table, "segmentation": seg_table, "summary": summary, "maps": np.stack(maps),
            "upsampled": np.stack(ups), "ids": ids, "pngs": pngs, "grid": grid_path, "target": target}


def _write_report_section(out: str, meta: dict, grid_path: str, has_masks: bool) -> None:
    """The run's section of ``out/report.html``."""
    title = "Token heatmaps" + (" and zero-shot segmentation" if has_masks else "")
    summary = (f"{' + '.join(meta['components'])} of {meta['model']} projected on {meta['target']}, "
               f"per patch ({meta['grid'][0]}x{meta['grid'][1]}), upsampled and overlaid on {meta['images']} images.")
    facts = {"store": meta["store"], "components": ", ".join(meta["components"]), "target": meta["target"],
             "images": meta["images"]}
    tables = [{"path": "heatmaps.parquet", "caption": "one row per image (peak patch, PNG)", "max_rows": 20}]
    if has_masks:
        seg = meta["segmentation"]
        facts.update({"pixAcc (mean)": round(seg["mean_pixacc"], 4), "mIoU (mean)": round(seg["mean_miou"], 4),
                      "AP (mean)": round(seg["mean_ap"], 4), "mAP fg/bg (mean)": round(seg["mean_map"], 4),
                      "threshold": THRESHOLD_RULE})
        tables.append({"path": "segmentation.parquet", "caption": "per-image segmentation metrics, mean and pooled",
                       "max_rows": 40})
    images = [{"path": os.path.relpath(grid_path, out), "caption": "image | heatmap overlay"}]
    from .report import write_report, write_section

    write_section(out, "heatmap", title, order=60, summary=summary, facts=facts, images=images, tables=tables)
    write_report(out)
