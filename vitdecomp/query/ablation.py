"""Mean-ablation curves and spurious-feature mitigation over a store (README “Query”).

Every classifier here is linear on the readout: ``logits = z Wᵀ + b`` with ``z = Σ_k c_k``
(a zero-shot text head for CLIP stores or aligned stores, a linear probe fitted on the stored
readouts, or the model's own linear head). Mean-ablating a set ``S`` of components replaces
``c_k`` by its mean ``μ_k`` over a reference split, so the ablated readout is
``z − Σ_{k∈S} (c_k − μ_k)`` and any number of ablation sets is evaluated in one pass over the
store after one pass for the means.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..config import OptionError
from ..errors import InputError
from ..fit.compalign import aligned_batches
from ..fit.probe import LinearHead, label_indices
from ..store.splits import check_column


# ------------------------------------------------------------------------------------ passes
def _batches(st, names, head: LinearHead, ids, aligner, columns=(), batch_size: int = 512):
    use_aligner = aligner if head.space == "aligned" else None
    if head.space == "aligned" and aligner is None and st.manifest["model"]["readout"]["space"] != "clip":
        raise InputError("a zero-shot head on a non-CLIP store needs a CompAlign aligner")
    return aligned_batches(st, use_aligner, components=names, ids=ids, columns=list(columns),
                           dtype=np.float64, batch_size=batch_size)


def _coefficient_space(st, head: LinearHead, aligner) -> bool:
    """Stream the stored columns directly, a compact store's coordinates as they are (README “Store
    layout”; :mod:`vitdecomp.store.stream`): no aligner in the way. Either layout."""
    return (head.space != "aligned" or aligner is None) and \
        not (head.space == "aligned" and st.manifest["model"]["readout"]["space"] != "clip")


def _small_ints(x: np.ndarray, top: int) -> np.ndarray:
    """``x`` as the smallest signed integer type that holds ``-1 … top`` (per-row labels and predictions
    are the only per-row state a pass keeps)."""
    return x.astype(np.int8 if top < 127 else np.int16 if top < 32_767 else np.int32, copy=False)


def _label_codes(col, classes: Sequence[str]) -> np.ndarray:
    """:func:`label_indices` of an Arrow column, without a Python object per row for string labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        idx = pc.index_in(col, value_set=pa.array([str(c) for c in classes], col.type))
        return _small_ints(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), len(classes))
    return _small_ints(label_indices(col.to_pylist(), classes), len(classes))


def component_means(st, names, head: LinearHead, ids, aligner=None) -> np.ndarray:
    """``μ [K, d]``: each component's mean over the rows ``ids`` (in the head's space)."""
    if _coefficient_space(st, head, aligner):         # means of the coordinates, mapped once
        from ..store.stream import blas_threads, stream_parts, sum64

        lay = st.compact_layout
        sums: dict = {}
        n = 0
        with blas_threads():
            for b in stream_parts(st, names, ids=ids, dtype=np.float64):
                for k, v in (*b.coef.items(), *b.full.items()):
                    sums[k] = sum64(v) + sums.get(k, 0.0)
                if b.offset is not None:
                    sums[""] = sum64(b.offset) + sums.get("", 0.0)
                n += b.n
        if n == 0:
            raise InputError(f"no rows to average over in {st.uri}")
        out = np.stack([lay.decode(k, (sums[k] / n)[None], None if "" not in sums else (sums[""] / n)[None],
                                   np.float64)[0] if lay is not None and k in lay.bases else sums[k] / n
                        for k in names])
        return out
    total, n = None, 0
    for b in _batches(st, names, head, ids, aligner):
        s = b.contributions.sum(0)
        total = s if total is None else total + s
        n += len(b.ids)
    if n == 0:
        raise InputError(f"no rows to average over in {st.uri}")
    return total / n


def evaluate_ablations(st, names, head: LinearHead, masks: dict[str, np.ndarray], means: np.ndarray, ids,
                       label_column: str, group_column: Optional[str] = None, aligner=None) -> dict:
    """Predictions of ``head`` on rows ``ids`` with each mask's components mean-ablated.

    Returns ``{"labels": [n], "groups": [n] (or None), "pred": {mask: [n]}}``."""
    labels, groups, preds = [], [], {m: [] for m in masks}
    cols = [label_column] + ([group_column] if group_column else [])
    if _coefficient_space(st, head, aligner):         # per-component logits from the stored columns
        from ..store.compact import CoefficientMap
        from ..store.stream import blas_threads, stream_parts

        cmap = CoefficientMap(st.compact_layout, names, head.W)
        mean_logits = means @ head.W.T                                        # [K, C]
        C = len(head.classes)
        with blas_threads():
            for b in stream_parts(st, names, ids=ids, columns=cols, dtype=np.float64):
                lk = cmap(b.coef, b.full, b.offset)                           # [b, K, C]
                full = lk.sum(1) + head.b
                labels.append(_label_codes(b.columns[label_column], head.classes))
                if group_column:
                    groups += [str(v) for v in b.columns[group_column].to_pylist()]
                dev = lk - mean_logits[None]
                for m, mask in masks.items():
                    preds[m].append(_small_ints((full - dev[:, mask].sum(1) if mask.any() else full).argmax(1), C))
        if not labels:
            raise InputError(f"no rows to evaluate in {st.uri}")
        return {"labels": np.concatenate(labels), "groups": groups if group_column else None,
                "pred": {m: np.concatenate(p) for m, p in preds.items()}}
    for b in _batches(st, names, head, ids, aligner, cols):
        c = b.contributions
        z = c.sum(1)
        labels.append(label_indices(b.columns[label_column].to_pylist(), head.classes))
        if group_column:
            groups += [str(v) for v in b.columns[group_column].to_pylist()]
        dev = c - means[None]
        for m, mask in masks.items():
            zm = z - dev[:, mask].sum(1) if mask.any() else z
            preds[m].append(head.logits(zm).argmax(1))
    if not labels:
        raise InputError(f"no rows to evaluate in {st.uri}")
    return {"labels": np.concatenate(labels), "groups": groups if group_column else None,
            "pred": {m: np.concatenate(p) for m, p in preds.items()}}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    ok = labels >= 0
    return float((pred[ok] == labels[ok]).mean()) if ok.any() else float("nan")


def group_accuracy(pred: np.ndarray, labels: np.ndarray, classes: Sequence[str], groups: Sequence[str]) -> dict:
    """Accuracy per (label, group) pair, the worst group and the unweighted mean over groups."""
    acc, count = {}, {}
    for p, y, g in zip(pred, labels, groups):
        if y < 0:
            continue
        key = f"{classes[y]} | {g}"
        acc[key] = acc.get(key, 0) + int(p == y)
        count[key] = count.get(key, 0) + 1
    per = {k: acc[k] / count[k] for k in sorted(acc)}
    if not per:
        raise InputError("no labelled rows to evaluate")
    return {"groups": per, "counts": {k: count[k] for k in sorted(count)}, "worst": min(per.values()),
            "mean": float(np.mean(list(per.values())))}


# ------------------------------------------------------------------------------------ curves
def layer_units(components, names: Sequence[str]) -> list[Optional[int]]:
    """Distinct layers in model order: ``None`` for ``embed``, then block indices."""
    byname = {c.name: c for c in components}
    blocks = sorted({byname[n].block for n in names if byname[n].block is not None})
    return ([None] if any(byname[n].kind == "embed" for n in names) else []) + blocks


KINDS = {"all": None, "attn": ("head", "attn", "attn_pool"), "mlp": ("mlp",), "conv": ("conv",)}


def ablation_masks(components, names: Sequence[str], order: str = "reverse",
                   kinds: Sequence[str] = ("all", "attn", "mlp")) -> list[dict]:
    """The ablation sets of the curves: cumulative over layers (from the last, or from the first with
    ``order="forward"``) and per layer, for each kind of component. ``bias`` is never ablated."""
    byname = {c.name: c for c in components}
    units = layer_units(components, names)
    seq = list(reversed(units)) if order == "reverse" else units

    def member(n, kind, layers):
        c = byname[n]
        if c.kind == "bias":
            return False
        layer = None if c.kind == "embed" else c.block
        if layer not in layers:
            return False
        return KINDS[kind] is None or c.kind in KINDS[kind]

    out = [{"curve": "baseline", "kind": "none", "step": 0, "layer": None,
            "mask": np.zeros(len(names), bool)}]
    for kind in kinds:
        if kind not in KINDS:
            raise OptionError("kinds", f"unknown component kind {kind!r}; kinds: {sorted(KINDS)}")
        if not any(member(n, kind, set(units)) for n in names):
            continue
        for j in range(1, len(seq) + 1):
            mask = np.array([member(n, kind, set(seq[:j])) for n in names])
            out.append({"curve": "cumulative", "kind": kind, "step": j, "layer": seq[j - 1], "mask": mask})
        for u in units:
            mask = np.array([member(n, kind, {u}) for n in names])
            if mask.any():
                out.append({"curve": "per_layer", "kind": kind, "step": 0, "layer": u, "mask": mask})
    return out


def ablation_curves(st, head: LinearHead, label_column: str, *, ids=None, mean_ids=None, aligner=None,
                    components: Optional[Sequence[str]] = None, order: str = "reverse",
                    kinds: Sequence[str] = ("all", "attn", "mlp")):
    """The curves' table (pyarrow) and the rows as dicts."""
    import pyarrow as pa

    check_column(st, label_column, "label_column")
    names = list(components) if components else (aligner.names if aligner is not None and head.space == "aligned"
                                                 else st.names)
    sets = ablation_masks(st.components, names, order, kinds)
    means = component_means(st, names, head, mean_ids if mean_ids is not None else ids, aligner)
    ev = evaluate_ablations(st, names, head, {i: s["mask"] for i, s in enumerate(sets)}, means, ids, label_column,
                            aligner=aligner)
    rows = []
    for i, s in enumerate(sets):
        rows.append({"curve": s["curve"], "kind": s["kind"], "step": s["step"],
                     "layer": "embed" if s["layer"] is None and s["curve"] != "baseline" else
                     (None if s["layer"] is None else str(s["layer"])),
                     "ablated": int(s["mask"].sum()), "accuracy": accuracy(ev["pred"][i], ev["labels"]),
                     "components": [n for n, m in zip(names, s["mask"]) if m]})
    return pa.Table.from_pylist(rows), rows, int((ev["labels"] >= 0).sum())


def plot_curves(rows: list[dict], title: str):
    """The ablation curves as a matplotlib figure (cumulative | per layer); the job saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r["accuracy"] for r in rows if r["curve"] == "baseline")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in dict.fromkeys(r["kind"] for r in rows if r["curve"] != "baseline"):
        cum = [r for r in rows if r["curve"] == "cumulative" and r["kind"] == kind]
        axes[0].plot([0] + [r["step"] for r in cum], [base] + [r["accuracy"] for r in cum], marker="o", label=kind)
        per = [r for r in rows if r["curve"] == "per_layer" and r["kind"] == kind]
        axes[1].plot([r["layer"] for r in per], [r["accuracy"] for r in per], marker="o", label=kind)
    for ax in axes:
        ax.axhline(base, color="gray", ls="--", lw=1, label="no ablation")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    axes[0].set_xlabel("layers mean-ablated (cumulative)")
    axes[0].set_title("cumulative")
    axes[1].set_xlabel("layer mean-ablated alone")
    axes[1].set_title("per layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ mitigation
def signed_push(st, names, head: LinearHead, ids, label_column: str, group_column: str, means: np.ndarray,
                aligner=None) -> np.ndarray:
    """README “The toy world”'s label-aware ranking: each component's mean push of the logits towards the class the
    row's group (spurious attribute) predicts, ``⟨c_k − μ_k, w_ĝ − mean_{c≠ĝ} w_c⟩``, where ĝ is the
    class the head predicts most often for that group value on these rows."""
    ev = evaluate_ablations(st, names, head, {"none": np.zeros(len(names), bool)}, means, ids, label_column,
                            group_column, aligner)
    C = len(head.classes)
    assoc = {}
    for g in set(ev["groups"]):
        sel = np.array([x == g for x in ev["groups"]])
        assoc[g] = int(np.bincount(ev["pred"]["none"][sel], minlength=C).argmax())
    dirs = {c: head.W[c] - (head.W.sum(0) - head.W[c]) / max(1, C - 1) for c in set(assoc.values())}
    total, n = np.zeros(len(names)), 0
    for b in _batches(st, names, head, ids, aligner, [group_column]):
        g = [assoc[str(v)] for v in b.columns[group_column].to_pylist()]
        d = np.stack([dirs[x] for x in g])                                   # [b, d]
        total += np.einsum("bkd,bd->k", b.contributions - means[None], d)
        n += len(b.ids)
    return total / max(n, 1)


def plot_mitigation(results: dict, title: str):
    """Per-group accuracy before/after (and random) as a matplotlib figure; the job saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ("before", "after", "random") if s in results]
    groups = list(results["before"]["groups"]) + ["worst group", "mean group"]
    x = np.arange(len(groups))
    w = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(groups), 3.8))
    for i, s in enumerate(settings):
        r = results[s]
        vals = [r["groups"].get(g, np.nan) for g in groups[:-2]] + [r["worst"], r["mean"]]
        bars = ax.bar(x + (i - (len(settings) - 1) / 2) * w, vals, w, label=s)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def mitigate(st, head: LinearHead, label_column: str, group_column: str, *, fit_ids, eval_ids, k: int = 10,
             scores: Optional[np.ndarray] = None, names: Optional[Sequence[str]] = None, aligner=None,
             random_draws: int = 5, seed: int = 0, means: Optional[np.ndarray] = None) -> dict:
    """Mean-ablate the ``k`` components with the largest ``scores`` (means over ``fit_ids``, or the
    given ``means`` computed there) and report per-group accuracy on ``eval_ids`` before, after and
    for random ``k``-sets (a control)."""
    check_column(st, label_column, "label_column")
    check_column(st, group_column, "group_column")
    names = list(names) if names is not None else st.names
    eligible = np.array([n != "bias" for n in names])
    order = [i for i in np.argsort(-np.asarray(scores), kind="stable") if eligible[i]]
    if k < 1 or k > len(order):
        raise OptionError("k", f"must be between 1 and {len(order)} (the ablatable components), got {k}")
    top = order[:k]
    if means is None:
        means = component_means(st, names, head, fit_ids, aligner)
    masks = {"before": np.zeros(len(names), bool), "after": np.isin(np.arange(len(names)), top)}
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(eligible)
    for r in range(random_draws):
        masks[f"random{r}"] = np.isin(np.arange(len(names)), rng.choice(pool, k, replace=False))
    ev = evaluate_ablations(st, names, head, masks, means, eval_ids, label_column, group_column, aligner)
    out = {m: group_accuracy(ev["pred"][m], ev["labels"], head.classes, ev["groups"]) for m in ("before", "after")}
    if random_draws:
        rs = [group_accuracy(ev["pred"][f"random{r}"], ev["labels"], head.classes, ev["groups"])
              for r in range(random_draws)]
        out["random"] = {"groups": {g: float(np.mean([x["groups"][g] for x in rs])) for g in rs[0]["groups"]},
                         "counts": rs[0]["counts"], "worst": float(np.mean([x["worst"] for x in rs])),
                         "mean": float(np.mean([x["mean"] for x in rs]))}
    out["ablated"] = [names[i] for i in top]
    out["accuracy"] = {m: accuracy(ev["pred"][m], ev["labels"]) for m in ("before", "after")}
    return out


def rows_of(results: dict) -> list[dict]:
    rows = []
    for s in ("before", "after", "random"):
        if s not in results:
            continue
        r = results[s]
        for g, a in r["groups"].items():
            rows.append({"setting": s, "group": g, "images": int(r["counts"].get(g, 0)), "accuracy": float(a)})
        rows.append({"setting": s, "group": "worst group", "images": None, "accuracy": float(r["worst"])})
        rows.append({"setting": s, "group": "mean group", "images": None, "accuracy": float(r["mean"])})
    return rows
